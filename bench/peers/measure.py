"""Measurement, the same on both sides: warm timings with the machine's busyness during
them, the finite-difference force check and the force sanity numbers of every point.

The CPU and memory probes are :mod:`celli_scale.memory`'s. That module needs only the
standard library, but ``celli_scale/__init__`` imports JAX, which the peers' interpreter
lacks; there :func:`library_memory` loads ``celli_scale/memory.py`` from its file.
"""

from __future__ import annotations

import functools
import importlib.util
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any


@functools.cache
def library_memory() -> ModuleType:
    """:mod:`celli_scale.memory`, also in an interpreter without JAX (the peers')."""
    try:
        from celli_scale import memory
    except ModuleNotFoundError as e:
        if e.name != "jax":
            raise
        path = Path(__file__).resolve().parents[2] / "celli_scale" / "memory.py"
        spec = importlib.util.spec_from_file_location("_celli_scale_memory", path)
        if spec is None or spec.loader is None:
            raise
        memory = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(memory)
    return memory


def timed_calls(step: Callable[[], Any], repeats: int, warmup: int) -> dict[str, Any]:
    """Wall-clock seconds of ``repeats`` calls of ``step()`` (which blocks until done),
    after ``warmup`` untimed calls.

    Also records how busy the machine was during the timed calls: ``foreign_cpu_cores``
    is the CPU time of *other* processes divided by the wall time. The lock keeps other
    timed runs away, but not untimed work (tests, builds); with 2 cores and OpenMP /
    Eigen thread pools spinning at barriers, even one busy foreign core can slow a run
    several-fold, so the driver re-measures a point whose value is high.

    Returns:
      ``times`` (s, one per call), ``run_peak_rss_mb`` (MiB resident at most during the
      timed calls, compilation and set-up excluded), ``cpu_s_per_run`` (CPU seconds of
      this process per call), ``cpu_per_wall`` (cores this process used) and
      ``foreign_cpu_cores`` (cores other processes used).
    """
    mem = library_memory()
    for _ in range(warmup):
        step()
    mem.reset_peak_rss()
    busy0, own0, wall0, times = mem.busy_cpu_seconds(), mem.cpu_seconds(), time.perf_counter(), []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    wall = time.perf_counter() - wall0
    own = mem.cpu_seconds() - own0
    foreign = max(0.0, mem.busy_cpu_seconds() - busy0 - own)
    return {
        "times": times,
        "run_peak_rss_mb": mem.peak_rss_since_reset_mb(),
        "cpu_s_per_run": own / max(repeats, 1),
        "cpu_per_wall": own / max(wall, 1e-12),
        "foreign_cpu_cores": foreign / max(wall, 1e-12),
    }


def force_stats(energy: float, forces: Any) -> dict[str, Any]:
    """Energy (eV) and force (eV/Å, ``(N, 3)``) sanity numbers recorded with every point."""
    import numpy as np

    f = np.asarray(forces, dtype=np.float64)
    fmax = float(np.max(np.abs(f))) if f.size else 0.0
    fsum = float(np.max(np.abs(f.sum(axis=0))))
    return {
        "energy": float(energy),
        "energy_finite": bool(np.isfinite(energy)),
        "forces_finite": bool(np.all(np.isfinite(f))),
        "max_abs_force": fmax,
        "max_abs_force_sum": fsum,
        # |Σ F| relative to N·max|F|: ~1e-7 in float32, ~1e-15 in float64 when correct
        "force_sum_rel": fsum / max(len(f) * fmax, 1e-300),
    }


def fd_check(
    energy_at: Callable[[int, int, float], float], forces: Any, atom: int = 0, h: float = 1e-4
) -> dict[str, Any]:
    """Compare ``forces[atom]`` (eV/Å) with −dE/dr by central differences of step ``h`` Å
    (``energy_at(atom, k, d)`` is the energy, eV, with coordinate ``k`` of ``atom``
    displaced by ``d`` Å). ``fd_ok``: within 1e-5 eV/Å + 1e-4 of the largest force."""
    import numpy as np

    fd = np.array([-(energy_at(atom, k, h) - energy_at(atom, k, -h)) / (2 * h) for k in range(3)])
    f = np.asarray(forces, dtype=np.float64)[atom]
    err = float(np.max(np.abs(fd - f)))
    return {
        "fd_atom": atom,
        "fd_h": h,
        "fd_forces": fd.tolist(),
        "autograd_forces": f.tolist(),
        "fd_max_abs_err": err,
        "fd_ok": bool(err <= 1e-5 + 1e-4 * float(np.max(np.abs(f)))),
    }
