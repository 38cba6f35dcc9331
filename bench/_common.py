"""Helpers shared by the asv benchmarks: quick mode, systems, configs, memory checks.

Every hyper-parameter a benchmark uses is stated here, once, so that the four models are
compared at matched settings and a reader of ``bench/RESULTS.md`` can reproduce them.

Quick mode (``CELLI_BENCH_QUICK=1``; ``tests/conftest.py`` sets it): tiny systems and
narrow models, so that every benchmark runs in seconds (CI checks that none is broken).
Without it the benchmarks use the sizes reported in ``bench/RESULTS.md``; pick a subset
with ``asv run --bench REGEX``.
"""

from __future__ import annotations

import os
from typing import Any


def enable_compilation_cache() -> None:
    """Turn on JAX's persistent compilation cache (see ``bench/__init__.py``): in this
    process and, through the environment (JAX reads ``JAX_COMPILATION_CACHE_DIR`` etc. when
    it starts), in the scaling benchmarks' worker subprocesses."""
    where = os.environ.get("CELLI_BENCH_JAX_CACHE")
    if where == "":
        return
    where = where or os.path.expanduser("~/.cache/celli_scale/jax_bench")
    settings = {
        "jax_compilation_cache_dir": where,
        "jax_persistent_cache_min_compile_time_secs": 0.0,
        "jax_persistent_cache_min_entry_size_bytes": 0,
    }
    for key, value in settings.items():
        os.environ.setdefault(key.upper(), str(value))
    import jax

    for key, value in settings.items():
        jax.config.update(key, value)


enable_compilation_cache()

from celli_scale import memory  # noqa: E402
from celli_scale.datasets import nacl_grid  # noqa: E402
from celli_scale.study.presets import (  # noqa: E402  (the benchmarks and the study share these)
    FULL_HYPERPARAMS,
    MODEL_EXTRAS,
    QUICK_HYPERPARAMS,
    QUICK_MODEL_EXTRAS,
    build_potential,
    model_config,
)

#: True when ``CELLI_BENCH_QUICK`` is set to anything but "" or "0".
QUICK = os.environ.get("CELLI_BENCH_QUICK", "") not in ("", "0")


#: Models compared (registry names).
MODELS: tuple[str, ...] = ("allegro", "celli", "nequip", "mace")

#: NaCl grid sites per axis (PEERS.md grid, spacing 2.2 Å): N = n³ atoms.
GRID_N: tuple[int, ...] = (3,) if QUICK else (4, 6, 10, 16, 26)  # 64 ... 17576 atoms
DTYPES: tuple[str, ...] = ("float32", "float64")

#: Shared hyper-parameters in use (quick or full), as one dict.
HYPERPARAMS: dict[str, Any] = dict(QUICK_HYPERPARAMS if QUICK else FULL_HYPERPARAMS)
EXTRAS: dict[str, dict[str, Any]] = QUICK_MODEL_EXTRAS if QUICK else MODEL_EXTRAS

#: Training-step benchmark: structures per batch and grid size.
TRAIN_BATCH = 2 if QUICK else 4
TRAIN_GRID_N: tuple[int, ...] = (2,) if QUICK else (4, 6)
TRAIN_DTYPES: tuple[str, ...] = ("float32",) if QUICK else DTYPES
TRAIN_LR = 1e-3
TRAIN_SPRING = 1.0  # eV/Å², the harmonic-crystal labels
TRAIN_FORCE_WEIGHT = 1.0

#: Scaling benchmarks (data-parallel: a batch of structures sharded over workers); quick
#: mode compares CELLI with its strictly local trunk only (every worker is a subprocess).
SCALING_MODELS: tuple[str, ...] = ("allegro", "celli") if QUICK else MODELS
SCALING_DEVICES: tuple[int, ...] = (1, 2) if QUICK else (1, 2, 4)
SCALING_PROCESSES: tuple[int, ...] = (1, 2)
SCALING_BATCH = 4  # strong scaling: divisible by every worker count
SCALING_PER_WORKER = 1 if QUICK else 2  # weak scaling: structures per worker
SCALING_GRID_N = 2 if QUICK else 6
SCALING_REPEATS = 1 if QUICK else 3

#: Halo-cost benchmark: a (2m)³ grid on a 2×2×2 mesh of fake CPU devices, so every
#: device owns a brick of m³ atoms (CELLI's local trunk is Allegro's).
HALO_MODELS: tuple[str, ...] = ("allegro",) if QUICK else ("allegro", "nequip", "mace")
HALO_GRID_M: tuple[int, ...] = (2,) if QUICK else (4, 6, 8)
HALO_MESH: tuple[int, int, int] = (2, 2, 2)

