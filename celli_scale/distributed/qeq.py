"""Charge equilibration solved across devices: the distributed Qeq.

Every shard of a :class:`celli_scale.distributed.domains.Decomposition` holds its owned
atoms' charges; the whole system's Qeq (:mod:`celli_scale.qeq`: minimise
``Σ (χ_i + φ^ext_i) q_i + ½ Σ J_i q_i² + E_elec(q; σ)`` subject to the total charge, or
one total per group of atoms) is solved by the same Jacobi-preconditioned, projected
conjugate gradients, with the work of each product split by domain:

* real space (Ewald/PME): a per-shard list of (owned atom, buffer atom) pairs within the
  real-space cut-off (:func:`domains.owned_pairs`); ghost values arrive by the halo
  exchange (:func:`halo.forward`, no shift: charges are not positions);
* Ewald reciprocal: local structure factors ``S_local(k) = Σ_owned q_j exp(i k·r_j)``,
  all-reduced, then the potential at the owned atoms;
* PME reciprocal: each shard spreads its owned charges onto the global grid (B-splines),
  the grid is all-reduced and every shard runs the (replicated) FFT convolution and
  interpolates at its owned atoms (``M`` numbers per all-reduce; a slab-decomposed FFT
  would reduce-scatter instead, worth it only when ``M log M`` dominates);
* open systems (direct sum): owned values are all-gathered (``N`` numbers).

**Collectives per CG iteration** (counted from the lowered program in the tests):
the halo exchange of the preconditioned residual (one ``ppermute`` per stage), **one
all-reduce** carrying ``S(k)`` (``2K`` numbers) or the PME grid (``M``) fused with the
constraint sums ``Cᵀz̃, Cᵀr`` (``2G``), and **one all-reduce** of the three dot products.
This is the Chronopoulos–Gear form of preconditioned CG (one fused reduction of
``rᵀz`` and ``wᵀz``, ``w = A z``, with ``s = A p`` kept by recurrence), with the
projection onto the constraint surface made reduction-free: the preconditioned
direction is ``z = z̃ − D⁻¹C ν`` with ``z̃ = D⁻¹ r`` and ``ν = (CᵀD⁻¹C)⁻¹ Cᵀz̃``, so
``A z = A z̃ − (A D⁻¹C) ν`` with the ``G`` columns ``A D⁻¹C`` computed once per solve, and
``Cᵀz̃`` rides in the matvec's all-reduce. The iterations keep the residual and
``s = A p`` projected onto the constraint surface (``Cᵀw`` rides in the second all-reduce),
so the growing multiplier component never enters ``z̃``, and ``pᵀAp`` is expanded from
fresh dot products (``zᵀAz + β (zᵀs + p_oldᵀw) + β² p_oldᵀs``) instead of the
Chronopoulos–Gear recursion, which drifts to ≤ 0 near float32's precision floor. LAMMPS'
``fix qeq/reaxff`` needs two all-reduces per iteration with no Ewald term at all; this
needs two with it.

Derivatives are not taken through the iterations (nor through any collective): the
adjoint solve ``[A C; Cᵀ 0] [μ; ν] = [∂L/∂q; 0]`` runs on the same distributed CG, and
position derivatives of bilinear forms ``uᵀ A_el(x) v`` come from local functions of
each shard's positions with the all-reduced sums held fixed (:func:`bilinear_grads`), so
``∂L/∂χ = −μ`` and ``∂L/∂x = −∂(μᵀ A_el q)/∂x`` (``L`` any function of the charges).
The reciprocal part of the strain derivative is taken at fixed fractional coordinates,
where ``S(k)`` and the PME grid do not change: only the influence function and the
volume do, evaluated once from the all-reduced data.

The functions named ``shard_*`` run inside ``jax.shard_map`` over a mesh with the axes
:data:`celli_scale.distributed.halo.MESH_AXES`; :func:`solve` is the host entry point
(used by the tests and the benchmarks); :class:`ShardedPotential` uses the pieces for CELLI.

Units: χ and φ in V (eV/e), J in eV/e², σ and positions in Å, charges in e.
Written by hand: no library solves a charge equilibration over a domain decomposition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from celli_scale import electrostatics as el
from celli_scale import qeq as qeq_mod
from celli_scale.distributed import domains, halo
from celli_scale.distributed.multihost import to_host
from celli_scale.electrostatics import direct, ewald, pme
from celli_scale.electrostatics.limits import memory_limit
from celli_scale.qeq_inputs import check_groups, check_per_atom
from celli_scale.system import System
from celli_scale.units import COULOMB

AXES = halo.MESH_AXES
_SQRT_PI = math.sqrt(math.pi)


# ---------------------------------------------------------------------------------------
# static layout and per-shard geometry
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """Static shape information of a distributed solve (part of the compiled program).

    Attributes:
      method: ``"ewald"``, ``"pme"`` or ``"direct"``.
      n_own: owned slots per shard. n_buffer: buffer entries (owned + ghosts).
      specs: the halo exchange stages (:func:`halo.stage_specs`).
      n_groups: constraint groups ``G`` (1: the total charge).
      n_shards: shards in the mesh.
      alpha, r_cut: Ewald splitting (1/Å) and real-space cut-off (Å).
      grid, order: PME grid and B-spline order.
      gaussian: Gaussian charges (widths σ) or point charges.
    """

    method: str
    n_own: int
    n_buffer: int
    specs: tuple
    n_groups: int
    n_shards: int
    alpha: float = 0.0
    r_cut: float = 0.0
    grid: tuple = ()
    order: int = 0
    gaussian: bool = True
    n_k: int = 0

    @property
    def periodic(self) -> bool:
        return self.method in ("ewald", "pme")


@struct.dataclass
class ShardGeometry:
    """What one shard precomputes per geometry (positions fixed during a solve).

    ``kern``: real-space kernel of each (owned, buffer) pair, COULOMB × 1/Å, zero on
    padding and beyond the cut-off; ``diag``: the self coefficient ``φ_i ∋ diag_i q_i``;
    ``bg``: the neutralising-background coefficient (``φ_i ∋ bg Σ q``). Ewald: ``cos``,
    ``sin`` ``(C, K)`` and ``gk`` ``(K,)`` (with ``2 COULOMB / V``). PME: stencil ``flat``,
    ``wt`` ``(C, p³)`` and the influence function ``infl``. Direct: ``kmat`` ``(C, N)``
    over the all-gathered atoms and their ``all_mask``, ``all_gid``.
    """

    own_mask: jax.Array
    gid: jax.Array
    centers: jax.Array
    others: jax.Array
    kern: jax.Array
    diag: jax.Array
    bg: jax.Array
    gauss: jax.Array
    cos: Any = None
    sin: Any = None
    gk: Any = None
    flat: Any = None
    wt: Any = None
    infl: Any = None
    kmat: Any = None
    all_mask: Any = None
    all_gid: Any = None


def _kernel(r, layout: Layout, s_i, s_j):
    """Pair kernel (COULOMB × 1/Å): the single-device real-space Ewald or open-boundary
    kernel (:func:`ewald.pair_kernel`, :func:`direct.pair_kernel`)."""
    if not layout.gaussian:
        s_i = s_j = None
    if layout.periodic:
        return COULOMB * ewald.pair_kernel(r, layout.alpha, s_i, s_j)
    return COULOMB * direct.pair_kernel(r, s_i, s_j)


def _real_pairs(layout, x_buf, sigma_buf, centers, others, pmask, own_mask):
    """Kernel of the (owned, buffer) pairs within the cut-off (zero elsewhere)."""
    vec = x_buf[others] - x_buf[centers]
    r2 = jnp.sum(vec * vec, axis=-1)
    pm = pmask & (r2 < layout.r_cut**2) & own_mask[centers]
    r = jnp.sqrt(jnp.where(pm, r2, 1.0))
    return jnp.where(pm, _kernel(r, layout, sigma_buf[centers], sigma_buf[others]), 0.0)


def _kvectors(cell, kvecs, alpha):
    """``k`` (K, 3) and ``gk = 2 COULOMB/V · 4π/k² exp(−k²/4α²)`` (K,)."""
    k, g = ewald.kspace(cell, kvecs, alpha)
    return k, 2.0 * COULOMB / jnp.abs(jnp.linalg.det(cell)) * g


def _background(cell, alpha):
    """``bg``: ``φ_i ∋ bg Σ_j q_j`` from the neutralising background (V/e)."""
    return -COULOMB * jnp.pi / (jnp.abs(jnp.linalg.det(cell)) * alpha**2)


def _direct_matrix(layout, own_x, sigma_own, own_mask, all_x, all_sigma, all_mask):
    """Open boundaries: ``(C, N)`` kernel between owned atoms and all gathered atoms."""
    me = jax.lax.axis_index(AXES) * layout.n_own + jnp.arange(layout.n_own)
    vec = all_x[None, :, :] - own_x[:, None, :]
    r2 = jnp.sum(vec * vec, axis=-1)
    valid = own_mask[:, None] & all_mask[None, :] & (me[:, None] != jnp.arange(all_x.shape[0]))
    r = jnp.sqrt(jnp.where(valid, r2, 1.0))
    k = _kernel(r, layout, sigma_own[:, None], all_sigma[None, :])
    return jnp.where(valid, k, 0.0)


def shard_setup(layout, params, cell, x_buf, sigma_buf, own_mask, gid, pairs) -> ShardGeometry:
    """Per-shard geometry for a solve (inside ``shard_map``).

    ``x_buf``: buffer positions (owned first, ghosts at their image positions),
    ``sigma_buf``: Gaussian widths of the buffer entries (ignored for point charges),
    ``pairs``: ``(centers, others, mask)`` of :class:`domains.OwnedPairs` (periodic)."""
    c = layout.n_own
    dt = x_buf.dtype
    own_x = x_buf[:c]
    sigma_own = sigma_buf[:c]
    gauss = (1.0 / (sigma_own * _SQRT_PI)) if layout.gaussian else jnp.zeros((c,), dt)
    centers, others, pmask = pairs
    if not layout.periodic:
        all_x = jax.lax.all_gather(own_x, AXES, tiled=True)
        all_sigma = jax.lax.all_gather(sigma_own, AXES, tiled=True)
        all_mask = jax.lax.all_gather(own_mask, AXES, tiled=True)
        all_gid = jax.lax.all_gather(gid, AXES, tiled=True)
        kmat = _direct_matrix(layout, own_x, sigma_own, own_mask, all_x, all_sigma, all_mask)
        return ShardGeometry(
            own_mask=own_mask, gid=gid, centers=centers, others=others,
            kern=jnp.zeros(centers.shape, dt), diag=COULOMB * gauss, bg=jnp.zeros((), dt),
            gauss=COULOMB * gauss,
            kmat=kmat, all_mask=all_mask, all_gid=all_gid,
        )  # fmt: skip
    kern = _real_pairs(layout, x_buf, sigma_buf, centers, others, pmask, own_mask)
    diag = COULOMB * (gauss - 2.0 * layout.alpha / _SQRT_PI)
    geom = dict(
        own_mask=own_mask, gid=gid, centers=centers, others=others, kern=kern, diag=diag,
        bg=_background(cell, layout.alpha), gauss=COULOMB * gauss,
    )  # fmt: skip
    if layout.method == "ewald":
        k, gk = _kvectors(cell, params.kvecs, layout.alpha)
        kr = own_x @ k.T
        geom.update(cos=jnp.cos(kr), sin=jnp.sin(kr), gk=gk)
    else:
        flat, wt = pme.spline_stencil(own_x, cell, layout.grid, layout.order)
        infl = pme.influence(cell, layout.alpha, layout.grid, params.bsp_moduli)
        geom.update(flat=flat, wt=wt, infl=infl)
    return ShardGeometry(**geom)


def _group_sums(vals, mask, gid, n_groups):
    """``Cᵀ vals`` of this shard's atoms: ``(G, X)`` for ``vals`` ``(C, X)``."""
    return jax.ops.segment_sum(jnp.where(mask[:, None], vals, 0.0), gid, num_segments=n_groups)


