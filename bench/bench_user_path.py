"""The user's path: ``pot(system)`` as a user (an MD loop, the ASE calculator) calls it.

Allegro, CELLI, NequIP and MACE at the matched hyper-parameters of
:data:`bench._common.HYPERPARAMS`, float32, on the USER_GRID_N³ NaCl grid (spacing 2.2 Å),
one device. Two call patterns (:data:`bench._common.USER_MD_STEP`,
:data:`~bench._common.USER_FRESH_DISPLACEMENT`):

* ``md``: every call moves every atom by 0.01 Å (a fresh random direction each call), so
  the Verlet lists of :class:`celli_scale.Potential` are reused and the host only checks
  displacements (a rebuild every ~50 calls with the default 1 Å skin);
* ``fresh``: every call is a new structure in the same cell (sites displaced up to
  0.43 Å): lists rebuilt on the host each call, electrostatics parameters kept.

``BatchCall`` is the same for ``pot(Batch)`` (:data:`bench._common.USER_BATCH` structures
moved as in ``md``), against the stacked kernel ``pot.evaluate_batch`` on exact lists.

``time_call`` times one public call (host work + compiled kernel + the output's transfer),
warm; ``track_call_over_kernel`` is call / kernel, the kernel (``pot.evaluate``) timed on a
prepared graph with exact lists (min of the calls and of 3 kernel runs; goal ≤ 1.05 for
``md``: host work ≤ 5 % of the compiled evaluation, issue 20).
"""

from __future__ import annotations

import time

import jax
import numpy as np

from bench._common import (
    MODELS,
    TIMEOUT_S,
    USER_BATCH,
    USER_BATCH_GRID_N,
    USER_CALLS,
    USER_FRESH_DISPLACEMENT,
    USER_GRID_N,
    USER_MD_STEP,
    build_potential,
    config_for,
    nacl_grid,
)

PATTERNS = ("md", "fresh")


def structures(grid_n: int, pattern: str, calls: int, seed: int = 0):
    """The systems a benchmark cycles through (seeded; ``seed`` picks the rattle and
    the moves)."""
    base = nacl_grid(grid_n, rattle=0.05, seed=seed)
    rng = np.random.default_rng(1 + seed)
    pos = np.asarray(base.positions)
    out = []
    for _ in range(calls):
        if pattern == "md":
            step = rng.normal(size=pos.shape)
            pos = pos + USER_MD_STEP * step / np.linalg.norm(step, axis=1, keepdims=True)
            out.append(base.replace(positions=pos))
        else:
            d = rng.uniform(-USER_FRESH_DISPLACEMENT, USER_FRESH_DISPLACEMENT, pos.shape)
            out.append(base.replace(positions=np.asarray(base.positions) + d))
    return out


def call_seconds(pot, systems) -> list[float]:
    """Seconds of each ``pot(system)`` call over ``systems`` (result on the host)."""
    times = []
    for s in systems:
        t0 = time.perf_counter()
        out = pot(s)
        np.asarray(out.energy), np.asarray(out.forces)
        times.append(time.perf_counter() - t0)
    return times


class PotentialCall:
    """``pot(system)`` per model, grid and call pattern, float32."""

    params = (list(MODELS), list(USER_GRID_N), list(PATTERNS))
    param_names = ("model", "grid_n", "pattern")
    timeout = TIMEOUT_S
    number = 1
    repeat = (1, 5, 120.0)
    warmup_time = 0.0

    def setup(self, model: str, grid_n: int, pattern: str) -> None:
        self.pot = build_potential(config_for(model, "float32"))
        self.systems = structures(grid_n, pattern, USER_CALLS)
        call_seconds(self.pot, self.systems)  # compile; lists and capacities settle
        self.k = 0

    def time_call(self, model: str, grid_n: int, pattern: str) -> None:
        s = self.systems[self.k % len(self.systems)]
        self.k += 1
        out = self.pot(s)
        np.asarray(out.energy), np.asarray(out.forces)

    def track_call_over_kernel(self, model: str, grid_n: int, pattern: str) -> float:
        """Public call / compiled kernel on exact lists, min over the calls of each."""
        calls = min(call_seconds(self.pot, self.systems))
        g = self.pot.graph(self.systems[-1])
        jax.block_until_ready(self.pot.evaluate(self.pot.params, g))
        kernel = min(
            _timed(lambda: jax.block_until_ready(self.pot.evaluate(self.pot.params, g)))
            for _ in range(3)
        )
        return calls / kernel

    track_call_over_kernel.unit = "ratio"  # type: ignore[attr-defined]


def batches(grid_n: int, n_structures: int, calls: int) -> list:
    """``calls`` batches of ``n_structures`` NaCl grids (other rattles), each moved as in
    the ``md`` pattern of :func:`structures`."""
    from celli_scale import Batch

    walks = [structures(grid_n, "md", calls, seed=k) for k in range(n_structures)]
    return [Batch.from_systems(list(step)) for step in zip(*walks, strict=True)]


