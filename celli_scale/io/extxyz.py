"""Extended XYZ files, read and written through ASE.

Units: positions and cell in Å, energy in eV, forces in eV/Å, charges in e, stress in
eV/Å³ (ASE's sign convention). The file is checked line by line before ASE parses it, so
a malformed file raises :class:`~celli_scale.io.frame.DataFormatError` naming the line.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from celli_scale.io.frame import (
    DataFormatError,
    Frame,
    Index,
    check_exists,
    check_index,
    frames_list,
    from_ase_checked,
    parse_index,
    reason,
)


def read_extxyz(path: str | os.PathLike, index: Index = ":", **system_kwargs: Any) -> list[Frame]:
    """Read an extended XYZ file (Å, eV, eV/Å, e, eV/Å³) through ``ase.io.read``.

    Args:
      path: the file.
      index: ASE-style selection (``":"``, ``-1``, ``"0:10:2"``, a slice or an int).
      system_kwargs: passed to :class:`System` (e.g. ``min_distance``).

    Returns:
      a list of frames (also for an integer index).

    Raises:
      DataFormatError: naming the file, the line (and frame/atom) and the problem: an
        empty file, a bad atom count, a missing line, a wrong number of columns for the
        frame's ``Properties``, an unknown element, a frame index out of range.
    """
    import ase.io

    path = Path(path)
    check_exists(path)
    starts = _scan_extxyz(path)
    idx = parse_index(index, path)
    check_index(idx, len(starts), path)
    try:
        images = ase.io.read(path, index=idx, format="extxyz")
    except (ValueError, OSError, IndexError, KeyError, TypeError, StopIteration) as e:
        raise DataFormatError(f"{path}: not a readable extxyz file: {reason(e)}") from None
    if not isinstance(images, list):
        images = [images]
    numbers = list(range(len(starts)))
    chosen = numbers[idx] if isinstance(idx, slice) else [numbers[idx]]
    if len(chosen) != len(images):
        raise DataFormatError(
            f"{path}: ASE read {len(images)} frame(s) where {len(chosen)} were expected"
        )
    pairs = zip(chosen, images, strict=True)
    return [from_ase_checked(a, path, k, **system_kwargs) for k, a in pairs]


def _extxyz_columns(comment: str, path: Path, lineno: int) -> tuple[int, int | None, str]:
    """Columns an atom line must have, the species column (or None) and the
    ``Properties`` string, from an extxyz comment line."""
    props = "species:S:1:pos:R:3"
    if "properties=" in comment.lower():
        from ase.io.extxyz import key_val_str_to_dict

        try:
            info = key_val_str_to_dict(comment)
        except Exception as e:  # ASE raises several types for a malformed comment line
            raise DataFormatError(
                f"{path} line {lineno}: malformed extxyz comment line ({reason(e)})"
            ) from None
        props = next((str(v) for k, v in info.items() if k.lower() == "properties"), props)
    fields = props.split(":")
    if len(fields) % 3:
        raise DataFormatError(f"{path} line {lineno}: malformed Properties={props!r}")
    n_cols, species_col = 0, None
    for k in range(0, len(fields), 3):
        name, kind, count = fields[k : k + 3]
        if not count.isdigit() or kind not in ("S", "R", "I", "L"):
            raise DataFormatError(
                f"{path} line {lineno}: malformed Properties={props!r} at {name!r}"
            )
        if name == "species":
            species_col = n_cols
        n_cols += int(count)
    return n_cols, species_col, props


def _scan_extxyz(path: Path) -> list[int]:
    """Check the frame structure of an extxyz file line by line; return the line number
    where each frame starts. Raises :class:`DataFormatError` naming the line."""
    from ase.data import atomic_numbers

    starts: list[int] = []
    try:
        with path.open(encoding="utf-8") as fh:
            lines = iter(enumerate(fh, start=1))
            for lineno, line in lines:
                text = line.strip()
                if not text:
                    continue  # blank lines between frames (and at the end) are allowed
                k = len(starts)
                try:
                    n = int(text)
                except ValueError:
                    raise DataFormatError(
                        f"{path} line {lineno}: frame {k} should start with the number of "
                        f"atoms, got {text[:40]!r}"
                    ) from None
                if n < 1:
                    raise DataFormatError(f"{path} line {lineno}: frame {k} has {n} atoms")
                starts.append(lineno)
                comment = next(lines, None)
                if comment is None:
                    raise DataFormatError(
                        f"{path} line {lineno}: frame {k} ends before its comment line"
                    )
                n_cols, species_col, props = _extxyz_columns(comment[1], path, comment[0])
                for atom in range(n):
                    item = next(lines, None)
                    if item is None:
                        raise DataFormatError(
                            f"{path} line {lineno}: frame {k} announces {n} atoms but the "
                            f"file ends after {atom}"
                        )
                    at, cols = item[0], item[1].split()
                    if len(cols) != n_cols:
                        raise DataFormatError(
                            f"{path} line {at} (frame {k}, atom {atom}): {len(cols)} columns, "
                            f"but Properties={props} needs {n_cols}"
                        )
                    if species_col is not None:
                        sym = cols[species_col]
                        if not (atomic_numbers.get(sym, 0) > 0 or sym.isdigit()):
                            raise DataFormatError(
                                f"{path} line {at} (frame {k}, atom {atom}): unknown element "
                                f"{sym!r}"
                            )
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{path}: not a text file ({e.reason})") from None
    if not starts:
        raise DataFormatError(f"{path}: no frames (the file is empty)")
    return starts


def write_extxyz(path: str | os.PathLike, frames: Frame | Sequence[Frame]) -> None:
    """Write frames as extended XYZ through ``ase.io.write`` (Å, eV, eV/Å, e, eV/Å³).

    Energies, stresses, cells and total charges are stored exactly; ASE writes per-atom
    columns (positions, forces, charges) with 8 decimals, so those round-trip to 5e-9.
    Use :func:`~celli_scale.io.npz.save_npz` for bit-exact storage.
    """
    import ase.io

    frames = frames_list(frames, str(path))
    ase.io.write(Path(path), [f.to_ase() for f in frames], format="extxyz")