def _conv(layout, grid_flat, infl):
    g = grid_flat.reshape(layout.grid)
    return jnp.fft.irfftn(jnp.fft.rfftn(g) * infl, s=layout.grid).reshape(-1)


def shard_matvec(layout, geom, send_idx, v, cols=None):
    """``A_el v`` at the owned atoms and ``Cᵀ [v, cols]`` of the whole system ``(G, 1+X)``,
    with one all-reduce (periodic: the reciprocal sums and the constraint sums together)
    or one all-gather (open)."""
    c = layout.n_own
    dt = v.dtype
    mask = geom.own_mask
    vc = v[:, None] if cols is None else jnp.concatenate([v[:, None], cols], axis=1)
    vc = jnp.where(mask[:, None], vc, 0.0)
    width = vc.shape[1]
    if not layout.periodic:
        g = jax.lax.all_gather(vc, AXES, tiled=True)
        sums = _group_sums(g, geom.all_mask, geom.all_gid, layout.n_groups)
        phi = geom.kmat @ g[:, 0] + geom.diag * vc[:, 0]
        return jnp.where(mask, phi, 0.0), sums
    local = _group_sums(vc, mask, geom.gid, layout.n_groups).reshape(-1)
    v_buf = halo.forward(vc[:, 0], layout.n_buffer, layout.specs, send_idx)
    real = jax.ops.segment_sum(geom.kern * v_buf[geom.others], geom.centers, num_segments=c)
    if layout.method == "ewald":
        n_k = geom.gk.shape[0]
        red = jax.lax.psum(jnp.concatenate([vc[:, 0] @ geom.cos, vc[:, 0] @ geom.sin, local]), AXES)
        sc, ss, sums = red[:n_k], red[n_k : 2 * n_k], red[2 * n_k :]
        recip = geom.cos @ (geom.gk * sc) + geom.sin @ (geom.gk * ss)
    else:
        size = int(np.prod(layout.grid))
        spread = (
            jnp.zeros(size, dt).at[geom.flat.reshape(-1)].add((geom.wt * vc[:, :1]).reshape(-1))
        )
        red = jax.lax.psum(jnp.concatenate([spread, local]), AXES)
        grid, sums = red[:size], red[size:]
        recip = COULOMB * jnp.sum(geom.wt * _conv(layout, grid, geom.infl)[geom.flat], axis=1)
    sums = sums.reshape(layout.n_groups, width)
    phi = real + recip + geom.diag * vc[:, 0] + geom.bg * jnp.sum(sums[:, 0])
    return jnp.where(mask, phi, 0.0), sums


