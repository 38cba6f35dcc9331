"""Halo cost: what a spatial domain decomposition's ghost atoms cost each model.

One device of a decomposition holds a brick of ``m³`` owned atoms of the periodic NaCl
grid plus ghosts within the model's receptive field (+ 0.5 Å skin; the model config's
``receptive_field``: ``r_cut`` for Allegro, ``n_layers × r_cut`` for NequIP and MACE;
see :mod:`celli_scale.distributed.domains`). The device
computes the owned atoms' energy and its gradient on owned and ghost atoms, with Allegro
evaluating only edges centred on owned atoms and message passing every edge whose
centre's features the owned atoms read. Tracked per model and brick size:

* ``ghosts_per_owned`` and ``edges_per_owned`` (geometry: the bulk has 56 edges per atom),
* ``halo_overhead``: the device's time / the time of the same ``m³`` atoms as a periodic
  bulk (no halo), energy + forces, float32, median of 3 warm runs each.

Only the compute is measured here; the halo exchange itself (``ppermute``) comes with the
domain decomposition. CELLI's local trunk has Allegro's halo (same module); its charges
and electrostatics are global (distributed Qeq), so it is not listed separately.
Hyper-parameters: ``bench/_common.py`` (the same as every model benchmark).
"""

from __future__ import annotations

import time

import jax
import numpy as np

from bench._common import (
    HALO_GRID_M,
    HALO_MODELS,
    TIMEOUT_S,
    build_potential,
    check_fits,
    config_for,
    nacl_grid,
)
from celli_scale.distributed import domains

DTYPE = "float32"


def _median_seconds(call, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


class HaloGeometry:
    """Ghost atoms and edges per owned atom a device holds (host geometry, no timing)."""

    params = (list(HALO_MODELS), list(HALO_GRID_M))
    param_names = ("model", "brick_m")
    timeout = TIMEOUT_S

    def setup(self, model: str, brick_m: int) -> None:
        from celli_scale import models
        from celli_scale.potential import Potential

        cfg = config_for(model, DTYPE)
        pot = Potential(models.build(cfg), None)  # graphs only: no parameters needed
        self.sub, self.graph, _ = domains.device_graph(pot, brick_m)

    def track_ghosts_per_owned(self, model: str, brick_m: int) -> float:
        """Ghost atoms per owned atom (halo = receptive field + 0.5 Å skin)."""
        return self.sub.n_ghost / self.sub.n_owned

    track_ghosts_per_owned.unit = "ghosts/owned"  # type: ignore[attr-defined]

    def track_edges_per_owned(self, model: str, brick_m: int) -> float:
        """Edges the device evaluates per owned atom (bulk: 56 within 5 Å)."""
        return int(self.graph.senders.shape[0]) / self.sub.n_owned

    track_edges_per_owned.unit = "edges/owned"  # type: ignore[attr-defined]


class HaloCost:
    """Energy + forces of one device's brick + halo against the same atoms as a bulk."""

    params = (list(HALO_MODELS), list(HALO_GRID_M))
    param_names = ("model", "brick_m")
    timeout = TIMEOUT_S
    number = 1
    repeat = (1, 5, 60.0)
    warmup_time = 0.0

    def setup(self, model: str, brick_m: int) -> None:
        cfg = config_for(model, DTYPE)
        pot = build_potential(cfg)
        # the bulk first: a Potential pads every graph to the largest edge count it has
        # seen, and the brick's unpruned graph is much larger
        bulk = pot.graph(nacl_grid(brick_m))
        _, graph, owned = domains.device_graph(pot, brick_m)
        fn = domains.owned_energy_forces(pot.model)
        self.device = fn.lower(pot.params, graph, owned).compile()
        check_fits(self.device)
        self.device_args = (pot.params, graph, owned)
        self.bulk = pot.evaluate.lower(pot.params, bulk).compile()
        self.bulk_args = (pot.params, bulk)
        e = jax.block_until_ready(self.device(*self.device_args))[0]  # warm-up
        jax.block_until_ready(self.bulk(*self.bulk_args))
        if not np.isfinite(float(e)):
            raise RuntimeError(f"{model}: owned energy is not finite")

    def time_device_energy_forces(self, model: str, brick_m: int) -> None:
        jax.block_until_ready(self.device(*self.device_args))

    def track_halo_overhead(self, model: str, brick_m: int) -> float:
        """Device time (brick + halo) / bulk time (the same atoms, periodic, no halo)."""
        t_dev = _median_seconds(lambda: self.device(*self.device_args))
        t_bulk = _median_seconds(lambda: self.bulk(*self.bulk_args))
        return t_dev / t_bulk

    track_halo_overhead.unit = "ratio"  # type: ignore[attr-defined]


def main() -> None:
    """Print the halo table at the current sizes (full sizes: what bench/RESULTS.md
    reports); ``python -m bench.bench_halo`` from the repository root."""
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, {DTYPE}")
    print(
        "| model | brick m³ | halo Å | ghosts/owned | edges/owned | device s | bulk s | overhead |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for model in HALO_MODELS:
        for m in HALO_GRID_M:
            geo = HaloGeometry()
            geo.setup(model, m)
            cost = HaloCost()
            cost.setup(model, m)
            t_dev = _median_seconds(lambda c=cost: c.device(*c.device_args))
            t_bulk = _median_seconds(lambda c=cost: c.bulk(*c.bulk_args))
            print(
                f"| {model} | {m**3} | {geo.sub.halo:.1f} | "
                f"{geo.track_ghosts_per_owned(model, m):.2f} | "
                f"{geo.track_edges_per_owned(model, m):.1f} | {t_dev:.4f} | {t_bulk:.4f} | "
                f"{t_dev / t_bulk:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
