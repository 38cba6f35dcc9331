"""Generated structures: the NaCl grid of the benchmarks (``shared/data/PEERS.md``), rock
salt, random open clusters. Positions in Å, cells as lattice rows; every function is
deterministic for a given ``seed``.
"""

from __future__ import annotations

import numpy as np

from celli_scale.system import System

#: Species of the NaCl grid (Na, Cl).
NACL_SPECIES = (11, 17)


def nacl_grid(n: int, spacing: float = 2.2, rattle: float = 0.0, seed: int = 0) -> System:
    """``n³`` simple-cubic sites, periodic, Na where ``i + j + k`` is even and Cl where it
    is odd (the PEERS.md grid: spacing 2.2 Å gives 56 neighbours within 5 Å).

    Args:
      n: sites per axis (N = n³ atoms). spacing: Å. rattle: standard deviation (Å) of a
      Gaussian displacement of every site. seed: of that displacement.
    """
    n = int(n)
    g = np.stack(np.meshgrid(*[np.arange(n)] * 3, indexing="ij"), -1).reshape(-1, 3)
    pos = g * float(spacing)
    if rattle:
        pos = pos + np.random.default_rng(seed).normal(0, rattle, pos.shape)
    z = np.where(g.sum(1) % 2 == 0, NACL_SPECIES[0], NACL_SPECIES[1])
    return System(pos, z, cell=np.eye(3) * spacing * n, pbc=True)


def rocksalt(n: int = 2, a: float = 5.64, rattle: float = 0.0, seed: int = 0) -> System:
    """Conventional rock-salt cells (8 atoms each, lattice constant ``a`` Å), ``n`` along x,
    neutral Na/Cl, periodic."""
    base = np.array([[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]], dtype=float)
    frac = np.concatenate([base, base + np.array([0.5, 0, 0])])
    z = np.array([11] * 4 + [17] * 4)
    frac = np.concatenate([frac + [i, 0, 0] for i in range(n)]) / [n, 1, 1]
    z = np.tile(z, n)
    cell = np.diag([a * n, a, a])
    pos = frac @ cell
    if rattle:
        pos = pos + np.random.default_rng(seed).normal(0, rattle, pos.shape)
    return System(pos, z, cell=cell, pbc=True)


def random_cluster(
    n: int = 6,
    seed: int = 0,
    species: tuple[int, ...] = (1, 8),
    box: float = 4.0,
    min_distance: float = 0.9,
) -> System:
    """A random open cluster of ``n`` atoms in a ``box`` Å cube, at least ``min_distance``
    Å apart, species cycling through ``species``."""
    rng = np.random.default_rng(seed)
    pos: list[np.ndarray] = []
    while len(pos) < n:
        p = rng.uniform(0, box, 3)
        if all(np.linalg.norm(p - q) > min_distance for q in pos):
            pos.append(p)
    z = np.resize(np.asarray(species), n)
    return System(np.array(pos), z)