# ---------------------------------------------------------------------------------------
# the solver
# ---------------------------------------------------------------------------------------
@struct.dataclass
class ShardSolve:
    """One shard's part of a solve: owned ``x`` and the replicated multipliers ``lam``
    (``(G,)``; the chemical potentials are ``−lam``), iteration count, true residual
    (relative to the cold start's), converged and indefinite flags."""

    x: jax.Array
    lam: jax.Array
    iterations: jax.Array
    residual: jax.Array
    converged: jax.Array
    indefinite: jax.Array


def _psum(x):
    return jax.lax.psum(x, AXES)


def shard_cg(layout, geom, send_idx, hardness, b, c, *, q0=None, tol, maxiter) -> ShardSolve:
    """Solve ``A x + C λ = b, Cᵀx = c`` (``A = diag(J) + A_el``) on the whole system.

    ``b``: owned right-hand side (``−χ − φ^ext`` for the charges, ``∂L/∂q`` for an
    adjoint), ``c``: ``(G,)`` constraint values (replicated), ``q0``: owned warm start
    (entered as one exact line search along its projection, as in :mod:`celli_scale.qeq`).
    """
    mask = geom.own_mask
    m = mask.astype(b.dtype)
    gid = geom.gid
    n_g = layout.n_groups
    dt = b.dtype
    hard = jnp.where(mask, hardness, 1.0)
    d = hard + (
        geom.diag + 2.0 * layout.alpha / _SQRT_PI * COULOMB if layout.periodic else geom.diag
    )
    # Jacobi diagonal as the single-device solver: J + the Gaussian self term
    d = jnp.where(mask & (d > 0), d, 1.0)
    dinv = jnp.where(mask, 1.0 / d, 0.0)
    b = jnp.where(mask, b, 0.0)

    def a_full(v, cols=None):
        phi, sums = shard_matvec(layout, geom, send_idx, v, cols)
        return jnp.where(mask, hard * v + phi, 0.0), sums

    def pick(per_group):
        return m * per_group[gid]

    sums0 = _psum(_group_sums(jnp.stack([m, m * dinv], axis=1), mask, gid, n_g))
    mm = jnp.where(sums0[:, 0] > 0, sums0[:, 0], 1.0)
    mdm = jnp.where(sums0[:, 1] > 0, sums0[:, 1], 1.0)
    # A D⁻¹C, one column per group (G matvecs, once per solve)
    cols = (dinv * m)[:, None] * jax.nn.one_hot(gid, n_g, dtype=dt)
    adc = jax.lax.map(lambda col: a_full(col)[0], cols.T).T  # (C, G)

    def project(r):  # orthogonal projection onto Cᵀr = 0 (one all-reduce)
        return r - pick(_psum(_group_sums(r[:, None], mask, gid, n_g))[:, 0] / mm)

    def norm(v):
        return jnp.sqrt(_psum(jnp.sum(v * v)))

    x = pick(jnp.asarray(c, dt) / mm)
    ax, _ = a_full(x)
    r = b - ax
    ref = norm(project(r))
    floor = 1e3 * jnp.finfo(dt).eps * (norm(b) + norm(ax))
    thresh = jnp.maximum(tol * ref, 0.1 * floor)
    indef0 = jnp.asarray(False)
    if q0 is not None:
        dvec = project(jnp.where(mask, jax.lax.stop_gradient(q0).astype(dt), 0.0))
        ad, _ = a_full(dvec)
        dad, dd, dr = _psum(jnp.stack([dvec @ ad, dvec @ dvec, dvec @ r]))
        ok = dad > 0
        indef0 = (dad < 0) | (~ok & (dd > 0))
        gamma = jnp.where(ok, dr / jnp.where(ok, dad, 1.0), 0.0)
        x = x + gamma * dvec
        r = r - gamma * ad
    # the iterations work on the projected residual (the constraints' multipliers are
    # recovered from the true residual at the end): r = P(b − A x) and s = P A p. Left in,
    # the growing multiplier component C λ of r would cancel in z = z̃ − D⁻¹C ν and
    # A z = A z̃ − (A D⁻¹C) ν, which costs float32 its last digits (|λ| ≫ |r| near the end)
    r = project(r)

    def cond(state):
        k, _, _, _, _, _, done, indef = state
        return (k < maxiter) & ~done & ~indef

    eps = jnp.finfo(dt).eps

    def body(state):
        k, x, r, p, s, gamma_old, _, _ = state
        zt = dinv * r
        wt, sums = a_full(zt, r[:, None])  # all-reduce 1 (with S(k) / the PME grid)
        nu = sums[:, 0] / mdm
        z = zt - dinv * m * nu[gid]
        w = wt - adc @ nu
        rp = r - pick(sums[:, 1] / mm)  # strips the round-off drift off the surface
        # all-reduce 2: the dot products (zᵀs, p_oldᵀw, p_oldᵀs for pᵀAp below) and Cᵀw
        dots = jnp.stack([rp @ z, w @ z, rp @ rp, z @ s, p @ w, p @ s])
        red = _psum(jnp.concatenate([dots, _group_sums(w[:, None], mask, gid, n_g)[:, 0]]))
        gamma, delta, rr, zs, pw, ps = (red[i] for i in range(6))
        w = w - pick(red[6:] / mm)  # P w: s = P A p stays on the surface
        done = jnp.sqrt(rr) <= thresh
        first = k == 0
        beta = jnp.where(first, 0.0, gamma / jnp.where(gamma_old != 0, gamma_old, 1.0))
        # pᵀAp of p = z + β p_old from fresh dot products (s = P A p_old by recurrence):
        # zᵀAz + β (zᵀs + p_oldᵀw) + β² p_oldᵀs. The Chronopoulos–Gear shortcut
        # δ − βγ/α_old (and any recursion on pᵀAp) drifts to ≤ 0 near float32's floor.
        pap = delta + beta * (zs + pw) + beta * beta * ps
        scale = (
            jnp.abs(delta) + jnp.abs(beta) * (jnp.abs(zs) + jnp.abs(pw)) + beta * beta * jnp.abs(ps)
        )
        # |pᵀAp| within the round-off of its terms: stagnation at the precision floor
        # (stop; the true residual decides convergence); clearly negative: A is indefinite
        stalled = ~done & (jnp.abs(pap) <= 16.0 * eps * scale)
        indef = ~done & ~stalled & ~(pap > 0)
        stop = done | stalled | indef
        alpha = jnp.where(stop, 0.0, gamma / jnp.where(pap > 0, pap, 1.0))
        p = z + beta * p
        s = w + beta * s
        step = ~stop
        return (
            k + step.astype(k.dtype),
            x + alpha * p,
            rp - alpha * s,
            p,
            s,
            jnp.where(step, gamma, gamma_old),
            done | stalled,
            indef,
        )

    zero = jnp.zeros_like(b)
    one = jnp.ones((), dt)
    state = (jnp.asarray(0, jnp.int32), x, r, zero, zero, one, jnp.asarray(False), indef0)
    k, x, _, _, _, _, _, indef = jax.lax.while_loop(cond, body, state)
    # the true residual of the returned x (not the recurrence's), and the multipliers
    ax, _ = a_full(x)
    r = b - ax
    lam = _psum(_group_sums(r[:, None], mask, gid, n_g))[:, 0] / mm
    num = norm(r - pick(lam))
    residual = jnp.where(
        ref > 0, num / jnp.where(ref > 0, ref, 1.0), jnp.where(num <= floor, 0.0, jnp.inf)
    )
    finite = _psum(jnp.sum(~jnp.isfinite(x))) == 0
    converged = (num <= jnp.maximum(tol * ref, floor)) & ~indef & finite
    return ShardSolve(x, lam, k, residual, converged, indef)


