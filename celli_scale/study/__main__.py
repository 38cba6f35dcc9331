"""``python -m celli_scale.study --worker``: a study worker (spec as JSON on stdin, see
:func:`celli_scale.study.run.worker`); ``python -m celli_scale.study CONFIG [--out DIR]``:
the study itself, as ``celli-scale scale``."""

from __future__ import annotations

import argparse
import json
import logging
import sys

if sys.argv[1:] == ["--worker"]:
    from celli_scale.study.run import worker

    logging.basicConfig(level=logging.WARNING)
    worker(json.loads(sys.stdin.read()))
else:
    from celli_scale import study

    parser = argparse.ArgumentParser(prog="python -m celli_scale.study")
    study.add_parser(parser.add_subparsers(dest="command", required=True))
    sys.exit(study.main(parser.parse_args(["scale", *sys.argv[1:]])))
