"""Reading and writing structures and labelled data sets.

A :class:`Frame` is one :class:`~celli_scale.system.System` plus optional reference labels.
Supported files:

* extended XYZ through ASE (:func:`read_extxyz`, :func:`write_extxyz`);
* RuNNer / n2p2 ``input.data`` (:func:`read_runner`, :func:`write_runner`), in atomic units
  on disk;
* padded ``.npz`` data sets (:func:`save_npz`, :func:`load_npz`), bit-exact;
* :func:`read` / :func:`write` pick one of these from the file name.

Units in memory: positions and cell in Å, energy in eV, forces in eV/Å, charges in e,
stress in eV/Å³ (ASE's sign convention). Loading never runs code: no pickle, no eval. A
malformed file raises :class:`DataFormatError` (a ``ValueError``) naming the file, the line
or frame, and the field.
"""

from celli_scale.io.extxyz import read_extxyz, write_extxyz
from celli_scale.io.formats import FORMATS, guess_format, read, write
from celli_scale.io.frame import DataFormatError, Frame, Index
from celli_scale.io.npz import NPZ_FORMAT, load_npz, save_npz
from celli_scale.io.runner import read_runner, write_runner

__all__ = [
    "FORMATS",
    "NPZ_FORMAT",
    "DataFormatError",
    "Frame",
    "Index",
    "guess_format",
    "load_npz",
    "read",
    "read_extxyz",
    "read_runner",
    "save_npz",
    "write",
    "write_extxyz",
    "write_runner",
]