# ---------------------------------------------------------------------------------------
# derivatives of bilinear forms uᵀ A_el(x) v (no autodiff through collectives)
# ---------------------------------------------------------------------------------------
def shard_bilinear_grads(layout, params, cell, x_buf, sigma_buf, own_mask, pairs, u, v, v_buf):
    """Derivatives of ``B = uᵀ A_el(x, cell) v`` for owned ``u``, ``v`` (``v_buf``: ``v``
    on the buffer, halo-exchanged; unused for open systems).

    Returns ``(g_buf, g_own, virial, w_cell)``: ``∂B/∂x`` on buffer entries (real space;
    ghosts' parts go back to their owners by :func:`halo.reverse`) and on owned atoms
    (reciprocal or direct), this shard's ``Σ x ⊗ g_buf`` (to all-reduce), and the
    reciprocal and background strain derivative ``∂B/∂ε`` at fixed fractional
    coordinates (replicated: add once, not per shard)."""
    c = layout.n_own
    dt = x_buf.dtype
    own_x = x_buf[:c]
    u = jnp.where(own_mask, u, 0.0)
    v = jnp.where(own_mask, v, 0.0)
    centers, others, pmask = pairs
    zero33 = jnp.zeros((3, 3), dt)
    if not layout.periodic:
        sigma_own = sigma_buf[:c]
        g = jax.lax.all_gather(
            jnp.concatenate([own_x, sigma_own[:, None], u[:, None], v[:, None]], axis=1),
            AXES,
            tiled=True,
        )
        all_mask = jax.lax.all_gather(own_mask, AXES, tiled=True)
        all_x, all_s, all_u, all_v = g[:, :3], g[:, 3], g[:, 4], g[:, 5]

        def local(xo):
            kmat = _direct_matrix(layout, xo, sigma_own, own_mask, all_x, all_s, all_mask)
            return jnp.sum(kmat * (u[:, None] * all_v[None, :] + v[:, None] * all_u[None, :]))

        return jnp.zeros_like(x_buf), jax.grad(local)(own_x), zero33, zero33

    def real(xb):
        kern = _real_pairs(layout, xb, sigma_buf, centers, others, pmask, own_mask)
        return jnp.sum(u[centers] * kern * v_buf[others])

    g_buf = jax.grad(real)(x_buf)
    virial = x_buf.T @ g_buf
    sum_u, sum_v = jnp.sum(u), jnp.sum(v)
    if layout.method == "ewald":
        k, _ = _kvectors(cell, params.kvecs, layout.alpha)
        n_k = k.shape[0]
        kr = own_x @ k.T
        cs, sn = jnp.cos(kr), jnp.sin(kr)
        loc = jnp.concatenate([u @ cs, u @ sn, v @ cs, v @ sn, jnp.stack([sum_u, sum_v])])
        red = jax.lax.stop_gradient(_psum(loc))
        scu, ssu, scv, ssv = (red[i * n_k : (i + 1) * n_k] for i in range(4))
        su, sv = red[4 * n_k], red[4 * n_k + 1]

        def recip(xo):
            _, gk = _kvectors(cell, params.kvecs, layout.alpha)
            a = xo @ k.T
            cc, ss = jnp.cos(a), jnp.sin(a)
            return jnp.sum(gk * (scu * (v @ cc) + scv * (u @ cc) + ssu * (v @ ss) + ssv * (u @ ss)))

        def strain(cl):  # fixed fractional coordinates: S(k) unchanged
            _, gk = _kvectors(cl, params.kvecs, layout.alpha)
            return jnp.sum(gk * (scu * scv + ssu * ssv)) + _background(cl, layout.alpha) * su * sv

    else:
        size = int(np.prod(layout.grid))
        flat, wt = pme.spline_stencil(own_x, cell, layout.grid, layout.order)
        fl = flat.reshape(-1)
        gu = jnp.zeros(size, dt).at[fl].add((wt * u[:, None]).reshape(-1))
        gv = jnp.zeros(size, dt).at[fl].add((wt * v[:, None]).reshape(-1))
        red = jax.lax.stop_gradient(_psum(jnp.concatenate([gu, gv, jnp.stack([sum_u, sum_v])])))
        qu, qv = red[:size], red[size : 2 * size]
        su, sv = red[2 * size], red[2 * size + 1]
        infl = pme.influence(cell, layout.alpha, layout.grid, params.bsp_moduli)
        phi_u, phi_v = _conv(layout, qu, infl), _conv(layout, qv, infl)

        def recip(xo):
            f, w = pme.spline_stencil(xo, cell, layout.grid, layout.order)
            return COULOMB * jnp.sum(w * (u[:, None] * phi_v[f] + v[:, None] * phi_u[f]))

        def strain(cl):  # fixed fractional coordinates: the charge grids unchanged
            infl_c = pme.influence(cl, layout.alpha, layout.grid, params.bsp_moduli)
            b = COULOMB * jnp.sum(qu * _conv(layout, qv, infl_c))
            return b + _background(cl, layout.alpha) * su * sv

    g_own = jax.grad(recip)(own_x)
    w_cell = cell.T @ jax.grad(strain)(cell)
    return g_buf, g_own, virial, w_cell


