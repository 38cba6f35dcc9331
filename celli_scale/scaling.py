"""`celli-scale scale CONFIG`: a scaling study of the models over system size, devices
and processes.

The study sweeps models × system sizes × (processes, devices) on the NaCl grid of
``bench/PEERS.md`` (simple cubic, spacing 2.2 Å, ±1 alternating, periodic) and times one
jitted energy + forces evaluation of a *batch* of structures. Parallelism is
**data-parallel (batch over devices)**: the batch is sharded over a 1-D mesh of
``processes × devices`` workers with ``jax.shard_map`` and each device evaluates its own
structures; no structure is split (spatial domain decomposition is a different, future
feature; ``bench/bench_halo.py`` measures what its halo will cost). Strong scaling keeps the
batch fixed; weak scaling gives every worker the same number of structures.

Every (model, processes, devices) triple runs in its own subprocess(es), with
``XLA_FLAGS=--xla_force_host_platform_device_count=D`` on CPU (the flag must be set before
JAX starts), sizes in increasing order; several processes join one ``jax.distributed``
run whose coordinator and gloo CPU collectives stay on 127.0.0.1. One code path serves 1
and many workers.

Outputs in ``out_dir``: ``results.csv`` (one row per model × size × processes × devices),
``time_vs_n.png`` (log-log, fitted slope per model), ``speedup_vs_devices.png``
(speed-up and parallel efficiency over workers, devices and processes as separate
series), ``ratio_celli_mpnn.png`` (CELLI/MACE and CELLI/NequIP time ratios vs N) and
``results.md`` (tables, slopes, speed-ups, configuration, machine).

Config (YAML, every key optional but ``models`` and ``sizes``)::

    models: [allegro, celli]        # registry names
    sizes: [4, 6]                   # NaCl grid sites per axis (N = n³) ...
    size_unit: grid_n               # ... or "atoms": sizes are N (perfect cubes)
    dtype: float32                  # float32 | float64
    devices: [1, 2]                 # devices per process
    processes: [1, 2]               # processes (jax.distributed on 127.0.0.1)
    mode: strong                    # strong (fixed batch) | weak (batch per worker)
    batch: 2                        # structures per step (strong; default: lcm of the
                                    # worker counts) or per worker (weak; default 1)
    repeats: 3                      # timed evaluations per point (median reported)
    hyperparams: {channels: 32}     # shared model keys, over the defaults below
    model_extras: {celli: {n_pre: 1}}  # per-model keys, over the defaults below
    spacing: 2.2                    # Å
    rattle: 0.05                    # Å, Gaussian displacement of each site
    seed: 0
    timeout_s: 3600                 # per (model, processes, devices) run
    memory_fraction: 0.85           # skip a point whose compiled need exceeds this
                                    # fraction of the available memory

Units: seconds are wall-clock seconds per batch step (process 0's clock; the step ends
with an all-reduce, so it includes the slowest worker); ``atoms_steps_per_s`` is
``batch · N / seconds``; memory (process 0's) in MiB.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import logging
import math
import os
import queue
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------
# matched hyper-parameters (benchmarks and the study share them)
# --------------------------------------------------------------------------------------
#: Shared keys, identical for all four models (PEERS.md: 2 layers, l_max 2, 32 features,
#: 8 radial functions, r_cut 5 Å; 56 neighbours per atom on the NaCl grid).
FULL_HYPERPARAMS: dict[str, Any] = {
    "r_cut": 5.0,
    "l_max": 2,
    "channels": 32,
    "n_layers": 2,
    "n_radial": 8,
    "radial_mlp": [64, 64],
    "avg_num_neighbors": 56.0,
    "parity": True,
}
#: Model-specific keys (each model's own defaults otherwise). CELLI: one Allegro layer
#: before and one after the charge-equilibration layer; electrostatics chosen by "auto"
#: to accuracy 1e-6. MACE: correlation order 3, as mace-torch in PEERS.md.
MODEL_EXTRAS: dict[str, dict[str, Any]] = {
    "allegro": {},
    "celli": {"n_pre": 1, "n_post": 1, "elec_method": "auto", "elec_accuracy": 1e-6},
    "nequip": {},
    "mace": {"correlation": 3},
}
#: float32 CELLI cannot reach the float64 Qeq tolerance: its CG stops at this one.
CELLI_FLOAT32_QEQ_TOL = 1e-5

#: Quick mode (tests, CI): the same keys, tiny widths.
QUICK_HYPERPARAMS: dict[str, Any] = {
    "r_cut": 5.0,
    "l_max": 2,
    "channels": 4,
    "n_layers": 2,
    "n_radial": 4,
    "radial_mlp": [8],
    "avg_num_neighbors": 56.0,
    "parity": True,
}
QUICK_MODEL_EXTRAS: dict[str, dict[str, Any]] = {
    "allegro": {"latent_dim": 8, "latent_mlp": [8], "edge_eng_mlp": [8]},
    "celli": {
        "n_pre": 1,
        "n_post": 1,
        "elec_method": "auto",
        "elec_accuracy": 1e-6,
        "latent_dim": 8,
        "latent_mlp": [8],
        "edge_eng_mlp": [8],
    },
    "nequip": {"readout_hidden": 4},
    "mace": {"correlation": 3},
}

#: Species of the NaCl grid.
NACL_SPECIES = (11, 17)

#: Prefix of a result line written by a worker subprocess.
_ROW_TAG = "CELLI_SCALE_ROW "
_DEVICE_FLAG = "--xla_force_host_platform_device_count"
#: Environment variable telling a worker its place in a multi-process run:
#: ``"COORDINATOR_ADDRESS,NUM_PROCESSES,PROCESS_ID"`` (the coordinator always on 127.0.0.1).
_DIST_ENV = "CELLI_SCALE_DISTRIBUTED"


class MemoryTooLarge(NotImplementedError):
    """Temporary: asv's skip (moves to bench/)."""