def batch_kernel(pot, batch):
    """The stacked kernel on exact lists of ``batch`` (prepared graph) and the graph."""
    g = pot.batch_graph(list(batch), sigma_max=pot.sigma_bound())
    return (lambda: jax.block_until_ready(pot.evaluate_batch(pot.params, g, stress=True))), g


class BatchCall:
    """``pot(Batch)`` per model in the ``md`` pattern, float32."""

    params = (list(MODELS), list(USER_BATCH_GRID_N))
    param_names = ("model", "grid_n")
    timeout = TIMEOUT_S
    number = 1
    repeat = (1, 5, 120.0)
    warmup_time = 0.0

    def setup(self, model: str, grid_n: int) -> None:
        self.pot = build_potential(config_for(model, "float32"))
        self.batches = batches(grid_n, USER_BATCH, USER_CALLS)
        call_seconds(self.pot, self.batches)  # compile; lists and capacities settle
        self.k = 0

    def time_call(self, model: str, grid_n: int) -> None:
        b = self.batches[self.k % len(self.batches)]
        self.k += 1
        out = self.pot(b)
        np.asarray(out.energy), np.asarray(out.forces)

    def track_call_over_kernel(self, model: str, grid_n: int) -> float:
        """Public call / stacked kernel on exact lists, min over the calls of each."""
        calls = min(call_seconds(self.pot, self.batches))
        run, _ = batch_kernel(self.pot, self.batches[-1])
        run()
        return calls / min(_timed(run) for _ in range(3))

    track_call_over_kernel.unit = "ratio"  # type: ignore[attr-defined]


def batch_report(
    grid_n: int = USER_BATCH_GRID_N[-1],
    n_structures: int = USER_BATCH,
    repeats: int = 3,
    calls: int = USER_CALLS,
    dtype: str = "float32",
) -> list[dict]:
    """``pot(Batch)`` with Verlet lists kept (default skin) and rebuilt each call (skin 0),
    and the stacked kernel on exact lists, every model interleaved, min seconds
    (``python -m bench.bench_user_path --batch [--float64] [N]``)."""
    bs = batches(grid_n, n_structures, calls)
    pots = {}
    for m in MODELS:
        for skin in ("kept", "rebuilt"):
            pot = build_potential(config_for(m, dtype))
            if skin == "rebuilt":
                pot.skin = 0.0
            call_seconds(pot, bs)  # compile, settle
            pots[m, skin] = pot
    kernels = {m: batch_kernel(pots[m, "kept"], bs[-1])[0] for m in MODELS}
    for run in kernels.values():
        run()
    best = {k: np.inf for k in [*pots, *((m, "kernel") for m in MODELS)]}
    for _ in range(repeats):
        for m in MODELS:  # interleaved
            for skin in ("kept", "rebuilt"):
                best[m, skin] = min(best[m, skin], min(call_seconds(pots[m, skin], bs)))
            best[m, "kernel"] = min(best[m, "kernel"], _timed(kernels[m]))
    rows = []
    for m in MODELS:
        k = best[m, "kernel"]
        row = dict(
            model=m,
            dtype=dtype,
            n_structures=n_structures,
            n_atoms=grid_n**3,
            call_kept_s=best[m, "kept"],
            call_rebuilt_s=best[m, "rebuilt"],
            kernel_s=k,
            kept_over_kernel=best[m, "kept"] / k,
            rebuilt_over_kernel=best[m, "rebuilt"] / k,
        )
        rows.append(row)
        print(
            f"{m:8s} {n_structures} x {grid_n**3} atoms  call (lists kept) "
            f"{row['call_kept_s']:.4f} s  (rebuilt) {row['call_rebuilt_s']:.4f} s  kernel "
            f"{k:.4f} s  kept/kernel {row['kept_over_kernel']:.3f}  rebuilt/kernel "
            f"{row['rebuilt_over_kernel']:.3f}",
            flush=True,
        )
    return rows


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def report(
    grid_ns=USER_GRID_N,
    repeats: int = 3,
    *,
    dtype: str = "float32",
    patterns=PATTERNS,
    calls: int = USER_CALLS,
) -> list[dict]:
    """Every model and pattern, interleaved: min call and kernel seconds, their ratio, the
    rebuilds per call (``python -m bench.bench_user_path [--float64] [--md-only] N ...``)."""
    rows = []
    for grid_n in grid_ns:
        pots = {m: build_potential(config_for(m, dtype)) for m in MODELS}
        for pattern in patterns:
            systems = structures(grid_n, pattern, calls)
            graphs = {}
            for m, pot in pots.items():
                call_seconds(pot, systems)  # compile, settle
                pot.stats = dict.fromkeys(pot.stats, 0)
                graphs[m] = pot.graph(systems[-1])
                jax.block_until_ready(pot.evaluate(pot.params, graphs[m]))
            best = {m: [np.inf, np.inf] for m in pots}
            for _ in range(repeats):
                for m, pot in pots.items():  # interleaved
                    best[m][0] = min(best[m][0], min(call_seconds(pot, systems)))
                    g = graphs[m]
                    t = _timed(lambda p=pot, g=g: jax.block_until_ready(p.evaluate(p.params, g)))
                    best[m][1] = min(best[m][1], t)
            for m, (call, kernel) in best.items():
                st = pots[m].stats
                rows.append(
                    dict(
                        model=m,
                        dtype=dtype,
                        n_atoms=grid_n**3,
                        pattern=pattern,
                        call_s=call,
                        kernel_s=kernel,
                        ratio=call / kernel,
                        rebuilds_per_call=st["rebuilds"] / max(st["calls"], 1),
                    )
                )
                print(
                    f"{m:8s} N={grid_n**3:5d} {pattern:5s} call {call:.4f} s  kernel "
                    f"{kernel:.4f} s  call/kernel {call / kernel:.3f}",
                    flush=True,
                )
    return rows