# ---------------------------------------------------------------------------------------
# host side: method choice, communication volume, the standalone solver
# ---------------------------------------------------------------------------------------
#: The distributed solve holds per-shard arrays, so the single-device memory estimate of
#: :func:`celli_scale.electrostatics.prepare` (all pairs on one device) does not apply.
_NO_SINGLE_DEVICE_LIMIT = 1 << 62


def prepare(system: System, method: str, accuracy: float, sigma: Any):
    """:func:`celli_scale.electrostatics.prepare` for a distributed evaluation (the same
    parameters, without the single-device memory refusal)."""
    return el.prepare(
        system, method=method, accuracy=accuracy, sigma=sigma, max_bytes=_NO_SINGLE_DEVICE_LIMIT
    )


def choose_method(system: System, n_devices: int, accuracy: float, sigma: Any) -> str:
    """``method="auto"``: ``"direct"`` for open systems; for periodic ones Ewald's
    structure factors or PME's grid, whichever costs less per device and iteration:
    Ewald ``(N/S)·K`` (two ``(C, K)`` products) against PME's spline work ``(N/S)·p³``
    plus the replicated FFTs ``M log M`` (which do not shrink with the device count), with
    the cost weights of :mod:`celli_scale.electrostatics.params`; Ewald also needs its
    ``(C, K)`` tables in memory."""
    if not system.periodic:
        return "direct"
    from celli_scale.electrostatics.params import COST_FFT, COST_K, COST_SPLINE

    n = system.n_atoms
    per = n / max(int(n_devices), 1)
    pm = prepare(system, "pme", accuracy, sigma)
    try:
        ew = prepare(system, "ewald", accuracy, sigma)
    except ValueError:  # Ewald's parameters refused (e.g. its k-space too large): PME
        return "pme"
    n_k = ew.kvecs.shape[0]
    m = float(np.prod(pm.grid))
    c_ewald = 2 * COST_K * per * n_k
    c_pme = 2 * COST_SPLINE * per * pm.order**3 + 2 * COST_FFT * m * math.log2(m)
    fits = 2 * per * n_k * 8 * 4 < memory_limit()
    return "ewald" if (c_ewald <= c_pme and fits) else "pme"


