"""The scaling study, ``celli-scale scale CONFIG``: models × system sizes × (processes,
devices), data-parallel, on the NaCl grid.

* :mod:`.config`: :class:`StudyConfig` and :func:`load_config` (YAML).
* :mod:`.presets`: the matched hyper-parameters the study and the benchmarks share, and
  :func:`build_potential`.
* :mod:`.run`: the sweep, worker subprocesses (``python -m celli_scale.study --worker``)
  and one timed point.
* :mod:`.report`: ``results.csv``, ``results.md`` and the three plots.

Example::

    from celli_scale import study
    rows = study.run_study(study.load_config("bench/configs/scale_tiny.yaml"), "out/tiny")
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from celli_scale.distributed import ray_launcher
from celli_scale.study.config import StudyConfig, load_config
from celli_scale.study.report import ok_rows
from celli_scale.study.run import run_study

__all__ = ["StudyConfig", "add_parser", "load_config", "main", "run_study"]


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
    # each (processes) point becomes a Ray worker group of that many workers
    ray_launcher.add_cluster_arguments(p)


def main(args: argparse.Namespace) -> int:
    """Run the study of ``args.config`` into ``args.out``; print a one-line summary."""
    cfg = load_config(args.config)
    out = Path(getattr(args, "out", "out/scale"))
    ray_opts = ray_launcher.cluster_options(args)
    if ray_opts is not None:
        ray_opts.pop("num_workers")
        if args.num_workers is not None:
            raise ValueError(
                "celli-scale scale takes its process counts from the config's 'processes'; "
                "drop --num-workers"
            )
        ray_launcher.connect(ray_opts["address"])  # fail fast, before the sweep
    rows = run_study(cfg, out) if ray_opts is None else run_study(cfg, out, ray=ray_opts)
    ok = ok_rows(rows)
    print(
        f"{len(ok)}/{len(rows)} points ok; wrote {out / 'results.csv'}, "
        f"{out / 'results.md'} and 3 plots"
    )
    failed = [r for r in rows if r not in ok]
    for r in failed:
        print(
            f"failed: {r['model']} N={r['n_atoms']} processes={r.get('processes', 1)} "
            f"devices={r['devices']}: {r['status']}",
            file=sys.stderr,
        )
    return 1 if failed else 0