#: Domain decomposition (``bench_sharded.py``, issue 17), float32, NaCl grid, skin 0.5 Å
#: (``celli_scale.distributed.domains.SKIN``), halo = receptive field + skin.
#: Sharded vs unsharded on one device: ``SHARDED_1DEV_N³`` atoms, Allegro.
SHARDED_1DEV_N = 4 if QUICK else 16  # 64 / 4096 atoms
SHARDED_1DEV_REPEATS = 2 if QUICK else 5  # interleaved warm calls per side; min reported
#: Strong and weak scaling over fake CPU devices (one worker subprocess per model and
#: device count, ``XLA_FLAGS=--xla_force_host_platform_device_count=D``).
SHARDED_MODELS: tuple[str, ...] = ("allegro",) if QUICK else ("allegro", "nequip", "mace")
SHARDED_DEVICES: tuple[int, ...] = (1, 2) if QUICK else (1, 2, 4, 8)
SHARDED_STRONG_N = 4 if QUICK else 16  # strong: the N = n³ grid, whatever the device count
SHARDED_WEAK_M = 3 if QUICK else 10  # weak: m³ sites per device (grid m·mesh_shape)
SHARDED_CHUNKS = 1  # sub-bricks per device
SHARDED_REPEATS = 1 if QUICK else 3  # warm calls per point; min reported
#: A worker is stopped (point skipped) past this wall time or resident memory.
SHARDED_POINT_TIMEOUT_S = 300.0 if QUICK else 600.0
SHARDED_MAX_RSS_GIB = 12.0

#: A million atoms on one CPU (bench_million): the MILLION_GRID³ NaCl grid in MILLION_CHUNKS
#: sub-bricks (6³ = 216: about 4,600 owned atoms each).
MILLION_GRID = 6 if QUICK else 100
MILLION_CHUNKS = 8 if QUICK else 216

#: Distributed Qeq and sharded CELLI (``bench_sharded_celli.py``, issue 18), float32,
#: matched hyper-parameters (CELLI: ``n_pre`` 1, ``n_post`` 1, ``elec_method`` "auto",
#: ``elec_accuracy`` 1e-6, ``elec_sigma_max`` 1.5 Å), NaCl grid spacing 2.2 Å, rattle 0.05 Å.
#: CELLI vs Allegro over fake CPU devices: the ``CELLI_STRONG_N³`` grid.
CELLI_DEVICES: tuple[int, ...] = (1, 2) if QUICK else (1, 2, 4, 8)
CELLI_STRONG_N = 4 if QUICK else 16  # 64 / 4096 atoms
#: Qeq share (CELLI − Allegro) / Allegro on one device at these ``n³`` grids (even n: the
#: periodic NaCl pattern needs it).
CELLI_SHARE_N: tuple[int, ...] = (4,) if QUICK else (8, 12, 16)  # 512 ... 4096 atoms
#: Weak scaling, sharded CELLI vs sharded MACE: ``CELLI_WEAK_M³`` owned sites per device.
CELLI_WEAK_MODELS: tuple[str, ...] = ("celli",) if QUICK else ("celli", "mace")
CELLI_WEAK_M = 4 if QUICK else 6  # 64 / 216 atoms per device
#: Timed calls: each on the base grid moved by a fresh Gaussian step of this size (Å), so
#: that both Qeq solves warm-start from the previous call's (different) solution, as in MD.
CELLI_STEP = 0.01
CELLI_REPEATS = 1 if QUICK else 3  # timed warm calls per model (interleaved); min reported
#: float32 CG tolerance of the sharded CELLI runs: the matched value (``config_for``). The
#: figures in bench/RESULTS.md (issue 18) were taken at 1e-4, before 43c8174 made the
#: distributed adjoint converge in float32 at 1e-5 (it stopped with a spurious "not
#: positive definite" at N ≥ 1728).
CELLI_QEQ_TOL = 1e-5
#: A big system on one CPU device: the CELLI_BIG_GRID³ grid in CELLI_BIG_CHUNKS sub-bricks,
#: PME chosen explicitly ("auto" fails there, see RESULTS.md).
CELLI_BIG_GRID = 6 if QUICK else 32
CELLI_BIG_CHUNKS = 2 if QUICK else 8
CELLI_BIG_METHOD = "pme"