def bytes_per_iteration(layout: Layout, plan: domains.Decomposition, itemsize: int) -> dict:
    """Communication volume of one CG iteration: ``all_reduce`` (numbers per shard in the
    two all-reduces, times ``itemsize``; an all-reduce moves ~2× that per device in a
    ring), ``all_gather`` (open systems), ``halo`` (one forward exchange of one value per
    atom, all shards)."""
    g = layout.n_groups
    out = {"halo": halo.bytes_per_exchange(plan, width=1, itemsize=itemsize)}
    if layout.method == "direct":
        out.update(
            all_reduce=3 * itemsize, all_gather=2 * layout.n_own * layout.n_shards * itemsize
        )
        out["halo"] = 0
        return out
    first = int(np.prod(layout.grid)) if layout.method == "pme" else 2 * layout.n_k
    first += 2 * g
    out.update(all_reduce=(first + 3) * itemsize, all_gather=0)
    return out


@struct.dataclass
class DistributedQeqResult:
    """Result of :func:`solve`, in the system's atom order.

    charges ``(N,)`` e; chemical_potential ``()`` or ``(G,)`` V; iterations; residual;
    converged; method; chi_grad ``(N,)`` and position_grad ``(N, 3)``: ``∂L/∂χ`` and
    ``∂L/∂x`` of ``L = Σ weights_i q_i`` (only when ``weights`` are given);
    bytes_per_iteration: communication volume (see :func:`bytes_per_iteration`)."""

    charges: Any
    chemical_potential: Any
    iterations: int
    residual: float
    converged: bool
    chi_grad: Any = None
    position_grad: Any = None
    method: str = struct.field(pytree_node=False, default="")
    bytes_per_iteration: dict = struct.field(pytree_node=False, default_factory=dict)


def _scatter(plan, values, fill=0.0, dtype=float):
    """Per-atom ``values`` (N, ...) into owned slots ``(S, C, ...)``."""
    values = np.asarray(values)
    out = np.full((*plan.owned_ids.shape, *values.shape[1:]), fill, dtype)
    ok = plan.owned_ids >= 0
    out[ok] = values[plan.owned_ids[ok]]
    return out


def _gather(plan, shard_values, n):
    shard_values = np.asarray(shard_values)
    out = np.zeros((n, *shard_values.shape[2:]), shard_values.dtype)
    ok = plan.owned_ids >= 0
    out[plan.owned_ids[ok]] = shard_values[ok]
    return out


