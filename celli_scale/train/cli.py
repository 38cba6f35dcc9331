"""``celli-scale train CONFIG.yaml`` and ``celli-scale evaluate MODEL DATA``.

The training config (YAML, ``yaml.safe_load`` semantics via
:func:`celli_scale.config_io.load_yaml`; unknown keys are an error naming them)::

    model: {name: allegro, r_cut: 4.0, ...}   # as Potential.from_config takes
    data: {train: train.xyz, valid: valid.xyz}  # or valid_fraction: 0.1
    out: run1
    loss: {energy: 1.0, forces: 1.0, charges: 1.0, stress: 0.0}
    optimizer: {name: adam, learning_rate: 1e-3, schedule: cosine, final_lr_fraction: 0.1}
    batch_size: 4
    max_epochs: 100
    max_minutes: 30
    patience: 10
    seed: 0
    checkpoint: {keep: 3, every: 0}
    fit_energy_shift: true   # per-species shifts start at least-squares atomic energies

It writes ``out/model/`` (:meth:`Potential.save` of the best parameters),
``out/checkpoints/`` and ``out/metrics.csv``.

A config with ``stages`` is a training *routine*
(:class:`~celli_scale.train.routine.Routine`): stages run one after the other, or, with
``interleave``, in turns repeated ``cycles`` times, on one set of parameters::

    model: {name: allegro, ...}
    data: {train: train.xyz, valid_fraction: 0.1}  # default data of the stages
    out: run2
    seed: 0                      # model initialisation; the stages' default seed
    progress: true
    checkpoint: {keep: 3}        # routine checkpoints, saved after every epoch
    stages:
      - {type: force_matching, epochs: 20, optimizer: {learning_rate: 1e-3}}
      - type: force_matching     # each entry is its own stage (own optimizer state)
        name: fm_forces          # shown in metrics.csv; default: the type
        epochs: 5
        loss: {energy: 0.1, forces: 1.0}
        data: {train: other.xyz, valid: other_valid.xyz}
    interleave: {cycles: 3}      # optional: (20 epochs, 5 epochs) x 3

A ``force_matching`` stage takes the single-stage keys ``data``, ``loss``, ``optimizer``,
``batch_size``, ``seed``, ``devices``, ``fit_energy_shift``; its learning-rate schedule
spans its epochs over the whole routine (``epochs`` x ``cycles``). Other stage types are
added to :data:`STAGE_BUILDERS`. It writes ``out/model/`` (the final parameters),
``out/checkpoints/`` (resumed from when present) and ``out/metrics.csv`` (one row per
epoch, with the stage's name).

Top-down stages refine the routine's model on observables of its own MD: ``difftre``
(:class:`~celli_scale.train.difftre.DiffTRe`, targets per state point) and
``relative_entropy`` (:class:`~celli_scale.train.relative_entropy.RelativeEntropy`, a
reference trajectory per state point). An epoch is one optimizer update on the state
points' trajectories reweighted to the current parameters; a state point is re-sampled
(:func:`celli_scale.md.potential_sampler`, the energy :func:`celli_scale.md.potential_energy_fn`)
when its effective sample size falls below ``ess_threshold``::

    - type: difftre
      name: difftre              # default: the type
      epochs: 10                 # optimizer updates
      state_points:
        - name: liquid           # default sp<k>
          structure: start.xyz   # or {nacl_grid: {n: 4, spacing: 2.8}}, as celli-scale md;
          frame: 0               #   periodic, orthorhombic: its cell is the box (NVT)
          temperature: 300       # K
          masses: 22.99          # amu, one number or one per atom; default ASE's masses
          targets:               # at least one; loss: weight x mean((<O> - target)^2)
            rdf: {file: target_rdf.csv, weight: 1.0}   # CSV r_A,g (bin centres), as
                                 #   celli-scale md writes; or values: [...] with r_max;
                                 #   r_max (Å, <= half the box), n_bins default to the file's
                                 #   (other bins: linear interpolation). All pairs together.
            pressure: {value: 1.0, unit: bar, weight: 1e-6}   # unit: bar, kbar, GPa, eV/A^3
            energy: {value: -3.1, weight: 1.0}    # potential energy, eV/atom
      md: {dt: 1.0, friction: 0.01}   # MDConfig keys of the sampler; ensemble: langevin
                                      #   (default) or nose_hoover; not temperature, every,
                                      #   seed (the state point's, sampling.stride, seed)
      sampling: {equilibration: 1000, frames: 100, stride: 10}   # MD steps; the defaults
      optimizer: {name: adam, learning_rate: 1e-3, schedule: constant}  # over the epochs
      ess_threshold: 0.8         # re-sample below this effective-sample-size fraction
      seed: 0                    # PRNG of the MD; default: the top-level seed
      batch_size: null           # frames evaluated together; null: all at once
    - type: relative_entropy     # the same keys, but per state point:
      epochs: 10
      state_points:
        - reference: traj.xyz    # frames of the target ensemble (same atoms and cell)
          temperature: 300       # structure: default the reference's first frame
          weight: 1.0            # this state point's share of the gradient

There is no density target: in NVT sampling the density is the box's. A routine without
force-matching data needs ``model.species`` (there is no data to learn them from).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from ase import units as ase_units

from celli_scale.distributed import multihost, ray_launcher
from celli_scale.train.routine import Routine, Stage
from celli_scale.train.trainer import ForceMatching, LossWeights, TrainConfig

if TYPE_CHECKING:
    from celli_scale.train.difftre import Target
    from celli_scale.train.reweight import StatePoint

log = logging.getLogger(__name__)

TOP_KEYS = {
    "model", "data", "out", "loss", "optimizer", "batch_size", "max_epochs",
    "max_minutes", "patience", "seed", "checkpoint", "devices", "progress",
    "fit_energy_shift",
}  # fmt: skip
DATA_KEYS = {"train", "valid", "valid_fraction"}
OPT_KEYS = {"name", "learning_rate", "schedule", "final_lr_fraction"}
CKPT_KEYS = {"keep", "every"}


def _check_keys(d: Any, allowed: set[str], where: str) -> dict:
    if not isinstance(d, dict):
        raise ValueError(f"{where} must be a mapping, got {type(d).__name__}")
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise ValueError(
            f"unknown key(s) in {where}: {', '.join(map(str, unknown))} "
            f"(known: {', '.join(sorted(allowed))})"
        )
    return d


def parse_config(cfg: Any) -> tuple[dict, dict, Path, TrainConfig]:
    """``(model, data, out, TrainConfig)`` from a training config dict.

    Raises:
      ValueError: an unknown or missing key (named), a value of the wrong type.
    """
    cfg = _check_keys(cfg, TOP_KEYS, "the training config")
    for k in ("model", "data", "out"):
        if k not in cfg:
            raise ValueError(f"the training config needs '{k}'")
    data = _check_keys(cfg["data"], DATA_KEYS, "data")
    if "train" not in data:
        raise ValueError("the training config needs 'data.train'")
    if "valid" in data and "valid_fraction" in data:
        raise ValueError("give data.valid or data.valid_fraction, not both")
    loss = _check_keys(
        cfg.get("loss", {}), {f.name for f in dataclasses.fields(LossWeights)}, "loss"
    )
    opt = _check_keys(cfg.get("optimizer", {}), OPT_KEYS, "optimizer")
    ck = _check_keys(cfg.get("checkpoint", {}), CKPT_KEYS, "checkpoint")
    kw: dict[str, Any] = {
        "loss": LossWeights(**{k: float(v) for k, v in loss.items()}),
        "optimizer": str(opt.get("name", "adam")),
        "learning_rate": float(opt.get("learning_rate", 1e-3)),
        "schedule": str(opt.get("schedule", "constant")),
        "final_lr_fraction": float(opt.get("final_lr_fraction", 0.1)),
        "checkpoint_keep": int(ck.get("keep", 3)),
        "checkpoint_every": int(ck.get("every", 0)),
    }
    for k, typ in (("batch_size", int), ("max_epochs", int), ("patience", int), ("seed", int)):
        if k in cfg:
            kw[k] = typ(cfg[k])
    if "max_minutes" in cfg:
        kw["max_minutes"] = math.inf if cfg["max_minutes"] is None else float(cfg["max_minutes"])
    if "devices" in cfg:
        kw["devices"] = None if cfg["devices"] is None else int(cfg["devices"])
    for k in ("progress", "fit_energy_shift"):
        if k in cfg:
            if not isinstance(cfg[k], bool):
                raise ValueError(f"'{k}' must be true or false, got {cfg[k]!r}")
            kw[k] = cfg[k]
    if "valid_fraction" in data:
        kw["valid_fraction"] = float(data["valid_fraction"])
    if not isinstance(cfg["model"], dict):
        raise ValueError("'model' must be a mapping (a model config)")
    return cfg["model"], data, Path(cfg["out"]), TrainConfig(**kw)


def train_from_config(cfg: dict, base: Path | None = None) -> Path:
    """Run a training config, or a routine config (with ``stages``); paths relative to
    ``base``; returns ``out``."""
    from celli_scale import io
    from celli_scale.potential import Potential

    if isinstance(cfg, dict) and "stages" in cfg:
        return train_routine_from_config(cfg, base)
    model_cfg, data, out, tc = parse_config(cfg)
    base = Path(".") if base is None else base
    out = out if out.is_absolute() else base / out
    train = io.read(base / data["train"])
    valid = io.read(base / data["valid"]) if "valid" in data else None
    pot = Potential.from_config(model_cfg, seed=tc.seed, example=train[0].system)
    fm = ForceMatching(pot, train, valid, tc)
    state = fm.fit(out)
    pot.params = state["best_params"]
    pot.save(out / "model")
    log.info("best validation loss %.6g; model in %s", float(state["best_loss"]), out / "model")
    return out


# -- routines ---------------------------------------------------------------------------
ROUTINE_KEYS = {
    "model", "data", "out", "seed", "progress", "checkpoint", "stages", "interleave",
}  # fmt: skip
STAGE_KEYS = {"type", "name", "epochs"}  # every stage; its builder checks the rest
FM_STAGE_KEYS = STAGE_KEYS | {
    "data", "loss", "optimizer", "batch_size", "seed", "devices", "fit_energy_shift",
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class StageContext:
    """What a stage builder gets besides its own entry of the routine config.

    Attributes:
      pot: the :class:`~celli_scale.potential.Potential` being trained; its ``params``
        when all stages are built start the routine.
      base: directory that relative paths in the config are relative to.
      data: the top-level ``data`` mapping (None when absent).
      seed: the top-level seed (a stage's default seed).
      epochs: the epochs this stage runs over the whole routine (``epochs`` x ``cycles``).
      where: the entry's place in the config (``stages[1]``), for error messages.
    """

    pot: Any
    base: Path
    data: Mapping[str, Any] | None
    seed: int
    epochs: int
    where: str


#: ``builder(entry, context) -> Stage``: the entry is the stage's mapping in the config
#: (``type``, ``epochs``, ``name`` included; the builder refuses keys it does not know and
#: names the stage ``entry.get("name", <type>)``, which the config keeps distinct).
StageBuilder = Callable[[Mapping[str, Any], StageContext], Stage]


def build_force_matching(entry: Mapping[str, Any], ctx: StageContext) -> ForceMatching:
    """A :class:`ForceMatching` stage from a routine config entry (keys: see the module
    docstring); ``max_epochs`` is the stage's epochs over the routine."""
    from celli_scale import io

    entry = _check_keys(dict(entry), FM_STAGE_KEYS, f"{ctx.where} (force_matching)")
    data = entry.get("data", ctx.data)
    if data is None:
        raise ValueError(f"{ctx.where} needs 'data' (or give a top-level 'data')")
    sub = {k: v for k, v in entry.items() if k not in STAGE_KEYS | {"data"}}
    sub.setdefault("seed", ctx.seed)
    single = {"model": {}, "data": data, "out": ".", "max_epochs": ctx.epochs, **sub}
    try:
        _, data, _, tc = parse_config(dict(single, progress=False))
    except ValueError as e:
        raise ValueError(f"{ctx.where}: {e}") from e
    train = io.read(ctx.base / data["train"])
    valid = io.read(ctx.base / data["valid"]) if "valid" in data else None
    return ForceMatching(ctx.pot, train, valid, tc, name=str(entry.get("name", "force_matching")))


# -- top-down stages: DiffTRe and relative entropy on the routine's Potential -------------
TOPDOWN_STAGE_KEYS = STAGE_KEYS | {
    "state_points", "md", "sampling", "optimizer", "ess_threshold", "seed", "batch_size",
}  # fmt: skip
SAMPLING_KEYS = {"equilibration", "frames", "stride"}
#: MDConfig fields a sampler takes from elsewhere (the key -> where it comes from)
MD_SET_BY_STAGE = {
    "temperature": "each state point's 'temperature'",
    "every": "sampling.stride",
    "seed": "the stage's 'seed' (a PRNG key per trajectory)",
}
STATE_POINT_KEYS = {"name", "structure", "frame", "temperature", "masses"}
DIFFTRE_SP_KEYS = STATE_POINT_KEYS | {"targets"}
RE_SP_KEYS = STATE_POINT_KEYS | {"reference", "weight"}
TARGET_KEYS = {
    "rdf": {"file", "values", "r_max", "n_bins", "weight"},
    "pressure": {"value", "unit", "weight"},
    "energy": {"value", "weight"},
}
#: pressure units of a ``pressure`` target, in eV/Å³
PRESSURE_UNITS = {
    "eV/A^3": 1.0,
    "bar": float(ase_units.bar),
    "kbar": 1e3 * float(ase_units.bar),
    "GPa": float(ase_units.GPa),
}


def _number(v: Any, what: str, positive: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ValueError(f"{what} must be a finite number, got {v!r}")
    if positive and v <= 0:
        raise ValueError(f"{what} must be positive, got {v!r}")
    return float(v)


def _weight(d: Mapping[str, Any], where: str) -> float:
    w = _number(d.get("weight", 1.0), f"{where}.weight")
    if w < 0:
        raise ValueError(f"{where}.weight must be non-negative, got {w}")
    return w


def _state_point_system(sp: Mapping[str, Any], ctx: StageContext, where: str, default=None):
    """The structure of a state point entry: ``structure`` (+ ``frame``) as ``celli-scale
    md`` reads it, else ``default``; checked to be periodic, orthorhombic and known to the
    model."""
    from celli_scale.md import structure_from_spec

    if "structure" in sp:
        frame = sp.get("frame", 0)
        if isinstance(frame, bool) or not isinstance(frame, int):
            raise ValueError(f"{where}.frame must be an integer, got {frame!r}")
        try:
            system = structure_from_spec(sp["structure"], ctx.base, frame)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{where}.structure: {e}") from e
    elif default is not None:
        system = default
    else:
        raise ValueError(f"{where} needs 'structure' (a file, or {{nacl_grid: {{...}}}})")
    cell = np.asarray(system.cell, float) if system.periodic else None
    if cell is None or not np.all(system.pbc) or not np.allclose(cell, np.diag(np.diag(cell))):
        raise ValueError(
            f"{where}: top-down training needs a structure periodic in x, y, z with an "
            "orthorhombic cell (the state point's box)"
        )
    try:
        ctx.pot.species_index(system.species)
    except ValueError as e:
        raise ValueError(f"{where}.structure: {e}") from e
    return system


def _state_point(sp: Mapping[str, Any], system: Any, k: int, where: str) -> StatePoint:
    """A :class:`StatePoint` (box, temperature, masses, the structure's index ``k`` as the
    energy function's ``structure`` argument) of a state point entry."""
    from ase.data import atomic_masses

    from celli_scale.train.reweight import StatePoint

    if "temperature" not in sp:
        raise ValueError(f"{where} needs 'temperature' (K)")
    t = _number(sp["temperature"], f"{where}.temperature", positive=True)
    masses = sp.get("masses")
    if masses is None:
        masses = atomic_masses[np.asarray(system.species)]
    elif isinstance(masses, int | float) and not isinstance(masses, bool):
        masses = float(masses)
    elif isinstance(masses, list):
        masses = np.asarray(masses, float)
    else:
        raise ValueError(f"{where}.masses must be a number or a list (amu), got {masses!r}")
    name = str(sp.get("name", f"sp{k}"))
    try:
        return StatePoint(
            np.asarray(system.positions, float),
            np.diag(np.asarray(system.cell, float)),
            t,
            masses,
            energy_kwargs={"structure": k},
            name=name,
        )
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e


def _rdf_target(spec: Any, box: np.ndarray, ctx: StageContext, where: str) -> Target:
    """An RDF target: ``file`` (CSV ``r_A,g`` of bin centres, as ``celli-scale md``
    writes) or ``values``, on the bins ``r_max``, ``n_bins`` (default: the file's)."""
    from celli_scale.train.difftre import Target, rdf, rdf_bin_centers

    spec = _check_keys(spec, TARGET_KEYS["rdf"], where)
    if ("file" in spec) == ("values" in spec):
        raise ValueError(f"{where} needs one of 'file' (CSV r_A,g) or 'values'")
    r_max = spec.get("r_max")
    n_bins = spec.get("n_bins")
    if "values" in spec:
        g = np.asarray(spec["values"], float)
        if g.ndim != 1 or g.size < 1:
            raise ValueError(f"{where}.values must be a list of numbers")
        if r_max is None:
            raise ValueError(f"{where} with 'values' needs 'r_max' (Å)")
        n_bins = g.size if n_bins is None else _positive_int(n_bins, f"{where}.n_bins")
        if n_bins != g.size:
            raise ValueError(f"{where}: {g.size} values for n_bins {n_bins}")
        r_max = _number(r_max, f"{where}.r_max", positive=True)
    else:
        path = ctx.base / str(spec["file"])
        try:
            table = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)
        except (OSError, ValueError) as e:
            raise ValueError(f"{where}.file: cannot read {path} as CSV r_A,g: {e}") from e
        if table.shape[1] != 2 or table.shape[0] < 2:
            raise ValueError(f"{where}.file: {path} must have two columns r_A,g and 2+ rows")
        r, g_file = table[:, 0], table[:, 1]
        width = r[1] - r[0]
        if not (width > 0 and np.allclose(np.diff(r), width, rtol=1e-4, atol=1e-6)):
            raise ValueError(f"{where}.file: the r_A column of {path} is not evenly spaced")
        file_r_max = float(r[-1] + width / 2)
        r_max = file_r_max if r_max is None else _number(r_max, f"{where}.r_max", positive=True)
        n_bins = len(r) if n_bins is None else _positive_int(n_bins, f"{where}.n_bins")
        centres = rdf_bin_centers(r_max, n_bins)
        if centres.shape == r.shape and np.allclose(centres, r, rtol=0, atol=1e-6):
            g = g_file
        elif r_max <= file_r_max + 1e-6:
            g = np.interp(centres, r, g_file)  # another binning: linear interpolation
        else:
            raise ValueError(
                f"{where}: r_max {r_max} Å lies beyond the file's last bin ({file_r_max:.6g} Å)"
            )
    half = 0.5 * float(np.min(box))
    if r_max > half + 1e-9:
        raise ValueError(f"{where}: r_max {r_max} Å exceeds half the box ({half:.6g} Å)")
    return Target(rdf(r_max, n_bins), g, _weight(spec, where))


def _difftre_targets(spec: Any, sp: StatePoint, energy_fn, ctx: StageContext, where: str):
    from celli_scale.train.difftre import Target, potential_energy, pressure

    if isinstance(spec, dict) and "density" in spec:
        raise ValueError(
            f"{where}.density: the density is fixed by the state point's box in NVT "
            "sampling (no gradient); choose the structure's cell instead"
        )
    spec = _check_keys(spec, set(TARGET_KEYS), where)
    if not spec:
        raise ValueError(f"{where} must name at least one target ({', '.join(TARGET_KEYS)})")
    out = {}
    for key, t in spec.items():
        w = f"{where}.{key}"
        if key == "rdf":
            out[key] = _rdf_target(t, sp.box_lengths, ctx, w)
            continue
        t = _check_keys(t, TARGET_KEYS[key], w)
        if "value" not in t:
            raise ValueError(f"{w} needs 'value'")
        value = _number(t["value"], f"{w}.value")
        if key == "pressure":
            unit = t.get("unit", "bar")
            if unit not in PRESSURE_UNITS:
                raise ValueError(f"{w}.unit {unit!r} unknown (known: {', '.join(PRESSURE_UNITS)})")
            obs = pressure(energy_fn, unit=PRESSURE_UNITS[unit])
        else:
            obs = potential_energy(energy_fn, per_atom=True)
        out[key] = Target(obs, value, _weight(t, w))
    return out


def _topdown_common(entry: Mapping[str, Any], ctx: StageContext, kind: str) -> dict[str, Any]:
    """The settings shared by the top-down stages: optimizer (its schedule over the
    stage's epochs), ESS threshold, seed, frame batch size and the MD sampler's settings
    (``md`` and ``sampling``)."""
    from celli_scale.md import MDConfig
    from celli_scale.train.reweight import DEFAULT_ESS_THRESHOLD
    from celli_scale.train.trainer import make_optimizer

    where = f"{ctx.where} ({kind})"
    opt = _check_keys(entry.get("optimizer", {}), OPT_KEYS, f"{where}.optimizer")
    try:
        tc = TrainConfig(
            optimizer=str(opt.get("name", "adam")),
            learning_rate=_number(opt.get("learning_rate", 1e-3), "learning_rate", True),
            schedule=str(opt.get("schedule", "constant")),
            final_lr_fraction=_number(opt.get("final_lr_fraction", 0.1), "final_lr_fraction"),
        )
        optimizer = make_optimizer(tc, ctx.epochs)  # one update per epoch
    except ValueError as e:
        raise ValueError(f"{where}.optimizer: {e}") from e
    md = dict(
        _check_keys(
            entry.get("md", {}), {f.name for f in dataclasses.fields(MDConfig)}, f"{where}.md"
        )
    )
    for k, src in MD_SET_BY_STAGE.items():
        if k in md:
            raise ValueError(f"{where}.md.{k} is set by {src}")
    md.setdefault("ensemble", "langevin")
    if md["ensemble"] == "nve":
        raise ValueError(
            f"{where}.md.ensemble: sampling needs a thermostat (langevin, nose_hoover)"
        )
    sampling = _check_keys(entry.get("sampling", {}), SAMPLING_KEYS, f"{where}.sampling")
    n_eq = sampling.get("equilibration", 1000)
    if isinstance(n_eq, bool) or not isinstance(n_eq, int) or n_eq < 0:
        raise ValueError(f"{where}.sampling.equilibration must be an integer >= 0, got {n_eq!r}")
    n_frames = _positive_int(sampling.get("frames", 100), f"{where}.sampling.frames")
    if n_frames < 2:
        raise ValueError(f"{where}.sampling.frames must be at least 2, got {n_frames}")
    stride = _positive_int(sampling.get("stride", 10), f"{where}.sampling.stride")
    try:
        mdc = MDConfig(**md, every=stride)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}.md: {e}") from e
    ess = _number(entry.get("ess_threshold", DEFAULT_ESS_THRESHOLD), f"{where}.ess_threshold")
    if not 0 < ess <= 1:
        raise ValueError(f"{where}.ess_threshold must lie in (0, 1], got {ess}")
    seed = entry.get("seed", ctx.seed)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"{where}.seed must be an integer, got {seed!r}")
    bs = entry.get("batch_size")
    bs = None if bs is None else _positive_int(bs, f"{where}.batch_size")
    sps = entry.get("state_points")
    if not isinstance(sps, list) or not sps:
        raise ValueError(f"{where} needs 'state_points': a non-empty list of mappings")
    return {
        "optimizer": optimizer,
        "md": mdc,
        "sampling": (n_eq, n_frames, stride),
        "ess_threshold": ess,
        "seed": seed,
        "batch_size": bs,
        "state_points": sps,
    }


