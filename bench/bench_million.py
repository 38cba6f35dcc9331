"""A million atoms on one CPU: Allegro energy + forces through ``ShardedPotential``.

``ShardedPotential(pot, devices=1, chunks=MILLION_CHUNKS)`` evaluates the periodic NaCl grid
of ``MILLION_GRID³`` atoms (full: 100³ = 1,000,000; spacing 2.2 Å, rattle 0.2 Å, seed 1) as
sub-bricks one after another, so peak memory follows a sub-brick (about 4,600 owned atoms
at 216 chunks), not the system. Compared with the unsharded ``pot(system)`` of the
``SHARDED_1DEV_N³`` grid (4,096 atoms) in the same process: the goal is a time per atom
within 1.3× of it (linear scaling) and a peak resident memory ≤ 16 KiB per atom.

Hyper-parameters: ``bench/_common.py`` (Allegro, float32, the models table's). Everything
runs once in ``setup_cache`` (one warm call of the million-atom system takes minutes here);
the ``track_`` methods report it. ``python -m bench.bench_million`` prints the figures.
"""

from __future__ import annotations

import resource
import time
from typing import Any

import jax

from bench._common import (
    MILLION_CHUNKS,
    MILLION_GRID,
    SHARDED_1DEV_N,
    TIMEOUT_S,
    build_potential,
    config_for,
    nacl_grid,
)

DTYPE = "float32"


def _seconds(call) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(call().forces)
    return time.perf_counter() - t0


def measure() -> dict[str, Any]:
    """Decompose, one cold and one warm call of the big grid; then the small grid unsharded
    (first call cold, min of two warm). Times in s, memory from the process's peak RSS."""
    from celli_scale.distributed.sharded import ShardedPotential

    pot = build_potential(config_for("allegro", DTYPE))
    big = nacl_grid(MILLION_GRID, 2.2, 0.2, 1)
    sp = ShardedPotential(pot, devices=1, chunks=MILLION_CHUNKS)
    t0 = time.perf_counter()
    sp.decompose(big)
    t_decomp = time.perf_counter() - t0
    t_cold = _seconds(lambda: sp(big))
    t_warm = _seconds(lambda: sp(big))
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    small = nacl_grid(SHARDED_1DEV_N, 2.2, 0.2, 1)
    _seconds(lambda: pot(small))
    t_small = min(_seconds(lambda: pot(small)) for _ in range(2))
    n_big, n_small = big.n_atoms, small.n_atoms
    return {
        "n_atoms": n_big,
        "chunks": MILLION_CHUNKS,
        "decompose_s": t_decomp,
        "first_call_s": t_cold,
        "warm_call_s": t_warm,
        "us_per_atom": 1e6 * t_warm / n_big,
        "small_us_per_atom": 1e6 * t_small / n_small,
        "per_atom_ratio": (t_warm / n_big) / (t_small / n_small),
        "peak_rss_kib_per_atom": peak_kib / n_big,
        "stats": sp.stats.summary(),
    }


class MillionAtoms:
    """Allegro E + F of ``MILLION_GRID³`` atoms on one CPU device in sub-bricks."""

    timeout = 4 * TIMEOUT_S

    def setup_cache(self) -> dict[str, Any]:
        return measure()

    def track_warm_call_s(self, result: dict[str, Any]) -> float:
        """Seconds of one warm ``sp(system)`` (energy + forces)."""
        return result["warm_call_s"]

    track_warm_call_s.unit = "s"  # type: ignore[attr-defined]

    def track_us_per_atom(self, result: dict[str, Any]) -> float:
        return result["us_per_atom"]

    track_us_per_atom.unit = "µs/atom"  # type: ignore[attr-defined]

    def track_per_atom_ratio(self, result: dict[str, Any]) -> float:
        """Time per atom / the unsharded 4,096-atom grid's (goal ≤ 1.3)."""
        return result["per_atom_ratio"]

    track_per_atom_ratio.unit = "ratio"  # type: ignore[attr-defined]

    def track_peak_rss_kib_per_atom(self, result: dict[str, Any]) -> float:
        """Peak resident memory of the process / atoms (goal ≤ 16 KiB)."""
        return result["peak_rss_kib_per_atom"]

    track_peak_rss_kib_per_atom.unit = "KiB/atom"  # type: ignore[attr-defined]


if __name__ == "__main__":
    res = measure()
    print(res.pop("stats"))
    for key, value in res.items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
