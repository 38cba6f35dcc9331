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

from celli_scale.scaling import (  # the benchmarks and the study share these
    FULL_HYPERPARAMS,
    MODEL_EXTRAS,
    QUICK_HYPERPARAMS,
    QUICK_MODEL_EXTRAS,
    MemoryTooLarge,
    build_potential,
    check_fits,
    model_available,
    model_config,
    nacl_system,
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

#: Halo-cost benchmark: bricks of m³ owned atoms (CELLI's local trunk is Allegro's).
HALO_MODELS: tuple[str, ...] = ("allegro", "nequip", "mace")
HALO_GRID_M: tuple[int, ...] = (2,) if QUICK else (4, 6, 10)

#: asv timing settings for one jitted evaluation (warm-up happens in setup).
TIMEOUT_S = 120.0 if QUICK else 3600.0


def config_for(model: str, dtype: str) -> dict[str, Any]:
    """The full config dict of ``model`` at the benchmark's matched hyper-parameters."""
    return model_config(model, dtype, HYPERPARAMS, EXTRAS)


def skip_unless_available(model: str) -> None:
    """asv's way of skipping: NotImplementedError in setup."""
    ok, why = model_available(model)
    if not ok:
        raise NotImplementedError(f"model {model!r} not available: {why}")


__all__ = [
    "DTYPES",
    "EXTRAS",
    "GRID_N",
    "HYPERPARAMS",
    "MODELS",
    "MemoryTooLarge",
    "QUICK",
    "SCALING_BATCH",
    "SCALING_DEVICES",
    "SCALING_GRID_N",
    "SCALING_MODELS",
    "SCALING_PER_WORKER",
    "SCALING_PROCESSES",
    "SCALING_REPEATS",
    "TIMEOUT_S",
    "TRAIN_BATCH",
    "TRAIN_DTYPES",
    "TRAIN_FORCE_WEIGHT",
    "TRAIN_GRID_N",
    "TRAIN_LR",
    "TRAIN_SPRING",
    "build_potential",
    "check_fits",
    "config_for",
    "nacl_system",
    "skip_unless_available",
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