def _energy_and_samplers(ctx: StageContext, systems: list, common: dict):
    """One energy function for all state points (``structure=k`` picks state point
    ``k``'s :func:`~celli_scale.md.potential_energy_fn`) and one MD sampler each
    (:func:`~celli_scale.md.potential_sampler`)."""
    from celli_scale.md import potential_energy_fn, potential_sampler

    fns = [potential_energy_fn(ctx.pot, s) for s in systems]

    def energy_fn(params, positions, box=None, structure=0, **unused):
        return fns[structure](params, positions, box=box)

    n_eq, n_frames, stride = common["sampling"]
    samplers = [
        potential_sampler(
            ctx.pot, s, common["md"], n_equilibration=n_eq, n_frames=n_frames, stride=stride
        )
        for s in systems
    ]
    return energy_fn, samplers


def build_difftre(entry: Mapping[str, Any], ctx: StageContext) -> Stage:
    """A :class:`~celli_scale.train.difftre.DiffTRe` stage on the routine's Potential from
    a routine config entry (keys: see the module docstring): one optimizer update per
    epoch, the model sampled by :func:`celli_scale.md.potential_sampler`."""
    from celli_scale.train.difftre import DiffTRe

    entry = _check_keys(dict(entry), TOPDOWN_STAGE_KEYS, f"{ctx.where} (difftre)")
    common = _topdown_common(entry, ctx, "difftre")
    systems, sps, raw = [], [], []
    for k, sp in enumerate(common["state_points"]):
        where = f"{ctx.where}.state_points[{k}]"
        sp = _check_keys(sp, DIFFTRE_SP_KEYS, where)
        if "targets" not in sp:
            raise ValueError(f"{where} needs 'targets' ({', '.join(TARGET_KEYS)})")
        systems.append(_state_point_system(sp, ctx, where))
        sps.append(_state_point(sp, systems[-1], k, where))
        raw.append(sp)
    energy_fn, samplers = _energy_and_samplers(ctx, systems, common)
    targets = [
        _difftre_targets(sp["targets"], p, energy_fn, ctx, f"{ctx.where}.state_points[{k}].targets")
        for k, (sp, p) in enumerate(zip(raw, sps, strict=True))
    ]
    return DiffTRe(
        energy_fn,
        sps,
        targets,
        common["optimizer"],
        samplers,
        ess_threshold=common["ess_threshold"],
        seed=common["seed"],
        batch_size=common["batch_size"],
        name=str(entry.get("name", "difftre")),
    )


