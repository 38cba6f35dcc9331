"""Device scaling, data-parallel (batch over devices): strong scaling of one energy +
forces step on a fixed batch of ``SCALING_BATCH`` NaCl grids over 1, 2 and 4 devices.

Each device count runs in a subprocess with ``XLA_FLAGS=--xla_force_host_platform_
device_count=D`` (the flag must be set before JAX starts), through the same code path as
``celli-scale scale`` (:func:`celli_scale.scaling.run_points`). On a CPU the "devices"
share the machine's cores, so the speed-up is bounded by the core count.
This is not domain decomposition: every structure stays whole on one device.
"""

from __future__ import annotations

from bench._common import (
    EXTRAS,
    HYPERPARAMS,
    MODELS,
    SCALING_BATCH,
    SCALING_DEVICES,
    SCALING_GRID_N,
    SCALING_REPEATS,
    TIMEOUT_S,
    skip_unless_available,
)
from celli_scale.scaling import model_config, run_points


class DataParallelScaling:
    """Throughput of a batch of structures sharded over 1, 2, 4 devices (float32)."""

    params = (list(MODELS), list(SCALING_DEVICES))
    param_names = ("model", "devices")
    timeout = TIMEOUT_S
    dtype = "float32"

    def setup(self, model: str, devices: int) -> None:
        skip_unless_available(model)
        spec = {
            "model": model,
            "config": model_config(model, self.dtype, HYPERPARAMS, EXTRAS),
            "sizes": [SCALING_GRID_N],
            "dtype": self.dtype,
            "devices": devices,
            "batch": SCALING_BATCH,
            "repeats": SCALING_REPEATS,
            "spacing": 2.2,
            "rattle": 0.05,
            "seed": 0,
            "memory_fraction": 0.85,
        }
        (self.row,) = run_points(spec, timeout_s=TIMEOUT_S)
        status = self.row["status"]
        if status.startswith("out of memory"):
            raise NotImplementedError(status)
        if status != "ok":
            raise RuntimeError(f"{model} on {devices} devices: {status}")

    def track_atoms_steps_per_s(self, model: str, devices: int) -> float:
        """Atoms · steps per second over the whole batch (median of the repeats)."""
        return float(self.row["atoms_steps_per_s"])

    track_atoms_steps_per_s.unit = "atoms*steps/s"  # type: ignore[attr-defined]

    def track_seconds_per_step(self, model: str, devices: int) -> float:
        """Wall-clock seconds of one data-parallel step of the batch."""
        return float(self.row["seconds"])

    track_seconds_per_step.unit = "seconds"  # type: ignore[attr-defined]

    def track_peak_rss_mb(self, model: str, devices: int) -> float:
        """Peak resident memory of the worker process during the timed steps."""
        return float(self.row["peak_rss_mb"])

    track_peak_rss_mb.unit = "MiB"  # type: ignore[attr-defined]
