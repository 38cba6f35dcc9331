"""Host-side cell geometry: plane heights, periodic image ranges, exact pair search.

Plain numpy (outside jit). Used by :mod:`celli_scale.system` (overlap checks) and
:mod:`celli_scale.neighbors` (neighbor lists), and by the electrostatics to choose
image and k-vector ranges.

Convention: the vector from atom ``i`` to atom ``j`` is
``r_ij = x[j] - x[i] + shift_ij @ cell`` with integer image shifts.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree


def plane_heights(cell: np.ndarray) -> np.ndarray:
    """Distances (Å) between opposite faces of the cell, one per lattice vector."""
    cell = np.asarray(cell, dtype=float)
    vol = abs(np.linalg.det(cell))
    cross = np.stack(
        [np.cross(cell[1], cell[2]), np.cross(cell[2], cell[0]), np.cross(cell[0], cell[1])]
    )
    return vol / np.linalg.norm(cross, axis=1)


def image_range(cell: np.ndarray | None, pbc, cutoff: float) -> np.ndarray:
    """How many periodic images per axis can hold a neighbour within ``cutoff`` (Å)."""
    if cell is None or not any(pbc):
        return np.zeros(3, dtype=int)
    h = plane_heights(cell)
    n = np.ceil(cutoff / h).astype(int)
    return np.where(np.asarray(pbc, dtype=bool), n, 0)


def image_shifts(cell: np.ndarray | None, pbc, cutoff: float) -> np.ndarray:
    """All integer image shifts ``(S, 3)`` that can hold a pair within ``cutoff`` of any
    two atoms inside the cell (the zero shift first)."""
    n = image_range(cell, pbc, cutoff) + np.where(np.asarray(pbc, dtype=bool), 1, 0)
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
    pbc = np.asarray(pbc, dtype=bool)
    if cell is None or not pbc.any():
        return positions.copy(), np.zeros(positions.shape, dtype=int)
    frac = np.linalg.solve(np.asarray(cell, dtype=float).T, positions.T).T
    offsets = np.where(pbc, np.floor(frac), 0.0).astype(int)
    return positions - offsets @ cell, offsets


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
    pbc = np.asarray(pbc, dtype=bool)
    periodic = cell is not None and pbc.any()
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
        frac = np.linalg.solve(cell.T, wpos.T).T
        c = np.where(pbc, cutoff / plane_heights(cell), 0.0)
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
