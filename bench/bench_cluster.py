"""Multi-process data-parallel training and Ray's overhead.

One optimizer step of the package's trainer (:class:`celli_scale.train.ForceMatching`:
energy + force loss, Adam, gradients all-reduced over the batch axis) on a global batch of
``CLUSTER_BATCH`` rattled NaCl grids, in these layouts:

* ``1p1d``: one process, one device;
* ``1p2d``: one process, two host devices (XLA's device-count flag);
* ``2p1d``: two processes of one device each, one ``jax.distributed`` run on 127.0.0.1
  (:mod:`celli_scale.distributed.launch`);
* ``ray2``: the same two processes as Ray worker actors on a simulated 2-node cluster on
  127.0.0.1 (:func:`celli_scale.distributed.ray_launcher.local_cluster`).

Each process is pinned to its own core (``os.sched_setaffinity`` before JAX starts its
threads: process k on core k; the one-process layouts on cores 0 and 1). Times: warm, the
minimum of ``repeats`` steps, every process timing the same steps (the step ends in an
all-reduce, so the slowest sets it). Start-up: seconds from launching the processes to
the first step's start, minus compilation (``join_s``: the ``jax.distributed`` join;
Ray's ``startup_s``: connect, place and start the actors).

Model: Allegro of ``bench._common.config_for("allegro", "float32")`` (its
hyper-parameters are printed with the table). Run ``python -m bench.bench_cluster
[--grid 4] [--batch 8] [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from bench._common import QUICK, TIMEOUT_S

CLUSTER_GRID_N = 2 if QUICK else 4  # 8 / 64 atoms per structure
CLUSTER_BATCH = 4 if QUICK else 8
LAYOUTS = ("1p1d", "1p2d", "2p1d", "ray2")
ROW_TAG = "CLUSTER_ROW "


def step_worker(payload: dict[str, Any]) -> dict[str, Any]:
    """A process's body (already joined to its run, if several): build the trainer, time
    ``repeats`` warm steps; returns this process's timings."""
    t_enter = time.monotonic()
    cores = payload.get("cores")
    if cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(cores))
    import jax
    import numpy as np

    from bench._common import build_potential, config_for, nacl_grid
    from celli_scale.io import Frame
    from celli_scale.train import ForceMatching, TrainConfig

    cfg = config_for("allegro", "float32")
    pot = build_potential(cfg, seed=0)
    ref = build_potential(cfg, seed=1)
    frames = []
    for k in range(payload["batch"] + 1):
        s = nacl_grid(payload["grid"], rattle=0.1, seed=k)
        o = ref(s)
        frames.append(Frame(s, energy=float(o.energy), forces=np.asarray(o.forces)))
    tc = TrainConfig(batch_size=payload["batch"], progress=False, learning_rate=1e-3)
    fm = ForceMatching(pot, frames[:-1], frames[-1:], tc)
    state = jax.device_put(fm.init_state(), fm.replicated)
    graphs, labels, norms = fm.device_batch(fm.train, list(range(payload["batch"])))
    params, opt = state["params"], state["opt_state"]
    t0 = time.monotonic()
    params, opt, loss, _ = jax.block_until_ready(fm.step(params, opt, graphs, labels, norms))
    compile_s = time.monotonic() - t0
    times = []
    for _ in range(int(payload["repeats"])):
        t0 = time.perf_counter()
        params, opt, loss, _ = jax.block_until_ready(fm.step(params, opt, graphs, labels, norms))
        times.append(time.perf_counter() - t0)
    return {
        "process": int(jax.process_index()),
        "processes": int(jax.process_count()),
        "devices": int(jax.device_count()),
        "step_s": float(min(times)),
        "compile_s": compile_s,
        "setup_s": time.monotonic() - t_enter - compile_s - sum(times),
        "loss": float(loss),
        "n_atoms": int(frames[0].n_atoms),
    }


def _local(layout: str, payload: dict[str, Any]) -> dict[str, Any]:
    """Run ``layout`` (1p1d, 1p2d, 2p1d) as subprocesses; process 0's row."""
    from celli_scale.distributed import launch

    processes, devices = (2, 1) if layout == "2p1d" else (1, 2 if layout == "1p2d" else 1)
    address = f"{launch.LOOPBACK}:{launch.free_loopback_port()}"
    envs, stdin = [], []
    for i in range(processes):
        dist = launch.distributed_env(address, processes, i) if processes > 1 else None
        envs.append(launch.worker_env(devices, dist))
        cores = [i] if processes > 1 else list(range(devices))
        stdin.append(json.dumps({**payload, "cores": cores}))
    code = (
        "import json, sys, time; t0 = time.monotonic()\n"
        "from celli_scale.distributed import multihost; multihost.initialize()\n"
        "join = time.monotonic() - t0\n"
        "from bench.bench_cluster import step_worker, ROW_TAG\n"
        "row = step_worker(json.loads(sys.stdin.read())); row['join_s'] = join\n"
        "print(ROW_TAG + json.dumps(row), flush=True)\n"
    )
    t0 = time.monotonic()
    r = launch.run_group(
        [[sys.executable, "-c", code]] * processes, stdin=stdin, env=envs, timeout_s=TIMEOUT_S
    )
    wall = time.monotonic() - t0
    if not r.ok:
        raise RuntimeError(f"{layout}: {r.reason(TIMEOUT_S)}")
    row = json.loads(next(x for x in r.stdout_lines if x.startswith(ROW_TAG))[len(ROW_TAG) :])
    return {**row, "layout": layout, "wall_s": wall, "startup_s": 0.0}


