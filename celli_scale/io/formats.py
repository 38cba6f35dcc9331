"""Format dispatch: :func:`read` / :func:`write` pick a format from the file name.

Formats: ``"extxyz"`` (:mod:`~celli_scale.io.extxyz`), ``"runner"``
(:mod:`~celli_scale.io.runner`), ``"npz"`` (:mod:`~celli_scale.io.npz`), and for reading
only ``"ase"`` (any format ASE reads). Units in memory: positions and cell in Å, energy
in eV, forces in eV/Å, charges in e, stress in eV/Å³ (ASE's sign convention).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from celli_scale.io.extxyz import read_extxyz, write_extxyz
from celli_scale.io.frame import (
    DataFormatError,
    Frame,
    Index,
    check_exists,
    from_ase_checked,
    parse_index,
    reason,
    select,
)
from celli_scale.io.npz import load_npz, save_npz
from celli_scale.io.runner import read_runner, write_runner

FORMATS = ("extxyz", "runner", "npz", "ase")


def guess_format(path: str | os.PathLike) -> str:
    """The format of ``path`` from its name: ``.xyz``/``.extxyz`` → ``"extxyz"``,
    ``input.data``/``.data`` → ``"runner"``, ``.npz`` → ``"npz"``, else ``"ase"``
    (left to ASE's own detection)."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in (".xyz", ".extxyz"):
        return "extxyz"
    if p.name == "input.data" or suffix == ".data":
        return "runner"
    if suffix == ".npz":
        return "npz"
    return "ase"


def read(
    path: str | os.PathLike, index: Index = ":", format: str | None = None, **system_kwargs: Any
) -> list[Frame]:
    """Read frames from any supported file (units as in :mod:`celli_scale.io`).

    Args:
      path: the file.
      index: which frames, ASE style (``":"``, ``-1``, ``"2:10"``, an int or a slice).
      format: one of ``"extxyz"``, ``"runner"``, ``"npz"``, ``"ase"`` (any format ASE
        reads); default from the file name (:func:`guess_format`).
      system_kwargs: passed to :class:`System` (e.g. ``min_distance``).

    Returns:
      a list of frames.
    """
    path = Path(path)
    fmt = guess_format(path) if format is None else format
    if fmt == "extxyz":
        return read_extxyz(path, index, **system_kwargs)
    if fmt == "runner":
        return select(read_runner(path, **system_kwargs), index, path)
    if fmt == "npz":
        return select(load_npz(path, **system_kwargs), index, path)
    if fmt == "ase":
        import ase.io
        from ase.io.formats import UnknownFileTypeError

        check_exists(path)
        idx = parse_index(index, path)
        try:
            images = ase.io.read(path, index=idx)
        except UnknownFileTypeError:
            raise DataFormatError(
                f"{path}: cannot tell the file format from its name; use .xyz/.extxyz, "
                "input.data/.data or .npz"
            ) from None
        except IndexError:
            raise DataFormatError(
                f"{path}: frame index {index!r} is out of range for this file"
            ) from None
        except (ValueError, OSError, KeyError, TypeError, StopIteration) as e:
            raise DataFormatError(f"{path}: ASE cannot read it: {reason(e)}") from None
        if not isinstance(images, list):
            images = [images]
        return [from_ase_checked(a, path, k, **system_kwargs) for k, a in enumerate(images)]
    raise ValueError(f"unknown format {format!r}; expected one of {FORMATS}")


def write(
    path: str | os.PathLike, frames: Frame | Sequence[Frame], format: str | None = None
) -> None:
    """Write frames, format from the file name as in :func:`read` (extxyz, runner or npz)."""
    fmt = guess_format(path) if format is None else format
    if fmt == "extxyz":
        write_extxyz(path, frames)
    elif fmt == "runner":
        write_runner(path, frames)
    elif fmt == "npz":
        save_npz(path, frames)
    else:
        raise ValueError(
            f"{path}: cannot tell the format to write; use .xyz/.extxyz, input.data/.data or .npz"
            if format is None
            else f"unknown format {format!r}; expected 'extxyz', 'runner' or 'npz'"
        )
