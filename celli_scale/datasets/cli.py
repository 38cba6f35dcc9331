"""``celli-scale datasets make NAME --n N --out FILE``: reference data labelled by GFN2-xTB.

Draws ``N`` structures of data set ``NAME`` (one of :data:`celli_scale.datasets.qm.SYSTEMS`),
labels them with tblite (a progress bar over the structures; cached, so running the same
command again does not relabel) and writes them to ``FILE`` (``.xyz``: extended XYZ in ASE's
convention, energy in eV, forces in eV/Å, charges in e, total charge in ``charge``) with the
manifest ``FILE`` minus its suffix plus ``.json`` beside it. See :func:`celli_scale.datasets.make`.
"""

from __future__ import annotations

import argparse
import logging
import time

log = logging.getLogger(__name__)


def add_parser(sub) -> None:
    """Register ``datasets make NAME --n N --out FILE [...]`` on an argparse sub-parser set."""
    from celli_scale.datasets.qm import SYSTEMS

    p = sub.add_parser(
        "datasets",
        help="make reference data sets labelled by GFN2-xTB (tblite)",
        description="Reference data sets labelled by a quantum-chemistry engine.",
    )
    dsub = p.add_subparsers(dest="datasets_command", metavar="ACTION", required=True)
    m = dsub.add_parser(
        "make",
        help="draw and label a data set (cached)",
        description="Draw N structures of a data set (thermal displacements around a "
        "sensible geometry, every charge state), label them with GFN2-xTB through tblite "
        "(energy eV, forces eV/Å, Mulliken charges e) and write them with a JSON manifest "
        "beside the file. Labelled sets are cached (CELLI_DATA_CACHE, default "
        "~/.cache/celli_scale/datasets).",
    )
    m.add_argument("name", choices=SYSTEMS, help="the data set")
    m.add_argument("--n", type=int, required=True, help="structures in all (over charge states)")
    m.add_argument(
        "--out", required=True, help="output file (.xyz extended XYZ; .npz, input.data also work)"
    )
    m.add_argument("--seed", type=int, default=0, help="seed of the geometries (default 0)")
    m.add_argument(
        "--size",
        type=int,
        default=None,
        help="size: carbons (carbon-chain), 2m×2×2 block (nacl-cluster), n×n surface cells "
        "(au2-mgo), k×k×k cubic cells (nacl-bulk); default: the system's",
    )
    m.add_argument("--cache-dir", default=None, help="cache directory (default as above)")
    m.add_argument("--no-cache", action="store_true", help="relabel and leave the cache alone")
    m.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    """Run ``celli-scale datasets ACTION``. Returns 0; an SCF failure is a ``ValueError``
    naming the structure (one ``error:`` line from the command)."""
    from celli_scale.datasets.qm import LabelError, make, manifest_path

    if args.datasets_command != "make":  # argparse only offers "make"
        raise ValueError(f"unknown datasets action {args.datasets_command!r}")
    if args.n < 1:
        raise ValueError(f"--n must be a positive integer, got {args.n}")
    t0 = time.perf_counter()
    try:
        frames = make(
            args.name,
            args.n,
            args.seed,
            out=args.out,
            cache_dir=args.cache_dir,
            size=args.size,
            use_cache=not args.no_cache,
            progress=not args.no_progress,
        )
    except LabelError as e:
        raise ValueError(str(e)) from e
    print(
        f"{args.name}: {len(frames)} structures -> {args.out} "
        f"(manifest {manifest_path(args.out)}) in {time.perf_counter() - t0:.1f} s"
    )
    return 0