def _ray(payload: dict[str, Any]) -> dict[str, Any]:
    """The 2-process layout as 2 Ray workers on a local 2-node cluster; worker 0's row."""
    import subprocess

    from celli_scale.distributed.ray_launcher import local_cluster

    code = (
        "import json, sys\n"
        "from celli_scale.distributed.ray_launcher import run_on_ray\n"
        "a = json.loads(sys.argv[1])\n"
        "res = run_on_ray('bench.bench_cluster:ray_step_worker', a['payload'],\n"
        "    address=a['address'], num_workers=2, strategy='STRICT_SPREAD')\n"
        "row = dict(res.results[0], startup_s=res.startup_s, wall_s=res.seconds)\n"
        "print(a['tag'] + json.dumps(row), flush=True)\n"
    )
    with local_cluster(nodes=2, cpus_per_node=1) as (address, env):
        arg = json.dumps({"address": address, "payload": payload, "tag": ROW_TAG})
        r = subprocess.run(
            [sys.executable, "-c", code, arg],
            capture_output=True,
            text=True,
            env=env,
            timeout=TIMEOUT_S,
        )
    rows = [x for x in r.stdout.splitlines() if x.startswith(ROW_TAG)]
    if r.returncode or not rows:
        raise RuntimeError(f"ray2: {r.stderr[-2000:]}")
    return {**json.loads(rows[-1][len(ROW_TAG) :]), "layout": "ray2"}


def ray_step_worker(payload: dict[str, Any]) -> dict[str, Any]:
    """:func:`step_worker` in a Ray worker (joined by the launcher): pinned to the core of
    its index."""
    import jax

    return step_worker({**payload, "cores": [jax.process_index() % (os.cpu_count() or 1)]})


def measure(layout: str, grid: int, batch: int, repeats: int) -> dict[str, Any]:
    payload = {"grid": grid, "batch": batch, "repeats": repeats}
    return _ray(payload) if layout == "ray2" else _local(layout, payload)


class ClusterTrainStep:
    """Seconds of one data-parallel training step per layout (warm, min of repeats)."""

    params = (list(LAYOUTS),)
    param_names = ("layout",)
    timeout = TIMEOUT_S
    number = 1
    repeat = 1

    def setup_cache(self) -> dict[str, Any]:
        layouts = ("1p1d",) if QUICK else LAYOUTS
        return {
            layout: measure(layout, CLUSTER_GRID_N, CLUSTER_BATCH, 2 if QUICK else 5)
            for layout in layouts
        }

    def setup(self, cache: dict[str, Any], layout: str) -> None:
        if layout not in cache:
            raise NotImplementedError(f"{layout} is measured in full mode only")

    def track_step_seconds(self, cache: dict[str, Any], layout: str) -> float:
        return float(cache[layout]["step_s"])

    track_step_seconds.unit = "seconds"


def main(argv: list[str] | None = None) -> int:
    from bench._common import config_for

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grid", type=int, default=CLUSTER_GRID_N, help="NaCl grid sites per axis")
    p.add_argument("--batch", type=int, default=CLUSTER_BATCH, help="structures per step")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    a = p.parse_args(argv)
    print(f"model: allegro float32 {json.dumps(config_for('allegro', 'float32'))}")
    print(f"batch {a.batch} x {a.grid**3} atoms; min of {a.repeats} warm steps")
    rows = {}
    for layout in a.layouts.split(","):
        rows[layout] = measure(layout, a.grid, a.batch, a.repeats)
        r = rows[layout]
        print(
            f"{layout:5s} step {r['step_s'] * 1e3:8.1f} ms  compile {r['compile_s']:5.1f} s  "
            f"join {r.get('join_s', 0.0):5.2f} s  ray start-up {r['startup_s']:5.2f} s  "
            f"wall {r['wall_s']:5.1f} s  loss {r['loss']:.6g}",
            flush=True,
        )
    if "1p1d" in rows:
        base = rows["1p1d"]["step_s"]
        for k, r in rows.items():
            print(f"speed-up {k} vs 1p1d: {base / r['step_s']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
