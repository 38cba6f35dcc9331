"""Parallel efficiency of the multi-process sharded path: ``ShardedPotential`` (Allegro,
float32, energy + forces) on the ``MULTIHOST_GRID_N³`` periodic NaCl grid (26³ = 17,576
atoms; quick: 6³ = 216), space cut into domains over

* **a** ``1p x 1c``: 1 process, 1 device, pinned to one core (mesh 1×1×1);
* **b** ``2p x 1c``: 2 ``jax.distributed`` processes (gloo on 127.0.0.1), 1 device each,
  each pinned to its own core, one domain each (mesh 2×1×1 over the two processes);
* **c** ``1p x 2c``: 1 process with 2 host devices (2 domains, mesh 2×1×1), pinned to
  the same two cores.

Pinning: ``taskset -c`` (``os.sched_setaffinity`` where taskset is missing), and
``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false`` in every configuration (no Eigen thread
pool inside an op; the CPU client's own pool is sized by the cores a process may run on).
jax 0.10 accepts that flag; ``intra_op_parallelism_threads`` is a TensorFlow session
option, not an XLA flag (alone in ``XLA_FLAGS`` XLA reads it as a file name and aborts),
so it is not used.

Timing: ``sp(system)`` warm (decomposition and compilation done by an untimed first call
and one more untimed call), then ``MULTIHOST_REPEATS`` timed calls; each call gets the
base grid moved by a fresh Gaussian step of ``MULTIHOST_STEP`` Å (the same on every process:
a seeded generator), as an MD step would, so the decomposition is reused (the step is far
below half the skin) but nothing is cached on the positions. Reported: the minimum (and
median) wall seconds of process 0; in **b** the processes pass a barrier before each call,
so that a late start of the other process is not timed. A call includes the host work of
``ShardedPotential`` (displacement check, owned positions, the gather of forces and
per-atom energies to every process).

Goals: speed-up **b**/**a** = t_a / t_b ≥ 1.7 (two processes on two cores), and
**b**/**c** = t_c / t_b ≥ 0.9 (two processes about as fast as one process with two
devices). On a 2-core machine shared with other work the figures are noisy; run it on an
idle machine.

asv: :class:`MultihostEfficiency` (``setup_cache`` runs the three configurations once).
Command line: ``python -m bench.bench_multihost [--n-grid K] [--repeats R]`` prints a
table; ``--worker SPEC`` is a worker process's entry point.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import statistics
import sys
import time
from typing import Any

import numpy as np

from bench._common import (
    HYPERPARAMS,
    QUICK,
    SHARDED_MAX_RSS_GIB,
    build_potential,
    config_for,
    nacl_grid,
)
from bench.bench_sharded import DTYPE, RATTLE, ROOT, SPACING  # the same grid and precision

_MARK = "MULTIHOST-BENCH-RESULT "

#: NaCl grid sites per axis (even keeps the periodic NaCl pattern; odd works): N = n³ atoms.
MULTIHOST_GRID_N = 6 if QUICK else 26  # 216 / 17,576 atoms
#: Timed warm calls per configuration; min (and median) reported.
MULTIHOST_REPEATS = 2 if QUICK else 5
#: Fresh Gaussian displacement (Å per component) of each call's positions from the grid.
MULTIHOST_STEP = 0.01
#: One configuration (a group of worker processes) is stopped past this wall time.
MULTIHOST_TIMEOUT_S = 300.0 if QUICK else 3600.0
#: XLA flags of every worker (besides the host device count).
THREAD_FLAGS = "--xla_cpu_multi_thread_eigen=false"
#: Environment variable of a worker: the cores it pins itself to when taskset is missing.
CPUS_ENV = "CELLI_BENCH_CPUS"

#: name -> (processes, devices per process, description)
CONFIGS: dict[str, tuple[int, int, str]] = {
    "a": (1, 1, "1 process x 1 core (1 device)"),
    "b": (2, 1, "2 processes x 1 core (1 device each)"),
    "c": (1, 2, "1 process x 2 cores (2 devices)"),
}


# -- worker side ---------------------------------------------------------------------------


def _pin_from_env() -> None:
    cpus = os.environ.get(CPUS_ENV)
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})


def worker(spec: dict[str, Any]) -> dict[str, Any] | None:
    """One process of a configuration: join the run (if several), evaluate, time; process
    0 returns the row (others None)."""
    _pin_from_env()  # before JAX's backend starts (its thread pool follows the affinity)
    from celli_scale.distributed import multihost

    placement = multihost.initialize()
    import jax

    from celli_scale.distributed.sharded import ShardedPotential

    n = int(spec["grid"])
    mesh = tuple(spec["mesh"])
    repeats = int(spec["repeats"])
    pot = build_potential(config_for("allegro", DTYPE))
    base = nacl_grid(n, SPACING, RATTLE, 0)
    rng = np.random.default_rng(1)  # the same steps on every process
    x0 = np.asarray(base.positions, dtype=float)
    systems = [
        base.replace(positions=x0 + rng.normal(0.0, float(spec["step"]), x0.shape))
        for _ in range(repeats + 2)
    ]
    sp = ShardedPotential(pot, mesh_shape=mesh, chunks=int(spec.get("chunks", 1)))

    def barrier(tag: str) -> None:
        if placement.multi:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(tag)

    barrier("start")
    t0 = time.perf_counter()
    out = sp(systems[0])  # decomposition + compilation
    jax.block_until_ready(out.forces)
    first = time.perf_counter() - t0
    jax.block_until_ready(sp(systems[1]).forces)  # one more, untimed
    wall, cpu = [], []
    for k in range(repeats):
        barrier(f"call{k}")
        t0, c0 = time.perf_counter(), time.process_time()
        out = sp(systems[k + 2])
        jax.block_until_ready(out.forces)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    if jax.process_index() != 0:
        return None
    st = sp.stats
    f = np.asarray(out.forces, dtype=float)
    return {
        "processes": jax.process_count(),
        "devices": len(jax.devices()),
        "mesh": list(st.mesh_shape),
        "n_atoms": int(base.n_atoms),
        "owned_max": int(st.owned.max()),
        "ghosts_per_owned": float(st.ghosts_per_owned),
        "decompositions": int(st.decompositions),
        "first_call_s": first,
        "seconds": float(min(wall)),
        "median_s": float(statistics.median(wall)),
        "cpu_s": float(min(cpu)),
        "energy": float(out.energy),
        "max_force": float(np.abs(f).max()),
        "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [],
    }


# -- parent side ---------------------------------------------------------------------------


def cores() -> list[int]:
    """The first two cores this process may run on (fewer where there are fewer)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))[:2]
    return list(range(min(os.cpu_count() or 1, 2)))


