"""Sharded scaling, data-parallel (a batch of structures over workers): strong and weak
scaling of one energy + forces step over devices (one process) and over processes (one
device each, ``jax.distributed`` with gloo CPU collectives on 127.0.0.1).

Strong scaling: a fixed batch of ``SCALING_BATCH`` NaCl grids. Weak scaling:
``SCALING_PER_WORKER`` grids per worker. Each point runs in subprocess(es) with
``XLA_FLAGS=--xla_force_host_platform_device_count=D`` (the flag must be set before JAX
starts), through the same code path as ``celli-scale scale``
(:func:`celli_scale.study.run.run_points`). On a CPU the workers share the machine's cores,
so the speed-up is bounded by the core count. This is not domain decomposition: every
structure stays whole on one device (``bench_halo`` measures what a decomposition's halo
costs). Metric: atoms · steps per second over the whole batch (median of the repeats);
speed-up = throughput / one worker's, in strong and weak scaling alike.
"""

from __future__ import annotations

from bench._common import (
    EXTRAS,
    HYPERPARAMS,
    SCALING_BATCH,
    SCALING_DEVICES,
    SCALING_GRID_N,
    SCALING_MODELS,
    SCALING_PER_WORKER,
    SCALING_PROCESSES,
    SCALING_REPEATS,
    TIMEOUT_S,
    MemoryTooLarge,
    model_config,
)
from celli_scale.study.run import run_points

DTYPE = "float32"


def _throughput(model: str, devices: int, processes: int, mode: str) -> float:
    """Run one point and return its atoms · steps / s (skip when it does not fit)."""
    workers = devices * processes
    spec = {
        "model": model,
        "config": model_config(model, DTYPE, HYPERPARAMS, EXTRAS),
        "sizes": [SCALING_GRID_N],
        "dtype": DTYPE,
        "devices": devices,
        "processes": processes,
        "batch": SCALING_BATCH if mode == "strong" else SCALING_PER_WORKER * workers,
        "repeats": SCALING_REPEATS,
        "spacing": 2.2,
        "rattle": 0.05,
        "seed": 0,
        "memory_fraction": 0.85,
    }
    (row,) = run_points(spec, timeout_s=TIMEOUT_S)
    status = row["status"]
    if status.startswith("out of memory"):
        raise MemoryTooLarge(status)
    if status != "ok":
        raise RuntimeError(f"{model} on {processes} x {devices} devices ({mode}): {status}")
    return float(row["atoms_steps_per_s"])


class DeviceScaling:
    """One process, 1, 2, 4 devices; strong (fixed batch) and weak (batch per device)."""

    params = (list(SCALING_MODELS), list(SCALING_DEVICES), ["strong", "weak"])
    param_names = ("model", "devices", "mode")
    timeout = TIMEOUT_S

    def track_atoms_steps_per_s(self, model: str, devices: int, mode: str) -> float:
        """Atoms · steps per second over the whole batch (float32)."""
        return _throughput(model, devices, 1, mode)

    track_atoms_steps_per_s.unit = "atoms*steps/s"  # type: ignore[attr-defined]


class ProcessScaling:
    """1 and 2 processes of one device each (``jax.distributed`` on 127.0.0.1)."""

    params = (list(SCALING_MODELS), list(SCALING_PROCESSES), ["strong", "weak"])
    param_names = ("model", "processes", "mode")
    timeout = TIMEOUT_S

    def track_atoms_steps_per_s(self, model: str, processes: int, mode: str) -> float:
        """Atoms · steps per second over the whole batch (float32)."""
        return _throughput(model, 1, processes, mode)

    track_atoms_steps_per_s.unit = "atoms*steps/s"  # type: ignore[attr-defined]
