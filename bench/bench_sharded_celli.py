"""Distributed charge equilibration and sharded CELLI (issue 18).

``ShardedPotential(pot, devices=D)`` evaluates CELLI (energy, forces, stress, charges) with
the distributed Qeq of :mod:`celli_scale.distributed.qeq` (Chronopoulos–Gear projected
Jacobi CG, two all-reduces per iteration; Ewald ``S(k)`` or the PME grid all-reduced).

* ``CelliVsAllegro``: fake CPU devices 1, 2, 4, 8 (quick: 1, 2), the ``CELLI_STRONG_N³``
  grid (4096 atoms; quick 64): sharded CELLI and sharded Allegro energy + forces, min of
  ``CELLI_REPEATS`` warm calls, interleaved; CELLI / Allegro (the Qeq share is that minus
  one); CG iterations of the charge and adjoint solves cold (first call) and warm (every
  timed call moves the atoms by a fresh ``CELLI_STEP`` Å Gaussian step, so the solves
  warm-start from the previous, different, solution as in MD); bytes all-reduced per CG
  iteration with Ewald and with PME
  (:func:`celli_scale.distributed.qeq.bytes_per_iteration`) and the method "auto" picks.
* ``QeqShare``: the same on one device over the ``CELLI_SHARE_N³`` grids: where does the
  Qeq overhead fall under 15 % of the local model?
* ``WeakCelliVsMace``: ``CELLI_WEAK_M³`` owned atoms per device (grid ``m × mesh_shape``),
  sharded CELLI vs sharded MACE seconds per call.
* ``BigCelli``: one device, ``CELLI_BIG_GRID³`` atoms in ``CELLI_BIG_CHUNKS`` sub-bricks:
  decomposition, cold and warm call, time per atom against the ``CELLI_STRONG_N³`` grid
  (sharded, one device, chunks 1), peak resident memory.

Every (model group, device count) runs in a worker subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=D`` (``bench_sharded.run_worker``'s
time and memory guard); the workers run in ``setup_cache``. More than 2 fake devices share
this machine's 2 cores. Hyper-parameters and sizes: ``bench/_common.py`` (float32, matched
hyper-parameters, CELLI's CG tolerance ``CELLI_QEQ_TOL``). ``python -m
bench.bench_sharded_celli [devices|share|weak|big]`` prints the tables of bench/RESULTS.md.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import resource
import sys
import time
from typing import Any

import numpy as np

from bench import bench_sharded as bs
from bench._common import (
    CELLI_BIG_CHUNKS,
    CELLI_BIG_GRID,
    CELLI_BIG_METHOD,
    CELLI_DEVICES,
    CELLI_QEQ_TOL,
    CELLI_REPEATS,
    CELLI_SHARE_N,
    CELLI_STEP,
    CELLI_STRONG_N,
    CELLI_WEAK_M,
    CELLI_WEAK_MODELS,
    TIMEOUT_S,
    build_potential,
    config_for,
)

DTYPE = "float32"
_MARK = "CELLI-BENCH-RESULT "


def model_config(model: str, **overrides: Any) -> dict[str, Any]:
    """``config_for(model, "float32")``; CELLI with ``qeq_tol = CELLI_QEQ_TOL``."""
    cfg = config_for(model, DTYPE)
    if model == "celli":
        cfg["qeq_tol"] = CELLI_QEQ_TOL
    cfg.update(overrides)
    return cfg


def _moved(system: Any, seed: int) -> Any:
    """``system`` with every atom moved by a Gaussian step of ``CELLI_STEP`` Å."""
    rng = np.random.default_rng(1000 + seed)
    pos = np.asarray(system.positions) + rng.normal(0, CELLI_STEP, (system.n_atoms, 3))
    return system.replace(positions=pos)


def _bytes(sp: Any, system: Any) -> dict[str, Any]:
    """All-reduce bytes per CG iteration of this decomposition with Ewald and with PME
    (the layout of ``sp`` with the other method's ``S(k)`` / grid size), and "auto"'s pick."""
    from celli_scale import electrostatics as el
    from celli_scale.distributed import qeq as dq

    cfg = sp.config
    sigma = np.full(system.n_atoms, float(cfg.elec_sigma_max))
    layout = sp._elec["layout"]
    out: dict[str, Any] = {}
    for method in ("ewald", "pme"):
        p = el.prepare(system, method=method, accuracy=cfg.elec_accuracy, sigma=sigma)
        lay = dataclasses.replace(
            layout, method=method, grid=tuple(p.grid), n_k=int(p.kvecs.shape[0])
        )
        b = dq.bytes_per_iteration(lay, sp.decomposition, np.dtype(DTYPE).itemsize)
        out[f"{method}_all_reduce_bytes"] = int(b["all_reduce"])
        out[f"{method}_size"] = int(np.prod(p.grid)) if method == "pme" else int(p.kvecs.shape[0])
    out["halo_bytes"] = int(sp.stats.qeq_bytes_per_iteration["halo"])
    out["auto_method"] = dq.choose_method(
        system, int(np.prod(sp.stats.mesh_shape)), cfg.elec_accuracy, sigma
    )
    return out


def _case(pots: dict[str, Any], case: dict[str, Any]) -> dict[str, Any]:
    """Sharded evaluation of ``case["models"]`` on one grid: cold call each, then
    ``case["repeats"]`` timed calls per model on moved copies, interleaved."""
    import jax

    from celli_scale.distributed.sharded import ShardedPotential

    system = bs.grid(tuple(case["grid"]))
    kw: dict[str, Any] = {"chunks": int(case.get("chunks", 1))}
    if case.get("mesh_shape"):
        kw["mesh_shape"] = tuple(case["mesh_shape"])
    else:
        kw["devices"] = int(case["devices"])
    sps = {m: ShardedPotential(pots[m], **kw) for m in case["models"]}
    rows: dict[str, dict[str, Any]] = {}
    for m, sp in sps.items():
        t0, c0 = time.perf_counter(), time.process_time()
        out = sp(system)
        jax.block_until_ready(out.forces)
        st = sp.stats
        rows[m] = {
            "n_atoms": int(system.n_atoms),
            "mesh_shape": list(st.mesh_shape),
            "owned_max": int(st.owned.max()),
            "ghosts_per_owned": float(st.ghosts_per_owned),
            "first_call_s": time.perf_counter() - t0,
            "first_call_cpu_s": time.process_time() - c0,
            "wall": [],
            "cpu": [],
        }
        if st.qeq_method:
            rows[m]["qeq_method"] = st.qeq_method
            rows[m]["iterations_cold"] = list(st.qeq_iterations)
            rows[m]["iterations_warm"] = []
            if case.get("bytes"):
                rows[m].update(_bytes(sp, system))
    for k in range(int(case["repeats"])):
        moved = _moved(system, k)
        for m, sp in sps.items():
            t0, c0 = time.perf_counter(), time.process_time()
            jax.block_until_ready(sp(moved).forces)
            rows[m]["wall"].append(time.perf_counter() - t0)
            rows[m]["cpu"].append(time.process_time() - c0)
            if sp.stats.qeq_method:
                rows[m]["iterations_warm"].append(list(sp.stats.qeq_iterations))
    for r in rows.values():
        r["s"], r["cpu_s"] = min(r.pop("wall")), min(r.pop("cpu"))
        if "iterations_warm" in r:
            r["iterations_warm"] = np.mean(r["iterations_warm"], axis=0).tolist()
    return rows


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Run ``spec["cases"]`` (each with its ``models``) in this process."""
    models = sorted({m for c in spec["cases"] for m in c["models"]})
    pots = {m: build_potential(model_config(m)) for m in models}
    return {c["name"]: _case(pots, c) for c in spec["cases"]}


def run_worker(spec: dict[str, Any], devices: int) -> dict[str, Any]:
    """:func:`bench.bench_sharded.run_worker` with this module's entry point."""
    return bs.run_worker(spec, devices, module="bench.bench_sharded_celli", mark=_MARK)


# -- the three families, one worker per device count (quick: one worker in all) ----------


def _strong_cases(d: int) -> list[dict[str, Any]]:
    return [
        {
            "name": f"strong/{d}",
            "grid": [CELLI_STRONG_N] * 3,
            "devices": d,
            "models": ["celli", "allegro"],
            "repeats": CELLI_REPEATS,
            "bytes": True,
        }
    ]


def _weak_case(d: int, model: str) -> dict[str, Any]:
    mesh = bs.weak_mesh(d)
    return {
        "name": f"weak/{model}/{d}",
        "grid": [CELLI_WEAK_M * m for m in mesh],
        "mesh_shape": list(mesh),
        "models": [model],
        "repeats": CELLI_REPEATS,
    }


def _run(cases: list[dict[str, Any]], devices: int) -> dict[str, Any]:
    rows = run_worker({"cases": cases}, devices)
    if "status" in rows:
        return {c["name"]: {"status": rows["status"]} for c in cases}
    return rows


@functools.lru_cache(maxsize=1)
def device_results() -> dict[str, Any]:
    """``{"strong/D": {"celli": row, "allegro": row}, "weak/MODEL/D": {MODEL: row}}``
    (or ``{"status": why}``), one worker per (model group, device count)."""
    out: dict[str, Any] = {}
    if bs.QUICK:
        cases = [c for d in CELLI_DEVICES for c in _strong_cases(d)]
        cases += [_weak_case(d, m) for m in CELLI_WEAK_MODELS for d in CELLI_DEVICES]
        return _run(cases, max(CELLI_DEVICES))
    for d in CELLI_DEVICES:
        out.update(_run(_strong_cases(d) + [_weak_case(d, "celli")], d))
        for m in CELLI_WEAK_MODELS:
            if m != "celli":
                out.update(_run([_weak_case(d, m)], d))
    return out


@functools.lru_cache(maxsize=1)
def share_results() -> dict[str, Any]:
    """``{"share/n": {"celli": row, "allegro": row}}`` on one device, one worker."""
    cases = [
        {
            "name": f"share/{n}",
            "grid": [n] * 3,
            "devices": 1,
            "models": ["celli", "allegro"],
            "repeats": CELLI_REPEATS,
        }
        for n in CELLI_SHARE_N
    ]
    return _run(cases, 1)


def measure_big() -> dict[str, Any]:
    """CELLI E + F + charges of the ``CELLI_BIG_GRID³`` grid on one device in
    ``CELLI_BIG_CHUNKS`` sub-bricks (PME): decomposition, cold call, warm call on moved
    atoms; then the ``CELLI_STRONG_N³`` grid (one device, chunks 1) for time per atom.
    Wall and CPU seconds; peak RSS of this process (``ru_maxrss``)."""
    import jax

    from celli_scale.distributed.sharded import ShardedPotential

    pot = build_potential(model_config("celli", elec_method=CELLI_BIG_METHOD))

    def timed(sp, system):
        t0, c0 = time.perf_counter(), time.process_time()
        out = sp(system)
        jax.block_until_ready(out.forces)
        return out, time.perf_counter() - t0, time.process_time() - c0

    def rss_gib():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    res: dict[str, Any] = {}
    small = bs.grid((CELLI_STRONG_N,) * 3)
    sp_small = ShardedPotential(build_potential(model_config("celli")), devices=1)
    timed(sp_small, small)
    walls = [timed(sp_small, _moved(small, k))[1:] for k in range(2)]
    res["small_n_atoms"] = small.n_atoms
    res["small_s"] = min(w for w, _ in walls)
    res["small_cpu_s"] = min(c for _, c in walls)
    res["small_rss_gib"] = rss_gib()
    del sp_small
    big = bs.grid((CELLI_BIG_GRID,) * 3)
    sp = ShardedPotential(pot, devices=1, chunks=CELLI_BIG_CHUNKS)
    t0, c0 = time.perf_counter(), time.process_time()
    sp.decompose(big)
    res["decompose_s"] = time.perf_counter() - t0
    res["decompose_cpu_s"] = time.process_time() - c0
    res["decompose_rss_gib"] = rss_gib()
    _, res["first_call_s"], res["first_call_cpu_s"] = timed(sp, big)
    res["iterations_cold"] = list(sp.stats.qeq_iterations)
    out, res["warm_call_s"], res["warm_call_cpu_s"] = timed(sp, _moved(big, 0))
    res["iterations_warm"] = list(sp.stats.qeq_iterations)
    n = big.n_atoms
    res.update(
        n_atoms=n,
        chunks=CELLI_BIG_CHUNKS,
        method=sp.stats.qeq_method,
        elec_pairs=int(sp.stats.capacities.get("elec_pairs", 0)),
        energy_per_atom=float(out.energy) / n,
        charge_range=[float(np.min(out.charges)), float(np.max(out.charges))],
        us_per_atom=1e6 * res["warm_call_s"] / n,
        small_us_per_atom=1e6 * res["small_s"] / small.n_atoms,
        peak_rss_gib=rss_gib(),
    )
    res["per_atom_ratio"] = res["us_per_atom"] / res["small_us_per_atom"]
    res["peak_rss_kib_per_atom"] = res["peak_rss_gib"] * 2**20 / n
    res["stats"] = sp.stats.summary()
    return res


# -- asv benchmarks ----------------------------------------------------------------------


def _point(cache: dict[str, Any], key: str) -> dict[str, Any]:
    point = cache[key]
    if "status" in point:
        raise NotImplementedError(f"{key}: {point['status']}")
    return point


class CelliVsAllegro:
    """Sharded CELLI vs sharded Allegro on the ``CELLI_STRONG_N³`` grid over fake devices."""

    params = (list(CELLI_DEVICES),)
    param_names = ("devices",)
    timeout = TIMEOUT_S

    def setup_cache(self) -> dict[str, Any]:
        return device_results()

    def setup(self, cache: dict[str, Any], devices: int) -> None:
        p = _point(cache, f"strong/{devices}")
        self.celli, self.allegro = p["celli"], p["allegro"]

    def track_celli_s(self, cache, devices) -> float:
        """CELLI energy + forces + charges, warm call on moved atoms, min (s)."""
        return self.celli["s"]

    track_celli_s.unit = "s"  # type: ignore[attr-defined]

    def track_allegro_s(self, cache, devices) -> float:
        """Allegro energy + forces, same calls, interleaved with CELLI's (s)."""
        return self.allegro["s"]

    track_allegro_s.unit = "s"  # type: ignore[attr-defined]

    def track_celli_over_allegro(self, cache, devices) -> float:
        """CELLI / Allegro seconds; the Qeq share is this minus one."""
        return self.celli["s"] / self.allegro["s"]

    track_celli_over_allegro.unit = "ratio"  # type: ignore[attr-defined]

    def track_cg_iterations_cold(self, cache, devices) -> float:
        """Charge + adjoint CG iterations of the first call (zero start)."""
        return float(sum(self.celli["iterations_cold"]))

    track_cg_iterations_cold.unit = "iterations"  # type: ignore[attr-defined]

    def track_cg_iterations_warm(self, cache, devices) -> float:
        """Charge + adjoint CG iterations after a ``CELLI_STEP`` Å step (warm start)."""
        return float(sum(self.celli["iterations_warm"]))

    track_cg_iterations_warm.unit = "iterations"  # type: ignore[attr-defined]

    def track_all_reduce_bytes_ewald(self, cache, devices) -> float:
        """Bytes per shard in the two all-reduces of one CG iteration, Ewald."""
        return float(self.celli["ewald_all_reduce_bytes"])

    track_all_reduce_bytes_ewald.unit = "bytes"  # type: ignore[attr-defined]

    def track_all_reduce_bytes_pme(self, cache, devices) -> float:
        """The same with PME (the grid is all-reduced)."""
        return float(self.celli["pme_all_reduce_bytes"])

    track_all_reduce_bytes_pme.unit = "bytes"  # type: ignore[attr-defined]


class QeqShare:
    """CELLI / Allegro on one device over grid sizes (Qeq share = ratio − 1)."""

    params = (list(CELLI_SHARE_N),)
    param_names = ("n",)
    timeout = TIMEOUT_S

    def setup_cache(self) -> dict[str, Any]:
        return share_results()

    def setup(self, cache: dict[str, Any], n: int) -> None:
        p = _point(cache, f"share/{n}")
        self.celli, self.allegro = p["celli"], p["allegro"]

    def track_celli_over_allegro(self, cache, n) -> float:
        """CELLI / Allegro seconds (min of interleaved warm calls)."""
        return self.celli["s"] / self.allegro["s"]

    track_celli_over_allegro.unit = "ratio"  # type: ignore[attr-defined]

    def track_celli_over_allegro_cpu(self, cache, n) -> float:
        """The same in CPU seconds."""
        return self.celli["cpu_s"] / self.allegro["cpu_s"]

    track_celli_over_allegro_cpu.unit = "ratio"  # type: ignore[attr-defined]


class WeakCelliVsMace:
    """``CELLI_WEAK_M³`` owned atoms per device: seconds per call, sharded."""

    params = (list(CELLI_WEAK_MODELS), list(CELLI_DEVICES))
    param_names = ("model", "devices")
    timeout = TIMEOUT_S

    def setup_cache(self) -> dict[str, Any]:
        return device_results()

    def setup(self, cache: dict[str, Any], model: str, devices: int) -> None:
        self.row = _point(cache, f"weak/{model}/{devices}")[model]

    def track_seconds_per_step(self, cache, model, devices) -> float:
        """Energy + forces (CELLI: + charges), warm call on moved atoms, min (s)."""
        return self.row["s"]

    track_seconds_per_step.unit = "s"  # type: ignore[attr-defined]

    def track_cpu_us_per_owned_atom(self, cache, model, devices) -> float:
        """CPU seconds of that call / all owned atoms (µs)."""
        return 1e6 * self.row["cpu_s"] / self.row["n_atoms"]

    track_cpu_us_per_owned_atom.unit = "µs/atom"  # type: ignore[attr-defined]


class BigCelli:
    """CELLI E + F + charges of ``CELLI_BIG_GRID³`` atoms on one CPU device, in sub-bricks."""

    timeout = 4 * TIMEOUT_S

    def setup_cache(self) -> dict[str, Any]:
        return measure_big()

    def track_warm_call_s(self, result: dict[str, Any]) -> float:
        return result["warm_call_s"]

    track_warm_call_s.unit = "s"  # type: ignore[attr-defined]

    def track_per_atom_ratio(self, result: dict[str, Any]) -> float:
        """Time per atom / the ``CELLI_STRONG_N³`` grid's (goal ≤ 1.5)."""
        return result["per_atom_ratio"]

    track_per_atom_ratio.unit = "ratio"  # type: ignore[attr-defined]

    def track_peak_rss_kib_per_atom(self, result: dict[str, Any]) -> float:
        return result["peak_rss_kib_per_atom"]

    track_peak_rss_kib_per_atom.unit = "KiB/atom"  # type: ignore[attr-defined]


# -- command line ------------------------------------------------------------------------


def _print_devices() -> None:
    res = device_results()
    print(
        "| devices | mesh | CELLI s | Allegro s | CELLI CPU s | Allegro CPU s | Qeq share "
        "| CG its cold (q, adj) | CG its warm (q, adj) | auto | all-reduce B/it Ewald (2K) "
        "| all-reduce B/it PME (M) | halo B/it | peak RSS GiB |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---|---|---|---:|---:|---:|---:|")
    for d in CELLI_DEVICES:
        p = res[f"strong/{d}"]
        if "status" in p:
            print(f"| {d} | {p['status']} |")
            continue
        c, a = p["celli"], p["allegro"]
        print(
            f"| {d} | {'×'.join(map(str, c['mesh_shape']))} | {c['s']:.3f} | {a['s']:.3f} | "
            f"{c['cpu_s']:.3f} | {a['cpu_s']:.3f} | {c['s'] / a['s'] - 1:+.0%} | "
            f"{tuple(c['iterations_cold'])} | "
            f"({c['iterations_warm'][0]:.1f}, {c['iterations_warm'][1]:.1f}) | "
            f"{c['auto_method']} | {c['ewald_all_reduce_bytes']} ({c['ewald_size']}) | "
            f"{c['pme_all_reduce_bytes']} ({c['pme_size']}) | {c['halo_bytes']} | "
            f"{c['peak_rss_gib']:.1f} |"
        )
    print()
    print("| model | devices | N | owned/device | ghosts/owned | s/step | CPU µs/owned atom |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for m in CELLI_WEAK_MODELS:
        for d in CELLI_DEVICES:
            p = res[f"weak/{m}/{d}"]
            if "status" in p:
                print(f"| {m} | {d} | {p['status']} |")
                continue
            r = p[m]
            print(
                f"| {m} | {d} | {r['n_atoms']} | {r['owned_max']} | {r['ghosts_per_owned']:.2f} | "
                f"{r['s']:.3f} | {1e6 * r['cpu_s'] / r['n_atoms']:.0f} |"
            )


def _print_share() -> None:
    res = share_results()
    print(
        "| N | CELLI s | Allegro s | Qeq share (wall) | Qeq share (CPU s) | CG its cold "
        "| CG its warm | method |"
    )
    print("|---:|---:|---:|---:|---:|---|---|---|")
    for n in CELLI_SHARE_N:
        p = res[f"share/{n}"]
        if "status" in p:
            print(f"| {n**3} | {p['status']} |")
            continue
        c, a = p["celli"], p["allegro"]
        print(
            f"| {c['n_atoms']} | {c['s']:.3f} | {a['s']:.3f} | {c['s'] / a['s'] - 1:+.0%} | "
            f"{c['cpu_s'] / a['cpu_s'] - 1:+.0%} | {tuple(c['iterations_cold'])} | "
            f"({c['iterations_warm'][0]:.1f}, {c['iterations_warm'][1]:.1f}) | "
            f"{c['qeq_method']} |"
        )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        print(_MARK + json.dumps(worker(json.loads(argv[1]))), flush=True)
        return
    print("hyper-parameters:", json.dumps(model_config("celli")), flush=True)
    what = argv or ["share", "devices", "big"]
    if "share" in what:
        _print_share()
    if "devices" in what:
        _print_devices()
    if "big" in what:
        res = measure_big()
        print(res.pop("stats"))
        for key, value in res.items():
            print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    main()
