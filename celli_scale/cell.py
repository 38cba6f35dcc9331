"""Host-side cell geometry: plane heights, periodic image ranges, exact pair search.

Plain numpy (outside jit). Used by :mod:`celli_scale.system` (overlap checks) and
:mod:`celli_scale.neighbors` (neighbor lists), and by the electrostatics to choose
image and k-vector ranges.

Convention: the vector from atom ``i`` to atom ``j`` is
``r_ij = x[j] - x[i] + shift_ij @ cell`` with integer image shifts.

Partly periodic cells follow ASE's convention: a lattice vector along an open axis
(``pbc[a]`` False) may be zero (a slab ``pbc=(True, True, False)`` with a zero third
vector). Such a vector never enters ``r_ij`` (its shift is always 0); for the geometry
here it is replaced by a unit vector normal to the periodic ones (:func:`complete_cell`).

Size limits: a pair search over periodic images is refused *before* it allocates when it
would need more than :data:`MAX_IMAGE_SHIFTS` image shifts or an estimated
:func:`search_byte_limit` bytes (:func:`check_search_size`), so a degenerate cell or a huge
cut-off raises a ``ValueError`` naming the memory instead of a ``MemoryError`` (or minutes
of work) later.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

#: Shortest periodic lattice vector and smallest periodic plane spacing accepted (Å).
#: Real structures are far above it (an atom is closer than this to its own periodic
#: image); below it the image search is numerically meaningless.
MIN_CELL_LENGTH = 1e-3
#: Most periodic image shifts one pair search may visit.
MAX_IMAGE_SHIFTS = 200_000
#: Largest estimated memory (bytes) one pair search may need (ghost atoms and pairs);
#: None: half of this machine's physical memory (see :func:`search_byte_limit`).
MAX_SEARCH_BYTES: int | None = None
# bytes per ghost atom (position, index, shift) and per found pair (i, j, shift, distance
# and the k-d tree's output)
_GHOST_BYTES = 56
_PAIR_BYTES = 80


class SearchTooLargeError(ValueError):
    """A pair search would need more image shifts or memory than the limits allow."""


def search_byte_limit() -> int:
    """:data:`MAX_SEARCH_BYTES` if set, else half of the physical memory (8 GiB when the
    platform does not tell)."""
    if MAX_SEARCH_BYTES is not None:
        return int(MAX_SEARCH_BYTES)
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (AttributeError, ValueError, OSError):
        return 8 * 2**30


def complete_cell(cell: np.ndarray, pbc) -> np.ndarray:
    """``cell`` with every zero lattice vector along an open axis replaced by a unit vector
    normal to the other vectors (ASE's slab/wire convention); other rows unchanged.

    The replacement never enters a pair vector (open axes have zero shifts); it only makes
    the cell invertible for fractional coordinates and plane spacings.
    """
    cell = np.array(cell, dtype=float)
    pbc = np.broadcast_to(np.asarray(pbc, dtype=bool), (3,))
    norms = np.linalg.norm(cell, axis=1)
    zero = (norms == 0) & ~pbc
    if not zero.any():
        return cell
    keep = [a for a in range(3) if not zero[a]]
    basis = cell[keep]
    # orthonormal complement of the kept rows' span (SVD: robust for 0, 1 or 2 rows)
    if basis.shape[0]:
        _, sv, vt = np.linalg.svd(basis)
        rank = int(np.sum(sv > 1e-12 * max(sv.max(), 1e-300)))
        comp = vt[rank:]
    else:
        comp = np.eye(3)
    for k, a in enumerate(np.flatnonzero(zero)):
        cell[a] = comp[k] if k < comp.shape[0] else np.eye(3)[a]
    if np.linalg.det(cell) < 0:  # keep the handedness of the given vectors
        a = int(np.flatnonzero(zero)[0])
        cell[a] = -cell[a]
    return cell


def plane_heights(cell: np.ndarray, pbc=None) -> np.ndarray:
    """Distances (Å) between opposite faces of the cell, one per lattice vector. With
    ``pbc`` given, zero vectors along open axes are completed first (:func:`complete_cell`)."""
    cell = np.asarray(cell, dtype=float) if pbc is None else complete_cell(cell, pbc)
    vol = abs(np.linalg.det(cell))
    cross = np.stack(
        [np.cross(cell[1], cell[2]), np.cross(cell[2], cell[0]), np.cross(cell[0], cell[1])]
    )
    return vol / np.linalg.norm(cross, axis=1)


def image_range(cell: np.ndarray | None, pbc, cutoff: float) -> np.ndarray:
    """How many periodic images per axis can hold a neighbour within ``cutoff`` (Å)."""
    if cell is None or not any(pbc):
        return np.zeros(3, dtype=int)
    pbc = np.broadcast_to(np.asarray(pbc, dtype=bool), (3,))
    h = plane_heights(cell, pbc)
    with np.errstate(divide="ignore", invalid="ignore"):
        n = np.where(pbc, np.ceil(cutoff / np.where(pbc, h, 1.0)), 0)
    if not np.all(np.isfinite(n)) or np.any(n > MAX_IMAGE_SHIFTS):
        raise SearchTooLargeError(
            f"a pair search within {cutoff:g} Å of cell planes {np.round(h, 6).tolist()} Å "
            f"apart would need more than {MAX_IMAGE_SHIFTS} periodic images along one axis"
        )
    return n.astype(int)


def image_shifts(cell: np.ndarray | None, pbc, cutoff: float) -> np.ndarray:
    """All integer image shifts ``(S, 3)`` that can hold a pair within ``cutoff`` of any
    two atoms inside the cell (the zero shift first)."""
    n = image_range(cell, pbc, cutoff) + np.where(np.asarray(pbc, dtype=bool), 1, 0)
    n_shifts = int(np.prod(2 * n + 1))
    if n_shifts > MAX_IMAGE_SHIFTS:
        raise SearchTooLargeError(
            f"a pair search within {cutoff:g} Å in a cell with plane spacings "
            f"{np.round(plane_heights(cell, pbc), 6).tolist()} Å needs {n_shifts} periodic "
            f"images (limit {MAX_IMAGE_SHIFTS}, about {n_shifts * 24 / 2**30:.3g} GiB for "
            "the shifts alone); check the cell and the cut-off"
        )
    grids = np.meshgrid(*[np.arange(-k, k + 1) for k in n], indexing="ij")
    shifts = np.stack([g.ravel() for g in grids], axis=1)
    order = np.argsort(np.abs(shifts).sum(axis=1), kind="stable")
    return shifts[order]


def wrap(positions: np.ndarray, cell: np.ndarray | None, pbc) -> tuple[np.ndarray, np.ndarray]:
    """Wrap positions into the cell along periodic axes.

    Returns ``(wrapped, offsets)`` with ``wrapped = positions - offsets @ cell`` and
    integer ``offsets``.
    """
    positions = np.asarray(positions, dtype=float)
    pbc = np.broadcast_to(np.asarray(pbc, dtype=bool), (3,))
    if cell is None or not pbc.any():
        return positions.copy(), np.zeros(positions.shape, dtype=int)
    cell = np.asarray(cell, dtype=float)
    frac = np.linalg.solve(complete_cell(cell, pbc).T, positions.T).T
    offsets = np.where(pbc, np.floor(frac), 0.0).astype(int)
    return positions - offsets @ cell, offsets


def check_search_size(n_atoms: int, cell: np.ndarray | None, pbc, cutoff: float) -> None:
    """Refuse a periodic pair search that would be too large, before it allocates.

    Estimates the image shifts visited, the ghost atoms (images within ``cutoff`` of the
    cell) and, for fully periodic cells, the pairs ``N² (4π/3) cutoff³ / V``.

    Raises:
      SearchTooLargeError: (a ``ValueError``) naming the cell, the cut-off and the
        estimated memory, when above :data:`MAX_IMAGE_SHIFTS` or :func:`search_byte_limit`.
    """
    pbc = np.broadcast_to(np.asarray(pbc, dtype=bool), (3,))
    if cell is None or not pbc.any():
        return
    n = image_range(cell, pbc, cutoff)
    n_shifts = int(np.prod(np.where(pbc, 2 * n + 3, 1)))
    full = complete_cell(cell, pbc)
    h = plane_heights(full)
    ghosts = float(n_atoms) * float(np.prod(np.where(pbc, 1 + 2 * cutoff / h, 1.0)))
    pairs = 0.0
    if pbc.all():
        pairs = float(n_atoms) ** 2 * 4 / 3 * np.pi * cutoff**3 / abs(np.linalg.det(full))
    need = ghosts * _GHOST_BYTES + pairs * _PAIR_BYTES
    limit = search_byte_limit()
    if n_shifts > MAX_IMAGE_SHIFTS or need > limit:
        raise SearchTooLargeError(
            f"pair search too large: {n_atoms} atoms within {cutoff:g} Å in a cell with plane "
            f"spacings {np.round(h, 6).tolist()} Å (pbc={tuple(bool(p) for p in pbc)}) needs "
            f"{n_shifts} periodic images, about {ghosts:.3g} image atoms and {pairs:.3g} "
            f"pairs, about {need / 2**30:.3g} GiB (limits: {MAX_IMAGE_SHIFTS} images, "
            f"{limit / 2**30:.3g} GiB); check the cell and the cut-off"
        )


def host_pairs(
    positions: np.ndarray,
    cell: np.ndarray | None,
    pbc,
    cutoff: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every ordered pair ``(i, j, shift)`` with ``0 < |r_ij| < cutoff``.

    Exact for any cell shape and any cutoff (also larger than the cell: several images
    of the same atom, and an atom's own images, are found). O(N) with a k-d tree.

    Returns:
      ``i, j`` int arrays, ``shifts (E, 3)`` int array, distances ``(E,)`` in Å, sorted
      by ``(i, j)`` then shift.
    """
    pos = np.asarray(positions, dtype=float)
    pbc = np.broadcast_to(np.asarray(pbc, dtype=bool), (3,))
    periodic = cell is not None and pbc.any()
    if not (np.isfinite(cutoff) and cutoff > 0):
        raise ValueError(f"cutoff must be a positive finite number of Å, got {cutoff}")
    if periodic:
        check_search_size(pos.shape[0], np.asarray(cell, dtype=float), pbc, cutoff)
    if not periodic:
        # Written with scipy's k-d tree: jax-md's cell list assumes the minimum-image
        # convention, which breaks for cut-offs beyond half the cell; here no cell at all.
        tree = cKDTree(pos)
        pairs = tree.query_pairs(cutoff, output_type="ndarray")
        i = np.concatenate([pairs[:, 0], pairs[:, 1]])
        j = np.concatenate([pairs[:, 1], pairs[:, 0]])
        shifts = np.zeros((i.size, 3), dtype=int)
    else:
        cell = np.asarray(cell, dtype=float)
        wpos, off = wrap(pos, cell, pbc)
        frac = np.linalg.solve(complete_cell(cell, pbc).T, wpos.T).T
        c = np.where(pbc, cutoff / plane_heights(cell, pbc), 0.0)
        shifts_all = image_shifts(cell, pbc, cutoff)
        # ghost copies: images whose fractional coordinates lie within the cutoff of the cell
        gpos, gidx, gshift = [], [], []
        for s in shifts_all:
            f = frac + s
            keep = np.all((f >= -c - 1e-12) & (f <= 1 + c + 1e-12) | ~pbc, axis=1)
            if keep.any():
                gpos.append(wpos[keep] + s @ cell)
                gidx.append(np.flatnonzero(keep))
                gshift.append(np.broadcast_to(s, (int(keep.sum()), 3)))
        gpos = np.concatenate(gpos)
        gidx = np.concatenate(gidx)
        gshift = np.concatenate(gshift)
        home = cKDTree(wpos)
        ghost = cKDTree(gpos)
        sdm = home.sparse_distance_matrix(ghost, cutoff, output_type="ndarray")
        i = sdm["i"].astype(np.int64)
        g = sdm["j"].astype(np.int64)
        j = gidx[g]
        s = gshift[g]
        keep = ~((i == j) & np.all(s == 0, axis=1))
        i, j, s = i[keep], j[keep], s[keep]
        shifts = s - off[j] + off[i]
    vec = pos[j] - pos[i] + (shifts @ cell if periodic else 0.0)
    d = np.linalg.norm(vec, axis=1) if i.size else np.zeros(0)
    keep = (d < cutoff) & (d > 0) | ((d == 0) & (i != j))
    i, j, shifts, d = i[keep], j[keep], shifts[keep], d[keep]
    order = np.lexsort((shifts[:, 2], shifts[:, 1], shifts[:, 0], j, i))
    return (
        i[order].astype(np.int64),
        j[order].astype(np.int64),
        shifts[order].astype(np.int64),
        d[order],
    )
