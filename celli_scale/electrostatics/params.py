"""Host-side preparation: from an accuracy target to Ewald/PME parameters.

:func:`prepare` runs outside jit on a concrete cell. It picks the method, the Ewald split
parameter ``alpha``, the real-space cut-off, the reciprocal k-vectors (Ewald) or the FFT
grid and B-spline order (PME), and the periodic image shifts used by the dense fallback
inside jit. Everything the jit-compiled kernels need is in :class:`ElectrostaticsParams`
(a pytree: arrays are leaves, scalars/method/grid are static).

Meaning of ``accuracy`` (ε)
---------------------------
ε is the target *relative* RMS force error: the Kolafa–Perram (1992) estimates of the
RMS force error of the real-space and of the reciprocal-space truncation, expressed in
units of ``F_u = COULOMB · <q²> / a²`` (the force between two typical charges at the
mean interparticle distance ``a = (V/N)^(1/3)``), each kept below ε/√2. In these units
both estimates take the same charge-independent form::

    ΔF_real / F_u = 2 sqrt(α a / s) exp(-s²),   s = α r_cut
    ΔF_recip / F_u = 2 sqrt(α a / t) exp(-t²),  t = k_cut / (2 α)

so ``s = t`` solves both, and α is chosen to minimise a cost model. The relative energy
error is of the same order or smaller (the tests check both). For PME the B-spline
interpolation error, estimated from the first alias of the dominant wave vectors
``k ≈ 3α`` as ``2 (x / (1 − x))^p`` with ``x = 3 α h / 2π`` (grid spacing h along a
lattice vector, order p; checked against Ewald in the tests), is kept below ε/√2 too,
and the grid also resolves ``k_cut`` (Nyquist).

Limits (checked before anything large is allocated)
----------------------------------------------------
Gaussian widths broader than the cell and evaluations that would not fit in memory are
refused by :func:`prepare` with a ``ValueError``; see :mod:`celli_scale.electrostatics.limits`
(re-exported here: :func:`check_sigma_max`, :func:`estimate_resources`, ...).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from celli_scale import cell as cellmod
from celli_scale.electrostatics.limits import (  # noqa: F401  (re-exported)
    MAX_SIGMA_CELL_RATIO,
    ResourceEstimate,
    check_real,
    check_resources,
    check_sigma_max,
    estimate_resources,
    memory_limit,
    min_cell_width,
)

METHODS = ("auto", "direct", "ewald", "pme")
#: ``method="auto"`` on a periodic system uses Ewald below this many atoms, PME from it on.
#: Measured (bench/bench_electrostatics.py, NaCl grid, energy + forces, accuracy 1e-6,
#: 2-core CPU, float64): Ewald 3 ms vs PME 2 ms at N = 64, 23 ms vs 5 ms at N = 216, so
#: the crossover is below ~100 atoms; Ewald is kept for tiny cells (no interpolation error).
AUTO_PME_MIN_ATOMS = 100
#: Default B-spline order of PME (even; ≥ 4). Order 8 lets the grid be coarser for the same
#: interpolation error; measured (float64, energy + forces, NaCl grid, prepared, 2-core CPU)
#: against order 6 at the same accuracy: 0.50-0.75x the time from N = 64 to 64000 at 1e-5 and
#: 1e-6 (N = 8000, 1e-6: 112 vs 225 ms), energy errors 5e-8-2e-6; order 10 was slower again.
DEFAULT_PME_ORDER = 8
#: Relative margin on cut-offs for the image sets chosen on the host, so that an
#: infinitesimal (or small) strain of the cell keeps every pair within r_cut covered.
CELL_MARGIN = 0.05

# cost-model weights (relative time per unit of work on CPU, measured roughly with
# bench/bench_electrostatics.py): real-space pair, Ewald (atom, k) term, PME spline
# point (spread + gather), FFT point * log2(points)
COST_PAIR, COST_K, COST_SPLINE, COST_FFT = 1.0, 0.7, 0.5, 0.016
#: Cost of an (atom, k) term of the factorised Ewald sum, relative to a real-space pair
#: (measured at N = 1000, float64, energy + forces: 73 ns per pair, ~8 ns per (atom, k)
#: including the box's excess over the sphere), and the largest atoms × box points it is
#: used for (one block; larger sums evaluate every exp(i k·r) in blocks of k).
COST_K_BOX = 0.12
EWALD_BOX_ELEMENTS = 1 << 23


@struct.dataclass
class ElectrostaticsParams:
    """Everything the electrostatic kernels need besides the arrays of the system.

    Attributes:
      method: ``"direct"``, ``"ewald"`` or ``"pme"`` (static).
      n_atoms: atom count the parameters were prepared for (static).
      accuracy: target relative RMS force error ε (static; see module docs).
      alpha: Ewald split parameter in 1/Å (static; 0 for direct).
      r_cut: real-space cut-off in Å (static; 0 for direct).
      s: ``alpha * r_cut`` error exponent (static); Gaussian widths σ need
        ``r_cut >= 2 s max(σ)``.
      kvecs: ``(K, 3)`` integer-valued reciprocal indices n of the half k-space
        (Ewald; k = 2π n · inv(cell)ᵀ), float array.
      shifts: ``(S, 3)`` integer-valued image shifts covering ``r_cut * (1 + margin)`` for
        the dense real-space fallback inside jit, float array.
      kbox: Ewald: the largest ``|n_a|`` of ``kvecs`` along each axis (static; ``()``
        otherwise), the box the reciprocal sum factorises over
        (:func:`celli_scale.electrostatics.ewald.reciprocal`).
      grid: PME FFT grid ``(K1, K2, K3)`` (static; ``()`` otherwise).
      order: PME B-spline order (static; 0 otherwise).
      bsp_moduli: PME squared inverse B-spline moduli ``(|b1|², |b2|², |b3|²)`` along the
        rfft axes, arrays of length K1, K2, K3 // 2 + 1.
    """

    kvecs: jax.Array
    shifts: jax.Array
    bsp_moduli: tuple
    method: str = struct.field(pytree_node=False, default="direct")
    n_atoms: int = struct.field(pytree_node=False, default=0)
    accuracy: float = struct.field(pytree_node=False, default=1e-6)
    alpha: float = struct.field(pytree_node=False, default=0.0)
    r_cut: float = struct.field(pytree_node=False, default=0.0)
    s: float = struct.field(pytree_node=False, default=0.0)
    kbox: tuple = struct.field(pytree_node=False, default=())
    grid: tuple = struct.field(pytree_node=False, default=())
    order: int = struct.field(pytree_node=False, default=0)

    @property
    def periodic(self) -> bool:
        return self.method in ("ewald", "pme")


def _is_concrete(x: Any) -> bool:
    return x is not None and not isinstance(x, jax.core.Tracer)


def validate_sigma(sigma: Any, n_atoms: int, mask: Any = None) -> None:
    """Raise ``ValueError`` naming the atom if a concrete ``sigma`` is not finite and > 0."""
    if sigma is None:
        return
    check_real("sigma", sigma)
    if not _is_concrete(sigma):
        return
    s = np.asarray(sigma, dtype=float)
    if s.shape not in ((), (n_atoms,)):
        raise ValueError(
            f"sigma must have shape ({n_atoms},) (one width per atom, Å), got {s.shape}"
        )
    s = np.broadcast_to(s, (n_atoms,))
    real = (
        np.ones(n_atoms, bool) if mask is None or not _is_concrete(mask) else np.asarray(mask, bool)
    )
    bad = real & ~(np.isfinite(s) & (s > 0))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"sigma must be finite and > 0 (Gaussian width in Å); atom {i} has sigma={s[i]}"
        )


def _kp_exponent(eps: float, alpha_a: float) -> float:
    """Solve ``2 sqrt(alpha_a / x) exp(-x²) = eps / sqrt(2)`` for x (Kolafa–Perram)."""
    target = eps / math.sqrt(2.0)
    x = math.sqrt(max(-math.log(target), 1.0))
    for _ in range(50):
        x_new = math.sqrt(max(math.log(2.0 * math.sqrt(alpha_a / x) / target), 0.25))
        if abs(x_new - x) < 1e-12:
            break
        x = x_new
    return max(x, 0.5)


def _next_fast_len(n: int) -> int:
    """Smallest 2^a 3^b 5^c ≥ n (good FFT sizes)."""
    best = None
    p2 = 1
    while p2 < 2 * n:
        p3 = p2
        while p3 < 2 * n:
            p5 = p3
            while p5 < 2 * n:
                if p5 >= n and (best is None or p5 < best):
                    best = p5
                p5 *= 5
            p3 *= 3
        p2 *= 2
    return int(best)


def _kbox(kvecs: np.ndarray) -> tuple[int, int, int]:
    """The largest ``|n_a|`` of integer reciprocal indices along each axis."""
    if len(kvecs) == 0:
        return (0, 0, 0)
    return tuple(int(m) for m in np.abs(np.asarray(kvecs)).max(axis=0))


def _half_kvectors(cell: np.ndarray, k_cut: float) -> np.ndarray:
    """Integer n (one of each ±n pair, n ≠ 0) with |2π n · inv(cell)ᵀ| ≤ k_cut."""
    recip = 2 * np.pi * np.linalg.inv(cell).T
    nmax = np.floor(k_cut * np.linalg.norm(cell, axis=1) / (2 * np.pi)).astype(int)
    rng = [np.arange(-m, m + 1) for m in nmax]
    n = np.stack(np.meshgrid(*rng, indexing="ij"), -1).reshape(-1, 3)
    half = (
        (n[:, 0] > 0)
        | ((n[:, 0] == 0) & (n[:, 1] > 0))
        | ((n[:, 0] == 0) & (n[:, 1] == 0) & (n[:, 2] > 0))
    )
    n = n[half]
    k2 = np.sum((n @ recip) ** 2, axis=1)
    n = n[k2 <= k_cut**2]
    return n[np.argsort(np.sum((n @ recip) ** 2, axis=1), kind="stable")]


def bspline_values(w: np.ndarray, order: int):
    """``M_p(w + j)`` for j = 0 … p-1 (cardinal B-spline of order p), last axis; works on
    numpy and jax arrays (differentiable in w)."""
    xp = jnp if isinstance(w, jax.Array) else np
    vals = [w, 1.0 - w]
    for n in range(3, order + 1):
        new = []
        for j in range(n):
            a = (w + j) * vals[j] if j < n - 1 else 0.0
            b = (n - w - j) * vals[j - 1] if j >= 1 else 0.0
            new.append((a + b) / (n - 1))
        vals = new
    return xp.stack(vals, axis=-1)


def _bspline_moduli(k: int, order: int) -> np.ndarray:
    """``1/|Σ_j M_p(j) exp(2πi m j / K)|²`` for m = 0 … K-1 (Essmann et al. 1995)."""
    mj = bspline_values(np.zeros(()), order)  # M_p(j), j = 0..p-1
    m = np.arange(k)
    j = np.arange(order)
    d = np.exp(2j * np.pi * np.outer(m, j) / k) @ mj
    d2 = np.abs(d) ** 2
    tiny = d2 < 1e-10  # only for odd orders at m = K/2: average the neighbours
    if tiny.any():
        for i in np.flatnonzero(tiny):
            d2[i] = 0.5 * (d2[(i - 1) % k] + d2[(i + 1) % k])
    return 1.0 / d2


def _pme_grid(cell: np.ndarray, alpha: float, k_cut: float, eps: float, order: int) -> tuple:
    """PME grid for split ``alpha``: B-spline interpolation error below ε/√2 (see the
    module docs) and ``k_cut`` resolved (Nyquist), FFT-friendly sizes."""
    y = (eps / (2.0 * math.sqrt(2.0))) ** (1.0 / order)
    h = min((2.0 * np.pi / (3.0 * alpha)) * y / (1.0 + y), np.pi / k_cut)
    lengths = np.linalg.norm(cell, axis=1)
    return tuple(_next_fast_len(max(int(math.ceil(L / h)), 2 * order)) for L in lengths)


def _pme_moduli(grid: tuple, order: int, dtype: Any) -> tuple:
    mods = (
        _bspline_moduli(grid[0], order),
        _bspline_moduli(grid[1], order),
        _bspline_moduli(grid[2], order)[: grid[2] // 2 + 1],
    )
    return tuple(jnp.asarray(m, dtype=dtype) for m in mods)


#: Image shift that pads the ``shifts`` of :func:`unify`: so far that no pair within any
#: cut-off uses it (the dense real-space sum masks pairs beyond ``r_cut``).
PAD_SHIFT = (1.0e4, 0.0, 0.0)


def unify(
    params: list[ElectrostaticsParams], cells: list[Any], sigma_max: float = 0.0
) -> list[ElectrostaticsParams]:
    """Parameters of several structures made one shape, so their graphs stack into one
    batch and one compiled call (training batches of CELLI, ``pot(Batch)``).

    Every structure keeps at least the accuracy it was prepared for: one split
    ``α = min α_i`` and error exponent ``s = max s_i`` for all, so the real-space cut-off
    ``max(s/α, 2 s σ_max)`` and the reciprocal cut-off ``k_cut = 2 α s`` satisfy each
    structure's Kolafa–Perram bounds (``α r_cut ≥ s_i``, ``k_cut/2α ≥ s_i``). Ewald
    k-vectors are chosen per cell for that ``k_cut`` and padded with zero rows (weight 0 in
    :func:`celli_scale.electrostatics.ewald.kspace`); PME takes the largest grid along each
    axis (finer than each structure needs). Image shifts are padded with
    :data:`PAD_SHIFT`. Open structures (direct) need nothing beyond a common atom count.

    Args:
      params: from :func:`prepare`, one per structure, all the same method.
      cells: the structures' ``(3, 3)`` cells (ignored for direct).
      sigma_max: the largest Gaussian width (Å) the parameters must serve.

    Raises:
      ValueError: methods, accuracies or PME orders differ.
    """
    methods = {p.method for p in params}
    if len(methods) != 1:
        raise ValueError(
            f"cannot batch structures with different electrostatics methods {sorted(methods)} "
            "(e.g. periodic and open structures): evaluate them in separate batches"
        )
    method = methods.pop()
    if len({p.accuracy for p in params}) != 1 or len({p.order for p in params}) != 1:
        raise ValueError("cannot batch electrostatics parameters of different accuracy or order")
    if method == "direct":
        return list(params)
    eps, order = params[0].accuracy, params[0].order
    dtype = params[0].shifts.dtype
    alpha = min(p.alpha for p in params)
    s = max(p.s for p in params)
    r_cut = max(s / alpha, 2.0 * s * float(sigma_max), max(p.r_cut for p in params))
    k_cut = 2.0 * alpha * s
    cells = [np.asarray(c, dtype=float) for c in cells]
    pbc = (True, True, True)
    shifts = [cellmod.image_shifts(c, pbc, r_cut * (1 + CELL_MARGIN)) for c in cells]
    n_s = max(len(x) for x in shifts)
    shifts = [np.concatenate([x, np.tile(PAD_SHIFT, (n_s - len(x), 1))]) for x in shifts]
    common = dict(alpha=float(alpha), s=float(s), r_cut=float(r_cut))
    if method == "ewald":
        kv = [_half_kvectors(c, k_cut * (1 + CELL_MARGIN)) for c in cells]
        n_k = max(len(x) for x in kv)
        kbox = _kbox(np.concatenate(kv))
        kv = [np.concatenate([x, np.zeros((n_k - len(x), 3))]) for x in kv]
        return [
            p.replace(
                kvecs=jnp.asarray(k, dtype), shifts=jnp.asarray(sh, dtype), kbox=kbox, **common
            )
            for p, k, sh in zip(params, kv, shifts, strict=True)
        ]
    grids = np.array([_pme_grid(c, alpha, k_cut, eps, order) for c in cells])
    grid = tuple(int(g) for g in grids.max(axis=0))
    mods = _pme_moduli(grid, order, dtype)
    return [
        p.replace(shifts=jnp.asarray(sh, dtype), grid=grid, bsp_moduli=mods, **common)
        for p, sh in zip(params, shifts, strict=True)
    ]


def _choose(method: str, cell: np.ndarray, n_atoms: int, eps: float, sigma_max: float, order: int):
    vol = abs(float(np.linalg.det(cell)))
    a = (vol / max(n_atoms, 1)) ** (1.0 / 3.0)
    rho = n_atoms / vol
    best = None
    for alpha_a in np.geomspace(0.3, 12.0, 120):
        alpha = alpha_a / a
        s = _kp_exponent(eps, alpha_a)
        r_cut = max(s / alpha, 2.0 * s * sigma_max)
        k_cut = 2.0 * alpha * s
        n_pairs = n_atoms * (4.0 / 3.0) * np.pi * r_cut**3 * rho
        if method == "ewald":
            n_k = (4.0 / 3.0) * np.pi * k_cut**3 * vol / (2 * np.pi) ** 3 / 2
            # the factorised reciprocal sum (ewald._reciprocal_box) runs over a half box
            # ~1.9× the half sphere, much cheaper per point, while it fits in one block
            boxed = n_atoms * 1.9 * n_k <= EWALD_BOX_ELEMENTS
            cost = COST_PAIR * n_pairs + (COST_K_BOX if boxed else COST_K) * n_atoms * n_k
            extra = {}
        else:
            grid = _pme_grid(cell, alpha, k_cut, eps, order)
            m = float(np.prod(grid))
            cost = (
                COST_PAIR * n_pairs + COST_SPLINE * n_atoms * order**3 + COST_FFT * m * math.log2(m)
            )
            extra = {"grid": grid}
        if best is None or cost < best[0]:
            best = (cost, alpha, s, r_cut, k_cut, extra)
    return best[1:]


def prepare(
    system,
    method: str = "auto",
    accuracy: float = 1e-6,
    sigma: Any = None,
    *,
    order: int = DEFAULT_PME_ORDER,
    max_bytes: int | None = None,
) -> ElectrostaticsParams:
    """Choose the method and its parameters for ``system`` (host side, outside jit).

    Args:
      system: :class:`celli_scale.System`; periodic methods need a concrete cell
        (positions may be traced).
      method: ``"auto"`` (open → ``"direct"``; fully periodic → ``"ewald"`` below
        :data:`AUTO_PME_MIN_ATOMS` atoms, ``"pme"`` from it on), ``"direct"``, ``"ewald"``
        or ``"pme"``.
      accuracy: target relative RMS force error ε (see module docs), 1e-14 ≤ ε ≤ 0.1.
      sigma: optional Gaussian widths ``(N,)`` in Å the parameters must serve; the
        real-space cut-off is extended to ``2 s max(σ)`` when broad Gaussians need it.
      order: PME B-spline order (even, 4 … 12).
      max_bytes: refuse parameters whose evaluation would need more memory than this
        (estimated before allocating; default :func:`memory_limit`).

    Returns:
      :class:`ElectrostaticsParams`.

    Raises:
      ValueError: unknown method, bad accuracy/sigma/order, ``"direct"`` on a periodic
        system or a periodic method on an open one, a traced cell, Gaussian widths
        broader than the cell (:func:`check_sigma_max`), an evaluation needing more than
        ``max_bytes`` (:func:`check_resources`).
      NotImplementedError: partly periodic (slab/wire) systems.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    eps = float(accuracy)
    if not (1e-14 <= eps <= 0.1):
        raise ValueError(f"accuracy must be in [1e-14, 0.1] (relative error), got {accuracy}")
    n_atoms = int(system.positions.shape[0])
    validate_sigma(sigma, n_atoms)
    pbc = tuple(system.pbc)
    empty = jnp.zeros((0, 3), dtype=system.positions.dtype)
    if any(pbc) and not all(pbc):
        raise NotImplementedError(
            f"electrostatics for partly periodic systems (pbc={pbc}, slab or wire) is not "
            "implemented; use a fully periodic cell with vacuum or an open system"
        )
    if not any(pbc):
        if method in ("ewald", "pme"):
            raise ValueError(
                f"method={method!r} needs a periodic system (pbc all True); "
                "use method='direct' for an open system"
            )
        return ElectrostaticsParams(
            kvecs=empty, shifts=empty, bsp_moduli=(), method="direct", n_atoms=n_atoms, accuracy=eps
        )
    if method == "direct":
        raise ValueError(
            "method='direct' is for open systems; this system is periodic "
            "(use 'ewald', 'pme' or 'auto')"
        )
    if method == "auto":
        method = "ewald" if n_atoms < AUTO_PME_MIN_ATOMS else "pme"
    if not _is_concrete(system.cell):
        raise ValueError(
            "prepare needs a concrete cell (call it outside jit/grad and pass "
            "params= to the traced computation)"
        )
    if method == "pme" and (order < 4 or order > 12 or order % 2):
        raise ValueError(f"PME B-spline order must be even and in 4..12, got {order}")
    cell = np.asarray(system.cell, dtype=float)
    sigma_max = 0.0 if sigma is None or not _is_concrete(sigma) else float(np.max(sigma))
    if sigma_max > 0:
        wide = int(np.argmax(np.broadcast_to(np.asarray(sigma, dtype=float), (n_atoms,))))
        check_sigma_max(sigma_max, cell, pbc, what=f"sigma[{wide}]")
    alpha, s, r_cut, k_cut, extra = _choose(method, cell, n_atoms, eps, sigma_max, order)
    est = estimate_resources(
        method, n_atoms, cell, r_cut, k_cut, extra.get("grid", ()), order, margin=CELL_MARGIN
    )
    check_resources(est, max_bytes, f" ({method}, {n_atoms} atoms, accuracy {eps:g})")
    dtype = system.positions.dtype
    shifts = cellmod.image_shifts(cell, pbc, r_cut * (1 + CELL_MARGIN))
    common = dict(
        shifts=jnp.asarray(shifts, dtype=dtype),
        n_atoms=n_atoms,
        accuracy=eps,
        alpha=float(alpha),
        r_cut=float(r_cut),
        s=float(s),
    )
    if method == "ewald":
        kv = _half_kvectors(cell, k_cut * (1 + CELL_MARGIN))
        return ElectrostaticsParams(
            kvecs=jnp.asarray(kv, dtype=dtype),
            bsp_moduli=(),
            method="ewald",
            kbox=_kbox(kv),
            **common,
        )
    grid = extra["grid"]
    return ElectrostaticsParams(
        kvecs=empty,
        bsp_moduli=_pme_moduli(grid, order, dtype),
        method="pme",
        grid=tuple(int(g) for g in grid),
        order=int(order),
        **common,
    )
