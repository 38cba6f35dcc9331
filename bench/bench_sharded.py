"""Domain decomposition (issue 17): ``ShardedPotential`` against the unsharded potential,
strong and weak scaling over devices, and the halo exchange on its own.

* ``ShardedVsUnsharded``: one device, Allegro, float32, the ``SHARDED_1DEV_N³`` NaCl grid
  (4096 atoms; quick: 64). The public calls ``sp(system)`` (warm: the decomposition is
  reused) and ``pot(system)``, interleaved, min of ``SHARDED_1DEV_REPEATS`` each; goal of
  the ratio: ≤ 1.15.
* ``Scaling``: energy + forces over 1, 2, 4, 8 fake CPU devices (quick: 1, 2), per model
  (Allegro, NequIP, MACE; quick: Allegro). Strong: the fixed ``SHARDED_STRONG_N³`` grid;
  weak: ``SHARDED_WEAK_M³`` sites per device (the grid is ``m × mesh_shape``). Tracked:
  seconds per call (min of ``SHARDED_REPEATS`` warm calls), ghosts per owned atom, bytes per
  exchange (``sp.stats``), and the halo exchange alone: a jitted ``shard_map`` running only
  :func:`celli_scale.distributed.halo.forward` (positions) and
  :func:`celli_scale.distributed.halo.reverse` (forces back) over the decomposition's stages.

Each (model, device count) runs in one worker subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=D`` (the flag must be set before JAX
starts); a worker past ``SHARDED_POINT_TIMEOUT_S`` or ``SHARDED_MAX_RSS_GIB`` is stopped and
its points are skipped. The workers run once, in ``setup_cache``, for every parameter.
On a 2-core CPU, more than 2 fake devices share the two cores: the scaling shows what the
decomposition costs, not what real devices would gain. Hyper-parameters and sizes:
``bench/_common.py``; mesh shapes: :func:`celli_scale.distributed.domains.mesh_for`.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench._common import (
    QUICK,
    SHARDED_1DEV_N,
    SHARDED_1DEV_REPEATS,
    SHARDED_CHUNKS,
    SHARDED_DEVICES,
    SHARDED_MAX_RSS_GIB,
    SHARDED_MODELS,
    SHARDED_POINT_TIMEOUT_S,
    SHARDED_REPEATS,
    SHARDED_STRONG_N,
    SHARDED_WEAK_M,
    TIMEOUT_S,
    build_potential,
    config_for,
    nacl_grid,
)

DTYPE = "float32"
SPACING = 2.2  # Å, the PEERS.md grid
RATTLE = 0.05  # Å
ROOT = Path(__file__).resolve().parent.parent
_MARK = "SHARDED-BENCH-RESULT "


def grid(shape: tuple[int, int, int], rattle: float = RATTLE, seed: int = 0):
    """The NaCl grid with ``shape`` sites per axis (``nacl_grid``'s convention: Na where
    ``i + j + k`` is even, spacing 2.2 Å, periodic)."""
    from celli_scale.datasets.synthetic import NACL_SPECIES
    from celli_scale.system import System

    g = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    pos = g * SPACING
    if rattle:
        pos = pos + np.random.default_rng(seed).normal(0, rattle, pos.shape)
    z = np.where(g.sum(1) % 2 == 0, NACL_SPECIES[0], NACL_SPECIES[1])
    return System(pos, z, cell=np.diag(np.asarray(shape, float) * SPACING), pbc=True)


def weak_mesh(devices: int) -> tuple[int, int, int]:
    """The mesh a cubic system gets for ``devices`` (largest factors first, as
    :func:`celli_scale.distributed.domains.mesh_for`)."""
    from celli_scale.distributed.domains import mesh_for

    return mesh_for(devices, np.ones(3))


# -- worker side (runs in a subprocess with its own device count) -----------------------


def _exchange_fn(sp: Any):
    """Jitted ``shard_map``: positions forward over the decomposition's stages, the
    gathered buffer (a stand-in for per-entry forces) back; returns the owned sums."""
    import jax
    from jax.sharding import PartitionSpec as P

    from celli_scale.distributed import halo

    plan = sp.decomposition
    specs = halo.stage_specs(plan.stages)
    c_own = int(plan.owned_ids.shape[1])
    n_buf = int(plan.buffer_ids.shape[1])

    def shard_fn(cell, own, arrays):
        own = own[0]
        a = jax.tree_util.tree_map(lambda x: x[0], arrays)
        buf = halo.forward(own, n_buf, specs, a["send_idx"], a["wrap"], cell)
        back = halo.reverse(buf, c_own, specs, a["send_idx"], a["send_mask"])
        return back[None]

    spec = P(halo.MESH_AXES)
    fn = jax.shard_map(
        shard_fn,
        mesh=sp._mesh(plan.mesh_shape),
        in_specs=(P(), spec, spec),
        out_specs=spec,
        check_vma=False,
    )
    return jax.jit(fn)


def _time_exchange(sp: Any, system: Any, repeats: int) -> float:
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from celli_scale.distributed import halo

    plan = sp.decomposition
    own = np.zeros((*plan.owned_ids.shape, 3))
    ok = plan.owned_ids >= 0
    own[ok] = plan.positions[plan.owned_ids[ok]]
    sharding = NamedSharding(sp._mesh(plan.mesh_shape), P(halo.MESH_AXES))
    own = jax.device_put(jnp.asarray(own, DTYPE), sharding)
    cell = jnp.asarray(np.asarray(system.cell), DTYPE)
    arrays = {k: sp._arrays[k] for k in ("send_idx", "send_mask", "wrap")}
    fn = _exchange_fn(sp)
    jax.block_until_ready(fn(cell, own, arrays))
    best = np.inf
    for _ in range(max(repeats, 3)):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(cell, own, arrays))
        best = min(best, time.perf_counter() - t0)
    return float(best)


def _case(pot: Any, case: dict[str, Any]) -> dict[str, Any]:
    import jax

    from celli_scale.distributed.sharded import ShardedPotential

    system = grid(tuple(case["grid"]))
    kw: dict[str, Any] = {"chunks": int(case.get("chunks", SHARDED_CHUNKS))}
    if case.get("mesh_shape"):
        kw["mesh_shape"] = tuple(case["mesh_shape"])
    else:
        kw["devices"] = int(case["devices"])
    sp = ShardedPotential(pot, **kw)
    t0 = time.perf_counter()
    out = sp(system)
    jax.block_until_ready(out.forces)
    first = time.perf_counter() - t0
    ref = None
    if case.get("unsharded"):
        ref = pot(system)
        jax.block_until_ready(ref.forces)
    # wall and CPU seconds (all threads of the process: every fake device's work, and
    # robust against other processes on a shared machine), interleaved, min of repeats
    t_sp, t_pot, c_sp, c_pot = [], [], [], []
    for _ in range(int(case["repeats"])):
        for call, wall, cpu in ((sp, t_sp, c_sp), (pot if ref is not None else None, t_pot, c_pot)):
            if call is None:
                continue
            t0, c0 = time.perf_counter(), time.process_time()
            jax.block_until_ready(call(system).forces)
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    st = sp.stats
    row = {
        "n_atoms": int(system.n_atoms),
        "mesh_shape": list(st.mesh_shape),
        "chunk_shape": list(st.chunk_shape),
        "halo": st.halo,
        "stages": st.stages,
        "owned_max": int(st.owned.max()),
        "ghosts_per_owned": st.ghosts_per_owned,
        "edges_per_owned": float(st.edges.sum() / st.owned.sum()),
        "bytes_per_exchange": int(st.bytes_per_exchange),
        "first_call_s": first,
        "sharded_s": float(min(t_sp)),
        "sharded_cpu_s": float(min(c_sp)),
        "exchange_s": _time_exchange(sp, system, int(case["repeats"])),
    }
    if ref is not None:
        row["unsharded_s"] = float(min(t_pot))
        row["unsharded_cpu_s"] = float(min(c_pot))
        row["max_force_diff"] = float(np.abs(np.asarray(out.forces) - np.asarray(ref.forces)).max())
    return row


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Run ``spec["cases"]`` for ``spec["model"]`` in this process (its device count is
    fixed already) and return ``{case name: result row}``."""
    pot = build_potential(config_for(spec["model"], DTYPE))
    return {c["name"]: _case(pot, c) for c in spec["cases"]}