def _prepared(
    system: System,
    chi: Any,
    hardness: Any,
    sigma: Any = None,
    *,
    devices: int | None = None,
    mesh_shape: Any = None,
    method: str = "auto",
    accuracy: float = 1e-6,
    tol: float = 1e-10,
    maxiter: int | None = None,
    q0: Any = None,
    phi_ext: Any = None,
    groups: Any = None,
    group_charges: Any = None,
    weights: Any = None,
    skin: float = domains.SKIN,
) -> tuple:
    """Checks, decomposition, device arrays and the compiled function of a :func:`solve`
    call: ``(fn, args, plan, params, layout)``."""
    from celli_scale.qeq_inputs import check_inputs

    n = system.n_atoms
    check_inputs(n, chi, hardness, sigma, q0, tol, "cg")
    if phi_ext is not None:
        check_per_atom("phi_ext", phi_ext, n, "V")
    if weights is not None:
        check_per_atom("weights", weights, n, "")
    if groups is not None or group_charges is not None:
        gids, gcharges = check_groups(n, groups, group_charges, system.total_charge)
        gids = np.asarray(gids, np.int32)
        gcharges = np.asarray(gcharges, float)
    else:
        gids = np.zeros(n, np.int32)
        gcharges = np.asarray([float(system.total_charge)])
    sig = None if sigma is None else np.broadcast_to(np.asarray(sigma, float), (n,))
    if mesh_shape is not None:
        shape = halo.mesh_shape(mesh_shape)
        n_dev = int(np.prod(shape))
    else:
        n_dev = 1 if devices is None else int(devices)
        shape = domains.mesh_for(n_dev, domains.frame_of(system).spacing)
    devs = halo.mesh_devices(n_dev)
    if method == "auto":
        method = choose_method(system, n_dev, accuracy, sig)
    params = prepare(system, method, accuracy, sig)
    r_cut = params.r_cut if params.periodic else 0.0
    plan = domains.decompose(
        system, shape, halo=r_cut + skin, reach=0.0, r_cut=max(skin, 1e-3), skin=skin
    )
    cell = np.zeros((3, 3)) if system.cell is None else np.asarray(system.cell, float)
    if params.periodic:
        pairs = domains.owned_pairs(plan, cell, r_cut + skin)
    else:  # open systems: all-gathered, no pair list
        zeros = [np.zeros((plan.n_shards, 1), t) for t in (np.int32, np.int32, bool)]
        pairs = domains.OwnedPairs(0.0, *zeros)
    layout = Layout(
        method=params.method, n_own=int(plan.owned_ids.shape[1]),
        n_buffer=int(plan.buffer_ids.shape[1]), specs=halo.stage_specs(plan.stages),
        n_groups=int(gcharges.shape[0]), n_shards=plan.n_shards, alpha=float(params.alpha),
        r_cut=float(r_cut), grid=tuple(params.grid), order=int(params.order),
        gaussian=sig is not None, n_k=int(params.kvecs.shape[0]),
    )  # fmt: skip
    dt = jnp.asarray(system.positions).dtype
    ok = plan.owned_ids >= 0
    sig_atoms = np.ones(n) if sig is None else sig
    sigma_buf = np.where(plan.buffer_ids >= 0, sig_atoms[np.maximum(plan.buffer_ids, 0)], 1.0)
    chi_t = np.asarray(chi, float) + (0.0 if phi_ext is None else np.asarray(phi_ext, float))
    send_idx, send_mask, wrap = halo.stage_arrays(plan.stages)
    own_pos = _scatter(plan, plan.positions)
    arrays = {
        "own": own_pos, "mask": ok, "gid": _scatter(plan, gids, 0, np.int32),
        "chi": _scatter(plan, chi_t), "hard": _scatter(plan, np.asarray(hardness, float), 1.0),
        "sigma_buf": sigma_buf, "send_idx": send_idx, "send_mask": send_mask, "wrap": wrap,
        "pairs": (pairs.centers, pairs.others, pairs.mask),
        "q0": _scatter(plan, np.zeros(n) if q0 is None else np.asarray(q0, float)),
        "w": _scatter(plan, np.zeros(n) if weights is None else np.asarray(weights, float)),
    }  # fmt: skip
    mesh = Mesh(np.asarray(devs, dtype=object).reshape(plan.mesh_shape), AXES)
    spec = NamedSharding(mesh, P(AXES))
    arrays = jax.tree_util.tree_map(
        lambda a: jax.device_put(jnp.asarray(a, dt if a.dtype == float else a.dtype), spec),
        arrays,
    )
    cell_j = jnp.asarray(np.where(np.asarray(system.pbc)[:, None], cell, 0.0), dt)
    fn = _solve_fn(layout, mesh, float(tol), maxiter or max(100, 2 * n), q0 is not None,
                   weights is not None)  # fmt: skip
    args = (params, cell_j, jnp.asarray(gcharges, dt), arrays)
    return fn, args, plan, params, layout


def solve(
    system: System,
    chi: Any,
    hardness: Any,
    sigma: Any = None,
    *,
    devices: int | None = None,
    mesh_shape: Any = None,
    method: str = "auto",
    accuracy: float = 1e-6,
    tol: float = 1e-10,
    maxiter: int | None = None,
    q0: Any = None,
    phi_ext: Any = None,
    groups: Any = None,
    group_charges: Any = None,
    weights: Any = None,
    skin: float = domains.SKIN,
    check: bool = True,
) -> DistributedQeqResult:
    """Charge equilibration of ``system`` solved over a domain decomposition.

    The same problem as :func:`celli_scale.qeq.solve` (arguments alike; ``sigma`` per
    atom or ``None`` for point charges), with the system cut into ``devices`` bricks
    (or ``mesh_shape``) and solved by the distributed CG of this module.

    Args:
      method: electrostatics, ``"auto"`` (:func:`choose_method`), ``"ewald"``, ``"pme"``
        or ``"direct"`` (open systems).
      weights: optional ``(N,)``: also return ``∂L/∂χ`` and ``∂L/∂x`` for
        ``L = Σ weights_i q_i`` (the distributed adjoint solve).

    Raises:
      ValueError: bad inputs, as the single-device solver; an indefinite Qeq matrix.
      QeqConvergenceError: the solve missed ``tol`` (with ``check=True``).
    """
    fn, args, plan, params, layout = _prepared(
        system,
        chi,
        hardness,
        sigma,
        devices=devices,
        mesh_shape=mesh_shape,
        method=method,
        accuracy=accuracy,
        tol=tol,
        maxiter=maxiter,
        q0=q0,
        phi_ext=phi_ext,
        groups=groups,
        group_charges=group_charges,
        weights=weights,
        skin=skin,
    )
    n = system.n_atoms
    dt = args[1].dtype
    # device -> host, gathered from every process when the mesh spans several (a
    # collective: every process makes the same reads, in the same order)
    out = {k: to_host(v) for k, v in fn(*args).items()}
    res = DistributedQeqResult(
        charges=jnp.asarray(_gather(plan, out["q"], n)),
        chemical_potential=jnp.asarray(-(out["lam"][0] if groups is None else out["lam"])),
        iterations=int(out["iterations"]),
        residual=float(out["residual"]),
        converged=bool(out["converged"]),
        chi_grad=None if weights is None else jnp.asarray(_gather(plan, out["chi_grad"], n)),
        position_grad=None if weights is None else jnp.asarray(_gather(plan, out["x_grad"], n)),
        method=params.method,
        bytes_per_iteration=bytes_per_iteration(layout, plan, jnp.dtype(dt).itemsize),
    )
    if check:
        if bool(out["indefinite"]):
            raise ValueError(
                "Qeq matrix A = diag(hardness) + d²E_elec/dq² is not positive definite on the "
                "charge-conservation surface: the charge equilibration has no minimum. "
                "Increase the hardness, use Gaussian charges (sigma), or check for atoms too "
                "close together"
            )
        if not res.converged:
            raise qeq_mod.QeqConvergenceError(
                f"distributed Qeq solve did not converge: relative residual "
                f"{res.residual:.3e} after {res.iterations} iterations (tolerance {tol:g}); "
                "raise maxiter or loosen tol"
            )
        if weights is not None and not bool(out["adj_converged"]):
            raise qeq_mod.QeqConvergenceError(
                f"distributed Qeq adjoint solve did not converge: relative residual "
                f"{float(out['adj_residual']):.3e}"
            )
    return res