def _env(devices: int, cpus: list[int], dist: str | None) -> dict[str, str]:
    from celli_scale.distributed import launch

    env = launch.worker_env(devices, dist)
    env["XLA_FLAGS"] = f"{env['XLA_FLAGS']} {THREAD_FLAGS}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env[CPUS_ENV] = ",".join(map(str, cpus))
    return env


def run_config(name: str, n_grid: int, repeats: int, chunk_domains: int = 1) -> dict[str, Any]:
    """Run configuration ``name`` (:data:`CONFIGS`) and return process 0's row, or
    ``{"status": why}`` when it could not run, failed, ran out of time or memory.

    ``chunk_domains``: the grid is cut into ``2 x chunk_domains`` sub-bricks in every
    configuration (so that the work per sub-brick is the same): ``chunks`` per device is
    ``2 x chunk_domains / devices in the mesh`` (:class:`ShardedPotential`'s ``chunks``,
    evaluated one after another: the memory of a large grid on one core)."""
    from celli_scale.distributed import launch

    processes, devices, _ = CONFIGS[name]
    have = cores()
    need = processes * devices
    if len(have) < need:
        return {"status": f"skipped: needs {need} cores, this process may use {len(have)}"}
    spec = {
        "grid": int(n_grid),
        "mesh": [processes * devices, 1, 1],
        "repeats": int(repeats),
        "step": MULTIHOST_STEP,
        "chunks": 2 * int(chunk_domains) // (processes * devices),
    }
    cmd = [sys.executable, "-m", "bench.bench_multihost", "--worker", json.dumps(spec)]
    taskset = shutil.which("taskset")
    commands, envs = [], []
    address = f"127.0.0.1:{launch.free_loopback_port()}" if processes > 1 else None
    for i in range(processes):
        cpus = have[i * devices : (i + 1) * devices]
        dist = None if address is None else launch.distributed_env(address, processes, i)
        commands.append(([taskset, "-c", ",".join(map(str, cpus))] if taskset else []) + cmd)
        envs.append(_env(devices, cpus, dist))
    r = launch.run_group(
        commands,
        env=envs,
        cwd=ROOT,
        timeout_s=MULTIHOST_TIMEOUT_S,
        memory_limit_bytes=int(SHARDED_MAX_RSS_GIB * 2**30),
    )
    if not r.ok:
        return {"status": f"failed: {r.reason(MULTIHOST_TIMEOUT_S)}"}
    for line in r.stdout_lines:
        if line.startswith(_MARK):
            row = json.loads(line[len(_MARK) :])
            row["peak_rss_gib"] = r.peak_tree_rss_bytes / 2**30
            row["taskset"] = bool(taskset)
            return row
    return {"status": "failed: no result line from process 0"}