# -- parent side -------------------------------------------------------------------------


def _env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags.strip()} --xla_force_host_platform_device_count={devices}".strip()
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def run_worker(
    spec: dict[str, Any],
    devices: int,
    module: str = "bench.bench_sharded",
    mark: str = _MARK,
) -> dict[str, Any]:
    """Run ``module``'s worker (``python -m module --worker SPEC``) in a subprocess with
    ``devices`` fake CPU devices, watching its resident memory and time. Returns the rows
    it printed after ``mark`` (each row, or each row of each case, gets ``peak_rss_gib``),
    or ``{"status": why}`` when it was stopped (time, memory) or failed."""
    import psutil

    proc = subprocess.Popen(
        [sys.executable, "-m", module, "--worker", json.dumps(spec)],
        cwd=ROOT,
        env=_env(devices),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    t0, peak, why = time.monotonic(), 0.0, None
    ps = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss / 2**30)
        except psutil.Error:
            pass
        if peak > SHARDED_MAX_RSS_GIB:
            why = f"skipped: resident memory above {SHARDED_MAX_RSS_GIB} GiB"
        elif time.monotonic() - t0 > SHARDED_POINT_TIMEOUT_S:
            why = f"skipped: longer than {SHARDED_POINT_TIMEOUT_S:.0f} s"
        if why:
            proc.kill()
            proc.communicate()
            return {"status": why}
        time.sleep(0.2)
    stdout, stderr = proc.communicate()
    for line in stdout.splitlines():
        if line.startswith(mark):
            rows = json.loads(line[len(mark) :])
            for row in rows.values():
                inner = row.values() if all(isinstance(v, dict) for v in row.values()) else [row]
                for r in inner:
                    r["peak_rss_gib"] = peak
            return rows
    return {"status": f"failed (rc {proc.returncode}): {stderr.strip()[-2000:]}"}


