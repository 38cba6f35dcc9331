"""Configuration of a scaling study: :class:`StudyConfig`, read from YAML by
:func:`load_config` (safe YAML without aliases; errors name the file and the key).

YAML form (every key optional but ``models`` and ``sizes``)::

    models: [allegro, celli]        # registry names
    sizes: [4, 6]                   # NaCl grid sites per axis (N = n³) ...
    size_unit: grid_n               # ... or "atoms": sizes are N (perfect cubes)
    dtype: float32                  # float32 | float64
    devices: [1, 2]                 # devices per process
    processes: [1, 2]               # processes (jax.distributed on 127.0.0.1)
    mode: strong                    # strong (fixed batch) | weak (batch per worker)
    batch: 2                        # structures per step (strong; default: lcm of the
                                    # worker counts) or per worker (weak; default 1)
    repeats: 3                      # timed evaluations per point (median reported)
    hyperparams: {channels: 32}     # shared model keys, over presets.FULL_HYPERPARAMS
    model_extras: {celli: {n_pre: 1}}  # per-model keys, over presets.MODEL_EXTRAS
    spacing: 2.2                    # Å
    rattle: 0.05                    # Å, Gaussian displacement of each site
    seed: 0
    timeout_s: 3600                 # per (model, processes, devices) run
    memory_fraction: 0.85           # skip a point whose compiled need exceeds this
                                    # fraction of the available memory
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from celli_scale.study.presets import FULL_HYPERPARAMS, MODEL_EXTRAS, model_config


@dataclass(frozen=True)
class StudyConfig:
    """A scaling study (see the module docstring for the YAML form).

    Attributes:
      models: registry names. sizes: grid sites per axis (``size_unit="grid_n"``) or atom
      counts (``"atoms"``, perfect cubes). dtype: "float32" | "float64". devices: device
      counts per process. processes: process counts (``jax.distributed`` on 127.0.0.1);
      every (processes, devices) pair runs, with ``processes × devices`` workers.
      mode: "strong" (a fixed batch of ``batch`` structures, default the lcm of the
      worker counts) or "weak" (``batch`` structures per worker, default 1). repeats: timed
      evaluations per point. hyperparams / model_extras: over :data:`FULL_HYPERPARAMS` /
      :data:`MODEL_EXTRAS`. spacing, rattle (Å), seed. timeout_s: per subprocess.
      memory_fraction: of the available memory a point may need.
    """

    models: tuple[str, ...]
    sizes: tuple[int, ...]
    size_unit: str = "grid_n"
    dtype: str = "float32"
    devices: tuple[int, ...] = (1,)
    processes: tuple[int, ...] = (1,)
    mode: str = "strong"
    batch: int | None = None
    repeats: int = 3
    hyperparams: dict[str, Any] = field(default_factory=dict)
    model_extras: dict[str, dict[str, Any]] = field(default_factory=dict)
    spacing: float = 2.2
    rattle: float = 0.05
    seed: int = 0
    timeout_s: float = 3600.0
    memory_fraction: float = 0.85

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StudyConfig:
        """Validate a dict (from YAML); ValueError names the bad key."""
        from celli_scale import models as models_mod

        if not isinstance(d, dict):
            raise ValueError(f"scaling config must be a mapping, got {type(d).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(f"unknown scaling config key(s) {unknown}; known keys: {names}")
        for key in ("models", "sizes"):
            if key not in d:
                raise ValueError(f"scaling config key {key!r} is required")

        def int_list(key: str, minimum: int) -> tuple[int, ...]:
            v = d[key]
            v = [v] if isinstance(v, int) and not isinstance(v, bool) else v
            if (
                not isinstance(v, list | tuple)
                or not v
                or not all(
                    isinstance(x, int) and not isinstance(x, bool) and x >= minimum for x in v
                )
            ):
                raise ValueError(
                    f"scaling config key {key!r} must be a non-empty list of integers "
                    f">= {minimum}, got {v!r}"
                )
            return tuple(v)

        kw: dict[str, Any] = {}
        models = d["models"]
        models = [models] if isinstance(models, str) else models
        if not isinstance(models, list | tuple) or not models:
            raise ValueError(
                f"scaling config key 'models' must be a non-empty list, got {models!r}"
            )
        for m in models:
            if m not in models_mod.MODEL_NAMES:
                raise ValueError(
                    f"scaling config key 'models': unknown model {m!r}; "
                    f"choose from {list(models_mod.MODEL_NAMES)}"
                )
        kw["models"] = tuple(models)
        unit = d.get("size_unit", "grid_n")
        if unit not in ("grid_n", "atoms"):
            raise ValueError(
                f"scaling config key 'size_unit' must be 'grid_n' or 'atoms', got {unit!r}"
            )
        kw["size_unit"] = unit
        sizes = int_list("sizes", 2 if unit == "grid_n" else 8)
        if unit == "atoms":
            grid = []
            for n_atoms in sizes:
                n = round(n_atoms ** (1 / 3))
                if n**3 != n_atoms:
                    raise ValueError(
                        f"scaling config key 'sizes': {n_atoms} atoms is not a NaCl grid "
                        f"(n³ atoms); nearest: {n**3}"
                    )
                grid.append(n)
            sizes = tuple(grid)
        kw["sizes"] = tuple(sorted(set(sizes)))
        if "dtype" in d:
            if d["dtype"] not in ("float32", "float64"):
                raise ValueError(
                    f"scaling config key 'dtype' must be float32 or float64, got {d['dtype']!r}"
                )
            kw["dtype"] = d["dtype"]
        if "devices" in d:
            kw["devices"] = tuple(sorted(set(int_list("devices", 1))))
        if "processes" in d:
            kw["processes"] = tuple(sorted(set(int_list("processes", 1))))
        mode = d.get("mode", "strong")
        if mode not in ("strong", "weak"):
            raise ValueError(f"scaling config key 'mode' must be 'strong' or 'weak', got {mode!r}")
        kw["mode"] = mode
        workers = {p * n for p in kw.get("processes", (1,)) for n in kw.get("devices", (1,))}
        lcm = math.lcm(*workers) if mode == "strong" else 1
        if d.get("batch") is not None:
            b = d["batch"]
            if not isinstance(b, int) or isinstance(b, bool) or b < 1 or b % lcm:
                raise ValueError(
                    f"scaling config key 'batch' must be a positive multiple of every worker "
                    f"count (processes x devices, lcm {lcm}) in strong scaling, got {b!r}"
                )
            kw["batch"] = b
        if "repeats" in d:
            r = d["repeats"]
            if not isinstance(r, int) or isinstance(r, bool) or r < 1:
                raise ValueError(
                    f"scaling config key 'repeats' must be a positive integer, got {r!r}"
                )
            kw["repeats"] = r
        if "seed" in d:
            if not isinstance(d["seed"], int):
                raise ValueError(f"scaling config key 'seed' must be an integer, got {d['seed']!r}")
            kw["seed"] = d["seed"]
        for key, lo in (
            ("spacing", 0.0),
            ("rattle", -1e-300),
            ("timeout_s", 0.0),
            ("memory_fraction", 0.0),
        ):
            if key in d:
                v = d[key]
                if not isinstance(v, int | float) or isinstance(v, bool) or not v > lo:
                    raise ValueError(
                        f"scaling config key {key!r} must be a positive number, got {v!r}"
                    )
                kw[key] = float(v)
        if "hyperparams" in d:
            hp = d["hyperparams"] or {}
            if not isinstance(hp, dict):
                raise ValueError(f"scaling config key 'hyperparams' must be a mapping, got {hp!r}")
            bad = sorted(set(hp) - set(FULL_HYPERPARAMS) - {"envelope_p"})
            if bad:
                raise ValueError(
                    f"scaling config key 'hyperparams': unknown shared key(s) {bad}; known: "
                    f"{sorted(FULL_HYPERPARAMS)} (model-specific keys go in 'model_extras')"
                )
            kw["hyperparams"] = dict(hp)
        if "model_extras" in d:
            me = d["model_extras"] or {}
            if not isinstance(me, dict) or not all(
                k in models_mod.MODEL_NAMES and isinstance(v, dict) for k, v in me.items()
            ):
                raise ValueError(
                    "scaling config key 'model_extras' must map model names to mappings, "
                    f"got {me!r}"
                )
            kw["model_extras"] = {k: dict(v) for k, v in me.items()}
        cfg = cls(**kw)
        cfg.validate_models()
        return cfg

    def validate_models(self) -> None:
        """Check every model's full config and every point's size before anything runs:
        ValueError naming the model, the key or the size (and the memory a point would
        need at least), so a bad study fails at once instead of point by point."""
        from celli_scale import models as models_mod
        from celli_scale.memory import host_available_memory_bytes

        limit = host_available_memory_bytes()
        for model in self.models:
            cfg = self.model_config(model)
            try:
                mc = models_mod.make_config(cfg)
            except (TypeError, ValueError) as e:
                raise ValueError(f"scaling config, model {model!r}: {e}") from None
            for n in self.sizes:
                need = point_memory_floor(n, self.spacing, mc, self.batch_for(1))
                if need > limit:
                    raise ValueError(
                        f"scaling config, model {model!r}, size {n} (N = {n**3} atoms, "
                        f"r_cut {mc.r_cut:g} Å, spacing {self.spacing:g} Å): the edge features "
                        f"alone need at least {need / 2**30:.3g} GiB, more than this machine "
                        f"has available ({limit / 2**30:.1f} GiB); choose smaller sizes or r_cut"
                    )

    @property
    def worker_counts(self) -> tuple[int, ...]:
        return tuple(sorted({p * n for p in self.processes for n in self.devices}))

    def batch_for(self, workers: int) -> int:
        """Structures per step on ``workers`` workers (fixed in strong scaling, growing
        with the workers in weak scaling)."""
        if self.mode == "weak":
            return (self.batch or 1) * workers
        return self.batch_size

    @property
    def batch_size(self) -> int:
        """The strong-scaling batch (the per-worker batch in weak scaling)."""
        if self.batch is not None:
            return self.batch
        return math.lcm(*self.worker_counts) if self.mode == "strong" else 1

    def model_config(self, model: str) -> dict[str, Any]:
        """The full config dict of ``model`` in this study (presets, then the study's
        ``hyperparams`` and ``model_extras``)."""
        hp = {**FULL_HYPERPARAMS, **self.hyperparams}
        extras = {model: {**MODEL_EXTRAS.get(model, {}), **self.model_extras.get(model, {})}}
        return model_config(model, self.dtype, hp, extras)


def point_memory_floor(n: int, spacing: float, config: Any, batch: int = 1) -> float:
    """Lower bound (bytes) of one step's memory on ``batch`` NaCl grids of ``n³`` atoms:
    edges ≈ N · (4/3 π r_cut³ / spacing³) (periodic images included), each carrying at
    least one ``channels × (l_max + 1)²`` feature vector. A floor, not an estimate (the
    compiled program needs several times more): a point over the host's memory is refused
    before the study starts."""
    n_atoms = float(n) ** 3
    neighbours = 4.0 / 3.0 * math.pi * (float(config.r_cut) / float(spacing)) ** 3
    per_edge = config.channels * (config.l_max + 1) ** 2 * (8 if config.dtype == "float64" else 4)
    return batch * n_atoms * neighbours * per_edge


def load_config(path: str | os.PathLike) -> StudyConfig:
    """Read a YAML study config (:func:`celli_scale.config_io.load_yaml`: no aliases,
    ``1e3`` is a number); errors name the file and the key."""
    from celli_scale.config_io import load_yaml

    path = Path(path)
    data = load_yaml(path)
    try:
        return StudyConfig.from_dict(data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