#: The user's path (``bench_user_path.py``, issue 20): ``pot(system)`` in float32 on the
#: USER_GRID_N³ NaCl grid, two call patterns: "md" (every atom moved by USER_MD_STEP Å per
#: call, a fresh random direction each call, as an MD step) and "fresh" (a new structure each
#: call: sites displaced uniformly up to USER_FRESH_DISPLACEMENT Å per axis, same cell).
USER_GRID_N: tuple[int, ...] = (3,) if QUICK else (10, 16)  # 1000 / 4096 atoms
USER_MD_STEP = 0.01
USER_FRESH_DISPLACEMENT = 0.25  # per axis: up to 0.43 Å per site
USER_CALLS = 4 if QUICK else 12  # prepared structures cycled through by the timed calls
#: ``pot(Batch)`` on the user's path: USER_BATCH structures of USER_BATCH_GRID_N³ atoms
#: (NaCl grids with other rattles), moved as in the "md" pattern.
USER_BATCH = 2 if QUICK else 4
USER_BATCH_GRID_N: tuple[int, ...] = (3,) if QUICK else (8,)  # 4 x 512 atoms

#: asv timing settings for one jitted evaluation (warm-up happens in setup).
TIMEOUT_S = 120.0 if QUICK else 3600.0


def config_for(model: str, dtype: str) -> dict[str, Any]:
    """The full config dict of ``model`` at the benchmark's matched hyper-parameters."""
    return model_config(model, dtype, HYPERPARAMS, EXTRAS)


class MemoryTooLarge(NotImplementedError):
    """A benchmark's compiled program does not fit in memory. asv skips a benchmark whose
    setup raises NotImplementedError; the message gives the need and the availability."""


def check_fits(compiled: Any, n_programs: int = 1, fraction: float = 0.85) -> int:
    """:func:`celli_scale.memory.check_fits`, with a program that does not fit turned into
    asv's skip (:class:`MemoryTooLarge`)."""
    try:
        return memory.check_fits(compiled, n_programs, fraction)
    except memory.InsufficientMemoryError as e:
        raise MemoryTooLarge(str(e)) from None


__all__ = [
    "CELLI_BIG_CHUNKS",
    "CELLI_BIG_GRID",
    "CELLI_BIG_METHOD",
    "CELLI_DEVICES",
    "CELLI_QEQ_TOL",
    "CELLI_REPEATS",
    "CELLI_SHARE_N",
    "CELLI_STEP",
    "CELLI_STRONG_N",
    "CELLI_WEAK_M",
    "CELLI_WEAK_MODELS",
    "DTYPES",
    "EXTRAS",
    "GRID_N",
    "HYPERPARAMS",
    "MILLION_CHUNKS",
    "MILLION_GRID",
    "MODELS",
    "MemoryTooLarge",
    "QUICK",
    "HALO_GRID_M",
    "HALO_MESH",
    "HALO_MODELS",
    "SCALING_BATCH",
    "SCALING_DEVICES",
    "SCALING_GRID_N",
    "SCALING_MODELS",
    "SCALING_PER_WORKER",
    "SCALING_PROCESSES",
    "SCALING_REPEATS",
    "SHARDED_1DEV_N",
    "SHARDED_1DEV_REPEATS",
    "SHARDED_CHUNKS",
    "SHARDED_DEVICES",
    "SHARDED_MAX_RSS_GIB",
    "SHARDED_MODELS",
    "SHARDED_POINT_TIMEOUT_S",
    "SHARDED_REPEATS",
    "SHARDED_STRONG_N",
    "SHARDED_WEAK_M",
    "TIMEOUT_S",
    "USER_BATCH",
    "USER_BATCH_GRID_N",
    "USER_CALLS",
    "USER_FRESH_DISPLACEMENT",
    "USER_GRID_N",
    "USER_MD_STEP",
    "TRAIN_BATCH",
    "TRAIN_DTYPES",
    "TRAIN_FORCE_WEIGHT",
    "TRAIN_GRID_N",
    "TRAIN_LR",
    "TRAIN_SPRING",
    "build_potential",
    "check_fits",
    "config_for",
    "enable_compilation_cache",
    "nacl_grid",
]


def atoms_steps_per_s(step, n_atoms: int, repeats: int = 3) -> float:
    """Throughput of ``step()`` (which must block until done): atoms · steps per second,
    from the median of ``repeats`` warm calls."""
    import time

    import numpy as np

    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return n_atoms / float(np.median(times))