def scaling_spec(model: str, devices: tuple[int, ...]) -> dict[str, Any]:
    """The worker spec of one model at ``devices`` counts: a strong and a weak case each,
    named ``"{devices}/strong"``, ``"{devices}/weak"``."""
    cases = []
    for d in devices:
        mesh = weak_mesh(d)
        common = {"devices": d, "repeats": SHARDED_REPEATS, "chunks": SHARDED_CHUNKS}
        cases.append({"name": f"{d}/strong", "grid": [SHARDED_STRONG_N] * 3, **common})
        weak = [SHARDED_WEAK_M * m for m in mesh]
        cases.append({"name": f"{d}/weak", "grid": weak, "mesh_shape": list(mesh), **common})
    return {"model": model, "cases": cases}


def scaling_point(model: str, devices: tuple[int, ...]) -> dict[int, Any]:
    """``{d: {"strong": row, "weak": row} or {"status": ...}}`` for ``devices``, from one
    worker with ``max(devices)`` fake devices."""
    rows = run_worker(scaling_spec(model, devices), max(devices))
    if "status" in rows:
        return {d: rows for d in devices}
    return {d: {m: rows[f"{d}/{m}"] for m in ("strong", "weak")} for d in devices}


@functools.lru_cache(maxsize=1)
def scaling_results() -> dict[str, Any]:
    """Every scaling point: ``{"model/devices": rows or {"status": ...}}``, cached for the
    process. One worker per model and device count (quick mode: one per model, the
    device counts sharing a process, to keep CI short)."""
    out = {}
    for model in SHARDED_MODELS:
        groups = [SHARDED_DEVICES] if QUICK else [(d,) for d in SHARDED_DEVICES]
        for group in groups:
            for d, rows in scaling_point(model, tuple(group)).items():
                out[f"{model}/{d}"] = rows
    return out


# -- asv benchmarks ----------------------------------------------------------------------


def _min_interleaved(calls: list, repeats: int) -> tuple[list[float], list[float]]:
    """Min wall and min CPU seconds (``time.process_time``: this process's threads) of
    each call, the calls interleaved ``repeats`` times."""
    import jax

    wall, cpu = [np.inf] * len(calls), [np.inf] * len(calls)
    for _ in range(repeats):
        for i, call in enumerate(calls):
            t0, c0 = time.perf_counter(), time.process_time()
            jax.block_until_ready(call())
            wall[i] = min(wall[i], time.perf_counter() - t0)
            cpu[i] = min(cpu[i], time.process_time() - c0)
    return wall, cpu