def tp_mixing_report(grid_n: int = 10, repeats: int = 5) -> dict[str, float]:
    """Kernel seconds of Allegro and CELLI for each ``tp_mixing`` (min of ``repeats``
    interleaved runs on the exact graph; ``python -m bench.bench_user_path --tp-mixing``)."""
    from celli_scale.models.allegro import TP_MIXING

    s = nacl_grid(grid_n, rattle=0.05, seed=0)
    runs = {}
    for m in ("allegro", "celli"):
        for mix in TP_MIXING:
            pot = build_potential(dict(config_for(m, "float32"), tp_mixing=mix))
            g = pot.graph(s)
            jax.block_until_ready(pot.evaluate(pot.params, g))
            runs[f"{m} {mix}"] = (pot, g)
    best = dict.fromkeys(runs, np.inf)
    for _ in range(repeats):
        for k, (pot, g) in runs.items():
            t = _timed(lambda p=pot, g=g: jax.block_until_ready(p.evaluate(p.params, g)))
            best[k] = min(best[k], t)
    return best


def warm_start_report(
    grid_n: int = 10, repeats: int = 3, calls: int = USER_CALLS, dtype: str = "float32"
) -> dict[str, dict[str, float]]:
    """CELLI's ``pot(system)`` in the ``md`` pattern with and without the Qeq warm start
    (interleaved; min call seconds, mean CG iterations per call, max |Δq| between the two;
    ``python -m bench.bench_user_path --warm-start [--float64] N``)."""
    systems = structures(grid_n, "md", calls)
    pots = {w: build_potential(config_for("celli", dtype)) for w in ("warm", "cold")}
    pots["cold"].warm_start = False
    iters = {w: [] for w in pots}
    charges = {}
    for w, pot in pots.items():
        call_seconds(pot, systems)  # compile, settle
        for s in systems:
            out = pot(s)
            iters[w].append(int(out.qeq_iterations))
        charges[w] = np.asarray(out.charges)
    best = dict.fromkeys(pots, np.inf)
    for _ in range(repeats):
        for w, pot in pots.items():
            best[w] = min(best[w], min(call_seconds(pot, systems)))
    dq = float(np.max(np.abs(charges["warm"] - charges["cold"])))
    return {
        w: dict(call_s=best[w], mean_iterations=float(np.mean(iters[w])), max_dq_e=dq) for w in pots
    }


if __name__ == "__main__":
    import json
    import sys

    args = sys.argv[1:]
    if args and args[0] == "--tp-mixing":
        print(json.dumps(tp_mixing_report(*(int(x) for x in args[1:])), indent=1))
    elif args and args[0] == "--batch":
        dt = "float64" if "--float64" in args else "float32"
        sizes = [int(x) for x in args[1:] if not x.startswith("--")] or list(USER_BATCH_GRID_N)
        for n in sizes:
            print(json.dumps(batch_report(n, dtype=dt), indent=1), flush=True)
    elif args and args[0] == "--warm-start":
        dt = "float64" if "--float64" in args else "float32"
        sizes = [int(x) for x in args[1:] if not x.startswith("--")] or [10]
        for n in sizes:
            print(json.dumps({n**3: warm_start_report(n, dtype=dt)}, indent=1), flush=True)
    else:
        kw = {}
        if "--float64" in args:
            kw["dtype"] = "float64"
        if "--md-only" in args:
            kw["patterns"] = ("md",)
        sizes = tuple(int(x) for x in args if not x.startswith("--")) or USER_GRID_N
        print(json.dumps(report(sizes, **kw), indent=1))
