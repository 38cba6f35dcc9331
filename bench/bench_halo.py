"""Halo cost: what a spatial domain decomposition's ghost atoms and halo exchange cost
each model, per owned atom.

The periodic NaCl grid of ``(2m)³`` sites is cut over a ``HALO_MESH`` = 2×2×2 mesh of fake
CPU devices (:class:`celli_scale.distributed.sharded.ShardedPotential`), so each device owns
a brick of ``m³`` atoms and holds ghosts within the model's receptive field + 0.5 Å skin
(``r_cut`` = 5 Å for Allegro; ``n_layers × r_cut`` = 10 Å for NequIP and MACE). Allegro
evaluates only edges centred on owned atoms; message passing every edge within
``(n_layers − 1) × r_cut`` + skin of the brick. Tracked per model and brick size:

* ``ghosts_per_owned`` and ``edges_per_owned`` (``sp.stats``; the bulk has 56 edges per atom
  within 5 Å, and pairs are listed within ``r_cut`` + skin = 5.5 Å);
* ``halo_overhead``: ``sp(system)`` on the 8-device mesh (compute + halo exchange) / the
  unsharded ``pot(system)`` of the same atoms, float32, interleaved, min of the repeats;
* ``chunked_overhead``: the same bricks as 8 sub-bricks on one device
  (``ShardedPotential(pot, devices=1, chunks=8)``), the compute overhead at equal resources;
* ``exchange_fraction``: the halo exchange alone (forward + reverse, jitted) / the 8-device
  call.

All points of a model run in one worker subprocess with 8 fake devices (``bench_sharded``'s
worker). The 8 devices share this machine's 2 cores while the unsharded call runs on one
device: ``halo_overhead`` mixes the halo's cost with how well 8 devices fill 2 cores, and
``chunked_overhead`` isolates the compute. CELLI's local trunk has Allegro's halo; its
charges and electrostatics are global (distributed Qeq), so it is not listed separately.
Hyper-parameters: ``bench/_common.py``.
"""

from __future__ import annotations

import functools
from typing import Any

from bench._common import (
    HALO_GRID_M,
    HALO_MESH,
    HALO_MODELS,
    SHARDED_REPEATS,
    TIMEOUT_S,
)
from bench.bench_sharded import run_worker

CHUNKS = 8  # sub-bricks of the one-device comparison: the mesh's bricks


N_DEVICES = HALO_MESH[0] * HALO_MESH[1] * HALO_MESH[2]


def halo_spec(model: str, m: int) -> dict[str, Any]:
    """One worker's cases: the ``(2m)³`` grid on the mesh and chunked on one device."""
    common = {"grid": [2 * m] * 3, "repeats": SHARDED_REPEATS, "unsharded": True}
    return {
        "model": model,
        "cases": [
            {"name": "mesh", "mesh_shape": list(HALO_MESH), **common},
            {"name": "chunked", "devices": 1, "chunks": CHUNKS, **common},
        ],
    }


@functools.lru_cache(maxsize=1)
def halo_results() -> dict[str, Any]:
    """``{"model/m": rows or {"status": ...}}``, one worker each (cached for the process)."""
    return {
        f"{model}/{m}": run_worker(halo_spec(model, m), N_DEVICES)
        for model in HALO_MODELS
        for m in HALO_GRID_M
    }


class HaloCost:
    """Ghosts, edges and time per owned atom of a brick of ``m³`` owned atoms on a 2×2×2
    mesh, against the same atoms unsharded (8 fake devices share 2 cores)."""

    params = (list(HALO_MODELS), list(HALO_GRID_M))
    param_names = ("model", "brick_m")
    timeout = TIMEOUT_S

    def setup_cache(self) -> dict[str, Any]:
        return halo_results()

    def setup(self, cache: dict[str, Any], model: str, brick_m: int) -> None:
        rows = cache[f"{model}/{brick_m}"]
        if "status" in rows:
            raise NotImplementedError(f"{model}, m = {brick_m}: {rows['status']}")
        self.mesh, self.chunked = rows["mesh"], rows["chunked"]

    def track_ghosts_per_owned(self, cache, model, brick_m) -> float:
        """Ghost atoms per owned atom (halo = receptive field + 0.5 Å skin)."""
        return self.mesh["ghosts_per_owned"]

    track_ghosts_per_owned.unit = "ghosts/owned"  # type: ignore[attr-defined]

    def track_edges_per_owned(self, cache, model, brick_m) -> float:
        """Listed pairs (within r_cut + skin) a device evaluates per owned atom."""
        return self.mesh["edges_per_owned"]

    track_edges_per_owned.unit = "edges/owned"  # type: ignore[attr-defined]

    def track_halo_overhead(self, cache, model, brick_m) -> float:
        """``sp(system)`` on the 8-device mesh / ``pot(system)`` (compute + exchange)."""
        return self.mesh["sharded_s"] / self.mesh["unsharded_s"]

    track_halo_overhead.unit = "ratio"  # type: ignore[attr-defined]

    def track_halo_overhead_cpu(self, cache, model, brick_m) -> float:
        """As ``halo_overhead`` in CPU seconds (all threads: the 8 devices' work)."""
        return self.mesh["sharded_cpu_s"] / self.mesh["unsharded_cpu_s"]

    track_halo_overhead_cpu.unit = "ratio"  # type: ignore[attr-defined]

    def track_chunked_overhead(self, cache, model, brick_m) -> float:
        """8 sub-bricks on one device / ``pot(system)`` (the halo's compute alone)."""
        return self.chunked["sharded_s"] / self.chunked["unsharded_s"]

    track_chunked_overhead.unit = "ratio"  # type: ignore[attr-defined]

    def track_exchange_fraction(self, cache, model, brick_m) -> float:
        """Halo exchange alone (forward + reverse) / the 8-device ``sp(system)``."""
        return self.mesh["exchange_s"] / self.mesh["sharded_s"]

    track_exchange_fraction.unit = "ratio"  # type: ignore[attr-defined]


def main() -> None:
    """Print the halo table at the current sizes (full sizes: what bench/RESULTS.md
    reports); ``python -m bench.bench_halo [model ...]`` from the repository root."""
    import sys

    models = sys.argv[1:] or list(HALO_MODELS)
    print(
        "| model | owned/device | halo Å | ghosts/owned | edges/owned | 8-dev s | 1-dev 8 chunks s "
        "| unsharded s | overhead 8-dev | overhead chunked | CPU-s overhead 8-dev | CPU-s "
        "overhead chunked | exchange s | bytes/exchange |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for model in models:
        for m in HALO_GRID_M:
            rows = run_worker(halo_spec(model, m), N_DEVICES)
            if "status" in rows:
                print(f"| {model} | {m**3} | {rows['status']} |", flush=True)
                continue
            a, c = rows["mesh"], rows["chunked"]
            print(
                f"| {model} | {m**3} | {a['halo']:.1f} | {a['ghosts_per_owned']:.2f} | "
                f"{a['edges_per_owned']:.1f} | {a['sharded_s']:.3f} | {c['sharded_s']:.3f} | "
                f"{a['unsharded_s']:.3f} | {a['sharded_s'] / a['unsharded_s']:.2f} | "
                f"{c['sharded_s'] / c['unsharded_s']:.2f} | "
                f"{a['sharded_cpu_s'] / a['unsharded_cpu_s']:.2f} | "
                f"{c['sharded_cpu_s'] / c['unsharded_cpu_s']:.2f} | {a['exchange_s']:.4f} | "
                f"{a['bytes_per_exchange']} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