class ShardedVsUnsharded:
    """One device, Allegro float32, the ``SHARDED_1DEV_N³`` grid: ``sp(system)`` against
    ``pot(system)`` (public calls, warm; decomposition reused). Goal: ratio ≤ 1.15."""

    timeout = TIMEOUT_S
    number = 1
    repeat = (1, 5, 60.0)
    warmup_time = 0.0

    def setup(self) -> None:
        import jax

        from celli_scale.distributed.sharded import ShardedPotential

        self.pot = build_potential(config_for("allegro", DTYPE))
        self.system = nacl_grid(SHARDED_1DEV_N, SPACING, RATTLE, 0)
        self.sp = ShardedPotential(self.pot, devices=1)
        out = self.sp(self.system)  # decomposition + compilation
        ref = self.pot(self.system)
        jax.block_until_ready((out.forces, ref.forces))
        if not np.allclose(np.asarray(out.forces), np.asarray(ref.forces), atol=1e-3):
            raise RuntimeError("sharded forces differ from the unsharded ones")

    def time_sharded(self) -> None:
        self.sp(self.system).forces.block_until_ready()

    def time_unsharded(self) -> None:
        self.pot(self.system).forces.block_until_ready()

    def track_sharded_over_unsharded(self) -> float:
        """min over interleaved warm calls: ``sp(system)`` / ``pot(system)`` (goal ≤ 1.15)."""
        (t_sp, t_pot), _ = self._interleaved()
        return t_sp / t_pot

    track_sharded_over_unsharded.unit = "ratio"  # type: ignore[attr-defined]

    def track_sharded_over_unsharded_cpu(self) -> float:
        """The same ratio in CPU seconds (less sensitive to other work on the machine)."""
        _, (c_sp, c_pot) = self._interleaved()
        return c_sp / c_pot

    track_sharded_over_unsharded_cpu.unit = "ratio"  # type: ignore[attr-defined]

    def _interleaved(self):
        return _min_interleaved(
            [lambda: self.sp(self.system).forces, lambda: self.pot(self.system).forces],
            SHARDED_1DEV_REPEATS,
        )


class Scaling:
    """Strong (fixed N) and weak (fixed atoms per device) scaling over fake CPU devices;
    >2 devices share this machine's 2 cores (see the module docstring)."""

    params = (list(SHARDED_MODELS), list(SHARDED_DEVICES), ["strong", "weak"])
    param_names = ("model", "devices", "mode")
    timeout = TIMEOUT_S

    def setup_cache(self) -> dict[str, Any]:
        return scaling_results()

    def setup(self, cache: dict[str, Any], model: str, devices: int, mode: str) -> None:
        point = cache[f"{model}/{devices}"]
        if "status" in point:
            raise NotImplementedError(f"{model} on {devices} devices: {point['status']}")
        self.row = point[mode]

    def track_seconds_per_step(self, cache, model, devices, mode) -> float:
        """Energy + forces, ``sp(system)`` warm, min of ``SHARDED_REPEATS`` (s)."""
        return self.row["sharded_s"]

    track_seconds_per_step.unit = "s"  # type: ignore[attr-defined]

    def track_cpu_seconds_per_step(self, cache, model, devices, mode) -> float:
        """CPU seconds of that call, all fake devices' threads (min of the repeats)."""
        return self.row["sharded_cpu_s"]

    track_cpu_seconds_per_step.unit = "s"  # type: ignore[attr-defined]

    def track_ghosts_per_owned(self, cache, model, devices, mode) -> float:
        """All ghosts / all owned atoms (``sp.stats.ghosts_per_owned``)."""
        return self.row["ghosts_per_owned"]

    track_ghosts_per_owned.unit = "ghosts/owned"  # type: ignore[attr-defined]

    def track_bytes_per_exchange(self, cache, model, devices, mode) -> float:
        """Bytes one forward exchange moves (padded blocks, all shards; ``sp.stats``)."""
        return float(self.row["bytes_per_exchange"])

    track_bytes_per_exchange.unit = "bytes"  # type: ignore[attr-defined]

    def track_exchange_seconds(self, cache, model, devices, mode) -> float:
        """The halo exchange alone: positions forward + forces back, jitted (s)."""
        return self.row["exchange_s"]

    track_exchange_seconds.unit = "s"  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> None:
    """``python -m bench.bench_sharded``: print the scaling table at the current sizes;
    ``--worker SPEC`` is the subprocess entry point."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        rows = worker(json.loads(argv[1]))
        print(_MARK + json.dumps(rows), flush=True)
        return
    models = argv or list(SHARDED_MODELS)
    print(
        "| model | devices | mode | N | mesh | ghosts/owned | bytes/exchange | stages "
        "| s/step | CPU s/step | exchange s | peak RSS GiB |"
    )
    print("|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for model in models:
        for d in SHARDED_DEVICES:
            res = scaling_point(model, (d,))[d]
            if "status" in res:
                print(
                    f"| {model} | {d} | – | – | – | – | – | – | {res['status']} | | |", flush=True
                )
                continue
            for mode, r in res.items():
                print(
                    f"| {model} | {d} | {mode} | {r['n_atoms']} | "
                    f"{'×'.join(map(str, r['mesh_shape']))} | {r['ghosts_per_owned']:.2f} | "
                    f"{r['bytes_per_exchange']} | {r['stages']} | {r['sharded_s']:.3f} | "
                    f"{r['sharded_cpu_s']:.3f} | "
                    f"{r['exchange_s']:.4f} | {r['peak_rss_gib']:.1f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
