"""Our side (JAX, the repository's interpreter): one of our models on the NaCl grid,
built, checked and timed through ``celli_scale``'s public API only. JAX is imported
inside the functions (asv imports every module under ``bench/``)."""

from __future__ import annotations

import argparse
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from bench.peers.measure import fd_check, force_stats, timed_calls
from bench.peers.spec import RATTLE, SEED, SPACING, check_ours_config, nacl_arrays


def matched_config(model: str, dtype: str) -> dict[str, Any]:
    """Our config dict of ``model`` at the hyper-parameters matched across models
    (:mod:`celli_scale.study.presets`, shared with the scaling study and the asv
    benchmarks), species Na and Cl."""
    from celli_scale.study.presets import model_config

    return model_config(model, dtype)


def run_ours(args: argparse.Namespace) -> dict[str, Any]:
    """Build, check and time one of our models: ``args.model`` at the matched
    hyper-parameters, ``args.dtype``, on the ``args.grid_n``³ NaCl grid. Writes the
    system's arrays to ``args.npz`` (when given) for the peers' side to read.

    Returns the side's part of the result row (see :func:`bench.peers.side.run_side`);
    a program that would not fit in memory gives a "skipped: out of memory" status.
    """
    import jax

    jax.config.update("jax_enable_x64", True)  # float64 models need it; float32 stays 32
    import numpy as np

    from celli_scale import memory
    from celli_scale.datasets import nacl_grid
    from celli_scale.study.presets import build_potential

    # Potential.from_config initialised on the 2×2×2 grid, capacities reset: the graph
    # below carries no spare edges
    pot = build_potential(matched_config(args.model, args.dtype), seed=SEED)
    system = nacl_grid(args.grid_n, SPACING, RATTLE, SEED)
    pos = np.asarray(system.positions, dtype=np.float64)
    z = np.asarray(system.species)
    cell = np.asarray(system.cell, dtype=np.float64)
    ref_pos, ref_z, ref_cell = nacl_arrays(args.grid_n)
    same = bool(np.array_equal(pos, ref_pos) and np.array_equal(z, ref_z))
    same = same and bool(np.array_equal(cell, ref_cell))
    if args.npz:
        Path(args.npz).parent.mkdir(parents=True, exist_ok=True)
        np.savez(args.npz, positions=pos, species=z, cell=cell, grid_n=args.grid_n)

    mc = pot.model.config
    check_ours_config(mc)
    row: dict[str, Any] = {
        "config": mc.to_dict(),
        "n_params": int(sum(x.size for x in jax.tree_util.tree_leaves(pot.params))),
        "positions_equal_numpy_generator": same,
        "impl": f"jax.jit (XLA {jax.devices()[0].platform})",
    }
    graph = pot.graph(system)
    row["n_edges"] = int(np.asarray(graph.edge_mask).sum())
    t0 = time.perf_counter()
    compiled = pot.evaluate.lower(pot.params, graph, stress=False).compile()
    row["compile_s"] = time.perf_counter() - t0
    try:
        row["compiled_mb"] = memory.check_fits(compiled) / 2**20
    except memory.InsufficientMemoryError as e:
        row["status"] = f"skipped: out of memory ({e})"
        return row

    def step():
        return jax.block_until_ready(compiled(pot.params, graph))

    out = step()
    row.update(force_stats(float(out[0]), out[1]))
    if args.check:

        def energy_at(atom, k, d):
            g = graph.replace(positions=graph.positions.at[atom, k].add(d))
            return float(compiled(pot.params, g)[0])

        row.update(fd_check(energy_at, out[1]))
    if args.repeats > 0:
        row.update(timed_calls(step, args.repeats, args.warmup))
    return row


def versions_ours() -> dict[str, str]:
    """Installed versions of the packages our side's timings depend on."""
    out = {}
    for p in ("jax", "jaxlib", "flax", "e3nn-jax", "numpy"):
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            pass
    return out
