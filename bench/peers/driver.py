"""The driver: correctness checks, then every point on every side, each side in its own
subprocess (its own interpreter), timed runs under a machine-wide lock on a quiet
machine; writes ``peers.json`` and ``peers.md``. Also the command line of
``python -m bench.peers``.

Standard library only at import; ``celli_scale`` (and so JAX) on first use: the
subprocess harness is :func:`celli_scale.distributed.launch.run_group`, the probes
:mod:`celli_scale.memory`'s.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bench.peers as package
from bench.peers.report import check_key, machine_summary, write_markdown
from bench.peers.side import add_side_arguments, emit, run_side
from bench.peers.spec import AOTI_MODELS, parse_points

#: The repository root: the sides run there, so that ``-m bench.peers.side`` finds the
#: package and our side imports ``celli_scale`` from the source tree.
ROOT = Path(__file__).resolve().parents[2]
#: Interpreters of the two sides (flags and environment variables override them): ours
#: defaults to the one running the driver, the peers' to ``.venv-peers`` in the repository
#: root (bench/RESULTS.md: how to make it).
DEFAULT_OURS_PYTHON = os.environ.get("CELLI_PEERS_OURS_PYTHON", sys.executable)
DEFAULT_PEERS_PYTHON = os.environ.get(
    "CELLI_PEERS_PEERS_PYTHON", str(ROOT / ".venv-peers" / "bin" / "python")
)
#: Lock shared by everyone who times things on this machine.
DEFAULT_LOCK = os.environ.get("CELLI_CPU_LOCK", "/tmp/celli_cpu.lock")

Log = Callable[[str], None]


# --------------------------------------------------------------------------------------
# one side in a subprocess
# --------------------------------------------------------------------------------------
def run_side_process(
    python: str,
    side_args: list[str],
    *,
    lock: str | None,
    timeout_s: float,
    mem_limit_bytes: int,
    log: Log,
) -> dict[str, Any]:
    """Run ``python -m bench.peers.side <side_args>`` in the repository root (under
    ``flock lock`` when given) through :func:`celli_scale.distributed.launch.run_group`
    and return its result row, with ``tree_peak_rss_mb`` (the subprocess tree's peak
    resident MiB). The timeout counts once the interpreter runs (with a lock: once
    ``flock`` has started it); the process tree is killed when its resident memory
    exceeds ``mem_limit_bytes``. A run stopped for memory or time, or one that wrote no
    row, gets a row whose status says why and the tail of its output."""
    from celli_scale.distributed.launch import run_group

    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "row.json"
        cmd = [python, "-m", "bench.peers.side", *side_args, "--result", str(result)]
        if lock:
            cmd = ["flock", lock, *cmd]
        log(" ".join(cmd))
        run = run_group(
            [cmd],
            cwd=ROOT,
            timeout_s=timeout_s,
            memory_limit_bytes=mem_limit_bytes,
            timeout_starts_when_child_exists=bool(lock),
        )
        peak = run.peak_tree_rss_bytes
        why = None
        if run.killed_for_memory:
            why = (
                f"out of memory: stopped at {peak / 2**30:.1f} GiB resident "
                f"(limit {mem_limit_bytes / 2**30:.1f} GiB)"
            )
        elif run.timed_out:
            why = f"skipped: timed out after {timeout_s:.0f} s"
        if why is None and result.exists():
            row = json.loads(result.read_text())
        else:
            row = {"status": why or f"error: exit code {run.returncodes[0]}"}
            row["log_tail"] = "\n".join([*run.stdout_lines, run.stderr_tails[0]])[-2000:]
        row["tree_peak_rss_mb"] = peak / 2**20
        return row


def host_memory_limit(fraction: float) -> int:
    """``fraction`` of the host's available memory (bytes): the limit on a side's
    process-tree resident memory."""
    from celli_scale import memory

    # the limit is on host RSS: the host's memory, without starting a JAX backend (the
    # driver must not take memory on an accelerator the sides will use)
    return int(fraction * memory.host_available_memory_bytes())


# --------------------------------------------------------------------------------------
# a quiet machine, re-measured when it was not
# --------------------------------------------------------------------------------------
def wait_quiet(max_busy: float, max_wait_s: float, log: Log) -> float:
    """Wait until the whole machine uses at most ``max_busy`` cores (averaged over 2 s)
    or ``max_wait_s`` has passed; return the last busy figure."""
    from celli_scale import memory

    t0 = last_log = time.monotonic()
    while True:
        b0 = memory.busy_cpu_seconds()
        time.sleep(2.0)
        busy = (memory.busy_cpu_seconds() - b0) / 2.0
        now = time.monotonic()
        if busy <= max_busy or now - t0 > max_wait_s:
            return busy
        if now - last_log > 60:
            log(f"waiting for a quiet machine ({busy:.2f} cores busy)")
            last_log = now


def measure(
    run: Callable[[], dict[str, Any]],
    *,
    retries: int,
    max_foreign: float,
    quiet_wait_s: float,
    log: Log,
) -> dict[str, Any]:
    """``run()`` (one timed subprocess) once the machine is quiet; again, up to ``retries``
    times, while other processes used more than ``max_foreign`` cores during the timed
    calls. Returns the least disturbed row, with every attempt listed under "attempts"."""
    best, attempts = None, []
    for _ in range(retries + 1):
        wait_quiet(max_foreign, quiet_wait_s, log)
        row = run()
        foreign = row.get("foreign_cpu_cores")
        attempts.append(
            {"status": row.get("status"), "seconds": row.get("seconds"), "foreign": foreign}
        )
        ok = row.get("status") == "ok" and foreign is not None
        if best is None or (ok and best.get("foreign_cpu_cores", 1e9) > foreign):
            best = row
        if not ok or foreign <= max_foreign:
            break
        log(f"others used {foreign:.2f} cores during the timed calls: measuring again")
    best["attempts"] = attempts
    best["contended"] = best.get("foreign_cpu_cores", 0.0) > max_foreign
    return best


# --------------------------------------------------------------------------------------
# the driver
# --------------------------------------------------------------------------------------
def run_both(args: argparse.Namespace) -> int:
    """Driver: correctness checks, then every point on every side; writes JSON + Markdown.

    Sides, in this order for each point: ``ours``, ``peer`` (torch eager) and, for the
    nequip-family models when ``--peer-modes`` includes it, ``peer_aoti`` (AOTInductor).
    """
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "peers.json"
    aot_dir = out_dir / "aot"

    def log(msg: str) -> None:
        print(f"[peers {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    points = parse_points(args.points)
    models = sorted({m for m, _, _ in points})
    modes = [m for m in args.peer_modes.split(",") if m]
    mem_limit = host_memory_limit(args.mem_fraction)
    doc: dict[str, Any] = {
        "machine": machine_summary(),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "lock": args.lock,
        "check_grid_n": args.check_grid_n,
        "max_foreign": args.max_foreign,
        "retries": args.retries,
        "interpreters": {"ours": args.ours_python, "peers": args.peers_python},
        "versions": {},
        "checks": [],
        "points": [],
    }
    if args.resume and json_path.exists():  # keep what is already measured
        old = json.loads(json_path.read_text())
        for key in ("checks", "versions", "points", "date"):
            doc[key] = old.get(key, doc[key])
    elif aot_dir.exists():  # compiled files of an earlier run may hold other weights
        for f in aot_dir.glob("*.nequip.pt2"):
            f.unlink()

    def save() -> None:
        json_path.write_text(json.dumps(doc, indent=1))
        write_markdown(doc, out_dir / "peers.md")

    #: (result key, interpreter side, peer mode) of every side of a point
    sides = [("ours", "ours", "eager"), ("peer", "peers", "eager")]
    if "aotinductor" in modes:
        sides.append(("peer_aoti", "peers", "aotinductor"))
    pythons = {"ours": args.ours_python, "peers": args.peers_python}

    def wanted(key: str, model: str) -> bool:
        return key != "peer_aoti" or model in AOTI_MODELS

    def run(key, side, mode, model, n, dt, repeats, check, lock):
        npz = out_dir / "systems" / f"nacl_{n}.npz"
        a = ["--side", side, "--model", model, "--grid-n", str(n), "--dtype", dt]
        a += ["--repeats", str(repeats), "--warmup", str(args.warmup), "--npz", str(npz)]
        a += ["--threads", str(args.threads), "--peer-mode", mode, "--aot-dir", str(aot_dir)]
        return run_side_process(
            pythons[side],
            a + (["--check"] if check else []),
            lock=lock,
            timeout_s=args.timeout,
            mem_limit_bytes=mem_limit,
            log=log,
        )

    if not args.skip_checks:
        done = {(c.get("model"), check_key(c)) for c in doc["checks"]}
        for model in models:
            for key, side, mode in sides:
                if not wanted(key, model) or (model, key) in done:
                    continue
                # untimed, so no lock, except for the AOTInductor compilation: minutes of
                # both cores, which would disturb someone else's timed run
                lock = args.lock if mode == "aotinductor" else None
                row = run(key, side, mode, model, args.check_grid_n, "float64", 0, True, lock)
                row["side_key"] = key
                log(
                    f"check {model} {key}: {row.get('status')} "
                    f"fd_err={row.get('fd_max_abs_err')} sum_rel={row.get('force_sum_rel')}"
                )
                doc["checks"].append(row)
                save()

    by_key = {(p["model"], p["grid_n"], p["dtype"]): p for p in doc["points"]}
    for model, n, dt in points:
        point = by_key.get((model, n, dt))
        if point is None:
            point = {"model": model, "grid_n": n, "n_atoms": n**3, "dtype": dt}
            doc["points"].append(point)
        for key, side, mode in sides:
            if key in point or not wanted(key, model):
                continue
            est = _estimated_rss(doc["points"], key, model, dt, n**3)
            if est is not None and est > mem_limit:
                row = {
                    "status": f"skipped: out of memory (needs ~{est / 2**30:.0f} GiB, "
                    f"scaled from the smaller size's peak; limit {mem_limit / 2**30:.1f} GiB)"
                }
            else:
                row = measure(
                    functools.partial(
                        run, key, side, mode, model, n, dt, args.repeats, False, args.lock
                    ),
                    retries=args.retries,
                    max_foreign=args.max_foreign,
                    quiet_wait_s=args.quiet_wait,
                    log=log,
                )
            point[key] = row
            if "versions" in row:
                doc["versions"][side] = row["versions"]
            log(f"{model} N={n**3} {dt} {key}: {row.get('status')} {row.get('seconds')}")
            save()
    save()
    log(f"wrote {json_path} and {out_dir / 'peers.md'}")
    return 0


def _estimated_rss(points, key: str, model: str, dtype: str, n_atoms: int) -> float | None:
    """Peak resident bytes of side ``key`` at ``n_atoms`` while timing, scaled linearly
    from the largest smaller size measured (memory grows with the edge count, ∝ N here),
    or from the memory at which a smaller size was stopped; None if nothing is known."""
    best = None
    for p in points:
        r = p.get(key) or {}
        if p["model"] != model or p["dtype"] != dtype or p["n_atoms"] >= n_atoms:
            continue
        if r.get("status") == "ok":
            peak = r.get("run_peak_rss_mb") or 0.0  # excludes compilation, graph building
        else:  # stopped by the watchdog: what it had reached
            peak = r.get("tree_peak_rss_mb", 0.0) if "out of memory" in r.get("status", "") else 0
        if peak and (best is None or p["n_atoms"] > best[0]):
            best = (p["n_atoms"], peak)
    if best is None:
        return None
    return best[1] * 2**20 * n_atoms / best[0]


# --------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The options of ``python -m bench.peers``: one side's, then the driver's."""
    p = argparse.ArgumentParser(
        prog="python -m bench.peers", description=package.__doc__.split("\n")[0]
    )
    add_side_arguments(p, ("both", "ours", "peers"), "both")
    p.add_argument(
        "--peer-modes",
        default="eager,aotinductor",
        help="driver: peer modes to time (aotinductor: allegro and nequip only)",
    )
    # driver options
    p.add_argument("--out", default="out/peers", help="driver output directory")
    p.add_argument("--points", default=None, help="model:grid_n:dtype,... (default: all)")
    p.add_argument("--ours-python", default=DEFAULT_OURS_PYTHON)
    p.add_argument("--peers-python", default=DEFAULT_PEERS_PYTHON)
    p.add_argument("--lock", default=DEFAULT_LOCK, help="flock file ('' = no lock)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per subprocess")
    p.add_argument(
        "--mem-fraction",
        type=float,
        default=0.85,
        help="stop a subprocess above this fraction of MemAvailable",
    )
    p.add_argument(
        "--max-foreign",
        type=float,
        default=0.15,
        help="re-measure when other processes used more cores than this while timing",
    )
    p.add_argument("--retries", type=int, default=3, help="re-measurements per point")
    p.add_argument(
        "--quiet-wait", type=float, default=900.0, help="max seconds to wait for a quiet machine"
    )
    p.add_argument("--check-grid-n", type=int, default=4)
    p.add_argument("--skip-checks", action="store_true")
    p.add_argument("--resume", action="store_true", help="keep points in an existing peers.json")
    return p


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.peers``: the driver (``--side both``, the default) or one side."""
    args = build_parser().parse_args(argv)
    if args.side == "both":
        args.lock = args.lock or None
        return run_both(args)
    return emit(run_side(args), args.result)
