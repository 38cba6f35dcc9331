"""The ``celli-scale`` command.

Subcommands:

* ``celli-scale info FILE``: summarise a structure or data file (frames, atoms, species,
  cell/pbc of the first frame, total charges, labels present).
* ``celli-scale demo [OPTIONS]``: run the main job on one CPU (:mod:`celli_scale.demo`).
* ``celli-scale scale CONFIG [--out DIR]``: a scaling study (:mod:`celli_scale.study`).
* ``celli-scale run STRUCTURE --model DIR [--devices N | --mesh A,B,C] [--chunks K]
  [--skin S] [--frame I] [--out FILE] [--stress]``: energy, forces and stress of one
  structure with a saved potential over a domain decomposition (:mod:`celli_scale.run`).
* ``celli-scale datasets make NAME --n N --out FILE [--seed S] [--size K]``: reference data
  labelled by GFN2-xTB through tblite (:mod:`celli_scale.datasets.cli`).
* ``celli-scale train CONFIG.yaml``: force-matching training (:mod:`celli_scale.train.cli`).
* ``celli-scale evaluate MODEL DATA [--json FILE] [--plot FILE.png]``: errors by formula
  and total charge (:mod:`celli_scale.train.evaluate`).
* ``celli-scale md CONFIG.yaml``: molecular dynamics with jax-md, trajectory, log, RDF and
  a plot (:mod:`celli_scale.md`).

Subcommands that live in their own module declare their options through
``add_parser(subparsers)`` and run as ``main(args)``.

User errors (missing or malformed file, bad input) print one line ``error: ...`` to stderr
and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from celli_scale import demo, md, run, study
from celli_scale.datasets import cli as datasets_cli
from celli_scale.distributed.multihost import DistributedSetupError
from celli_scale.distributed.ray_launcher import WorkerTaskError
from celli_scale.train import cli as train_cli

logger = logging.getLogger(__name__)

#: Exit status for user errors (as argparse uses for bad arguments).
EXIT_USAGE = 2


class CLIError(Exception):
    """A user-facing error of the command line (reported as one line, exit status 2)."""


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="celli-scale",
        description="Long-range machine-learned interatomic potentials at scale.",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p_info = sub.add_parser(
        "info",
        help="summarise a structure or data file (.xyz/.extxyz, input.data, .npz, ...)",
        description="Summarise a structure or data file: frames, atoms per frame, species, "
        "cell and pbc of the first frame, total charges and labels present.",
    )
    p_info.add_argument("file", help="structure or data file")
    p_info.add_argument(
        "--format",
        choices=("extxyz", "runner", "npz", "ase"),
        default=None,
        help="file format (default: from the file name)",
    )
    for module in dict.fromkeys(_module_commands().values()):  # train_cli adds two commands
        module.add_parser(sub)
    return parser


def _module_commands() -> dict[str, Any]:
    """Subcommands implemented in their own module (``add_parser(sub)`` + ``main(args)``),
    by command name."""
    return {
        "demo": demo,
        "scale": study,
        "run": run,
        "datasets": datasets_cli,
        "train": train_cli,
        "evaluate": train_cli,
        "md": md,
    }


def _fmt_charge(q: float) -> str:
    return f"{q:g}"


def info_lines(frames: Sequence, path: str, fmt: str) -> list[str]:
    """Human-readable summary of ``frames`` (units: Å, e), one string per line."""
    from ase.data import chemical_symbols

    if len(frames) == 0:
        return [f"file: {path} (format: {fmt})", "frames: 0"]
    sizes = np.array([f.n_atoms for f in frames])
    counts: Counter[int] = Counter()
    for f in frames:
        counts.update(int(z) for z in np.asarray(f.system.species))
    species = ", ".join(f"{chemical_symbols[z]} {counts[z]}" for z in sorted(counts))
    first = frames[0].system
    pbc = " ".join("T" if p else "F" for p in first.pbc)
    charges = Counter(round(float(f.system.total_charge), 6) for f in frames)
    charge_str = ", ".join(
        f"{_fmt_charge(q)} ({n} frame{'s' if n != 1 else ''})" for q, n in sorted(charges.items())
    )
    n = len(frames)
    lines = [
        f"file: {path} (format: {fmt})",
        f"frames: {n}",
        f"atoms per frame: min {sizes.min()}, max {sizes.max()} (total {sizes.sum()})",
        f"species (atoms over all frames): {species}",
        f"first frame: {first.n_atoms} atoms, pbc {pbc}",
    ]
    if first.cell is None:
        lines.append("  cell: none")
    else:
        cell = np.asarray(first.cell, dtype=float)
        lines.append("  cell (Å, rows are lattice vectors):")
        lines.extend("    " + " ".join(f"{v:12.6f}" for v in row) for row in cell)
    lines.append(f"total charge (e): {charge_str}")
    label_counts = {
        k: sum(getattr(f, k) is not None for f in frames)
        for k in ("energy", "forces", "charges", "stress")
    }
    present = [f"{k} {c}/{n}" for k, c in label_counts.items() if c]
    lines.append("labels: " + (", ".join(present) if present else "none"))
    return lines


def _cmd_info(args: argparse.Namespace) -> int:
    from celli_scale import io

    fmt = args.format or io.guess_format(args.file)
    frames = io.read(args.file, format=fmt)
    print("\n".join(info_lines(frames, args.file, fmt)))
    return 0


def _cmd_module(args: argparse.Namespace) -> int:
    return int(_module_commands()[args.command].main(args) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``celli-scale``; returns the exit status (0 on success, 2 on a user
    error, after printing ``error: ...`` to stderr)."""
    parser = _build_parser()
    args = parser.parse_args(None if argv is None else list(argv))
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    commands = {"info": _cmd_info, **{k: _cmd_module for k in _module_commands()}}
    try:
        return commands[args.command](args)
    # User errors: bad or unreadable input (ValueError, OSError, the library's errors are
    # subclasses), a feature the input needs that is not implemented (e.g. electrostatics
    # of a slab), not enough memory for what was asked, a cluster set-up that cannot work
    # (no Ray token, no cluster at the address), a task that failed on a Ray worker
    # (its message). Programming errors keep their
    # traceback; -vv logs the traceback of user errors too.
    except (
        OSError,
        ValueError,
        CLIError,
        NotImplementedError,
        MemoryError,
        DistributedSetupError,
        WorkerTaskError,
    ) as e:
        logger.debug("%s failed", args.command, exc_info=True)
        msg = " ".join(str(e).split()) or type(e).__name__
        if isinstance(e, MemoryError):
            msg = f"out of memory ({msg}); try a smaller input"
        if isinstance(e, OSError) and e.filename and str(e.filename) not in msg:
            msg = f"{e.filename}: {msg}"
        print(f"error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
