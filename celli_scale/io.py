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

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from celli_scale.system import System
from celli_scale.units import BOHR, HARTREE, HARTREE_PER_BOHR

logger = logging.getLogger(__name__)

__all__ = [
    "DataFormatError",
    "Frame",
    "load_npz",
    "read",
    "read_extxyz",
    "read_runner",
    "save_npz",
    "write",
    "write_extxyz",
    "write_runner",
]

#: Version tag stored in every ``.npz`` data set written by :func:`save_npz`.
NPZ_FORMAT = "celli_scale.frames/1"

Index = int | slice | str


class DataFormatError(ValueError):
    """A data file is malformed; the message names the file, the line/frame and the field."""


# ---------------------------------------------------------------------------------------
# Frame
# ---------------------------------------------------------------------------------------
def _label_array(name: str, value: Any, shape: tuple[int, ...]) -> np.ndarray:
    arr = np.array(value, dtype=np.float64)  # a private copy
    if arr.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {arr.shape}")
    bad = ~np.isfinite(arr)
    if bad.any():
        where = np.argwhere(bad)[0]
        at = f" at atom {int(where[0])}" if name in ("forces", "charges") else ""
        raise ValueError(f"{name} contain NaN or inf{at}")
    arr.setflags(write=False)
    return arr


@dataclasses.dataclass(frozen=True, eq=False)
class Frame:
    """One structure with optional reference labels (host numpy data, read-only).

    Attributes:
      system: the structure (positions Å, cell Å, total charge e).
      energy: total energy in eV, or ``None``.
      forces: ``(N, 3)`` forces in eV/Å, or ``None``.
      charges: ``(N,)`` atomic partial charges in e, or ``None``.
      stress: ``(3, 3)`` stress in eV/Å³ (ASE sign convention), or ``None``.

    Raises:
      ValueError: a label has the wrong shape or contains NaN/inf (naming the label/atom).
    """

    system: System
    energy: float | None = None
    forces: np.ndarray | None = None
    charges: np.ndarray | None = None
    stress: np.ndarray | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.system, System):
            raise TypeError(f"Frame.system must be a System, got {type(self.system).__name__}")
        n = self.system.n_atoms
        if self.energy is not None:
            e = float(self.energy)
            if not np.isfinite(e):
                raise ValueError(f"energy must be finite, got {e}")
            object.__setattr__(self, "energy", e)
        if self.forces is not None:
            object.__setattr__(self, "forces", _label_array("forces", self.forces, (n, 3)))
        if self.charges is not None:
            object.__setattr__(self, "charges", _label_array("charges", self.charges, (n,)))
        if self.stress is not None:
            object.__setattr__(self, "stress", _label_array("stress", self.stress, (3, 3)))

    @property
    def n_atoms(self) -> int:
        return self.system.n_atoms

    @property
    def labels(self) -> tuple[str, ...]:
        """Names of the labels present, in the order energy, forces, charges, stress."""
        return tuple(
            k for k in ("energy", "forces", "charges", "stress") if getattr(self, k) is not None
        )

    @classmethod
    def from_ase(cls, atoms: Any, **system_kwargs: Any) -> Frame:
        """Build from ``ase.Atoms`` (Å, eV, e).

        Labels come from the attached calculator's stored results for the current atoms
        (``energy``, ``forces``, ``stress``, ``charges``; nothing is computed, stale results
        are ignored), else per-atom charges from the array
        ``"charges"`` or from explicitly set initial charges. Total charge:
        ``atoms.info["charge"]``, else the sum of the charge labels, else the sum of the
        initial charges. ``system_kwargs`` go to :class:`System` (e.g. ``min_distance``).
        """
        results = {k: _stored_result(atoms, k) for k in ("energy", "forces", "stress", "charges")}
        charges = results["charges"]
        if charges is None and "charges" in atoms.arrays:
            charges = atoms.arrays["charges"]
        if charges is None and atoms.has("initial_charges"):
            charges = atoms.get_initial_charges()
        total_charge = system_kwargs.pop("total_charge", None)
        if total_charge is None and "charge" not in atoms.info and "total_charge" not in atoms.info:
            if charges is not None:
                total_charge = float(np.sum(charges))
        system = System.from_ase(atoms, total_charge=total_charge, **system_kwargs)
        stress = results["stress"]
        if stress is not None:
            stress = np.asarray(stress, dtype=float)
            if stress.shape == (6,):
                from ase.stress import voigt_6_to_full_3x3_stress

                stress = voigt_6_to_full_3x3_stress(stress)
        return cls(
            system,
            energy=results["energy"],
            forces=results["forces"],
            charges=charges,
            stress=stress,
        )

    def to_ase(self) -> Any:
        """Convert to ``ase.Atoms``: labels in a ``SinglePointCalculator`` (stress in Voigt
        form, charges as the ``charges`` result), total charge in ``info["charge"]``."""
        atoms = self.system.to_ase()
        results: dict[str, Any] = {}
        if self.energy is not None:
            results["energy"] = self.energy
        if self.forces is not None:
            results["forces"] = np.array(self.forces)
        if self.charges is not None:
            results["charges"] = np.array(self.charges)
        if self.stress is not None:
            from ase.stress import full_3x3_to_voigt_6_stress

            results["stress"] = full_3x3_to_voigt_6_stress(self.stress)
        if results:
            from ase.calculators.singlepoint import SinglePointCalculator

            atoms.calc = SinglePointCalculator(atoms, **results)
        return atoms


def _stored_result(atoms: Any, name: str) -> Any:
    """A result the attached calculator already holds for ``atoms`` (never computes)."""
    from ase.calculators.calculator import PropertyNotImplementedError

    if atoms.calc is None:
        return None
    try:
        return atoms.calc.get_property(name, atoms, allow_calculation=False)
    except PropertyNotImplementedError:
        return None


