"""Padded ``.npz`` data sets: bit-exact float64 storage of frames.

Units: positions and cell in Å, energy in eV, forces in eV/Å, charges in e, stress in
eV/Å³. Loading never runs code (``allow_pickle=False``); a malformed file raises
:class:`~celli_scale.io.frame.DataFormatError` naming the file and the array (or frame).
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from celli_scale.io.frame import DataFormatError, Frame, check_exists, frames_list, reason
from celli_scale.system import System

#: Version tag stored in every ``.npz`` data set written by :func:`save_npz`.
NPZ_FORMAT = "celli_scale.frames/1"


_LABELS = ("energy", "forces", "charges", "stress")


def save_npz(path: str | os.PathLike, frames: Frame | Sequence[Frame]) -> None:
    """Save frames as a padded ``.npz`` data set (Å, eV, eV/Å, e, eV/Å³; float64, exact).

    Arrays (``F`` frames padded to ``A`` atoms): ``positions (F, A, 3)``, ``species (F, A)``
    (0 on padding), ``n_atoms (F,)``, ``cell (F, 3, 3)`` with ``has_cell (F,)``,
    ``pbc (F, 3)``, ``total_charge (F,)``, and for each label ``energy (F,)``,
    ``forces (F, A, 3)``, ``charges (F, A)``, ``stress (F, 3, 3)`` with a flag
    ``has_<label> (F,)``; missing labels and padding are NaN. The file is written
    atomically (temporary file, then rename).
    """
    path = Path(path)
    frames = frames_list(frames, str(path))
    nf = len(frames)
    na = max(f.n_atoms for f in frames)
    arrays: dict[str, np.ndarray] = {
        "format": np.array(NPZ_FORMAT),
        "positions": np.zeros((nf, na, 3)),
        "species": np.zeros((nf, na), dtype=np.int32),
        "n_atoms": np.array([f.n_atoms for f in frames], dtype=np.int64),
        "cell": np.zeros((nf, 3, 3)),
        "has_cell": np.zeros(nf, dtype=bool),
        "pbc": np.zeros((nf, 3), dtype=bool),
        "total_charge": np.zeros(nf),
        "energy": np.full(nf, np.nan),
        "forces": np.full((nf, na, 3), np.nan),
        "charges": np.full((nf, na), np.nan),
        "stress": np.full((nf, 3, 3), np.nan),
    }
    for name in _LABELS:
        arrays[f"has_{name}"] = np.zeros(nf, dtype=bool)
    for k, f in enumerate(frames):
        s, n = f.system, f.n_atoms
        arrays["positions"][k, :n] = np.asarray(s.positions, dtype=float)
        arrays["species"][k, :n] = np.asarray(s.species)
        if s.cell is not None:
            arrays["cell"][k] = np.asarray(s.cell, dtype=float)
            arrays["has_cell"][k] = True
        arrays["pbc"][k] = s.pbc
        arrays["total_charge"][k] = float(s.total_charge)
        for name in _LABELS:
            v = getattr(f, name)
            if v is not None:
                arrays[f"has_{name}"][k] = True
                if name in ("forces", "charges"):
                    arrays[name][k, :n] = v
                else:
                    arrays[name][k] = v
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez_compressed(fh, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_npz(path: str | os.PathLike, **system_kwargs: Any) -> list[Frame]:
    """Load a data set written by :func:`save_npz` (``allow_pickle=False``: never runs code).

    Raises:
      DataFormatError: naming the file and the missing or inconsistent array (or frame).
      FileNotFoundError: if the file does not exist.
    """
    path = Path(path)
    check_exists(path)
    with path.open("rb") as fh:
        magic = fh.read(6)
    if magic.startswith(b"\x93NUMPY"):
        raise DataFormatError(f"{path}: a single .npy array, not an .npz data set")
    if not magic.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        raise DataFormatError(
            f"{path}: not an .npz data set (not a zip archive of arrays, as save_npz writes)"
        )
    arrays: dict[str, np.ndarray] = {}
    key = None
    try:
        data = np.load(path, allow_pickle=False)
        try:
            for key in data.files:
                arrays[key] = data[key]
        finally:
            data.close()
    except ValueError as e:
        if "pickle" in str(e):
            # numpy suggests allow_pickle=True here; data files are never unpickled
            raise DataFormatError(
                f"{path}: not a readable .npz data set: array {key!r} holds Python "
                "objects (pickled data), which are never loaded"
            ) from None
        raise DataFormatError(f"{path}: not a readable .npz data set: {reason(e)}") from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise DataFormatError(f"{path}: not a readable .npz data set: {reason(e)}") from None
    return _frames_from_arrays(arrays, path, system_kwargs)


def _frames_from_arrays(arrays: dict[str, np.ndarray], path: Path, kw: dict) -> list[Frame]:
    def fail(field: str, msg: str) -> NoReturn:
        raise DataFormatError(f"{path}: field {field!r}: {msg}")

    fmt = arrays.get("format")
    if fmt is None or fmt.shape != () or str(fmt) != NPZ_FORMAT:
        fail("format", f"expected {NPZ_FORMAT!r}, got {None if fmt is None else str(fmt)!r}")
    if "n_atoms" not in arrays:
        fail("n_atoms", "missing")
    n_atoms = arrays["n_atoms"]
    if n_atoms.ndim != 1 or n_atoms.dtype.kind not in "iu":
        fail("n_atoms", f"must be a 1-D integer array, got {n_atoms.dtype} {n_atoms.shape}")
    nf = n_atoms.shape[0]
    if "positions" not in arrays:
        fail("positions", "missing")
    na = arrays["positions"].shape[1] if arrays["positions"].ndim == 3 else -1
    expected = {
        "positions": ((nf, na, 3), "f"),
        "species": ((nf, na), "iu"),
        "cell": ((nf, 3, 3), "f"),
        "has_cell": ((nf,), "b"),
        "pbc": ((nf, 3), "b"),
        "total_charge": ((nf,), "f"),
        "energy": ((nf,), "f"),
        "forces": ((nf, na, 3), "f"),
        "charges": ((nf, na), "f"),
        "stress": ((nf, 3, 3), "f"),
    }
    expected.update({f"has_{name}": ((nf,), "b") for name in _LABELS})
    for key, (shape, kinds) in expected.items():
        if key not in arrays:
            fail(key, "missing")
        a = arrays[key]
        if a.shape != shape or a.dtype.kind not in kinds:
            fail(key, f"expected shape {shape} of kind {kinds!r}, got {a.dtype} {a.shape}")
    if nf == 0:
        fail("n_atoms", "the data set has no frames")
    bad = (n_atoms < 1) | (n_atoms > na)
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        fail("n_atoms", f"frame {k} has {int(n_atoms[k])} atoms (must be 1..{na})")
    frames = []
    for k in range(nf):
        n = int(n_atoms[k])
        try:
            system = System(
                arrays["positions"][k, :n],
                arrays["species"][k, :n],
                cell=arrays["cell"][k] if arrays["has_cell"][k] else None,
                pbc=tuple(bool(p) for p in arrays["pbc"][k]),
                total_charge=float(arrays["total_charge"][k]),
                **kw,
            )
            labels = {}
            for name in _LABELS:
                if arrays[f"has_{name}"][k]:
                    v = arrays[name][k]
                    labels[name] = v[:n] if name in ("forces", "charges") else v
            frames.append(Frame(system, **labels))
        except ValueError as e:
            raise DataFormatError(f"{path} frame {k}: {e}") from None
    return frames
