"""Limits checked on the host before anything large is allocated.

* Gaussian widths: :func:`check_sigma_max` refuses widths broader than the cell.
* Memory: :func:`estimate_resources` counts real-space pairs, periodic ghost copies,
  k-vectors and PME grid points from the chosen parameters (uniform-density estimates)
  and the bytes an energy-and-forces evaluation needs for them; :func:`check_resources`
  refuses more than ``max_bytes`` (default :func:`memory_limit`) naming the dominant term.
* Dtypes: :func:`check_real` refuses complex inputs, which would silently lose a part.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from celli_scale import cell as cellmod

#: Gaussian widths may be at most this multiple of the cell's smallest width (distance
#: between opposite faces); see :func:`check_sigma_max`.
MAX_SIGMA_CELL_RATIO = 1.0
#: Share of the machine's physical memory one evaluation may need by default.
MEMORY_FRACTION = 0.5


def check_real(name: str, x: Any) -> None:
    """Refuse complex (or other non-real) dtypes: they would silently lose a part."""
    dtype = getattr(x, "dtype", None)
    dtype = np.asarray(x).dtype if dtype is None else np.dtype(dtype)
    if dtype.kind not in "biuf":
        raise ValueError(f"{name} must be real numbers, got dtype {dtype}")


def min_cell_width(cell: Any, pbc: Any = True) -> float:
    """Smallest distance (Å) between opposite faces of ``cell`` over its periodic axes."""
    h = cellmod.plane_heights(np.asarray(cell, dtype=float))
    periodic = np.broadcast_to(np.asarray(pbc, dtype=bool), (3,))
    return float(np.min(h[periodic])) if periodic.any() else math.inf


def check_sigma_max(sigma_max: float, cell: Any, pbc: Any = True, *, what: str = "sigma") -> None:
    """Refuse Gaussian widths broader than the periodic cell (host side).

    A Gaussian wider than the cell's smallest width ``h`` (distance between opposite
    faces) overlaps its own periodic images: it is no longer a local charge, and the
    real-space sum would need a cut-off of ``2 s σ`` (≈ 7 σ at accuracy 1e-6), that is
    ~(7 σ / h)³ cells of images per atom, memory growing as σ³. Widths up to
    :data:`MAX_SIGMA_CELL_RATIO` × ``h`` are accepted. Models that learn σ below a cap
    (CELLI's ``elec_sigma_max``) call this with the cap when the cell is known;
    :func:`prepare` calls it for the widths it is given.

    Args:
      sigma_max: largest Gaussian width in Å.
      cell: ``(3, 3)`` lattice vectors as rows, Å.
      pbc: periodic flags (one or three bools); no bound for an open system.
      what: the name used in the message (e.g. ``"elec_sigma_max"``).

    Raises:
      ValueError: naming the width, the cell width and the cut-off it would need.
    """
    h = min_cell_width(cell, pbc)
    if float(sigma_max) > MAX_SIGMA_CELL_RATIO * h:
        raise ValueError(
            f"{what}={float(sigma_max):.4g} Å is broader than the cell (smallest width between "
            f"opposite faces {h:.4g} Å): a Gaussian wider than the cell overlaps its own "
            f"periodic images and its real-space sum would need a cut-off of about 7 σ = "
            f"{7 * float(sigma_max):.4g} Å; use widths <= {MAX_SIGMA_CELL_RATIO * h:.4g} Å "
            "or a larger (super)cell"
        )


def memory_limit() -> int:
    """Default ``max_bytes``: :data:`MEMORY_FRACTION` of the machine's physical memory."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not POSIX: assume 16 GiB
        total = 16 << 30
    return int(MEMORY_FRACTION * total)


# Peak bytes per item of a host neighbor-list build plus one jitted energy-and-forces
# evaluation (float64), rounded up from the arrays each item touches.
_BYTES_PER_PAIR = 200  # host search (i, j, shift, distance, sort) and device pair arrays
_BYTES_PER_GHOST = 100  # periodic image copy in the host search
_BYTES_PER_KCANDIDATE = 100  # integer-vector candidate in the k-vector search
_BYTES_PER_KVECTOR = 100
_BYTES_PER_ATOM_K = 48  # one (atom, k) element of the reciprocal block, with gradients
_BYTES_PER_GRID_POINT = 100  # PME charge grid, FFTs, influence function, gradients
_BYTES_PER_STENCIL = 48  # PME (atom, spline point): index, weight, gradients


@dataclass(frozen=True)
class ResourceEstimate:
    """Sizes of one evaluation, estimated before anything is allocated.

    Attributes:
      pairs: directed real-space pairs within the cut-off (uniform density estimate).
      ghosts: periodic image copies searched on the host.
      kvectors: Ewald half-space k-vectors (0 for PME/direct).
      grid_points: PME FFT grid points (0 otherwise).
      parts: ``{description: bytes}`` of each term.
    """

    pairs: int
    ghosts: int
    kvectors: int
    grid_points: int
    parts: dict

    @property
    def nbytes(self) -> int:
        return int(sum(self.parts.values()))


def estimate_resources(
    method: str,
    n_atoms: int,
    cell: Any,
    r_cut: float,
    k_cut: float = 0.0,
    grid: tuple = (),
    order: int = 0,
    *,
    margin: float = 0.05,
) -> ResourceEstimate:
    """Estimate pair, ghost, k-vector and grid counts and the memory they need (host).

    ``r_cut`` (Å) and ``k_cut`` (1/Å) as chosen by :func:`~.params.prepare`, ``grid`` and
    ``order`` of PME; ``margin`` is the relative extension of the searched cut-offs."""
    if method not in ("ewald", "pme"):
        return ResourceEstimate(0, 0, 0, 0, {})
    cell = np.asarray(cell, dtype=float)
    vol = abs(float(np.linalg.det(cell)))
    r = r_cut * (1 + 2 * margin)  # neighbor lists carry a skin
    pairs = int(n_atoms * (n_atoms / vol) * (4.0 / 3.0) * math.pi * r**3)
    h = cellmod.plane_heights(cell)
    ghosts = int(n_atoms * np.prod(1.0 + 2.0 * r / h))
    parts = {
        f"{pairs:.3g} real-space pairs within r_cut={r_cut:.4g} Å": pairs * _BYTES_PER_PAIR,
        f"{ghosts:.3g} periodic image copies": ghosts * _BYTES_PER_GHOST,
    }
    kvectors = points = 0
    if method == "ewald":
        k = k_cut * (1 + margin)
        nmax = np.floor(k * np.linalg.norm(cell, axis=1) / (2 * np.pi))
        candidates = int(np.prod(2 * nmax + 1))
        kvectors = int((4.0 / 3.0) * math.pi * k**3 * vol / (2 * math.pi) ** 3 / 2)
        block = min(n_atoms * kvectors, 1 << 23)
        parts[f"{kvectors:.3g} k-vectors (k_cut={k_cut:.4g} 1/Å)"] = (
            candidates * _BYTES_PER_KCANDIDATE
            + kvectors * _BYTES_PER_KVECTOR
            + block * _BYTES_PER_ATOM_K
        )
    elif method == "pme":
        points = int(np.prod(grid))
        parts[f"PME grid {tuple(int(g) for g in grid)}"] = (
            points * _BYTES_PER_GRID_POINT + n_atoms * order**3 * _BYTES_PER_STENCIL
        )
    return ResourceEstimate(pairs, ghosts, kvectors, points, parts)


def check_resources(est: ResourceEstimate, max_bytes: int | None = None, what: str = "") -> None:
    """Raise ``ValueError`` if ``est`` needs more than ``max_bytes`` (default
    :func:`memory_limit`), naming the dominant term and the memory it would need."""
    limit = memory_limit() if max_bytes is None else int(max_bytes)
    if est.nbytes <= limit:
        return
    cause, nbytes = max(est.parts.items(), key=lambda kv: kv[1])
    raise ValueError(
        f"electrostatics{what} would need about {est.nbytes / 2**30:.3g} GiB, over the limit "
        f"of {limit / 2**30:.3g} GiB (max_bytes); the largest part is {cause} "
        f"(~{nbytes / 2**30:.3g} GiB). Use a looser accuracy, narrower Gaussian widths, or "
        "fewer atoms per evaluation"
    )