def speedups(rows: dict[str, dict[str, Any]]) -> dict[str, float]:
    """``{"b/a": t_a / t_b, "b/c": t_c / t_b}`` for the configurations that ran."""
    t = {k: r["seconds"] for k, r in rows.items() if "seconds" in r}
    out = {}
    if "a" in t and "b" in t:
        out["b/a"] = t["a"] / t["b"]
    if "c" in t and "b" in t:
        out["b/c"] = t["c"] / t["b"]
    return out


@functools.lru_cache(maxsize=4)
def results(n_grid: int = MULTIHOST_GRID_N, repeats: int = MULTIHOST_REPEATS) -> dict:
    """Every configuration's row (or status), run one after another; cached."""
    return {name: run_config(name, n_grid, repeats) for name in CONFIGS}


# -- asv benchmark -------------------------------------------------------------------------


class MultihostEfficiency:
    """Allegro energy + forces over domains: 1 process × 1 core (a), 2 processes × 1
    core (b), 1 process × 2 cores (c); see the module docstring. Goals: b/a ≥ 1.7,
    b/c ≥ 0.9."""

    timeout = MULTIHOST_TIMEOUT_S * 3 + 60

    def setup_cache(self) -> dict[str, Any]:
        return results()

    def setup(self, cache: dict[str, Any]) -> None:
        bad = {k: r["status"] for k, r in cache.items() if "status" in r}
        if bad:
            raise NotImplementedError(f"configurations that did not run: {bad}")

    def track_seconds_1proc_1core(self, cache) -> float:
        """(a) ``sp(system)`` warm, min of the repeats (s)."""
        return cache["a"]["seconds"]

    track_seconds_1proc_1core.unit = "s"  # type: ignore[attr-defined]

    def track_seconds_2proc_1core_each(self, cache) -> float:
        """(b) ``sp(system)`` warm over 2 jax.distributed processes (s)."""
        return cache["b"]["seconds"]

    track_seconds_2proc_1core_each.unit = "s"  # type: ignore[attr-defined]

    def track_seconds_1proc_2cores(self, cache) -> float:
        """(c) ``sp(system)`` warm, 1 process with 2 host devices (s)."""
        return cache["c"]["seconds"]

    track_seconds_1proc_2cores.unit = "s"  # type: ignore[attr-defined]

    def track_speedup_2proc_over_1core(self, cache) -> float:
        """t_a / t_b (goal ≥ 1.7)."""
        return speedups(cache)["b/a"]

    track_speedup_2proc_over_1core.unit = "ratio"  # type: ignore[attr-defined]

    def track_speedup_2proc_over_1proc_2cores(self, cache) -> float:
        """t_c / t_b (goal ≥ 0.9)."""
        return speedups(cache)["b/c"]

    track_speedup_2proc_over_1proc_2cores.unit = "ratio"  # type: ignore[attr-defined]


