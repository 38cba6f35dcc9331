"""RuNNer / n2p2 ``input.data`` files.

On disk: Bohr, Hartree, Hartree/Bohr and e; in memory (:class:`~celli_scale.io.frame.Frame`):
Å, eV, eV/Å and e. A malformed file raises :class:`~celli_scale.io.frame.DataFormatError`
naming the file, the line and the field.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from celli_scale.io.frame import DataFormatError, Frame, check_exists, frames_list
from celli_scale.system import System
from celli_scale.units import BOHR, HARTREE, HARTREE_PER_BOHR

logger = logging.getLogger(__name__)

_ATOM_FIELDS = ("atom", "x", "y", "z", "element", "charge", "n", "fx", "fy", "fz")


@dataclasses.dataclass
class _Block:
    start: int
    lattice: list[list[float]] = dataclasses.field(default_factory=list)
    positions: list[list[float]] = dataclasses.field(default_factory=list)
    species: list[int] = dataclasses.field(default_factory=list)
    charges: list[float] = dataclasses.field(default_factory=list)
    forces: list[list[float]] = dataclasses.field(default_factory=list)
    energy: float | None = None
    charge: float | None = None


def read_runner(path: str | os.PathLike, **system_kwargs: Any) -> list[Frame]:
    """Read a RuNNer / n2p2 ``input.data`` file.

    On disk: Bohr, Hartree, Hartree/Bohr and e; returned in Å, eV, eV/Å and e. A frame is
    periodic (pbc all True) iff it has three ``lattice`` lines. Missing ``energy`` gives
    ``energy=None``; missing ``charge`` gives the sum of the atomic charges. Atomic charges
    that are all exactly zero (n2p2's placeholder) give ``charges=None``.

    Raises:
      DataFormatError: naming the file, the line number and the field.
      FileNotFoundError: if the file does not exist.
    """
    path = Path(path)
    check_exists(path)
    frames: list[Frame] = []
    block: _Block | None = None

    def fail(lineno: int, msg: str) -> NoReturn:
        raise DataFormatError(f"{path} line {lineno}: {msg}")

    def number(lineno: int, fields: list[str], k: int, name: str) -> float:
        try:
            v = float(fields[k])
        except ValueError:
            fail(lineno, f"'{fields[0]}' field {k} ({name}) is not a number: {fields[k]!r}")
        if not np.isfinite(v):
            fail(lineno, f"'{fields[0]}' field {k} ({name}) is not finite: {fields[k]!r}")
        return v

    def need(lineno: int, fields: list[str], n: int) -> None:
        if len(fields) != n:
            fail(lineno, f"'{fields[0]}' needs {n} fields, got {len(fields)}")

    from ase.data import atomic_numbers

    try:
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                fields = line.split()
                if not fields:
                    continue
                key = fields[0]
                if key == "begin":
                    if block is not None:
                        fail(lineno, f"'begin' before the 'end' of the block at line {block.start}")
                    block = _Block(start=lineno)
                    continue
                if block is None:
                    fail(lineno, f"'{key}' outside a begin/end block")
                if key == "comment":
                    continue
                if key == "lattice":
                    need(lineno, fields, 4)
                    if len(block.lattice) == 3:
                        fail(lineno, "'lattice' appears more than three times in one block")
                    row = [number(lineno, fields, k, "xyz"[k - 1]) for k in (1, 2, 3)]
                    block.lattice.append(row)
                elif key == "atom":
                    need(lineno, fields, len(_ATOM_FIELDS))
                    f = [number(lineno, fields, k, _ATOM_FIELDS[k]) for k in (1, 2, 3)]
                    z = atomic_numbers.get(fields[4], 0)
                    if z < 1:
                        fail(lineno, f"'atom' field 4 (element) is not an element: {fields[4]!r}")
                    q = number(lineno, fields, 5, "charge")
                    number(lineno, fields, 6, "n")
                    force = [number(lineno, fields, k, _ATOM_FIELDS[k]) for k in (7, 8, 9)]
                    block.positions.append(f)
                    block.species.append(z)
                    block.charges.append(q)
                    block.forces.append(force)
                elif key in ("energy", "charge"):
                    need(lineno, fields, 2)
                    if getattr(block, key) is not None:
                        fail(lineno, f"'{key}' appears twice in the block at line {block.start}")
                    setattr(block, key, number(lineno, fields, 1, key))
                elif key == "end":
                    frames.append(_runner_frame(block, path, lineno, system_kwargs))
                    block = None
                else:
                    fail(lineno, f"unknown keyword {key!r}")
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{path}: not a text file ({e})") from None
    if block is not None:
        raise DataFormatError(f"{path} line {block.start}: 'begin' has no matching 'end'")
    if not frames:
        raise DataFormatError(f"{path}: no 'begin'/'end' blocks found")
    return frames


def _runner_frame(block: _Block, path: Path, lineno: int, system_kwargs: dict) -> Frame:
    where = f"{path} line {lineno}"
    if not block.positions:
        raise DataFormatError(f"{where}: the block at line {block.start} has no 'atom' lines")
    if len(block.lattice) not in (0, 3):
        raise DataFormatError(
            f"{where}: 'lattice' needs 3 lines in the block at line {block.start}, "
            f"got {len(block.lattice)}"
        )
    periodic = len(block.lattice) == 3
    charges = np.asarray(block.charges)
    total = block.charge if block.charge is not None else float(charges.sum())
    try:
        system = System(
            np.asarray(block.positions) * BOHR,
            np.asarray(block.species),
            cell=np.asarray(block.lattice) * BOHR if periodic else None,
            pbc=periodic,
            total_charge=total,
            **system_kwargs,
        )
        return Frame(
            system,
            energy=None if block.energy is None else block.energy * HARTREE,
            forces=np.asarray(block.forces) * HARTREE_PER_BOHR,
            charges=None if not np.any(charges) else charges,
        )
    except ValueError as e:
        raise DataFormatError(f"{path} block at lines {block.start}-{lineno}: {e}") from None


def write_runner(
    path: str | os.PathLike,
    frames: Frame | Sequence[Frame],
    *,
    fill_missing: bool = False,
) -> None:
    """Write frames as a RuNNer / n2p2 ``input.data`` file (Bohr, Hartree, Hartree/Bohr, e).

    Numbers are written with 17 significant digits (exact round trip of the stored values).
    Missing charges are written as 0.0 (read back as ``None``). Stress cannot be stored
    in this format and is dropped (with a warning).

    Args:
      fill_missing: write 0.0 for a missing energy or missing forces (e.g. structures for
        prediction); by default a frame without them raises ``ValueError``.

    Raises:
      ValueError: a partially periodic frame, or missing energy/forces without ``fill_missing``.
    """
    from ase.data import chemical_symbols

    path = Path(path)
    frames = frames_list(frames, str(path))

    def num(v: float) -> str:
        return f"{float(v):24.16e}"

    lines: list[str] = []
    for k, fr in enumerate(frames):
        s = fr.system
        if s.periodic and not all(s.pbc):
            raise ValueError(f"{path}: frame {k} has pbc={s.pbc}; input.data is all or none")
        if not fill_missing:
            for name in ("energy", "forces"):
                if getattr(fr, name) is None:
                    raise ValueError(
                        f"{path}: frame {k} has no {name}; pass fill_missing=True to write 0.0"
                    )
        if fr.stress is not None:
            logger.warning("%s: frame %d: input.data cannot store stress; dropped", path, k)
        pos = np.asarray(s.positions, dtype=float) / BOHR
        forces = np.zeros((s.n_atoms, 3)) if fr.forces is None else fr.forces / HARTREE_PER_BOHR
        charges = np.zeros(s.n_atoms) if fr.charges is None else fr.charges
        lines.append("begin")
        lines.append(f"comment frame {k} written by celli_scale")
        if s.periodic:
            for row in np.asarray(s.cell, dtype=float) / BOHR:
                lines.append("lattice " + " ".join(num(v) for v in row))
        for i, z in enumerate(np.asarray(s.species)):
            lines.append(
                f"atom {num(pos[i, 0])} {num(pos[i, 1])} {num(pos[i, 2])} "
                f"{chemical_symbols[int(z)]:>2s} {num(charges[i])} {num(0.0)} "
                f"{num(forces[i, 0])} {num(forces[i, 1])} {num(forces[i, 2])}"
            )
        energy = 0.0 if fr.energy is None else fr.energy / HARTREE
        lines.append(f"energy {num(energy)}")
        lines.append(f"charge {num(float(s.total_charge))}")
        lines.append("end")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
