"""Running a scaling study: the sweep (:func:`run_study`), one (model, processes,
devices) run in worker subprocesses (:func:`run_points`), the worker's body
(:func:`worker`) and one timed point (:func:`measure_point`).

The study times one jitted energy + forces evaluation of a *batch* of NaCl grids
(the project's shared PEERS.md: simple cubic, spacing 2.2 Å, ±1 alternating, periodic), sharded
data-parallel over ``processes × devices`` workers
(:mod:`celli_scale.distributed.data_parallel`). Strong scaling keeps the batch fixed;
weak scaling gives every worker the same number of structures.

Every (model, processes, devices) triple runs in its own subprocess(es)
(``python -m celli_scale.study --worker``, the spec as JSON on stdin), with
``XLA_FLAGS=--xla_force_host_platform_device_count=D`` on CPU (the flag must be set before
JAX starts), sizes in increasing order; several processes join one ``jax.distributed``
run whose coordinator and gloo CPU collectives stay on 127.0.0.1
(:mod:`celli_scale.distributed.launch`). Process 0 writes each result as one tagged JSON
line on stdout as soon as it is measured.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from celli_scale.datasets.synthetic import nacl_grid
from celli_scale.distributed import launch
from celli_scale.study import report
from celli_scale.study.config import StudyConfig
from celli_scale.study.presets import build_potential

log = logging.getLogger(__name__)

#: Prefix of a result line written by a worker subprocess.
ROW_TAG = "CELLI_SCALE_ROW "
#: The worker's command line (spec as JSON on stdin).
WORKER_ARGS = ("-m", "celli_scale.study", "--worker")


def measure_point(
    pot: Any,
    n: int,
    *,
    devices: int = 1,
    batch: int = 1,
    repeats: int = 3,
    spacing: float = 2.2,
    rattle: float = 0.05,
    seed: int = 0,
    memory_fraction: float = 0.85,
) -> dict[str, Any]:
    """Time one jitted energy + forces step on ``batch`` NaCl grids of ``n³`` atoms,
    sharded over ``devices`` devices (all processes' devices together). Returns a result
    row (see :data:`celli_scale.study.report.CSV_COLUMNS`); memory and CPU time are this
    process's.

    Every process builds every graph (host work, identical everywhere) so that the edge
    capacity is common; each then places only its own shards.

    Raises:
      celli_scale.memory.InsufficientMemoryError: the compiled step does not fit.
    """
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from celli_scale import memory
    from celli_scale.distributed import data_parallel as dp

    if batch % devices:
        raise ValueError(f"batch {batch} is not divisible by {devices} devices")
    systems = [nacl_grid(n, spacing, rattle, seed + k) for k in range(batch)]
    n_atoms = systems[0].n_atoms
    graphs = pot.batch_graph(systems)
    n_edges = int(np.asarray(graphs.edge_mask[0]).sum())
    fn, sharding = dp.data_parallel_energy_forces(pot, devices)
    graphs = dp.place(graphs, sharding)
    params = dp.place(pot.params, NamedSharding(sharding.mesh, P()))
    t0 = time.perf_counter()
    compiled = fn.lower(params, graphs).compile()
    compile_s = time.perf_counter() - t0
    mine = sum(d.process_index == jax.process_index() for d in sharding.mesh.devices.flat)
    # devices of every process on this host share its memory
    need = memory.check_fits(compiled, devices if launch.on_one_host() else mine, memory_fraction)
    times = []
    with memory.PeakRSS() as rss:
        out = jax.block_until_ready(compiled(params, graphs))  # warm-up
        cpu0 = memory.cpu_seconds()
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            out = jax.block_until_ready(compiled(params, graphs))
            times.append(time.perf_counter() - t0)
        cpu_s = (memory.cpu_seconds() - cpu0) / max(1, repeats)
    seconds = float(np.median(times))
    return {
        "n_grid": int(n),
        "n_atoms": int(n_atoms),
        "n_edges": n_edges,
        "workers": int(devices),
        "batch": int(batch),
        "seconds": seconds,
        "seconds_min": float(np.min(times)),
        "seconds_per_structure": seconds / batch,
        "atoms_steps_per_s": batch * n_atoms / seconds,
        "cpu_seconds": cpu_s,
        "peak_rss_mb": float(rss.peak_mb),
        "compiled_mb": need / 2**20,
        "compile_s": compile_s,
        "energy_sum": float(np.asarray(out[2])[0]),
        "status": dp.summary_check(pot, out[2]),
    }


def ray_worker(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """A Ray worker's body (:func:`celli_scale.distributed.ray_launcher.run_on_ray`, the
    run already joined): :func:`worker`, returning process 0's rows (others: none)."""
    rows: list[dict[str, Any]] = []
    worker(spec, rows.append)
    return rows


