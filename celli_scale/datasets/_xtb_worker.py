"""The labelling helper process of :mod:`celli_scale.datasets.qm` (``label_one``).

Reads ``len (8 bytes, little endian) + pickle(args)`` calls of
:func:`celli_scale.datasets.qm._singlepoint` from stdin until it closes and answers each
with ``len + pickle((ok, result or exception))`` on the original stdout; anything the engine
prints goes to stderr.
"""

from __future__ import annotations

import os
import pickle
import struct
import sys


def main() -> None:
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # the engine's prints must not enter the answer stream
    from celli_scale.datasets.qm import _singlepoint

    calls = sys.stdin.buffer
    while head := calls.read(8):
        args = pickle.loads(calls.read(struct.unpack("<Q", head)[0]))
        try:
            answer = (True, _singlepoint(*args))
        except Exception as e:  # handed back to the caller, who raises it
            answer = (False, e)
        blob = pickle.dumps(answer)
        answers.write(struct.pack("<Q", len(blob)) + blob)
        answers.flush()


if __name__ == "__main__":
    main()
