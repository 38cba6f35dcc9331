"""One side, one point: the body of the subprocess the driver starts.

    <interpreter> -m bench.peers.side --side ours|peers --model M --grid-n N --dtype D ...

runs in the repository root (``bench`` and ``bench.peers`` import nothing heavy, so the
peers' interpreter, which has no JAX, can run it) and prints its result row as JSON, or
writes it to ``--result``. ``python -m bench.peers --side ours|peers ...`` does the same.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from bench.peers.measure import library_memory


def add_side_arguments(p: argparse.ArgumentParser, sides: tuple[str, ...], default: str) -> None:
    """The options of one side's run (``sides``: the choices of ``--side``)."""
    p.add_argument("--side", choices=sides, default=default)
    p.add_argument("--model", choices=("allegro", "mace", "nequip"), default="allegro")
    p.add_argument("--grid-n", type=int, default=10, help="NaCl grid sites per axis (N = n³)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--repeats", type=int, default=5, help="timed warm runs (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up calls")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (peers)")
    p.add_argument("--check", action="store_true", help="add the finite-difference check")
    p.add_argument(
        "--peer-mode",
        choices=("eager", "aotinductor"),
        default="eager",
        help="peers: torch eager, or (nequip, nequip-allegro) compiled by AOTInductor",
    )
    p.add_argument("--aot-dir", default="out/peers/aot", help="cache of AOTInductor files")
    p.add_argument("--npz", default=None, help="system arrays (written by ours, read by peers)")
    p.add_argument("--result", default=None, help="write the row as JSON here (else stdout)")


def run_side(args: argparse.Namespace) -> dict[str, Any]:
    """Run one point on one side; never raises (errors become the row's status)."""
    row: dict[str, Any] = {
        "side": args.side,
        "model": args.model,
        "grid_n": args.grid_n,
        "n_atoms": args.grid_n**3,
        "dtype": args.dtype,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "status": "ok",
    }
    try:
        if args.side == "ours":
            from bench.peers.ours import run_ours, versions_ours

            row["versions"] = versions_ours()
            row.update(run_ours(args))
        else:
            from bench.peers.torch_side import run_peers, versions_peers

            row["versions"] = versions_peers()
            row.update(run_peers(args))
    except MemoryError as e:
        row["status"] = f"out of memory ({type(e).__name__})"
    except RuntimeError as e:
        msg = str(e)
        oom = "out of memory" in msg.lower() or "can't allocate" in msg.lower()
        row["status"] = f"out of memory ({msg[:200]})" if oom else f"error: {msg[:500]}"
    except Exception as e:  # recorded, so that one broken point does not stop the study
        row["status"] = f"error: {type(e).__name__}: {str(e)[:500]}"
    if "times" in row:
        row["seconds"] = statistics.median(row["times"])
    if row["status"] == "ok" and not (row.get("energy_finite") and row.get("forces_finite")):
        row["status"] = "error: non-finite energy or forces"
    if row["status"] == "ok" and args.check and not row.get("fd_ok", False):
        row["status"] = "error: finite-difference check failed"
    if row["status"] == "ok" and abs(row.get("aoti_minus_eager_max_abs_force", 0.0)) > 1e-6:
        row["status"] = "error: AOTInductor forces differ from eager"
    # after a timing: the peak since its start (timed_calls resets it); else the process's
    row["peak_rss_mb"] = library_memory().peak_rss_since_reset_mb()
    return row


def emit(row: dict[str, Any], result: str | None) -> int:
    """Write ``row`` as JSON to ``result`` (else stdout); exit status 0 if it is "ok"."""
    text = json.dumps(row, indent=1)
    if result:
        Path(result).write_text(text)
    else:
        print(text)
    return 0 if row["status"] == "ok" else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.peers.side", description="one side of one peers point"
    )
    add_side_arguments(p, ("ours", "peers"), "ours")
    args = p.parse_args(argv)
    return emit(run_side(args), args.result)


if __name__ == "__main__":
    sys.exit(main())