def model_config(
    model: str,
    dtype: str,
    hyperparams: dict[str, Any] | None = None,
    extras: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Full config dict of ``model`` at matched hyper-parameters (``species`` = Na, Cl)."""
    hp = dict(FULL_HYPERPARAMS if hyperparams is None else hyperparams)
    ex = MODEL_EXTRAS if extras is None else extras
    cfg = {"name": model, **hp, **ex.get(model, {}), "dtype": dtype, "species": list(NACL_SPECIES)}
    if model == "celli" and dtype == "float32":
        cfg.setdefault("qeq_tol", CELLI_FLOAT32_QEQ_TOL)
    return cfg


def model_available(model: str) -> tuple[bool, str]:
    """Whether the model's module can be imported (models land one by one)."""
    import importlib

    from celli_scale import models

    if model not in models.MODEL_NAMES:
        return False, f"unknown model (choose from {list(models.MODEL_NAMES)})"
    try:
        models._lookup(model)
    except (ImportError, AttributeError) as e:
        return False, f"{type(e).__name__}: {e}"
    importlib.invalidate_caches()
    return True, ""


def nacl_system(n: int, spacing: float = 2.2, rattle: float = 0.0, seed: int = 0):
    """The PEERS.md NaCl grid (n³ atoms), see :func:`celli_scale.demo.nacl_grid`."""
    from celli_scale.datasets import nacl_grid

    return nacl_grid(int(n), spacing=spacing, rattle=rattle, seed=seed)


def build_potential(config: dict[str, Any], seed: int = 0):
    """A freshly initialised :class:`~celli_scale.potential.Potential` for benchmarking.

    Parameters come from a jitted ``model.init`` on a 2×2×2 NaCl grid (they do not depend
    on the system size); ``capacity_growth=1`` so that graphs carry no spare edges.
    """

    from celli_scale.potential import Potential

    pot = Potential.from_config(config, seed=seed, example=nacl_system(2), capacity_growth=1.0)
    pot.reset_capacities()  # size the next graph exactly
    return pot


from celli_scale.memory import (  # noqa: E402
    PeakRSS,
)


def check_fits(compiled, n_programs=1, fraction=0.85):
    from celli_scale import memory

    try:
        return memory.check_fits(compiled, n_programs, fraction)
    except memory.InsufficientMemoryError as e:
        raise MemoryTooLarge(str(e)) from None


# --------------------------------------------------------------------------------------
# one measurement: a batch of structures, data-parallel over devices
# --------------------------------------------------------------------------------------
def batch_graphs(pot: Any, systems: Sequence[Any]) -> Any:
    """Graphs of ``systems`` (same atom count) with one common edge capacity, stacked
    along a leading batch axis."""

    return pot.batch_graph(systems)


def data_parallel_energy_forces(pot: Any, devices: int) -> tuple[Any, Any]:
    """``(fn, sharding)``: ``fn(params, graphs) -> (energy (B,), forces (B, N, 3),
    summary (3,))`` jitted with the batch axis sharded over the first ``devices`` devices
    of ``jax.devices()`` (data-parallel: each device evaluates whole structures; with
    several processes the mesh spans every process's devices).

    ``summary`` is replicated: the total energy, the number of non-finite energies and
    the largest Qeq residual (0 for models without one). Its all-reduce ends the step on
    every device, as a training step's gradient all-reduce would, so the time of the
    step is the time of the slowest device.
    """
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    devs = jax.devices()
    if len(devs) < devices:
        raise RuntimeError(
            f"{devices} devices requested, {len(devs)} visible (on CPU set "
            f"XLA_FLAGS={_DEVICE_FLAG}={devices} before JAX starts)"
        )
    mesh = Mesh(np.asarray(devs[:devices]), ("batch",))

    def one(params, graph):
        energy, forces, _, out = pot.evaluate(params, graph)
        res = out.qeq_residual if out.qeq_residual is not None else jnp.zeros((), energy.dtype)
        return energy, forces, res.astype(energy.dtype)

    def local(params, graphs):
        # lax.map, not vmap: a device evaluates its structures one after another. On CPU
        # vmap's batched gathers/scatters made each structure 1.2-1.8x slower (measured,
        # bench/RESULTS.md), even for a batch of one.
        e, f, res = jax.lax.map(lambda graph: one(params, graph), graphs)
        summary = jnp.stack(
            [
                jax.lax.psum(jnp.sum(e), "batch"),
                jax.lax.psum(jnp.sum(~jnp.isfinite(e)).astype(e.dtype), "batch"),
                jax.lax.pmax(jnp.max(res), "batch"),
            ]
        )
        return e, f, summary

    # check_vma=False: the models' loops (CELLI's Qeq solver) carry values that are not
    # annotated as varying over the mesh axis; every device runs them on its own shard.
    sharded = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(), P("batch")),
        out_specs=(P("batch"), P("batch"), P()),
        check_vma=False,
    )
    fn = jax.jit(sharded)
    return fn, NamedSharding(mesh, P("batch"))