_SOLVE_FNS: dict = {}

_COLLECTIVES = {
    "all_reduce": "stablehlo.all_reduce",
    "all_gather": "stablehlo.all_gather",
    "collective_permute": "stablehlo.collective_permute",
}


def _regions(text: str, pattern: str) -> list[tuple[str, str]]:
    """``(match, body)`` of every brace-delimited region opened by ``pattern``."""
    import re

    out = []
    for m in re.finditer(pattern, text):
        depth, i = 1, m.end()
        while depth and i < len(text):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        out.append((m.group(0), text[m.end() : i]))
    return out


def loop_collectives(stablehlo_text: str) -> list[dict[str, int]]:
    """Collectives executed per iteration of every ``stablehlo.while`` of a lowered
    program (``jax.jit(f).lower(...).as_text()``), following calls into private functions:
    ``[{"all_reduce": n, "all_gather": n, "collective_permute": n}, ...]``. The CG loop
    is the body with the most collectives (the tests check ≤ 2 all-reduces in it)."""
    import re

    funcs = {
        re.search(r"@([\w.$-]+)", head).group(1): body
        for head, body in _regions(stablehlo_text, r"func\.func [^{]*?@[\w.$-]+\([^{]*\{")
    }

    def count(body: str, seen: tuple = ()) -> dict[str, int]:
        c = {k: body.count(v) for k, v in _COLLECTIVES.items()}
        for name in re.findall(r"call @([\w.$-]+)", body):
            if name in funcs and name not in seen:
                sub = count(funcs[name], (*seen, name))
                c = {k: c[k] + sub[k] for k in c}
        return c

    return [count(body) for _, body in _regions(stablehlo_text, r"\bdo\s*\{")]


def lowered_solve_text(system: System, chi: Any, hardness: Any, sigma: Any = None, **kw) -> str:
    """The StableHLO text of the program :func:`solve` runs for these arguments (for
    counting collectives; nothing is executed)."""
    fn, args, *_ = _prepared(system, chi, hardness, sigma, **kw)
    return fn.lower(*args).as_text()


def _solve_fn(layout, mesh, tol, maxiter, warm, adjoint):
    key = (layout, mesh, tol, maxiter, warm, adjoint)
    if key in _SOLVE_FNS:
        return _SOLVE_FNS[key]

    def shard_fn(params, cell, gcharges, arrays):
        a = jax.tree_util.tree_map(lambda x: x[0], arrays)
        x_buf = halo.forward(
            a["own"], layout.n_buffer, layout.specs, a["send_idx"], a["wrap"], cell
        )
        geom = shard_setup(
            layout, params, cell, x_buf, a["sigma_buf"], a["mask"], a["gid"], a["pairs"]
        )
        sol = shard_cg(
            layout, geom, a["send_idx"], a["hard"], -a["chi"], gcharges,
            q0=a["q0"] if warm else None, tol=tol, maxiter=maxiter,
        )  # fmt: skip
        out = {
            "q": sol.x[None], "lam": sol.lam, "iterations": sol.iterations,
            "residual": sol.residual, "converged": sol.converged, "indefinite": sol.indefinite,
        }  # fmt: skip
        if adjoint:
            adj = shard_cg(
                layout, geom, a["send_idx"], a["hard"], a["w"], jnp.zeros_like(gcharges),
                tol=tol, maxiter=maxiter,
            )  # fmt: skip
            mu = adj.x
            v_buf = halo.forward(sol.x, layout.n_buffer, layout.specs, a["send_idx"])
            g_buf, g_own, _, _ = shard_bilinear_grads(
                layout, params, cell, x_buf, a["sigma_buf"], a["mask"], a["pairs"], -mu,
                sol.x, v_buf,
            )  # fmt: skip
            grad = g_own + _reverse(layout, g_buf, a)
            out.update(
                chi_grad=(-mu)[None], x_grad=grad[None], adj_converged=adj.converged,
                adj_residual=adj.residual,
            )  # fmt: skip
        return out

    spec = P(AXES)
    out_specs = {
        "q": spec, "lam": P(), "iterations": P(), "residual": P(), "converged": P(),
        "indefinite": P(),
    }  # fmt: skip
    if adjoint:
        out_specs.update(chi_grad=spec, x_grad=spec, adj_converged=P(), adj_residual=P())
    fn = jax.jit(
        jax.shard_map(
            shard_fn,
            mesh=mesh,
            in_specs=(P(), P(), P(), spec),
            out_specs=out_specs,
            check_vma=False,
        )  # fmt: skip
    )
    _SOLVE_FNS[key] = fn
    return fn


def _reverse(layout, g_buf, a):
    """Ghost entries of ``g_buf`` summed into their owners (periodic; open: owned only)."""
    if not layout.periodic:
        return g_buf[: layout.n_own]
    return halo.reverse(g_buf, layout.n_own, layout.specs, a["send_idx"], a["send_mask"])


__all__ = [
    "DistributedQeqResult",
    "Layout",
    "ShardGeometry",
    "ShardSolve",
    "bytes_per_iteration",
    "choose_method",
    "loop_collectives",
    "lowered_solve_text",
    "shard_bilinear_grads",
    "shard_cg",
    "shard_matvec",
    "shard_setup",
    "solve",
]