def worker(spec: dict[str, Any], on_row: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Subprocess body: one model and device/process count, all sizes in increasing
    order; process 0 writes each result to stdout as one :data:`ROW_TAG` JSON line as
    soon as it is measured (or hands it to ``on_row``). A size that does not fit stops the
    larger ones."""
    launch.init_from_env()
    import jax

    from celli_scale.memory import InsufficientMemoryError

    jax.config.update("jax_enable_x64", True)
    processes = int(spec.get("processes", 1))
    if jax.process_count() != processes:
        raise RuntimeError(f"expected {processes} processes, JAX sees {jax.process_count()}")
    leader = jax.process_index() == 0
    base = {
        "model": spec["model"],
        "dtype": spec["dtype"],
        "devices": spec["devices"],
        "processes": processes,
        "batch": spec["batch"],
        "platform": jax.devices()[0].platform,
    }
    off_loopback = [a for a in launch.listening_addresses() if not launch.is_loopback(a)]

    def emit(row: dict[str, Any]) -> None:
        if not leader:
            return
        row["status"] = " ".join(str(row.get("status", "")).split())[:400]  # one CSV line
        if processes > 1:
            row["listening"] = launch.listening_addresses()
        if on_row is not None:
            on_row({**base, **row})
            return
        sys.stdout.write(ROW_TAG + json.dumps({**base, **row}) + "\n")
        sys.stdout.flush()

    sizes = sorted(spec["sizes"])
    try:
        if off_loopback:
            raise RuntimeError(f"listening off loopback: {off_loopback}")
        pot = build_potential(spec["config"], seed=spec["seed"])
    except Exception as e:  # report every size as failed, with the reason
        for n in sizes:
            emit({"n_grid": n, "n_atoms": n**3, "status": f"error: {type(e).__name__}: {e}"})
        raise
    stop = None
    for n in sizes:
        if stop is not None:
            emit({"n_grid": n, "n_atoms": n**3, "status": f"skipped: {stop}"})
            continue
        try:
            row = measure_point(
                pot,
                n,
                devices=spec["devices"] * processes,
                batch=spec["batch"],
                repeats=spec["repeats"],
                spacing=spec["spacing"],
                rattle=spec["rattle"],
                seed=spec["seed"],
                memory_fraction=spec["memory_fraction"],
            )
        except InsufficientMemoryError as e:
            stop = f"a smaller size (n={n}) did not fit"
            row = {"n_grid": n, "n_atoms": n**3, "status": f"out of memory: {e}"}
        except Exception as e:  # noqa: BLE001 - reported in the row, the sweep goes on
            if processes > 1:
                raise  # the other processes wait in a collective: end the run
            log.exception("model %s n=%d failed", spec["model"], n)
            row = {"n_grid": n, "n_atoms": n**3, "status": f"error: {type(e).__name__}: {e}"}
        emit(row)
    if processes > 1 and on_row is None:  # under Ray the launcher leaves the run
        jax.distributed.shutdown()


def run_points(
    spec: dict[str, Any],
    timeout_s: float = 3600.0,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    ray: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Run :func:`worker` for ``spec`` in ``spec['processes']`` (default 1) subprocesses
    with ``spec['devices']`` host devices each; return the rows of process 0 (a row per
    size, failures included), calling ``on_row(row)`` as each arrives.

    Several processes form one ``jax.distributed`` run with its coordinator on
    127.0.0.1 (a free port) and gloo collectives; if any of them fails or the run times
    out, all are killed (:func:`celli_scale.distributed.launch.run_group`) and the
    missing sizes get a row saying why.
    """
    processes = int(spec.get("processes", 1))
    spec = {**spec, "processes": processes}
    if ray is not None:
        return _run_points_ray(spec, timeout_s, on_row, ray)
    rows: list[dict[str, Any]] = []

    def on_line(line: str) -> None:
        if line.startswith(ROW_TAG):
            row = json.loads(line[len(ROW_TAG) :])
            rows.append(row)
            if on_row is not None:
                on_row(row)

    address = f"{launch.LOOPBACK}:{launch.free_loopback_port()}" if processes > 1 else None
    envs = [
        launch.worker_env(
            spec["devices"], address and launch.distributed_env(address, processes, i)
        )
        for i in range(processes)
    ]
    result = launch.run_group(
        [[sys.executable, *WORKER_ARGS]] * processes,
        stdin=[json.dumps(spec)] * processes,
        env=envs,
        timeout_s=timeout_s,
        on_line=on_line,
        tail_chars=400,
    )
    if result.timed_out:
        why = f"timeout after {timeout_s:.0f} s"
    else:
        bad = result.failed or [i for i, rc in enumerate(result.returncodes) if rc]
        status = result.returncodes[bad[0]] if bad else 0
        tail = " | ".join(f"process {i}: {result.stderr_tails[i]}" for i in bad)
        why = f"worker exited with status {status}: {tail}"
    done = {r["n_grid"] for r in rows}
    for n in sorted(spec["sizes"]):
        if n not in done:
            row = {
                "model": spec["model"],
                "dtype": spec["dtype"],
                "devices": spec["devices"],
                "processes": processes,
                "batch": spec["batch"],
                "n_grid": n,
                "n_atoms": n**3,
                "status": why,
            }
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return rows


def _run_points_ray(
    spec: dict[str, Any],
    timeout_s: float,
    on_row: Callable[[dict[str, Any]], None] | None,
    ray: dict[str, Any],
) -> list[dict[str, Any]]:
    """:func:`run_points` on a Ray worker group of ``spec['processes']`` workers; a
    failed group gives every size a row saying why."""
    from celli_scale.distributed.ray_launcher import run_on_ray

    opts = {k: v for k, v in ray.items() if k != "num_workers"}
    try:
        res = run_on_ray(
            "celli_scale.study.run:ray_worker",
            spec,
            num_workers=spec["processes"],
            devices_per_worker=spec["devices"],
            timeout_s=timeout_s,
            **opts,
        )
        rows = list(res.results[0])
        why = ""
    except Exception as e:  # noqa: BLE001 - reported in the rows, the sweep goes on
        rows, why = [], f"Ray worker group failed: {type(e).__name__}: {e}"
    for row in rows:
        if on_row is not None:
            on_row(row)
    done = {r["n_grid"] for r in rows}
    for n in sorted(spec["sizes"]):
        if n not in done:
            row = {k: spec[k] for k in ("model", "dtype", "devices", "processes", "batch")}
            row.update(n_grid=n, n_atoms=n**3, status=why or "missing")
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return rows


def point_spec(cfg: StudyConfig, model: str, processes: int, devices: int) -> dict[str, Any]:
    """The JSON spec a worker runs: ``model`` on ``processes × devices`` workers."""
    return {
        "model": model,
        "config": cfg.model_config(model),
        "sizes": list(cfg.sizes),
        "dtype": cfg.dtype,
        "devices": devices,
        "processes": processes,
        "batch": cfg.batch_for(processes * devices),
        "repeats": cfg.repeats,
        "spacing": cfg.spacing,
        "rattle": cfg.rattle,
        "seed": cfg.seed,
        "memory_fraction": cfg.memory_fraction,
    }


def run_study(
    config: dict[str, Any] | StudyConfig,
    out_dir: str | os.PathLike,
    *,
    progress: bool = True,
    ray: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Run the sweep models × sizes × processes × devices and write the outputs into
    ``out_dir`` (:func:`celli_scale.study.report.write_report`). With ``ray``
    (:func:`celli_scale.distributed.ray_launcher.run_on_ray` options: ``address``,
    ``cpus_per_worker``, ``max_restarts``) each point's processes are Ray workers instead
    of local subprocesses.

    Returns the rows of ``results.csv`` as a list of dicts (ordered by model, processes,
    devices, size); a point that did not run has ``status`` saying why and NaN timings.
    """
    from tqdm.auto import tqdm

    cfg = config if isinstance(config, StudyConfig) else StudyConfig.from_dict(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    layouts = [(p, n) for p in cfg.processes for n in cfg.devices]
    total = len(cfg.models) * len(cfg.sizes) * len(layouts)
    bar = tqdm(total=total, desc="scale", unit="point", disable=not progress)

    def on_row(row: dict[str, Any]) -> None:
        bar.set_postfix_str(
            f"{row['model']} N={row['n_atoms']} p={row['processes']} d={row['devices']}"
        )
        bar.update()

    for model in cfg.models:
        for processes, devices in layouts:
            spec = point_spec(cfg, model, processes, devices)
            got = run_points(spec, cfg.timeout_s, on_row, ray=ray)
            rows.extend(report.complete_row(r) for r in sorted(got, key=lambda r: r["n_grid"]))
            report.write_csv(rows, out / "results.csv")  # partial results survive an interrupt
    bar.close()
    report.write_report(rows, cfg, out)
    return rows