def global_array(x: Any, sharding: Any) -> Any:
    """A host array that every process holds identically, laid out with ``sharding``
    (each process materialises only its own shards; one code path for 1 or many
    processes)."""
    import jax

    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


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
    row (see :data:`CSV_COLUMNS`); memory and CPU time are this process's.

    Every process builds every graph (host work, identical everywhere) so that the edge
    capacity is common; each then places only its own shards.
    """
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    if batch % devices:
        raise ValueError(f"batch {batch} is not divisible by {devices} devices")
    systems = [nacl_system(n, spacing, rattle, seed + k) for k in range(batch)]
    n_atoms = systems[0].n_atoms
    graphs = batch_graphs(pot, systems)
    n_edges = int(np.asarray(graphs.edge_mask[0]).sum())
    fn, sharding = data_parallel_energy_forces(pot, devices)
    replicated = NamedSharding(sharding.mesh, P())
    graphs = jax.tree_util.tree_map(lambda x: global_array(x, sharding), graphs)
    params = jax.tree_util.tree_map(lambda x: global_array(x, replicated), pot.params)
    t0 = time.perf_counter()
    compiled = fn.lower(params, graphs).compile()
    compile_s = time.perf_counter() - t0
    local_devices = sum(d.process_index == jax.process_index() for d in sharding.mesh.devices.flat)
    # devices of every process on this host share its memory
    need = check_fits(compiled, devices if _one_host() else local_devices, memory_fraction)
    times = []
    with PeakRSS() as rss:
        out = jax.block_until_ready(compiled(params, graphs))  # warm-up
        cpu0 = _cpu_seconds()
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            out = jax.block_until_ready(compiled(params, graphs))
            times.append(time.perf_counter() - t0)
        cpu_s = (_cpu_seconds() - cpu0) / max(1, repeats)
    status = "ok"
    energy_sum, n_bad, res = (float(v) for v in np.asarray(out[2]))
    if n_bad:
        status = f"non-finite energy in {n_bad:.0f} structure(s)"
    tol = float(getattr(pot.config, "qeq_tol", None) or 1e-10)
    if hasattr(pot.config, "qeq_tol") and not (res <= 10 * tol):
        status = f"qeq residual {res:.2g} > 10 x tol {tol:.0e}"
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
        "energy_sum": energy_sum,
        "status": status,
    }


def _one_host() -> bool:
    """True when every JAX process runs on this machine (the study's own launches)."""
    import jax

    address = os.environ.get(_DIST_ENV, "").split(",")[0]
    return address.startswith("127.0.0.1:") or jax.process_count() == 1


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process (all threads): on a shared machine it
    moves less with other people's load than wall-clock time does."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _init_distributed() -> None:
    """Join the multi-process run described by :data:`_DIST_ENV`, if any.

    The coordinator binds to 127.0.0.1 only (``jax.distributed`` would otherwise listen
    on every interface) and the CPU collectives are gloo over loopback.
    """
    value = os.environ.get(_DIST_ENV)
    if not value:
        return
    import jax

    address, n_proc, pid = value.split(",")
    if not address.startswith("127.0.0.1:"):
        raise RuntimeError(f"refusing a coordinator off loopback: {address}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=address,
        num_processes=int(n_proc),
        process_id=int(pid),
        coordinator_bind_address=address,
        initialization_timeout=120,
    )


def listening_addresses() -> list[str]:
    """``host:port`` of every TCP socket this process listens on (Linux ``/proc``; empty
    elsewhere), so that a multi-process run can prove it stays on loopback."""
    import socket as socket_mod
    import struct

    inodes = set()
    try:
        for fd in os.listdir("/proc/self/fd"):
            try:
                link = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    except OSError:
        return []
    found = []
    for name, family in (("tcp", socket_mod.AF_INET), ("tcp6", socket_mod.AF_INET6)):
        try:
            with open(f"/proc/self/net/{name}") as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if cols[3] != "0A" or cols[9] not in inodes:  # 0A = LISTEN
                continue
            hex_ip, hex_port = cols[1].split(":")
            raw = bytes.fromhex(hex_ip)
            # /proc prints the address as native-endian 32-bit words
            raw = b"".join(
                struct.pack("=I", int.from_bytes(raw[i : i + 4], "big"))
                for i in range(0, len(raw), 4)
            )
            ip = socket_mod.inet_ntop(family, raw)
            found.append(f"{ip}:{int(hex_port, 16)}")
    return sorted(found)


def _is_loopback(address: str) -> bool:
    import ipaddress

    ip = ipaddress.ip_address(address.rsplit(":", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _worker(spec: dict[str, Any]) -> None:
    """Subprocess body: one model and device/process count, all sizes in increasing
    order; process 0 writes each result to stdout as one tagged JSON line as soon as it
    is measured."""
    _init_distributed()
    import jax

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
    off_loopback = [a for a in listening_addresses() if not _is_loopback(a)]

    def emit(row: dict[str, Any]) -> None:
        if not leader:
            return
        row["status"] = " ".join(str(row.get("status", "")).split())[:400]  # one CSV line
        if processes > 1:
            row["listening"] = listening_addresses()
        sys.stdout.write(_ROW_TAG + json.dumps({**base, **row}) + "\n")
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
        except MemoryTooLarge as e:
            stop = f"a smaller size (n={n}) did not fit"
            row = {"n_grid": n, "n_atoms": n**3, "status": f"out of memory: {e}"}
        except Exception as e:  # noqa: BLE001 - reported in the row, the sweep goes on
            if processes > 1:
                raise  # the other processes wait in a collective: end the run
            log.exception("model %s n=%d failed", spec["model"], n)
            row = {"n_grid": n, "n_atoms": n**3, "status": f"error: {type(e).__name__}: {e}"}
        emit(row)
    if processes > 1:
        jax.distributed.shutdown()


def _subprocess_env(devices: int, dist: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_FLAG)]
    flags.append(f"{_DEVICE_FLAG}={int(devices)}")
    env["XLA_FLAGS"] = " ".join(flags)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    env.pop(_DIST_ENV, None)
    if dist is not None:
        env[_DIST_ENV] = dist
    return env


def _free_loopback_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_points(spec: dict[str, Any], timeout_s: float = 3600.0, on_row=None) -> list[dict]:
    """Run :func:`_worker` for ``spec`` in ``spec['processes']`` (default 1) subprocesses
    with ``spec['devices']`` host devices each; return the rows of process 0 (a row per
    size, failures included), calling ``on_row(row)`` as each arrives.

    Several processes form one ``jax.distributed`` run with its coordinator on
    127.0.0.1 (a free port) and gloo collectives; if any of them fails or the run times
    out, all are killed and the missing sizes get a row saying why.
    """
    processes = int(spec.get("processes", 1))
    spec = {**spec, "processes": processes}
    cmd = [sys.executable, "-m", "celli_scale.scaling", "--worker"]
    rows: list[dict] = []
    lines: queue.Queue[str | None] = queue.Queue()
    address = f"127.0.0.1:{_free_loopback_port()}" if processes > 1 else None
    procs: list[subprocess.Popen] = []
    with contextlib.ExitStack() as stack:
        logs = [stack.enter_context(_TempLog()) for _ in range(processes)]
        stack.callback(lambda: [p.kill() for p in procs if p.poll() is None])
        for pid, errlog in enumerate(logs):
            dist = f"{address},{processes},{pid}" if address else None
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE if pid == 0 else subprocess.DEVNULL,
                stderr=errlog.file,
                text=True,
                env=_subprocess_env(spec["devices"], dist),
            )
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(spec))
            proc.stdin.close()
            procs.append(proc)
        leader = procs[0]
        assert leader.stdout is not None

        def pump() -> None:
            for line in leader.stdout:  # type: ignore[union-attr]
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + timeout_s
        timed_out = False
        while True:
            try:
                line = lines.get(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
            except queue.Empty:
                if time.monotonic() >= deadline:
                    timed_out = True
                    break
                if any(p.poll() not in (None, 0) for p in procs[1:]):
                    break  # a follower died: the leader would wait in a collective
                continue
            if line is None:
                break
            if line.startswith(_ROW_TAG):
                row = json.loads(line[len(_ROW_TAG) :])
                rows.append(row)
                if on_row is not None:
                    on_row(row)
        # the processes that ended badly on their own, before we kill the rest
        failed = [(i, p.returncode) for i, p in enumerate(procs) if p.poll() not in (None, 0)]
        if timed_out or failed:
            for p in procs:
                p.kill()
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        failed = failed or [(i, p.returncode) for i, p in enumerate(procs) if p.returncode]
        tail = " | ".join(f"process {i}: {logs[i].tail()}" for i, _ in failed)
    done = {r["n_grid"] for r in rows}
    why = (
        f"timeout after {timeout_s:.0f} s"
        if timed_out
        else (f"worker exited with status {failed[0][1] if failed else 0}: {tail}")
    )
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


class _TempLog:
    """A temporary file for a subprocess's stderr, with its last line for error rows."""

    def __enter__(self) -> _TempLog:
        import tempfile

        self.file = tempfile.TemporaryFile(mode="w+")
        return self

    def tail(self, n: int = 400) -> str:
        self.file.seek(0)
        text = self.file.read().strip()
        return " ".join(text[-n:].split())

    def __exit__(self, *exc: Any) -> None:
        self.file.close()


# --------------------------------------------------------------------------------------
# the study
# --------------------------------------------------------------------------------------
CSV_COLUMNS = (
    "model",
    "n_grid",
    "n_atoms",
    "n_edges",
    "dtype",
    "processes",
    "devices",
    "workers",
    "batch",
    "seconds",
    "seconds_min",
    "seconds_per_structure",
    "atoms_steps_per_s",
    "cpu_seconds",
    "peak_rss_mb",
    "compiled_mb",
    "compile_s",
    "energy_sum",
    "platform",
    "status",
)


@dataclass(frozen=True)
class StudyConfig:
    """A scaling study (see the module docstring for the YAML form).

    Attributes:
      models: registry names. sizes: grid sites per axis (``size_unit="grid_n"``) or atom
      counts (``"atoms"``, perfect cubes). dtype: "float32" | "float64". devices: device
      counts per process. processes: process counts (``jax.distributed`` on 127.0.0.1);
      every (processes, devices) pair runs, with ``processes × devices`` workers.
      mode: "strong" (a fixed batch of ``batch`` structures, default the lcm of the
      worker counts) or "weak" (``batch`` structures per worker, default 1). repeats: timed
      evaluations per point. hyperparams / model_extras: over :data:`FULL_HYPERPARAMS` /
      :data:`MODEL_EXTRAS`. spacing, rattle (Å), seed. timeout_s: per subprocess.
      memory_fraction: of the available memory a point may need.
    """

    models: tuple[str, ...]
    sizes: tuple[int, ...]
    size_unit: str = "grid_n"
    dtype: str = "float32"
    devices: tuple[int, ...] = (1,)
    processes: tuple[int, ...] = (1,)
    mode: str = "strong"
    batch: int | None = None
    repeats: int = 3
    hyperparams: dict[str, Any] = field(default_factory=dict)
    model_extras: dict[str, dict[str, Any]] = field(default_factory=dict)
    spacing: float = 2.2
    rattle: float = 0.05
    seed: int = 0
    timeout_s: float = 3600.0
    memory_fraction: float = 0.85

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StudyConfig:
        """Validate a dict (from YAML); ValueError names the bad key."""
        from celli_scale import models as models_mod

        if not isinstance(d, dict):
            raise ValueError(f"scaling config must be a mapping, got {type(d).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(f"unknown scaling config key(s) {unknown}; known keys: {names}")
        for key in ("models", "sizes"):
            if key not in d:
                raise ValueError(f"scaling config key {key!r} is required")

        def int_list(key: str, minimum: int) -> tuple[int, ...]:
            v = d[key]
            v = [v] if isinstance(v, int) and not isinstance(v, bool) else v
            if (
                not isinstance(v, list | tuple)
                or not v
                or not all(
                    isinstance(x, int) and not isinstance(x, bool) and x >= minimum for x in v
                )
            ):
                raise ValueError(
                    f"scaling config key {key!r} must be a non-empty list of integers "
                    f">= {minimum}, got {v!r}"
                )
            return tuple(v)

        kw: dict[str, Any] = {}
        models = d["models"]
        models = [models] if isinstance(models, str) else models
        if not isinstance(models, list | tuple) or not models:
            raise ValueError(
                f"scaling config key 'models' must be a non-empty list, got {models!r}"
            )
        for m in models:
            if m not in models_mod.MODEL_NAMES:
                raise ValueError(
                    f"scaling config key 'models': unknown model {m!r}; "
                    f"choose from {list(models_mod.MODEL_NAMES)}"
                )
        kw["models"] = tuple(models)
        unit = d.get("size_unit", "grid_n")
        if unit not in ("grid_n", "atoms"):
            raise ValueError(
                f"scaling config key 'size_unit' must be 'grid_n' or 'atoms', got {unit!r}"
            )
        kw["size_unit"] = unit
        sizes = int_list("sizes", 2 if unit == "grid_n" else 8)
        if unit == "atoms":
            grid = []
            for n_atoms in sizes:
                n = round(n_atoms ** (1 / 3))
                if n**3 != n_atoms:
                    raise ValueError(
                        f"scaling config key 'sizes': {n_atoms} atoms is not a NaCl grid "
                        f"(n³ atoms); nearest: {n**3}"
                    )
                grid.append(n)
            sizes = tuple(grid)
        kw["sizes"] = tuple(sorted(set(sizes)))
        if "dtype" in d:
            if d["dtype"] not in ("float32", "float64"):
                raise ValueError(
                    f"scaling config key 'dtype' must be float32 or float64, got {d['dtype']!r}"
                )
            kw["dtype"] = d["dtype"]
        if "devices" in d:
            kw["devices"] = tuple(sorted(set(int_list("devices", 1))))
        if "processes" in d:
            kw["processes"] = tuple(sorted(set(int_list("processes", 1))))
        mode = d.get("mode", "strong")
        if mode not in ("strong", "weak"):
            raise ValueError(f"scaling config key 'mode' must be 'strong' or 'weak', got {mode!r}")
        kw["mode"] = mode
        workers = {p * n for p in kw.get("processes", (1,)) for n in kw.get("devices", (1,))}
        lcm = math.lcm(*workers) if mode == "strong" else 1
        if d.get("batch") is not None:
            b = d["batch"]
            if not isinstance(b, int) or isinstance(b, bool) or b < 1 or b % lcm:
                raise ValueError(
                    f"scaling config key 'batch' must be a positive multiple of every worker "
                    f"count (processes x devices, lcm {lcm}) in strong scaling, got {b!r}"
                )
            kw["batch"] = b
        if "repeats" in d:
            r = d["repeats"]
            if not isinstance(r, int) or isinstance(r, bool) or r < 1:
                raise ValueError(
                    f"scaling config key 'repeats' must be a positive integer, got {r!r}"
                )
            kw["repeats"] = r
        if "seed" in d:
            if not isinstance(d["seed"], int):
                raise ValueError(f"scaling config key 'seed' must be an integer, got {d['seed']!r}")
            kw["seed"] = d["seed"]
        for key, lo in (
            ("spacing", 0.0),
            ("rattle", -1e-300),
            ("timeout_s", 0.0),
            ("memory_fraction", 0.0),
        ):
            if key in d:
                v = d[key]
                if not isinstance(v, int | float) or isinstance(v, bool) or not v > lo:
                    raise ValueError(
                        f"scaling config key {key!r} must be a positive number, got {v!r}"
                    )
                kw[key] = float(v)
        if "hyperparams" in d:
            hp = d["hyperparams"] or {}
            if not isinstance(hp, dict):
                raise ValueError(f"scaling config key 'hyperparams' must be a mapping, got {hp!r}")
            bad = sorted(set(hp) - set(FULL_HYPERPARAMS) - {"envelope_p"})
            if bad:
                raise ValueError(
                    f"scaling config key 'hyperparams': unknown shared key(s) {bad}; known: "
                    f"{sorted(FULL_HYPERPARAMS)} (model-specific keys go in 'model_extras')"
                )
            kw["hyperparams"] = dict(hp)
        if "model_extras" in d:
            me = d["model_extras"] or {}
            if not isinstance(me, dict) or not all(
                k in models_mod.MODEL_NAMES and isinstance(v, dict) for k, v in me.items()
            ):
                raise ValueError(
                    "scaling config key 'model_extras' must map model names to mappings, "
                    f"got {me!r}"
                )
            kw["model_extras"] = {k: dict(v) for k, v in me.items()}
        return cls(**kw)

    @property
    def worker_counts(self) -> tuple[int, ...]:
        return tuple(sorted({p * n for p in self.processes for n in self.devices}))

    def batch_for(self, workers: int) -> int:
        """Structures per step on ``workers`` workers (fixed in strong scaling, growing
        with the workers in weak scaling)."""
        if self.mode == "weak":
            return (self.batch or 1) * workers
        return self.batch_size

    @property
    def batch_size(self) -> int:
        """The strong-scaling batch (the per-worker batch in weak scaling)."""
        if self.batch is not None:
            return self.batch
        return math.lcm(*self.worker_counts) if self.mode == "strong" else 1

    def model_config(self, model: str) -> dict[str, Any]:
        hp = {**FULL_HYPERPARAMS, **self.hyperparams}
        extras = {model: {**MODEL_EXTRAS.get(model, {}), **self.model_extras.get(model, {})}}
        return model_config(model, self.dtype, hp, extras)


def load_config(path: str | os.PathLike) -> StudyConfig:
    """Read a YAML study config (``yaml.safe_load``); errors name the file and key."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: malformed YAML ({e})") from None
    try:
        return StudyConfig.from_dict(data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def run_study(
    config: dict[str, Any] | StudyConfig, out_dir: str | os.PathLike, *, progress: bool = True
) -> list[dict[str, Any]]:
    """Run the sweep models × sizes × processes × devices and write the outputs into
    ``out_dir``.

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
    for model in cfg.models:
        for processes, devices in layouts:
            batch = cfg.batch_for(processes * devices)
            spec = {
                "model": model,
                "config": cfg.model_config(model),
                "sizes": list(cfg.sizes),
                "dtype": cfg.dtype,
                "devices": devices,
                "processes": processes,
                "batch": batch,
                "repeats": cfg.repeats,
                "spacing": cfg.spacing,
                "rattle": cfg.rattle,
                "seed": cfg.seed,
                "memory_fraction": cfg.memory_fraction,
            }
            ok, why = model_available(model)
            if not ok:
                got = [
                    {
                        "model": model,
                        "dtype": cfg.dtype,
                        "devices": devices,
                        "processes": processes,
                        "batch": batch,
                        "n_grid": n,
                        "n_atoms": n**3,
                        "status": f"model not available: {why}",
                    }
                    for n in cfg.sizes
                ]
                bar.update(len(got))
            else:

                def on_row(row: dict[str, Any]) -> None:
                    bar.set_postfix_str(
                        f"{row['model']} N={row['n_atoms']} p={row['processes']} d={row['devices']}"
                    )
                    bar.update()

                got = run_points(spec, cfg.timeout_s, on_row)
            rows.extend(_complete(r) for r in sorted(got, key=lambda r: r["n_grid"]))
            write_csv(rows, out / "results.csv")  # partial results survive an interrupt
    bar.close()
    write_csv(rows, out / "results.csv")
    slopes = fit_slopes(rows)
    plot_time_vs_n(rows, slopes, out / "time_vs_n.png")
    plot_speedup(rows, out / "speedup_vs_devices.png")
    plot_ratios(rows, out / "ratio_celli_mpnn.png")
    write_markdown(rows, slopes, cfg, out / "results.md")
    return rows


def _complete(row: dict[str, Any]) -> dict[str, Any]:
    row = {"processes": 1, **row}
    row.setdefault("workers", row["processes"] * row.get("devices", 1))
    full = {k: row.get(k, math.nan) for k in CSV_COLUMNS}
    for k in ("model", "dtype", "platform", "status"):
        full[k] = row.get(k, "")
    return full


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(CSV_COLUMNS))
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in CSV_COLUMNS})


