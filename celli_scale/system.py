"""Atomic structures: :class:`System` (one structure) and :class:`Batch` (padded, fixed shapes).

Both are JAX pytrees. Positions, species, cell and total charge are leaves, so a
``System`` can be built from traced positions inside ``jax.grad``/``jax.jit``; the
periodic flags are static metadata. Validation that needs concrete values (NaN/inf,
overlapping atoms, singular cells) runs only when the inputs are concrete.

Units: positions and cell in Å, total charge in e, species as atomic numbers (element
symbols such as ``"Na"`` are accepted wherever atomic numbers are).
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from celli_scale import cell as cellmod

#: Largest atomic number the package knows (oganesson).
MAX_Z = 118
#: Default smallest allowed interatomic distance (Å).
DEFAULT_MIN_DISTANCE = 0.1


def _is_concrete(x: Any) -> bool:
    return x is not None and not isinstance(x, jax.core.Tracer)


def _as_pbc(pbc: Any) -> tuple[bool, bool, bool]:
    raw = np.asarray(False if pbc is None else pbc)
    if raw.ndim > 1:
        raise ValueError(f"pbc must be a bool or 3 bools, got {pbc!r}")
    if raw.dtype.kind == "f" or raw.dtype.kind in "iu":
        if not np.all((raw == 0) | (raw == 1)):
            raise ValueError(f"pbc must be a bool or 3 bools, got {pbc!r}")
    elif raw.dtype.kind != "b":  # strings ('F' would read as True), objects
        raise ValueError(f"pbc must be a bool or 3 bools, got {pbc!r}")
    arr = raw.astype(bool).reshape(-1)
    if arr.size == 1:
        arr = np.repeat(arr, 3)
    if arr.size != 3:
        raise ValueError(f"pbc must be a bool or 3 bools, got {pbc!r}")
    return (bool(arr[0]), bool(arr[1]), bool(arr[2]))


def _float_array(x: Any, name: str = "value") -> jax.Array:
    if not isinstance(x, jax.Array):
        arr = np.asarray(x)
        if arr.dtype.kind not in "iuf":
            raise ValueError(f"{name} must be real numbers, got {_describe(x)}")
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)
    return x


def _describe(x: Any) -> str:
    text = repr(x)
    return (text[:60] + "...") if len(text) > 60 else text


def real_number(value: Any, name: str) -> float:
    """``value`` as a Python float if it is a real number (Python or numpy int/float, a
    0-d array); ``ValueError`` naming ``name`` otherwise (bools and strings included)."""
    if isinstance(value, np.ndarray | jax.Array) and value.ndim == 0:
        value = value.item() if not isinstance(value, jax.core.Tracer) else value
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {_describe(value)}")
    return float(value)


def atomic_numbers(species: Any, name: str = "species") -> np.ndarray:
    """``species`` as an integer array of atomic numbers. Accepts atomic numbers (ints, or
    floats with integer values) and element symbols (``"Na"``, ``"Cl"``), also mixed.

    Raises:
      ValueError: naming the entry that is neither (``name`` and the atom index).
    """
    arr = np.asarray(species)
    if arr.dtype.kind in "US" or arr.dtype == object:
        from ase.data import atomic_numbers as by_symbol

        flat = arr.reshape(-1)
        out = np.zeros(flat.shape, dtype=np.int64)
        for k, v in enumerate(flat):
            if isinstance(v, bytes):
                v = v.decode("ascii", "replace")
            if isinstance(v, str):
                v = str(v).strip()
                z = int(v) if v.isdigit() else by_symbol.get(v, by_symbol.get(v.capitalize()))
                if z is None or z < 1:
                    raise ValueError(f"{name}: unknown element symbol {v!r} at atom {k}")
                out[k] = z
            elif isinstance(v, numbers.Real) and not isinstance(v, bool | np.bool_):
                if not float(v).is_integer():
                    raise ValueError(f"{name} must be integer atomic numbers; atom {k} has {v!r}")
                out[k] = int(v)
            else:
                raise ValueError(
                    f"{name}: atom {k} is {_describe(v)}, not an atomic number or symbol"
                )
        return out.reshape(arr.shape)
    if arr.dtype.kind == "b":
        raise ValueError(f"{name} must be atomic numbers or element symbols, got booleans")
    if arr.dtype.kind not in "iuf":
        raise ValueError(f"{name} must be atomic numbers or element symbols, got {arr.dtype}")
    return arr


@jax.tree_util.register_pytree_node_class
class System:
    """One atomic structure.

    Args:
      positions: ``(N, 3)`` Cartesian positions in Å (may be traced).
      species: ``(N,)`` atomic numbers (1 … 118) or element symbols (``["Na", "Cl"]``).
      cell: ``(3, 3)`` lattice vectors as rows in Å, or ``None`` for an open system.
        Along an open axis (``pbc`` False) the vector may be zero, as ASE writes slabs
        (``pbc=(True, True, False)`` with a zero third vector).
      pbc: periodic boundary flag, one bool or one per cell axis. Needs a cell if any is True.
      total_charge: net charge of the structure in e. It need not be an integer: a
        fractional total charge is physical for a subsystem (e.g. a Qeq fragment), and the
        charge equilibration constrains the charges to sum to it exactly; for periodic
        cells a net charge is compensated by a uniform background.
      min_distance: smallest allowed interatomic distance in Å (checked when concrete).
      validate: run the input checks (leave True unless the input is known to be good).

    Every periodic lattice vector must be at least ``max(min_distance,``
    :data:`celli_scale.cell.MIN_CELL_LENGTH` ``)`` long (else each atom overlaps its own
    image) and every periodic plane spacing at least ``MIN_CELL_LENGTH``; the overlap check
    is refused up front (``ValueError`` naming the memory) when its image search would be
    too large (:func:`celli_scale.cell.check_search_size`).

    Raises:
      ValueError: naming the field (and atom) at fault for NaN/inf positions or cell,
        mismatched lengths, unknown atomic numbers or symbols, non-numeric total charge,
        singular or too-small cells with pbc, overlapping atoms.

    Example:
      >>> s = System([[0, 0, 0], [0, 0, 1.0]], [1, 1])
      >>> s.n_atoms
      2
    """

    __slots__ = ("positions", "species", "cell", "pbc", "total_charge")

    def __init__(
        self,
        positions: Any,
        species: Any,
        cell: Any = None,
        pbc: Any = False,
        total_charge: Any = 0.0,
        *,
        min_distance: float = DEFAULT_MIN_DISTANCE,
        validate: bool = True,
    ) -> None:
        pbc_t = _as_pbc(pbc)
        positions = _float_array(positions, "positions")
        min_distance = real_number(min_distance, "min_distance")
        if not (np.isfinite(min_distance) and min_distance >= 0):
            raise ValueError(f"min_distance must be finite and >= 0 Å, got {min_distance}")
        species_np = None
        if _is_concrete(species):
            species_np = atomic_numbers(species)
            if validate:
                _check_species(species_np)
            species = jnp.asarray(np.rint(species_np).astype(np.int32))
        else:
            species = jnp.asarray(species)
        if cell is not None:
            cell = _float_array(cell, "cell")
        if total_charge is None or (
            _is_concrete(total_charge) and not isinstance(total_charge, jax.Array)
        ):
            total_charge = real_number(total_charge, "total_charge")
        total_charge = jnp.asarray(total_charge, dtype=positions.dtype)
        if total_charge.shape != ():
            raise ValueError(
                f"total_charge must be one number (e), got shape {tuple(total_charge.shape)}"
            )
        object.__setattr__(self, "positions", positions)
        object.__setattr__(self, "species", species)
        object.__setattr__(self, "cell", cell)
        object.__setattr__(self, "pbc", pbc_t)
        object.__setattr__(self, "total_charge", total_charge)
        if validate:
            self._validate(min_distance)

    # -- pytree -------------------------------------------------------------------------
    def tree_flatten(self):
        return (self.positions, self.species, self.cell, self.total_charge), (self.pbc,)

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        positions, species, cell, total_charge = children
        object.__setattr__(obj, "positions", positions)
        object.__setattr__(obj, "species", species)
        object.__setattr__(obj, "cell", cell)
        object.__setattr__(obj, "pbc", aux[0])
        object.__setattr__(obj, "total_charge", total_charge)
        return obj

    def __setattr__(self, name, value):  # immutable, like a frozen dataclass
        raise AttributeError("System is immutable; use System.replace(...)")

    def replace(self, *, min_distance: float = DEFAULT_MIN_DISTANCE, **changes: Any) -> System:
        """A copy with some fields replaced. The overlap check (``min_distance``, Å) runs
        only if the geometry (positions, species, cell or pbc) changes."""
        fields = dict(
            positions=self.positions,
            species=self.species,
            cell=self.cell,
            pbc=self.pbc,
            total_charge=self.total_charge,
        )
        fields.update(changes)
        geometry = {"positions", "species", "cell", "pbc"} & changes.keys()
        return System(**fields, min_distance=min_distance if geometry else 0.0)

    # -- properties ---------------------------------------------------------------------
    @property
    def n_atoms(self) -> int:
        return int(self.positions.shape[0])

    @property
    def periodic(self) -> bool:
        return any(self.pbc)

    @property
    def dtype(self):
        return self.positions.dtype

    def volume(self) -> jax.Array:
        """Cell volume in Å³ (absolute value of the determinant)."""
        if self.cell is None:
            raise ValueError("volume: the system has no cell")
        return jnp.abs(jnp.linalg.det(self.cell))

    def __repr__(self) -> str:
        q = self.total_charge
        q = float(q) if _is_concrete(q) else q
        return f"System(n_atoms={self.positions.shape[0]}, pbc={self.pbc}, total_charge={q})"

    # -- validation ---------------------------------------------------------------------
    def _validate(self, min_distance: float) -> None:
        pos = self.positions
        if pos.ndim != 2 or pos.shape[1] != 3:
            raise ValueError(f"positions must have shape (N, 3), got {tuple(pos.shape)}")
        if pos.shape[0] == 0:
            raise ValueError("positions: a System needs at least one atom")
        if self.species.shape != (pos.shape[0],):
            raise ValueError(
                f"species has shape {tuple(self.species.shape)} but positions has "
                f"{pos.shape[0]} atoms: lengths must match"
            )
        if self.cell is not None:
            if self.cell.shape != (3, 3):
                raise ValueError(f"cell must have shape (3, 3), got {tuple(self.cell.shape)}")
            if _is_concrete(self.cell):
                cell_np = np.asarray(self.cell, dtype=float)
                if not np.all(np.isfinite(cell_np)):
                    raise ValueError("cell contains NaN or inf")
                if self.periodic:
                    _check_cell(cell_np, self.pbc, min_distance)
        elif self.periodic:
            raise ValueError(f"pbc={self.pbc} needs a cell, but cell is None")
        if _is_concrete(self.total_charge) and not np.isfinite(float(self.total_charge)):
            raise ValueError(f"total_charge must be finite, got {float(self.total_charge)}")
        if _is_concrete(pos):
            pos_np = np.asarray(pos, dtype=float)
            bad = ~np.isfinite(pos_np).all(axis=1)
            if bad.any():
                idx = np.flatnonzero(bad)
                raise ValueError(
                    f"positions contain NaN or inf at atom(s) {idx[:10].tolist()}"
                    + (" ..." if idx.size > 10 else "")
                )
            cell_np = None if self.cell is None else np.asarray(self.cell, dtype=float)
            if (
                min_distance > 0
                and pos_np.shape[0] > 1
                and (self.cell is None or _is_concrete(self.cell))
            ):
                i, j, _, d = cellmod.host_pairs(pos_np, cell_np, self.pbc, min_distance)
                if i.size:
                    k = int(np.argmin(d))
                    raise ValueError(
                        f"overlapping atoms: atoms {int(i[k])} and {int(j[k])} are "
                        f"{d[k]:.4g} Å apart (minimum allowed {min_distance} Å)"
                    )

    # -- ASE ----------------------------------------------------------------------------
    @classmethod
    def from_ase(cls, atoms, total_charge: float | None = None, **kwargs: Any) -> System:
        """Build from ``ase.Atoms``. Total charge: argument, else ``atoms.info['charge']``,
        else the sum of initial charges."""
        if total_charge is None:
            if "charge" in atoms.info:
                total_charge = float(atoms.info["charge"])
            elif "total_charge" in atoms.info:
                total_charge = float(atoms.info["total_charge"])
            else:
                total_charge = float(np.sum(atoms.get_initial_charges()))
        pbc = tuple(bool(p) for p in atoms.pbc)
        cell = np.asarray(atoms.cell.array, dtype=float)
        has_cell = bool(np.abs(cell).sum() > 0)
        return cls(
            np.asarray(atoms.positions, dtype=float),
            np.asarray(atoms.numbers),
            cell=cell if has_cell else None,
            pbc=pbc,
            total_charge=total_charge,
            **kwargs,
        )

    def to_ase(self):
        """Convert to ``ase.Atoms`` (total charge in ``info['charge']``)."""
        import ase

        atoms = ase.Atoms(
            numbers=np.asarray(self.species),
            positions=np.asarray(self.positions, dtype=float),
            cell=None if self.cell is None else np.asarray(self.cell, dtype=float),
            pbc=self.pbc,
        )
        atoms.info["charge"] = float(self.total_charge)
        return atoms


def _check_species(species: np.ndarray) -> None:
    if species.ndim != 1:
        raise ValueError(
            f"species must be a 1-D array of atomic numbers, got shape {species.shape}"
        )
    if species.size and not np.all(np.isfinite(species.astype(float))):
        raise ValueError("species contain NaN or inf")
    if np.issubdtype(species.dtype, np.floating) and np.any(species != np.rint(species)):
        idx = int(np.flatnonzero(species != np.rint(species))[0])
        raise ValueError(f"species must be integer atomic numbers; atom {idx} has {species[idx]}")
    bad = (species < 1) | (species > MAX_Z)
    if bad.any():
        idx = int(np.flatnonzero(bad)[0])
        raise ValueError(f"unknown atomic number {species[idx]} at atom {idx} (must be 1..{MAX_Z})")


def _check_cell(cell: np.ndarray, pbc: tuple[bool, bool, bool], min_distance: float) -> None:
    """Periodic lattice vectors long enough, the cell not flat (absolute and relative
    tests). Zero vectors along open axes are allowed (ASE's slab/wire convention)."""
    norms = np.linalg.norm(cell, axis=1)
    floor = cellmod.MIN_CELL_LENGTH
    for a in range(3):
        if not pbc[a]:
            continue
        if norms[a] == 0:
            raise ValueError(f"singular cell: lattice vector {a} is zero but pbc[{a}] is True")
        if norms[a] < floor:
            raise ValueError(
                f"cell lattice vector {a} is {norms[a]:.3g} Å long (pbc[{a}] is True); "
                f"periodic lattice vectors must be at least {floor} Å"
            )
        if norms[a] < min_distance:
            raise ValueError(
                f"cell lattice vector {a} is {norms[a]:.4g} Å long, so every atom overlaps "
                f"its own periodic image (minimum allowed distance {min_distance} Å)"
            )
    full = cellmod.complete_cell(cell, pbc)
    vol = abs(float(np.linalg.det(full)))
    full_norms = np.linalg.norm(full, axis=1)
    if vol <= 1e-10 * max(float(np.prod(full_norms)), 1e-300):
        raise ValueError(
            f"singular (degenerate) cell with pbc={pbc}: volume {vol:.3g} Å³ for lattice "
            f"vectors of lengths {np.round(norms, 4).tolist()} Å (a vector along an open "
            "axis may be zero, else all three must be independent)"
        )
    h = cellmod.plane_heights(full)
    for a in range(3):
        if pbc[a] and h[a] < floor:
            raise ValueError(
                f"flat cell: the lattice planes along periodic axis {a} are {h[a]:.3g} Å "
                f"apart (at least {floor} Å needed)"
            )


@jax.tree_util.register_pytree_node_class
class Batch:
    """Several systems padded to a common atom count, stacked along a leading axis.

    Fixed shapes for jit: ``positions (B, A, 3)``, ``species (B, A)`` (0 on padding),
    ``mask (B, A)`` True for real atoms, ``cell (B, 3, 3)`` (zeros for open systems),
    ``pbc (B, 3)`` (numpy bool, static), ``total_charge (B,)``. Padding atoms sit at the
    origin, carry no charge and are never in a neighbor list; they never change an
    energy or a force.
    """

    __slots__ = ("positions", "species", "mask", "cell", "pbc", "total_charge")

    def __init__(self, positions, species, mask, cell, pbc, total_charge):
        object.__setattr__(self, "positions", positions)
        object.__setattr__(self, "species", species)
        object.__setattr__(self, "mask", mask)
        object.__setattr__(self, "cell", cell)
        object.__setattr__(self, "pbc", tuple(tuple(bool(x) for x in p) for p in pbc))
        object.__setattr__(self, "total_charge", total_charge)

    def __setattr__(self, name, value):
        raise AttributeError("Batch is immutable")

    def tree_flatten(self):
        return (self.positions, self.species, self.mask, self.cell, self.total_charge), (self.pbc,)

    @classmethod
    def tree_unflatten(cls, aux, children):
        positions, species, mask, cell, total_charge = children
        obj = object.__new__(cls)
        for k, v in dict(
            positions=positions,
            species=species,
            mask=mask,
            cell=cell,
            pbc=aux[0],
            total_charge=total_charge,
        ).items():
            object.__setattr__(obj, k, v)
        return obj

    @classmethod
    def from_systems(cls, systems: Sequence[System], n_atoms: int | None = None) -> Batch:
        """Pad and stack ``systems``; ``n_atoms`` (default: the largest) is the padded size."""
        if len(systems) == 0:
            raise ValueError("Batch.from_systems needs at least one system")
        sizes = [s.n_atoms for s in systems]
        n_max = max(sizes) if n_atoms is None else int(n_atoms)
        if n_max < max(sizes):
            raise ValueError(f"n_atoms={n_max} is smaller than the largest system ({max(sizes)})")
        dtype = systems[0].positions.dtype
        b = len(systems)
        pos = np.zeros((b, n_max, 3), dtype=dtype)
        spc = np.zeros((b, n_max), dtype=np.int32)
        mask = np.zeros((b, n_max), dtype=bool)
        cell = np.zeros((b, 3, 3), dtype=dtype)
        q = np.zeros((b,), dtype=dtype)
        for k, s in enumerate(systems):
            n = s.n_atoms
            pos[k, :n] = np.asarray(s.positions)
            spc[k, :n] = np.asarray(s.species)
            mask[k, :n] = True
            if s.cell is not None:
                cell[k] = np.asarray(s.cell)
            q[k] = float(s.total_charge)
        return cls(
            jnp.asarray(pos),
            jnp.asarray(spc),
            jnp.asarray(mask),
            jnp.asarray(cell),
            [s.pbc for s in systems],
            jnp.asarray(q),
        )

    @property
    def n_systems(self) -> int:
        return int(self.positions.shape[0])

    @property
    def n_atoms_padded(self) -> int:
        return int(self.positions.shape[1])

    def __len__(self) -> int:
        return self.n_systems

    def __getitem__(self, k: int) -> System:
        """The ``k``-th system without padding."""
        m = np.asarray(self.mask[k])
        pbc = self.pbc[k]
        cell = np.asarray(self.cell[k])
        return System(
            np.asarray(self.positions[k])[m],
            np.asarray(self.species[k])[m],
            cell=cell if np.abs(cell).sum() > 0 else None,
            pbc=pbc,
            total_charge=float(self.total_charge[k]),
            validate=False,
        )

    def __iter__(self) -> Iterator[System]:
        for k in range(self.n_systems):
            yield self[k]