def build_relative_entropy(entry: Mapping[str, Any], ctx: StageContext) -> Stage:
    """A :class:`~celli_scale.train.relative_entropy.RelativeEntropy` stage on the
    routine's Potential from a routine config entry (keys: see the module docstring)."""
    from celli_scale import io
    from celli_scale.train.relative_entropy import RelativeEntropy

    entry = _check_keys(dict(entry), TOPDOWN_STAGE_KEYS, f"{ctx.where} (relative_entropy)")
    common = _topdown_common(entry, ctx, "relative_entropy")
    systems, sps, refs, weights = [], [], [], []
    for k, sp in enumerate(common["state_points"]):
        where = f"{ctx.where}.state_points[{k}]"
        sp = _check_keys(sp, RE_SP_KEYS, where)
        if "reference" not in sp:
            raise ValueError(f"{where} needs 'reference' (a trajectory file)")
        try:
            frames = io.read(ctx.base / str(sp["reference"]))
        except (OSError, ValueError) as e:
            raise ValueError(f"{where}.reference: {e}") from e
        if not frames:
            raise ValueError(f"{where}.reference {sp['reference']} holds no frames")
        system = _state_point_system(sp, ctx, where, default=frames[0].system)
        for i, f in enumerate(frames):
            s = f.system
            same = (
                s.n_atoms == system.n_atoms
                and np.array_equal(np.asarray(s.species), np.asarray(system.species))
                and s.periodic
                and np.allclose(np.asarray(s.cell, float), np.asarray(system.cell, float))
            )
            if not same:
                raise ValueError(
                    f"{where}.reference: frame {i} differs from the structure in its atoms, "
                    "species or cell"
                )
        systems.append(system)
        sps.append(_state_point(sp, system, k, where))
        refs.append(np.stack([np.asarray(f.system.positions, float) for f in frames]))
        weights.append(_weight(sp, where))
    energy_fn, samplers = _energy_and_samplers(ctx, systems, common)
    return RelativeEntropy(
        energy_fn,
        sps,
        refs,
        common["optimizer"],
        samplers,
        ess_threshold=common["ess_threshold"],
        seed=common["seed"],
        batch_size=common["batch_size"],
        weights=weights,
        name=str(entry.get("name", "relative_entropy")),
    )