def _ok(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("status") == "ok" and np.isfinite(r.get("seconds", math.nan))]


def _workers(row: dict[str, Any]) -> int:
    """Devices in the row's mesh: processes × devices per process."""
    w = row.get("workers")
    if w is None or (isinstance(w, float) and not math.isfinite(w)):
        return int(row.get("processes", 1)) * int(row.get("devices", 1))
    return int(w)


def _single_device_times(rows, model: str) -> tuple[np.ndarray, np.ndarray]:
    """(N, seconds per structure) of ``model`` on the fewest workers in ``rows``."""
    w0 = min((_workers(x) for x in rows), default=1)
    pts = sorted(
        (r["n_atoms"], r["seconds_per_structure"])
        for r in _ok(rows)
        if r["model"] == model and _workers(r) == w0
    )
    if not pts:
        return np.zeros(0), np.zeros(0)
    n, t = np.asarray(pts, dtype=float).T
    return n, t


def fit_slopes(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Least-squares slope of log(time) vs log(N) per model, on the fewest-device rows
    (NaN with fewer than two sizes)."""
    slopes = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        n, t = _single_device_times(rows, model)
        slopes[model] = float(np.polyfit(np.log(n), np.log(t), 1)[0]) if n.size >= 2 else math.nan
    return slopes


def _figure(ncols: int = 1):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, ncols, figsize=(5.2 * ncols, 4))
    return plt, fig, ax


def plot_time_vs_n(rows, slopes: dict[str, float], path: Path) -> None:
    plt, fig, ax = _figure()
    d0 = min(_workers(r) for r in rows)
    for model in dict.fromkeys(r["model"] for r in rows):
        n, t = _single_device_times(rows, model)
        if n.size:
            s = slopes.get(model, math.nan)
            label = f"{model} (slope {s:.2f})" if np.isfinite(s) else f"{model}"
            ax.loglog(n, t, marker="o", label=label)
    ax.set_xlabel("atoms N")
    ax.set_ylabel("energy + forces, s per structure")
    ax.set_title(f"time vs N ({d0} worker{'s' if d0 > 1 else ''})")
    _legend_or_note(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def speedups(rows) -> dict[tuple[str, int, str], list[tuple[int, float]]]:
    """Speed-up over one worker, from throughput (atoms · steps / s), per model, for the
    largest size that ran on one worker: ``{(model, N, "devices" | "processes"):
    [(workers, speed-up), ...]}``. Throughput ratios serve strong scaling (fixed batch,
    = T(1)/T(w)) and weak scaling (batch ∝ workers) alike; efficiency = speed-up / w.
    "devices" series keep one process, "processes" series one device per process."""
    ok = _ok(rows)
    out: dict[tuple[str, int, str], list[tuple[int, float]]] = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in ok if r["model"] == model]
        base = {r["n_atoms"]: r["atoms_steps_per_s"] for r in mine if _workers(r) == 1}
        if not base:
            continue
        n_atoms = max(base)
        for layout in ("devices", "processes"):
            pts = {
                _workers(r): r["atoms_steps_per_s"] / base[n_atoms]
                for r in mine
                if r["n_atoms"] == n_atoms
                and (
                    int(r.get("processes", 1)) == 1
                    if layout == "devices"
                    else int(r.get("devices", 1)) == 1
                )
            }
            if len(pts) > 1:
                out[(model, n_atoms, layout)] = sorted(pts.items())
    return out


def plot_speedup(rows, path: Path) -> None:
    plt, fig, (a1, a2) = _figure(2)
    for (model, n_atoms, layout), pts in speedups(rows).items():
        w, sp = (np.asarray(v, dtype=float) for v in zip(*pts, strict=True))
        style = "-" if layout == "devices" else "--"
        label = f"{model} N={n_atoms} ({layout})"
        a1.plot(w, sp, style, marker="o", label=label)
        a2.plot(w, sp / w, style, marker="o", label=label)
    ws = sorted({_workers(r) for r in rows})
    a1.plot(ws, ws, "k:", lw=1, label="ideal")
    xlabel = "workers (devices × processes; data-parallel batch)"
    a1.set_xlabel(xlabel)
    a1.set_ylabel("speed-up (throughput / one worker's)")
    a2.set_xlabel(xlabel)
    a2.set_ylabel("parallel efficiency")
    a2.set_ylim(0, 1.2)
    for a in (a1, a2):
        a.set_xticks(ws)
        _legend_or_note(a)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def time_ratios(rows, num: str, den: str) -> list[tuple[int, float]]:
    """(N, t_num / t_den) at the fewest devices, for sizes both ran."""
    tn = dict(zip(*[list(a) for a in _single_device_times(rows, num)], strict=True))
    td = dict(zip(*[list(a) for a in _single_device_times(rows, den)], strict=True))
    return [(int(n), tn[n] / td[n]) for n in sorted(set(tn) & set(td))]


def plot_ratios(rows, path: Path) -> None:
    plt, fig, ax = _figure()
    for den in ("mace", "nequip"):
        pts = time_ratios(rows, "celli", den)
        if pts:
            n, r = zip(*pts, strict=True)
            ax.semilogx(
                n, r, marker="o", label=f"CELLI / {den.upper() if den == 'mace' else 'NequIP'}"
            )
    ax.axhline(1.0, color="k", lw=0.8, ls=":")
    ax.set_xlabel("atoms N")
    ax.set_ylabel("time ratio (energy + forces)")
    ax.set_title("CELLI vs message passing")
    _legend_or_note(ax, "needs celli and mace or nequip in the study")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _legend_or_note(ax, note: str = "no successful points") -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, note, ha="center", va="center", transform=ax.transAxes)


def machine_summary() -> str:
    import platform

    import jax

    dev = jax.devices()[0]
    return (
        f"{platform.node() or 'host'}: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPU cores, jax {jax.__version__}, device {dev.platform} "
        f"({dev.device_kind}), load average {os.getloadavg()[0]:.1f} at the end"
    )


def _fmt(v: Any, spec: str) -> str:
    try:
        return format(float(v), spec) if np.isfinite(float(v)) else "–"
    except (TypeError, ValueError):
        return str(v)


def write_markdown(rows, slopes: dict[str, float], cfg: StudyConfig, path: Path) -> None:
    lines = [
        "# Scaling study",
        "",
        f"Machine: {machine_summary()}.",
        f"NaCl grid (spacing {cfg.spacing} Å, rattle {cfg.rattle} Å), {cfg.dtype}, "
        f"{cfg.mode} scaling ("
        + (
            f"batch of {cfg.batch_size} structures per step"
            if cfg.mode == "strong"
            else f"{cfg.batch_size} structure(s) per worker"
        )
        + "), data-parallel (batch over devices; processes joined by jax.distributed "
        f"on 127.0.0.1), median of {cfg.repeats} warm evaluations of energy + forces.",
        "",
        "| model | N | edges | processes | devices | batch | s / step | s / structure "
        "| atoms·steps/s | peak RSS (MiB) | status |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['n_atoms']} | {_fmt(r['n_edges'], '.0f')} | "
            f"{r.get('processes', 1)} | {r['devices']} | {r['batch']} | "
            f"{_fmt(r['seconds'], '.4g')} | {_fmt(r['seconds_per_structure'], '.4g')} | "
            f"{_fmt(r['atoms_steps_per_s'], '.4g')} | {_fmt(r['peak_rss_mb'], '.0f')} | "
            f"{r['status']} |"
        )
    sp = speedups(rows)
    if sp:
        lines += [
            "",
            "## Speed-up and efficiency (throughput over one worker's)",
            "",
            "| model | N | layout | workers | speed-up | efficiency |",
            "|---|---:|---|---:|---:|---:|",
        ]
        for (model, n_atoms, layout), pts in sp.items():
            lines += [
                f"| {model} | {n_atoms} | {layout} | {w} | {v:.3f} | {v / w:.3f} |" for w, v in pts
            ]
    lines += ["", "## Fitted slope of log(time) vs log(N)", "", "| model | slope |", "|---|---:|"]
    lines += [f"| {m} | {_fmt(s, '.3f')} |" for m, s in slopes.items()]
    ratio_lines = []
    for den in ("mace", "nequip", "allegro"):
        for n, r in time_ratios(rows, "celli", den):
            ratio_lines.append(f"| CELLI / {den} | {n} | {r:.3f} |")
    if ratio_lines:
        lines += [
            "",
            "## Time ratios",
            "",
            "| ratio | N | value |",
            "|---|---:|---:|",
            *ratio_lines,
        ]
    lines += [
        "",
        "## Configuration",
        "",
        "```json",
        json.dumps({m: cfg.model_config(m) for m in cfg.models}, indent=1),
        "```",
        "",
    ]
    path.write_text("\n".join(lines))


# --------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------
def add_parser(sub) -> None:
    """Register ``scale CONFIG [--out DIR]`` on an argparse sub-parser set."""
    p = sub.add_parser(
        "scale",
        help="scaling study: models x sizes x processes x devices (data-parallel batch)",
        description="Time energy + forces of the models over NaCl-grid sizes, device and "
        "process counts (data-parallel: a batch of structures sharded over devices; "
        "processes joined by jax.distributed on 127.0.0.1); write "
        "results.csv, time_vs_n.png, speedup_vs_devices.png, ratio_celli_mpnn.png, results.md.",
    )
    p.add_argument("config", help="YAML study config (e.g. bench/configs/scale_tiny.yaml)")
    p.add_argument("--out", default="out/scale", help="output directory (default: out/scale)")


def main(args: argparse.Namespace) -> int:
    """Run the study of ``args.config`` into ``args.out``."""
    cfg = load_config(args.config)
    out = Path(getattr(args, "out", "out/scale"))
    rows = run_study(cfg, out)
    n_ok = len(_ok(rows))
    print(
        f"{n_ok}/{len(rows)} points ok; wrote {out / 'results.csv'}, {out / 'results.md'} "
        f"and 3 plots"
    )
    return 0


if __name__ == "__main__":  # worker entry: python -m celli_scale.scaling --worker < spec.json
    if sys.argv[1:] == ["--worker"]:
        logging.basicConfig(level=logging.WARNING)
        _worker(json.loads(sys.stdin.read()))
    else:
        sys.exit("usage: celli-scale scale CONFIG [--out DIR]")
