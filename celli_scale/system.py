"""Atomic structures: :class:`System` (one structure) and :class:`Batch` (padded, fixed shapes).

Both are JAX pytrees. Positions, species, cell and total charge are leaves, so a
``System`` can be built from traced positions inside ``jax.grad``/``jax.jit``; the
periodic flags are static metadata. Validation that needs concrete values (NaN/inf,
overlapping atoms, singular cells) runs only when the inputs are concrete.

Units: positions and cell in Å, total charge in e, species as atomic numbers.
"""

from __future__ import annotations

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
    arr = np.asarray(pbc, dtype=bool).reshape(-1)
    if arr.size == 1:
        arr = np.repeat(arr, 3)
    if arr.size != 3:
        raise ValueError(f"pbc must be a bool or 3 bools, got {pbc!r}")
    return (bool(arr[0]), bool(arr[1]), bool(arr[2]))


def _float_array(x: Any) -> jax.Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)
    return x


@jax.tree_util.register_pytree_node_class
class System:
    """One atomic structure.

    Args:
      positions: ``(N, 3)`` Cartesian positions in Å (may be traced).
      species: ``(N,)`` atomic numbers (1 … 118).
      cell: ``(3, 3)`` lattice vectors as rows in Å, or ``None`` for an open system.
      pbc: periodic boundary flag, one bool or one per cell axis. Needs a cell if any is True.
      total_charge: net charge of the structure in e.
      min_distance: smallest allowed interatomic distance in Å (checked when concrete).
      validate: run the input checks (leave True unless the input is known to be good).

    Raises:
      ValueError: naming the field (and atom) at fault for NaN/inf positions or cell,
        mismatched lengths, unknown atomic numbers, singular cells with pbc, overlapping atoms.

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
        positions = _float_array(positions)
        species_np = None
        if _is_concrete(species):
            species_np = np.asarray(species)
            if validate:
                _check_species(species_np)
            species = jnp.asarray(np.rint(species_np).astype(np.int32))
        else:
            species = jnp.asarray(species)
        if cell is not None:
            cell = _float_array(cell)
        total_charge = jnp.asarray(total_charge, dtype=positions.dtype)
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

    def check_integer_charge(self, tol: float = 1e-6) -> None:
        """Raise ``ValueError`` unless ``total_charge`` is an integer (within ``tol``)."""
        q = float(self.total_charge)
        if abs(q - round(q)) > tol:
            raise ValueError(f"total_charge must be an integer number of e, got {q}")

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
                    _check_cell(cell_np, self.pbc)
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


def _check_cell(cell: np.ndarray, pbc: tuple[bool, bool, bool]) -> None:
    vol = abs(float(np.linalg.det(cell)))
    norms = np.linalg.norm(cell, axis=1)
    for a in range(3):
        if pbc[a] and norms[a] == 0:
            raise ValueError(f"singular cell: lattice vector {a} is zero but pbc[{a}] is True")
    if vol <= 1e-10 * max(float(np.prod(norms)), 1e-300):
        raise ValueError(
            f"singular (degenerate) cell with pbc: volume {vol:.3g} Å³ for lattice vectors "
            f"of lengths {np.round(norms, 4).tolist()} Å"
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