#: stage type -> builder; other trainers register here (``STAGE_BUILDERS["x"] = ...``).
STAGE_BUILDERS: dict[str, StageBuilder] = {
    "force_matching": build_force_matching,
    "difftre": build_difftre,
    "relative_entropy": build_relative_entropy,
}


def _positive_int(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{what} must be a positive integer, got {v!r}")
    return v


def routine_from_config(cfg: Any, base: Path | None = None) -> tuple[Routine, Any, Path]:
    """``(routine, potential, out)`` from a routine config (paths relative to ``base``).
    The top-level keys and the schedule (types, epochs, names, cycles) are checked before
    the model is built or data read; each stage's builder then checks its own keys.

    Raises:
      ValueError: an unknown or missing key (named), an unknown stage type (naming the
        registered ones), epochs or cycles below 1, two stages with one name.
    """
    from celli_scale import io
    from celli_scale.potential import Potential

    cfg = _check_keys(cfg, ROUTINE_KEYS, "the routine config")
    for k in ("model", "out", "stages"):
        if k not in cfg:
            raise ValueError(f"the routine config needs '{k}'")
    if not isinstance(cfg["model"], dict):
        raise ValueError("'model' must be a mapping (a model config)")
    entries = cfg["stages"]
    if not isinstance(entries, list) or not entries:
        raise ValueError("'stages' must be a non-empty list of stage mappings")
    cycles = 1
    if "interleave" in cfg:
        inter = _check_keys(cfg["interleave"], {"cycles"}, "interleave")
        cycles = _positive_int(inter.get("cycles", 1), "interleave.cycles")
    names: dict[str, int] = {}
    for i, e in enumerate(entries):
        where = f"stages[{i}]"
        if not isinstance(e, dict):
            raise ValueError(f"{where} must be a mapping, got {type(e).__name__}")
        for k in ("type", "epochs"):
            if k not in e:
                raise ValueError(f"{where} needs '{k}'")
        if e["type"] not in STAGE_BUILDERS:
            raise ValueError(
                f"{where}: unknown stage type {e['type']!r} "
                f"(known: {', '.join(sorted(STAGE_BUILDERS))})"
            )
        _positive_int(e["epochs"], f"{where}.epochs")
        name = str(e.get("name", e["type"]))
        if name in names:
            raise ValueError(
                f"{where}: the name {name!r} is taken by stages[{names[name]}]; give each "
                "stage its own 'name'"
            )
        names[name] = i
    data = cfg.get("data")
    if data is not None:
        data = _check_keys(data, DATA_KEYS, "data")
    seed = int(cfg.get("seed", 0))
    keep = int(_check_keys(cfg.get("checkpoint", {}), {"keep"}, "checkpoint").get("keep", 3))

    base = Path(".") if base is None else base
    out = Path(cfg["out"])
    out = out if out.is_absolute() else base / out
    first = next((d for d in [data, *(e.get("data") for e in entries)] if d), None)
    example = None
    if isinstance(first, dict) and "train" in first:
        example = io.read(base / first["train"])[0].system
    pot = Potential.from_config(cfg["model"], seed=seed, example=example)
    schedule = []
    for i, e in enumerate(entries):
        ctx = StageContext(pot, base, data, seed, e["epochs"] * cycles, f"stages[{i}]")
        schedule.append((STAGE_BUILDERS[e["type"]](e, ctx), e["epochs"]))
    kw = dict(checkpoint_dir=out / "checkpoints", metrics_csv=out / "metrics.csv", keep=keep)
    if "interleave" in cfg:
        return Routine.interleaved(schedule, cycles, **kw), pot, out
    return Routine.sequential(schedule, **kw), pot, out


def train_routine_from_config(cfg: dict, base: Path | None = None) -> Path:
    """Run a routine config (see the module docstring); returns ``out``."""
    progress = cfg.get("progress", True) if isinstance(cfg, dict) else True
    if not isinstance(progress, bool):
        raise ValueError(f"'progress' must be true or false, got {progress!r}")
    routine, pot, out = routine_from_config(cfg, base)
    out.mkdir(parents=True, exist_ok=True)
    state = routine.run(pot.params, progress=progress)
    pot.params = routine.params_of(state)
    pot.save(out / "model")
    log.info("routine of %d epochs done; model in %s", routine.total_epochs, out / "model")
    return out


def add_parser(sub) -> None:
    """Register ``train`` and ``evaluate``."""
    p = sub.add_parser(
        "train",
        help="fit a potential to energies, forces, charges (and stress)",
        description=(
            "Force-matching training, or a routine of training stages, from a YAML "
            "config (see celli_scale.train.cli)."
        ),
    )
    p.add_argument("config", help="YAML training config")
    ray_launcher.add_cluster_arguments(p)
    p.set_defaults(command="train")
    q = sub.add_parser(
        "evaluate",
        help="errors of a saved potential on labelled data, by formula and total charge",
    )
    q.add_argument("model", help="directory written by Potential.save")
    q.add_argument("data", help="labelled data file (.xyz/.extxyz, input.data, .npz)")
    q.add_argument("--json", default=None, help="write the table as JSON to FILE")
    q.add_argument("--plot", default=None, help="write parity plots to FILE.png")


def main(args: argparse.Namespace) -> int:
    from celli_scale.config_io import load_yaml

    if args.command == "train":
        cfg = load_yaml(args.config)
        ray_opts = ray_launcher.cluster_options(args)
        if ray_opts is not None:
            return train_on_ray(cfg, Path.cwd(), ray_opts)
        # under srun (or a launcher's environment) every process joins one run here
        multihost.initialize()
        multihost.quiet_unless_leader()
        out = train_from_config(cfg)
        if multihost.is_leader():
            print(f"model written to {out / 'model'}")
        return 0
    return evaluate_main(args)


def ray_train_task(payload: dict) -> dict:
    """A Ray worker's body (:func:`celli_scale.distributed.ray_launcher.run_on_ray`): the
    training config ``payload["config"]`` with paths relative to ``payload["base"]``,
    data-parallel over the run's processes; resumes from ``out/checkpoints``."""
    import jax

    cfg, base = payload["config"], Path(payload["base"])
    out = Path(cfg["out"]) if isinstance(cfg, dict) and "out" in cfg else None
    resumed = None
    if out is not None:  # the checkpoint this attempt starts from (None: a fresh start)
        ck = (out if out.is_absolute() else base / out) / "checkpoints"
        steps = [int(d.name) for d in ck.iterdir() if d.name.isdigit()] if ck.is_dir() else []
        resumed = max(steps, default=None)
    out = train_from_config(cfg, base)
    return {"out": str(out), "process": int(jax.process_index()), "resumed_from": resumed}


def train_on_ray(cfg: Any, base: Path, ray_opts: dict, **kw: Any) -> int:
    """``celli-scale train --ray-address ...``: the training on Ray workers (restarted
    from the last checkpoint when one dies); prints where the model is."""
    res = ray_launcher.run_on_ray(
        "celli_scale.train.cli:ray_train_task",
        {"config": cfg, "base": str(base.absolute())},
        **ray_opts,
        **kw,
    )
    out = Path(res.results[0]["out"])
    restarts = f", {res.restarts} restart(s): {'; '.join(res.failures)}" if res.restarts else ""
    print(
        f"model written to {out / 'model'} ({len(res.results)} Ray worker(s), "
        f"start-up {res.startup_s:.1f} s, {res.seconds:.1f} s in all{restarts})"
    )
    return 0


def evaluate_main(args: argparse.Namespace) -> int:
    from celli_scale import io
    from celli_scale.potential import Potential
    from celli_scale.train.evaluate import error_table, parity_plot, predictions, table_lines

    pot = Potential.load(args.model)
    frames = io.read(args.data)
    preds = predictions(pot, frames)
    table = error_table(frames, preds)
    print("\n".join(table_lines(table)))
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=2))
    if args.plot:
        parity_plot(frames, preds, args.plot)
    return 0