def _frames_list(frames: Frame | Sequence[Frame], where: str) -> list[Frame]:
    if isinstance(frames, Frame):
        return [frames]
    frames = list(frames)
    if not frames:
        raise ValueError(f"{where}: no frames to write")
    for k, f in enumerate(frames):
        if not isinstance(f, Frame):
            raise TypeError(f"{where}: frame {k} is a {type(f).__name__}, not a Frame")
    return frames


def _check_exists(path: Path) -> None:
    if path.is_dir():
        raise DataFormatError(f"{path}: a directory, not a structure or data file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")


def _reason(e: BaseException) -> str:
    """A one-line reason for an exception from a third-party reader (never empty)."""
    text = " ".join(str(e).split())
    if isinstance(e, KeyError) and e.args:
        text = f"unknown key {e.args[0]!r}"
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _parse_index(index: Any, path: Path) -> int | slice:
    """``index`` (int, numpy integer, slice or ASE-style string) as an int or a slice."""
    if isinstance(index, str):
        from ase.io.formats import string2index

        try:
            index = string2index(index)
        except ValueError:
            raise DataFormatError(
                f"{path}: bad frame index {index!r} (use e.g. ':', -1, '0:10:2')"
            ) from None
    if isinstance(index, slice):
        for part in ("start", "stop", "step"):
            v = getattr(index, part)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int | np.integer)):
                raise DataFormatError(f"{path}: bad frame index {index!r} ({part} {v!r})")
        if index.step == 0:
            raise DataFormatError(f"{path}: bad frame index {index!r} (step 0)")
        return index
    if isinstance(index, bool | np.bool_) or not isinstance(index, int | np.integer):
        raise DataFormatError(f"{path}: bad frame index {index!r} (an int, slice or string)")
    return int(index)


def _check_index(index: int | slice, n_frames: int, path: Path) -> None:
    if isinstance(index, int) and not -n_frames <= index < n_frames:
        raise DataFormatError(
            f"{path}: frame index {index} is out of range: the file has {n_frames} "
            f"frame{'s' if n_frames != 1 else ''}"
        )


def _select(frames: list[Frame], index: Index, path: Path) -> list[Frame]:
    idx = _parse_index(index, path)
    _check_index(idx, len(frames), path)
    if isinstance(idx, slice):
        return frames[idx]
    return [frames[idx]]


# ---------------------------------------------------------------------------------------
# extended XYZ (through ASE)
# ---------------------------------------------------------------------------------------
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
    _check_exists(path)
    starts = _scan_extxyz(path)
    idx = _parse_index(index, path)
    _check_index(idx, len(starts), path)
    try:
        images = ase.io.read(path, index=idx, format="extxyz")
    except (ValueError, OSError, IndexError, KeyError, TypeError, StopIteration) as e:
        raise DataFormatError(f"{path}: not a readable extxyz file: {_reason(e)}") from None
    if not isinstance(images, list):
        images = [images]
    numbers = list(range(len(starts)))
    chosen = numbers[idx] if isinstance(idx, slice) else [numbers[idx]]
    if len(chosen) != len(images):
        raise DataFormatError(
            f"{path}: ASE read {len(images)} frame(s) where {len(chosen)} were expected"
        )
    pairs = zip(chosen, images, strict=True)
    return [_from_ase_checked(a, path, k, **system_kwargs) for k, a in pairs]


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
                f"{path} line {lineno}: malformed extxyz comment line ({_reason(e)})"
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


def _from_ase_checked(atoms: Any, path: Path, k: int, **system_kwargs: Any) -> Frame:
    try:
        return Frame.from_ase(atoms, **system_kwargs)
    except ValueError as e:
        raise DataFormatError(f"{path} frame {k}: {e}") from None


def write_extxyz(path: str | os.PathLike, frames: Frame | Sequence[Frame]) -> None:
    """Write frames as extended XYZ through ``ase.io.write`` (Å, eV, eV/Å, e, eV/Å³).

    Energies, stresses, cells and total charges are stored exactly; ASE writes per-atom
    columns (positions, forces, charges) with 8 decimals, so those round-trip to 5e-9.
    Use :func:`save_npz` for bit-exact storage.
    """
    import ase.io

    frames = _frames_list(frames, str(path))
    ase.io.write(Path(path), [f.to_ase() for f in frames], format="extxyz")


# ---------------------------------------------------------------------------------------
# RuNNer / n2p2 input.data
# ---------------------------------------------------------------------------------------
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
    _check_exists(path)
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
    frames = _frames_list(frames, str(path))

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


# ---------------------------------------------------------------------------------------
# npz data sets
# ---------------------------------------------------------------------------------------
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
    frames = _frames_list(frames, str(path))
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
    _check_exists(path)
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
        raise DataFormatError(f"{path}: not a readable .npz data set: {_reason(e)}") from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise DataFormatError(f"{path}: not a readable .npz data set: {_reason(e)}") from None
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


# ---------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------
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
    """Read frames from any supported file (units as in the module docstring).

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
        return _select(read_runner(path, **system_kwargs), index, path)
    if fmt == "npz":
        return _select(load_npz(path, **system_kwargs), index, path)
    if fmt == "ase":
        import ase.io
        from ase.io.formats import UnknownFileTypeError

        _check_exists(path)
        idx = _parse_index(index, path)
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
            raise DataFormatError(f"{path}: ASE cannot read it: {_reason(e)}") from None
        if not isinstance(images, list):
            images = [images]
        return [_from_ase_checked(a, path, k, **system_kwargs) for k, a in enumerate(images)]
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
