"""Charge equilibration (Qeq) in the 4G-HDNNP / CELLI form.

The charges minimise

    E(q) = Σ_i χ_i q_i + ½ Σ_i J_i q_i² + E_elec(q; σ)     subject to  Σ_i q_i = Q,

where ``E_elec`` is the electrostatic energy of Gaussian (or point) charges computed by
:mod:`celli_scale.electrostatics` (direct, Ewald or PME, the same code in every solver).
With ``A = diag(J) + ∂²E_elec/∂q²`` (symmetric, positive definite for a physical model)
the minimum solves the bordered system

    [A  m] [q]   [-χ]
    [mᵀ 0] [λ] = [ Q ],     m = 1 (or the mask of real atoms in padded arrays).

Two solvers, the same answer to the solver tolerance:

* ``"dense"``: ``A`` assembled as ``jax.jacfwd`` of the electrostatic potential w.r.t. the
  charges plus ``diag(J)``; bordered ``jnp.linalg.solve``. O(N³), for small systems;
  differentiable by ordinary autodiff.
* ``"cg"``: matrix-free projected, Jacobi-preconditioned conjugate gradients on the
  constraint surface (one potential evaluation per iteration, ``lax.while_loop``),
  warm-startable. Wrapped in ``jax.lax.custom_linear_solve``: derivatives (w.r.t. χ, J,
  σ, positions, cell, Q) come from implicit differentiation, i.e. one more linear solve,
  never from back-propagating through the iterations, so memory does not grow with the
  iteration count.

Optional extensions (no extra work when absent):

* ``phi_ext``: an external potential per atom (V = eV/e; an applied field's ``−E·r`` or
  the potential of fixed external charges), added to χ: ``E(q) = Σ (χ_i + φ_i) q_i + ...``.
* ``groups`` / ``group_charges``: per-group total charges (charge-constrained fragments,
  as in openmm's mlipops): ``Σ_{i∈g} q_i = Q_g`` for every group ``g``, one Lagrange
  multiplier per group. The bordered system gets ``G`` constraint rows ``C`` (``C_ig = 1``
  for ``i ∈ g``), CG projects out each group's (Jacobi-weighted) mean, and
  ``chemical_potential`` becomes the ``(G,)`` vector of the groups' μ_g.

Inside ``jit`` nothing raises: :class:`QeqResult` carries ``residual``, ``converged`` and
``indefinite``; :func:`check` (called by :func:`solve` on concrete results) turns them
into :class:`QeqConvergenceError` / ``ValueError`` on the host.

Units: χ in eV/e (V), J in eV/e², σ in Å, charges in e, energy in eV.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from celli_scale import electrostatics as el
from celli_scale.neighbors import NeighborList
from celli_scale.qeq_inputs import METHODS, check_groups, check_inputs, check_per_atom, is_concrete
from celli_scale.system import System
from celli_scale.units import COULOMB

__all__ = [
    "DENSE_MAX_ATOMS",
    "QeqConvergenceError",
    "check_residual",
    "QeqResult",
    "check",
    "solve",
    "solve_arrays",
]

#: ``method="auto"`` uses the dense solver up to this many atoms, CG above. Assembling A
#: costs N potential evaluations against CG's ~10–40 iterations, so CG wins early:
#: measured (bench/bench_qeq.py, Ewald, 2-core CPU) dense ≈ CG at 8 atoms, CG 2× faster
#: at 64 and 30× at 216.
DENSE_MAX_ATOMS = 64
_METHODS = METHODS


class QeqConvergenceError(RuntimeError):
    """A Qeq solve missed its tolerance (or hit ``maxiter``)."""


@struct.dataclass
class QeqResult:
    """Result of a charge-equilibration solve (a pytree; every field is an array).

    Attributes:
      charges: ``(N,)`` equilibrated charges in e (0 on padded atoms). Differentiable.
      energy: ``()`` the Qeq functional ``E(q*)`` at the solution in eV (χ, hardness and
        electrostatic terms together). Differentiable.
      chemical_potential: ``()`` the equalised electronegativity ``μ = ∂E/∂q_i`` (eV/e),
        the same on every real atom at the solution; ``dE*/dQ = μ``. Differentiable.
        With groups: ``(G,)``, μ_g shared by the atoms of group ``g``, ``dE*/dQ_g = μ_g``.
      iterations: ``()`` int32 CG iterations (0 for the dense solver).
      residual: ``()`` relative residual ``‖P(b − A q)‖ / ‖P(b − A q_c)‖`` with ``b = −χ``,
        ``P`` the projector onto ``Σq = 0`` and ``q_c = Q m/Σm`` the uniform start
        (with ``phi_ext``: ``b = −(χ + φ)``; with groups, ``P`` and ``q_c`` act group by
        group).
      converged: ``()`` bool, residual within the tolerance (or at round-off level) and
        the matrix positive definite on the constraint surface.
      indefinite: ``()`` bool, ``A`` was found not positive definite on the constraint
        surface (dense: Cholesky failure; CG: a direction with ``pᵀAp ≤ 0``).
    """

    charges: jax.Array
    energy: jax.Array
    chemical_potential: jax.Array
    iterations: jax.Array
    residual: jax.Array
    converged: jax.Array
    indefinite: jax.Array


# ---------------------------------------------------------------------------------------
# host-side checks
# ---------------------------------------------------------------------------------------
def check(result: QeqResult, tol: float | None = None) -> None:
    """Host-side check of a (concrete) :class:`QeqResult`; works for batched results too.

    Args:
      result: from :func:`solve_arrays` (possibly vmapped).
      tol: if given, additionally require ``residual <= tol``.

    Raises:
      ValueError: the Qeq matrix is not positive definite on the constraint surface
        (unphysical hardness, e.g. ``J ≤ 0`` with point charges, or point charges so close
        that the Coulomb coupling beats the hardness: the "polarisation catastrophe").
      QeqConvergenceError: the solve missed its tolerance; the message names the
        iteration count and the residual.
    """
    indef = np.asarray(result.indefinite)
    conv = np.asarray(result.converged)
    res = np.asarray(result.residual, dtype=float)
    it = np.asarray(result.iterations)
    if np.any(indef):
        raise ValueError(
            "Qeq matrix A = diag(hardness) + d²E_elec/dq² is not positive definite on the "
            "charge-conservation surface: the charge equilibration has no minimum. Increase "
            "the hardness, use Gaussian charges (sigma), or check for atoms too close together"
            + (f" (systems {np.flatnonzero(indef.reshape(-1)).tolist()})" if indef.ndim else "")
        )
    bad = ~conv
    if tol is not None:
        bad = bad | ~(res <= tol)
    if np.any(bad):
        worst = np.where(bad.reshape(-1), np.nan_to_num(res.reshape(-1), nan=np.inf), -1.0)
        k = int(np.argmax(worst))
        raise QeqConvergenceError(
            f"Qeq solve did not converge: relative residual {res.reshape(-1)[k]:.3e} after "
            f"{int(it.reshape(-1)[k])} iterations"
            + (f" (tolerance {tol:g})" if tol is not None else "")
            + "; raise maxiter, loosen tol, or use method='dense' for small systems"
        )


_check_result = check


#: A model's Qeq residual may exceed its tolerance by this factor before the host check
#: raises: CG stops at ``tol`` on the residual it tracks, and the recomputed residual of
#: the returned charges differs from it by round-off.
RESIDUAL_SLACK = 10.0


def check_residual(residual: Any, tol: float, *, where: str = "") -> None:
    """Host-side check of the Qeq residual a model reports (``ModelOutput.qeq_residual``,
    any shape): the one place that turns a missed tolerance into an error.

    Raises:
      QeqConvergenceError: the largest residual is not finite or exceeds
        ``RESIDUAL_SLACK × tol``; the message gives both numbers.
    """
    res = float(np.max(np.asarray(residual, dtype=float)))
    if not np.isfinite(res) or res > RESIDUAL_SLACK * tol:
        raise QeqConvergenceError(
            f"charge equilibration did not converge{where}: relative residual {res:.3g} > "
            f"{RESIDUAL_SLACK:g} x tolerance {tol:.3g} (raise the Qeq maxiter, loosen "
            "qeq_tol, or check the structure for atoms too close together)"
        )


# ---------------------------------------------------------------------------------------
# public entry points
# ---------------------------------------------------------------------------------------
def solve(
    system: System,
    chi: Any,
    hardness: Any,
    sigma: Any = None,
    method: str = "auto",
    tol: float = 1e-10,
    accuracy: float = 1e-6,
    *,
    electrostatics: str = "auto",
    params: Any = None,
    neighbors: NeighborList | None = None,
    q0: Any = None,
    maxiter: int | None = None,
    check: bool = True,
    phi_ext: Any = None,
    groups: Any = None,
    group_charges: Any = None,
) -> QeqResult:
    """Equilibrate the charges of ``system``.

    Args:
      system: the structure (positions may be traced; then pass ``params`` if the
        electrostatics preparation needs concrete values). Its ``total_charge`` is ``Q``.
      chi: ``(N,)`` electronegativities χ_i in eV/e.
      hardness: ``(N,)`` hardness J_i in eV/e² (per atom; map per-species values first).
      sigma: ``(N,)`` Gaussian charge widths in Å, or ``None`` for point charges.
      method: ``"dense"``, ``"cg"`` or ``"auto"`` (dense up to :data:`DENSE_MAX_ATOMS`).
      tol: relative residual tolerance (see :class:`QeqResult`).
      accuracy: electrostatics accuracy target (passed to ``electrostatics.prepare``).
      electrostatics: electrostatics method (``"auto"``, ``"direct"``, ``"ewald"``,
        ``"pme"``); ignored when ``params`` is given.
      params: prepared ``ElectrostaticsParams`` (skips the preparation).
      neighbors: real-space neighbor list for those params (built when ``None`` and the
        positions are concrete; with traced positions the exact dense in-jit path is used).
      q0: ``(N,)`` warm-start charges for CG (e.g. the previous MD step's).
      maxiter: CG iteration cap (default ``max(100, 2N)``).
      check: raise on a non-converged or indefinite solve (only possible when the result
        is concrete; inside ``jit``/``grad`` inspect ``residual``/``converged`` instead).
      phi_ext: ``(N,)`` external potential at each atom in V (eV/e), added to χ in the
        energy (a uniform field ``E`` gives ``phi_ext = −positions @ E``; in a periodic
        cell that potential is not periodic and depends on which images the positions
        are). ``energy`` then includes ``Σ φ_i q_i``.
      groups: per-group charge constraints: an ``(N,)`` int array of group ids
        ``0..G-1``, or a sequence of ``G`` atom-index lists covering every atom exactly
        once. Requires ``group_charges``.
      group_charges: ``(G,)`` total charge of each group in e. ``system.total_charge``
        must equal their sum.

    Returns:
      :class:`QeqResult`; ``charges``, ``energy`` and ``chemical_potential`` are
      differentiable w.r.t. chi, hardness, sigma, positions, cell, total charge, phi_ext
      and group_charges. With groups, ``chemical_potential`` is ``(G,)`` (one per group).

    Raises:
      ValueError: bad shapes, non-finite inputs, ``sigma <= 0`` (naming the atom),
        a non-positive-definite Qeq matrix.
      QeqConvergenceError: the solve missed ``tol`` (with ``check=True``).

    Example:
      >>> s = cs.System([[0, 0, 0], [0, 0, 2.0]], [11, 17])
      >>> r = cs.qeq.solve(s, chi=[-1.0, 1.0], hardness=[10.0, 10.0])
      >>> float(r.charges.sum())  # doctest: +SKIP
      0.0
    """
    n = system.n_atoms
    check_inputs(n, chi, hardness, sigma, q0, tol, method)
    if phi_ext is not None:
        check_per_atom("phi_ext", phi_ext, n, "V")
    if groups is not None or group_charges is not None:
        groups, group_charges = check_groups(n, groups, group_charges, system.total_charge)
    if method == "auto":
        method = "dense" if n <= DENSE_MAX_ATOMS else "cg"
    if params is None:
        params = el.prepare(system, method=electrostatics, accuracy=accuracy, sigma=sigma)
    if neighbors is None and is_concrete(system.positions) and is_concrete(system.cell):
        neighbors = el.real_space_neighbors(system, params)
    result = _solve_arrays_jit(
        system.positions,
        system.cell if system.periodic else None,
        chi,
        hardness,
        sigma,
        system.total_charge,
        params,
        neighbors,
        None,
        method=method,
        tol=tol,
        maxiter=maxiter,
        q0=q0,
        phi_ext=phi_ext,
        groups=groups,
        group_charges=group_charges,
    )
    if check and is_concrete(result.converged):
        _check_result(result)
    return result


def solve_arrays(
    positions: jax.Array,
    cell: jax.Array | None,
    chi: jax.Array,
    hardness: jax.Array,
    sigma: jax.Array | None,
    total_charge: jax.Array,
    params: Any,
    neighbors: NeighborList | None = None,
    mask: jax.Array | None = None,
    *,
    method: str = "cg",
    tol: float = 1e-10,
    maxiter: int | None = None,
    q0: jax.Array | None = None,
    phi_ext: jax.Array | None = None,
    groups: jax.Array | None = None,
    group_charges: jax.Array | None = None,
) -> QeqResult:
    """Pure, jit-able Qeq on arrays (no host checks; see :func:`check`).

    Args:
      positions: ``(N, 3)`` Å. cell: ``(3, 3)`` Å rows or ``None``.
      chi: ``(N,)`` eV/e. hardness: ``(N,)`` eV/e². sigma: ``(N,)`` Å or ``None``.
      total_charge: ``()`` e. With groups it may be ``None`` (it is then implied by the
        group charges; when given and concrete it must equal their sum).
      params, neighbors: from ``electrostatics.prepare`` / ``real_space_neighbors``.
      mask: ``(N,)`` bool, True for real atoms; padded atoms get charge 0, are excluded
        from the constraint and change nothing.
      method: ``"cg"``, ``"dense"`` or ``"auto"`` (static).
      tol: relative residual tolerance (static). maxiter: CG cap (static).
      q0: ``(N,)`` CG warm start (not differentiated).
      phi_ext: ``(N,)`` external potential in V, added to χ (``None``: none).
      groups: ``(N,)`` int group ids ``0..G-1`` (padded atoms: any id in range).
      group_charges: ``(G,)`` e; ``G`` is taken from its (static) shape. With groups,
        ``Σ_{i∈g} q_i = Q_g`` replaces ``Σ q_i = Q``; a group with no real atoms (all
        padded) is dropped from the constraints (its charge should be 0).

    Returns:
      :class:`QeqResult`. Differentiable w.r.t. positions, cell, chi, hardness, sigma,
      total_charge, phi_ext, group_charges (CG: implicit differentiation; dense: autodiff
      of the direct solve). With groups, ``chemical_potential`` is ``(G,)``.
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    n = positions.shape[0]
    ng = None
    if groups is not None or group_charges is not None:
        groups, group_charges = check_groups(n, groups, group_charges, total_charge)
        ng = int(jnp.shape(group_charges)[0])
    elif total_charge is None:
        raise ValueError("total_charge may be None only when groups are given")
    if method == "auto":
        method = "dense" if n <= DENSE_MAX_ATOMS else "cg"
    dt = positions.dtype
    m = jnp.ones((n,), dt) if mask is None else jnp.asarray(mask).astype(dt)
    real = m > 0
    chi = jnp.where(real, jnp.asarray(chi, dt), 0.0)
    if phi_ext is not None:  # E = Σ (χ + φ) q + ½ qᵀAq: φ acts as a shift of χ
        chi = chi + jnp.where(real, jnp.asarray(phi_ext, dt), 0.0)
    hard = jnp.where(real, jnp.asarray(hardness, dt), 1.0)
    if sigma is not None:
        sigma = jnp.where(real, jnp.asarray(sigma, dt), 1.0)
    if groups is None:
        cons = jnp.asarray(total_charge, dt)  # the constraint values: Q, or Q_g per group
    else:
        groups = jnp.asarray(groups, jnp.int32)
        cons = jnp.asarray(group_charges, dt)
    el_mask = None if mask is None else real

    # the kernel, stencil and influence function once for every product of the solve
    phi_of = el.potential_operator(positions, cell, sigma, params, neighbors, el_mask)

    def apply_a(q):
        return jnp.where(real, hard * q + phi_of(q), q)

    b = -chi
    if method == "dense":
        q, lam, indefinite, ref = _dense(apply_a, b, cons, m, groups, ng)
        iterations = jnp.asarray(0, jnp.int32)
    else:
        self_diag = 0.0 if sigma is None else COULOMB / (sigma * jnp.sqrt(jnp.pi))
        d = jnp.where(real, hard + self_diag, 1.0)
        d = jax.lax.stop_gradient(jnp.where(d > 0, d, 1.0))
        q, lam, iterations, indefinite, ref = _cg(
            apply_a,
            b,
            cons,
            m,
            d,
            groups,
            ng,
            q0=q0,
            tol=float(tol),
            maxiter=max(100, 2 * n) if maxiter is None else int(maxiter),
        )
    aq = apply_a(q)
    energy = jnp.dot(chi, q) + 0.5 * jnp.dot(q, aq)
    # residual of the stationarity condition on the constraint surface
    mm = _cdot(m, m, groups, ng)
    r = jax.lax.stop_gradient(b - aq)
    pr = _project(r, m, mm, groups, ng)
    num = jnp.linalg.norm(pr)
    floor = _roundoff(b, jax.lax.stop_gradient(aq))
    ref = jax.lax.stop_gradient(ref)
    residual = jnp.where(
        ref > 0, num / jnp.where(ref > 0, ref, 1.0), jnp.where(num <= floor, 0.0, jnp.inf)
    )
    converged = (num <= jnp.maximum(tol * ref, floor)) & ~indefinite & jnp.all(jnp.isfinite(q))
    return QeqResult(
        charges=q,
        energy=energy,
        chemical_potential=-lam,
        iterations=iterations,
        residual=residual,
        converged=converged,
        indefinite=indefinite,
    )


_solve_arrays_jit = jax.jit(solve_arrays, static_argnames=("method", "tol", "maxiter"))


def _roundoff(b, aq):
    """Residual norm attainable in floating point (a small multiple of eps·scale)."""
    eps = jnp.finfo(b.dtype).eps
    return 1e3 * eps * (jnp.linalg.norm(b) + jnp.linalg.norm(aq))


# ---------------------------------------------------------------------------------------
# dense solver
# ---------------------------------------------------------------------------------------
def _cdot(v, m, groups, ng):
    """``Cᵀ v``: the constraint values of ``v`` (a scalar without groups, ``(G,)`` with)."""
    if groups is None:
        return jnp.dot(m, v)
    return jax.ops.segment_sum(m * v, groups, num_segments=ng)


def _pick(lam, groups):
    """Each atom's entry of a per-constraint vector (``C λ = m * _pick(λ)``)."""
    return lam if groups is None else lam[groups]


def _safe(mm, groups):
    """``Cᵀm`` with empty (all-padded) groups set to 1 (their multipliers are then 0)."""
    return mm if groups is None else jnp.where(mm > 0, mm, 1.0)


def _dense(apply_a, b, c, m, groups=None, ng=None):
    if groups is not None:
        return _dense_groups(apply_a, b, c, m, groups, ng)
    n = b.shape[0]
    a = jax.jacfwd(apply_a)(jnp.zeros_like(b))
    a = 0.5 * (a + a.T)
    kkt = jnp.block([[a, m[:, None]], [m[None, :], jnp.zeros((1, 1), b.dtype)]])
    sol = jnp.linalg.solve(kkt, jnp.concatenate([b, c[None]]))
    q, lam = sol[:n], sol[n]
    # Definiteness on the constraint surface: P A P + s m̂m̂ᵀ is SPD iff A is SPD on m⊥.
    a_s = jax.lax.stop_gradient(a)
    mm = jnp.dot(m, m)
    proj = jnp.eye(n, dtype=b.dtype) - jnp.outer(m, m) / mm
    s = jnp.maximum(jnp.abs(jnp.trace(a_s)) / n, 1.0)
    chol = jnp.linalg.cholesky(proj @ a_s @ proj + s * jnp.outer(m, m) / mm)
    indefinite = ~jnp.all(jnp.isfinite(chol))
    ref = jnp.linalg.norm(_project(b - (c / mm) * (a_s @ m), m, mm))
    return q, lam, indefinite, ref


def _dense_groups(apply_a, b, c, m, groups, ng):
    """Bordered solve with one constraint row per group: ``[A C; Cᵀ 0]``."""
    n = b.shape[0]
    dt = b.dtype
    a = jax.jacfwd(apply_a)(jnp.zeros_like(b))
    a = 0.5 * (a + a.T)
    cmat = m[:, None] * jax.nn.one_hot(groups, ng, dtype=dt)  # (N, G)
    mm = jnp.sum(cmat * cmat, axis=0)
    empty = mm == 0  # all-padded group: λ_g pinned to 0 instead of a singular row
    kkt = jnp.block([[a, cmat], [cmat.T, jnp.diag(empty.astype(dt))]])
    sol = jnp.linalg.solve(kkt, jnp.concatenate([b, jnp.where(empty, 0.0, c)]))
    q, lam = sol[:n], sol[n:]
    a_s = jax.lax.stop_gradient(a)
    mms = _safe(mm, groups)
    u = cmat / jnp.sqrt(mms)  # orthonormal columns (groups are disjoint)
    proj = jnp.eye(n, dtype=dt) - u @ u.T
    s = jnp.maximum(jnp.abs(jnp.trace(a_s)) / n, 1.0)
    chol = jnp.linalg.cholesky(proj @ a_s @ proj + s * (u @ u.T))
    indefinite = ~jnp.all(jnp.isfinite(chol))
    q_c = m * _pick(c / mms, groups)
    ref = jnp.linalg.norm(_project(b - a_s @ q_c, m, mm, groups, ng))
    return q, lam, indefinite, ref


def _project(r, m, mm, groups=None, ng=None):
    """Remove ``r``'s component along the constraint columns (``P r``)."""
    return r - m * _pick(_cdot(r, m, groups, ng) / _safe(mm, groups), groups)


# ---------------------------------------------------------------------------------------
# CG solver with implicit differentiation
# ---------------------------------------------------------------------------------------
def _cg(apply_a, b, c, m, d, groups=None, ng=None, *, q0, tol, maxiter):
    n = b.shape[0]

    def lam_of(y):  # the multiplier(s): a scalar without groups, (G,) with
        return y[n] if groups is None else y[n:]

    # The bordered operator acts on one flat vector y = (q, λ): custom_linear_solve's
    # transpose rule needs every leaf of the right-hand side to carry a tangent.
    def bordered(y):
        v, lam = y[:n], lam_of(y)
        cv = jnp.atleast_1d(_cdot(v, m, groups, ng))
        return jnp.concatenate([apply_a(v) + m * _pick(lam, groups), cv])

    warm = None if q0 is None else jax.lax.stop_gradient(jnp.asarray(q0, b.dtype) * m)
    solver = partial(
        _pcg,
        m=jax.lax.stop_gradient(m),
        dinv=1.0 / d,
        warm=warm,
        tol=tol,
        maxiter=maxiter,
        groups=groups,
        ng=ng,
    )
    y, (iterations, indefinite, ref) = jax.lax.custom_linear_solve(
        bordered, jnp.concatenate([b, jnp.atleast_1d(c)]), solver, symmetric=True, has_aux=True
    )
    return y[:n], lam_of(y), iterations, indefinite, ref


def _pcg(matvec, rhs, *, m, dinv, warm, tol, maxiter, groups=None, ng=None):
    """Projected preconditioned CG for ``A x + m λ = b, mᵀx = c`` (A SPD on m⊥).

    With ``groups`` the constraint is ``Cᵀx = c`` with one column per group
    (``C_ig = m_i [g_i = g]``), ``λ`` and ``c`` are ``(G,)``, and every projection below
    acts group by group (the groups are disjoint, so ``CᵀC`` and ``CᵀD⁻¹C`` are diagonal).

    Works for any right-hand side (custom_linear_solve reuses it for tangent and
    adjoint solves). Starts at the uniform feasible point ``x_c = c m/mᵀm``; a warm start
    enters as one exact line search along ``P q0`` (never worse than the cold start, and
    scale-free, so tangent solves are not harmed). ``rhs`` is the flat ``(b, c)``; returns
    the flat ``(x, λ)`` and the aux ``(iterations, indefinite, ‖P r_c‖)``, where
    ``r_c = b − A x_c`` is the residual of the cold start (the reference of ``tol``).
    The Jacobi preconditioner ``dinv`` is a constant here: its derivatives are not needed
    (custom_linear_solve differentiates the matvec, never the solver).
    """
    nc = 1 if groups is None else ng
    n = rhs.shape[0] - nc
    b, c = rhs[:n], (rhs[n] if groups is None else rhs[n:])
    dt = b.dtype
    zero = jnp.zeros((nc,), dt)

    def a(x):
        return matvec(jnp.concatenate([x, zero]))[:n]

    mm = _safe(_cdot(m, m, groups, ng), groups)
    mdm = _safe(_cdot(dinv * m, m, groups, ng), groups)

    def cdot(v):
        return _cdot(v, m, groups, ng)

    def proj(r):
        return r - m * _pick(cdot(r) / mm, groups)

    def precond(r):  # D⁻¹ projected onto m⊥ (symmetric, PSD)
        z = dinv * r
        return z - dinv * m * _pick(cdot(z) / mdm, groups)

    x = m * _pick(c / mm, groups)
    ax = a(x)
    r = b - ax
    ref = jnp.linalg.norm(proj(r))
    thresh = jnp.maximum(tol * ref, 0.1 * _roundoff(b, ax))
    indefinite = jnp.asarray(False)
    if warm is not None:
        dvec = proj(warm)
        ad = a(dvec)
        dad = jnp.dot(dvec, ad)
        ok = dad > 0
        indefinite = (dad < 0) | (~ok & (jnp.dot(dvec, dvec) > 0))
        gamma = jnp.where(ok, jnp.dot(dvec, r) / jnp.where(ok, dad, 1.0), 0.0)
        x = x + gamma * dvec
        r = r - gamma * ad
    # r carries the large Lagrange component λm; strip it before any inner product
    # (otherwise round-off of λ² swamps rᵀz near convergence).
    rp = proj(r)
    z = precond(rp)
    p = z
    rz = jnp.dot(rp, z)
    rnorm = jnp.linalg.norm(rp)

    def cond(state):
        k, _, _, _, _, rn, indef = state
        return (k < maxiter) & (rn > thresh) & ~indef

    def body(state):
        k, x, r, p, rz, _, _ = state
        ap = a(p)
        pap = jnp.dot(p, ap)
        indef = ~(pap > 0)
        alpha = jnp.where(indef, 0.0, rz / jnp.where(indef, 1.0, pap))
        x = x + alpha * p
        r = r - alpha * ap
        rp = proj(r)
        z = precond(rp)
        rz_new = jnp.dot(rp, z)
        beta = rz_new / jnp.where(rz > 0, rz, 1.0)
        p = z + beta * p
        return k + 1, x, r, p, rz_new, jnp.linalg.norm(rp), indef

    state = (jnp.asarray(0, jnp.int32), x, r, p, rz, rnorm, indefinite)
    k, x, r, _, _, _, indefinite = jax.lax.while_loop(cond, body, state)
    lam = cdot(r) / mm
    return jnp.concatenate([x, jnp.atleast_1d(lam.astype(dt))]), (k, indefinite, ref)