# -- command line --------------------------------------------------------------------------


def table(rows: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown lines: one row per configuration, then the speed-ups against the goals."""
    lines = [
        "| config | layout | N | mesh | ghosts/owned | first call s | s/call (min) "
        "| s/call (median) | energy (eV) | peak RSS GiB |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        layout = CONFIGS[name][2]
        if "status" in r:
            lines.append(f"| {name} | {layout} | | | | | {r['status']} | | | |")
            continue
        lines.append(
            f"| {name} | {layout} | {r['n_atoms']} | {'×'.join(map(str, r['mesh']))} | "
            f"{r['ghosts_per_owned']:.2f} | {r['first_call_s']:.2f} | {r['seconds']:.4f} | "
            f"{r['median_s']:.4f} | {r['energy']:.6f} | {r['peak_rss_gib']:.2f} |"
        )
    sp = speedups(rows)
    goals = {"b/a": 1.7, "b/c": 0.9}
    for key, goal in goals.items():
        if key in sp:
            verdict = "met" if sp[key] >= goal else "missed"
            lines.append(f"speed-up {key}: {sp[key]:.3f} (goal ≥ {goal}: {verdict})")
    energies = [r["energy"] for r in rows.values() if "energy" in r]
    if len(energies) > 1:
        spread = (max(energies) - min(energies)) / max(abs(energies[0]), 1e-30)
        lines.append(f"energy agreement over the configurations: {spread:.2e} relative")
    return lines


def main(argv: list[str] | None = None) -> None:
    """``python -m bench.bench_multihost [--n-grid K] [--repeats R]``: print the table;
    ``--worker SPEC`` is a worker process's entry point."""
    import argparse

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        row = worker(json.loads(argv[1]))
        if row is not None:
            print(_MARK + json.dumps(row), flush=True)
        return
    p = argparse.ArgumentParser(prog="python -m bench.bench_multihost", description=__doc__)
    p.add_argument("--n-grid", type=int, default=MULTIHOST_GRID_N, help="NaCl sites per axis")
    p.add_argument("--repeats", type=int, default=MULTIHOST_REPEATS, help="timed calls")
    p.add_argument(
        "--chunk-domains",
        type=int,
        default=1,
        help="sub-bricks per domain of the 2-way cut (ShardedPotential chunks; 1 process x 1 "
        "core gets twice as many): less memory for large grids, the same work per sub-brick",
    )
    args = p.parse_args(argv)
    if args.n_grid < 2 or args.repeats < 1:
        p.error("--n-grid must be at least 2 and --repeats at least 1")
    print(
        f"Allegro {DTYPE}, NaCl grid {args.n_grid}³ = {args.n_grid**3} atoms, "
        f"{'quick' if QUICK else 'full'} hyper-parameters (channels "
        f"{HYPERPARAMS['channels']}, r_cut {HYPERPARAMS['r_cut']} Å), {args.repeats} timed "
        f"calls (fresh {MULTIHOST_STEP} Å steps), {2 * args.chunk_domains} sub-bricks, "
        f"cores {cores()}, "
        f"taskset {'yes' if shutil.which('taskset') else 'no (sched_setaffinity)'}",
        flush=True,
    )
    rows = {}
    for name in CONFIGS:
        rows[name] = run_config(name, args.n_grid, args.repeats, args.chunk_domains)
        print(f"{name}: {json.dumps(rows[name])}", flush=True)
    print("\n".join(table(rows)))


if __name__ == "__main__":
    main()
