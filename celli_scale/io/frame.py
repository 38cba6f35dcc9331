"""Frames: one structure plus optional reference labels, and helpers shared by the readers.

A :class:`Frame` is one :class:`~celli_scale.system.System` plus optional reference labels.
Units in memory: positions and cell in Å, energy in eV, forces in eV/Å, charges in e,
stress in eV/Å³ (ASE's sign convention). A malformed file raises :class:`DataFormatError`
(a ``ValueError``) naming the file, the line or frame, and the field.

The helpers below (frame lists, file checks, error reasons, frame index selection) are
shared by the format modules of :mod:`celli_scale.io`; they are not public API.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from celli_scale.system import System

Index = int | slice | str


class DataFormatError(ValueError):
    """A data file is malformed; the message names the file, the line/frame and the field."""


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


def frames_list(frames: Frame | Sequence[Frame], where: str) -> list[Frame]:
    if isinstance(frames, Frame):
        return [frames]
    frames = list(frames)
    if not frames:
        raise ValueError(f"{where}: no frames to write")
    for k, f in enumerate(frames):
        if not isinstance(f, Frame):
            raise TypeError(f"{where}: frame {k} is a {type(f).__name__}, not a Frame")
    return frames


def check_exists(path: Path) -> None:
    if path.is_dir():
        raise DataFormatError(f"{path}: a directory, not a structure or data file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")


def reason(e: BaseException) -> str:
    """A one-line reason for an exception from a third-party reader (never empty)."""
    text = " ".join(str(e).split())
    if isinstance(e, KeyError) and e.args:
        text = f"unknown key {e.args[0]!r}"
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def parse_index(index: Any, path: Path) -> int | slice:
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


def check_index(index: int | slice, n_frames: int, path: Path) -> None:
    if isinstance(index, int) and not -n_frames <= index < n_frames:
        raise DataFormatError(
            f"{path}: frame index {index} is out of range: the file has {n_frames} "
            f"frame{'s' if n_frames != 1 else ''}"
        )


def select(frames: list[Frame], index: Index, path: Path) -> list[Frame]:
    idx = parse_index(index, path)
    check_index(idx, len(frames), path)
    if isinstance(idx, slice):
        return frames[idx]
    return [frames[idx]]


def from_ase_checked(atoms: Any, path: Path, k: int, **system_kwargs: Any) -> Frame:
    try:
        return Frame.from_ase(atoms, **system_kwargs)
    except ValueError as e:
        raise DataFormatError(f"{path} frame {k}: {e}") from None
