"""Qeq with per-group total charges and an external potential per atom, against an
independent dense bordered (KKT) solve written here in numpy; implicit gradients vs
finite differences; input validation. float64 throughout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

import celli_scale as cs
from celli_scale import electrostatics as el
from celli_scale import qeq
from celli_scale.datasets import random_cluster
from celli_scale.units import COULOMB

jax.config.update("jax_enable_x64", True)

TOL = 1e-12
solve_arrays = jax.jit(qeq.solve_arrays, static_argnames=("method", "tol", "maxiter"))


# ---------------------------------------------------------------------------------------
# structures, parameters and the independent reference
# ---------------------------------------------------------------------------------------
def _cluster(n=12, seed=0, box=7.0, dmin=1.8) -> cs.System:
    return random_cluster(n, seed, species=(8, 1, 1), box=box, min_distance=dmin)


def _rocksalt(a=5.64, rattle=0.1, seed=1) -> cs.System:
    base = np.array([[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]], dtype=float)
    frac = np.concatenate([base, base + [0.5, 0, 0]])
    frac = np.concatenate([frac, frac + [1, 0, 0]]) / [2, 1, 1]
    cell = np.diag([2 * a, a, a])
    pos = frac @ cell + np.random.default_rng(seed).normal(0, rattle, (16, 3))
    return cs.System(pos, np.tile([11] * 4 + [17] * 4, 2), cell=cell, pbc=True)


def _params(n, seed=0):
    rng = np.random.default_rng(seed)
    chi = rng.normal(0, 1.0, n)
    hard = rng.uniform(10.0, 14.0, n)
    sigma = rng.uniform(0.8, 1.2, n)
    return chi, hard, sigma


def _coulomb_open(pos, sigma):
    """Electrostatic Hessian of open Gaussian charges, written out (no package code)."""
    d = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
    gamma = np.sqrt(sigma[:, None] ** 2 + sigma[None] ** 2)
    np.fill_diagonal(d, 1.0)
    a = COULOMB * erf(d / (np.sqrt(2) * gamma)) / d
    np.fill_diagonal(a, COULOMB / (sigma * np.sqrt(np.pi)))
    return a


def _coulomb_from_potential(s, sigma, params, nl):
    """Electrostatic Hessian as columns of the package's public potential (Ewald)."""
    n = s.n_atoms
    pot = jax.jit(lambda q: el.potential_arrays(s.positions, s.cell, q, sigma, params, nl))
    a = np.stack([np.asarray(pot(jnp.eye(n)[i])) for i in range(n)], axis=1)
    return 0.5 * (a + a.T)


def _reference(a_el, chi, hard, ids, qg, phi=None):
    """Dense bordered solve: [A C; Cᵀ 0][q; λ] = [−(χ+φ); Q_g]. Returns q, μ_g, E."""
    n, g = len(chi), len(qg)
    a = a_el + np.diag(hard)
    c = np.zeros((n, g))
    c[np.arange(n), ids] = 1.0
    kkt = np.block([[a, c], [c.T, np.zeros((g, g))]])
    x = chi if phi is None else chi + phi
    sol = np.linalg.solve(kkt, np.concatenate([-x, qg]))
    q = sol[:n]
    return q, -sol[n:], x @ q + 0.5 * q @ a @ q


def _open_case():
    s = _cluster()
    chi, hard, sigma = _params(s.n_atoms)
    params = el.prepare(s, "direct", sigma=sigma)
    return s, chi, hard, sigma, params, None, _coulomb_open(np.asarray(s.positions), sigma)


def _ewald_case():
    s = _rocksalt()
    chi, hard, sigma = _params(s.n_atoms, seed=3)
    params = el.prepare(s, "ewald", accuracy=1e-8, sigma=sigma)
    nl = el.real_space_neighbors(s, params)
    return s, chi, hard, sigma, params, nl, _coulomb_from_potential(s, sigma, params, nl)


CASES = {"open": _open_case, "ewald": _ewald_case}


# ---------------------------------------------------------------------------------------
# agreement with the dense reference
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_groups_and_field_match_dense_reference(case):
    s, chi, hard, sigma, params, nl, a_el = CASES[case]()
    n = s.n_atoms
    ids = np.arange(n) % 3  # three interleaved groups
    qg = np.array([1.0, -0.5, 0.0])
    phi = np.random.default_rng(7).normal(0, 0.5, n)
    s = s.replace(total_charge=float(qg.sum()))
    q_ref, mu_ref, e_ref = _reference(a_el, chi, hard, ids, qg, phi)
    for method in ("dense", "cg"):
        r = qeq.solve(
            s,
            chi,
            hard,
            sigma,
            method=method,
            tol=TOL,
            params=params,
            neighbors=nl,
            phi_ext=phi,
            groups=ids,
            group_charges=qg,
        )
        q = np.asarray(r.charges)
        np.testing.assert_allclose(q, q_ref, atol=1e-8, rtol=0, err_msg=method)
        np.testing.assert_allclose(np.bincount(ids, q), qg, atol=1e-10, rtol=0)
        np.testing.assert_allclose(np.asarray(r.chemical_potential), mu_ref, atol=1e-7)
        np.testing.assert_allclose(float(r.energy), e_ref, rtol=1e-9, atol=1e-9)
        assert bool(r.converged) and float(r.residual) <= 1e-10
    # the same groups as index lists
    lists = [np.flatnonzero(ids == g).tolist() for g in range(3)]
    r = qeq.solve(
        s, chi, hard, sigma, tol=TOL, params=params, neighbors=nl, groups=lists, group_charges=qg
    )
    q_ref0, _, _ = _reference(a_el, chi, hard, ids, qg)
    np.testing.assert_allclose(np.asarray(r.charges), q_ref0, atol=1e-8, rtol=0)


def test_one_group_and_zero_field_equal_the_plain_solve():
    s, chi, hard, sigma, params, nl, _ = _open_case()
    s = s.replace(total_charge=1.0)
    n = s.n_atoms
    kw = dict(params=params, tol=TOL)
    for method in ("dense", "cg"):
        plain = qeq.solve(s, chi, hard, sigma, method=method, **kw)
        one = qeq.solve(
            s, chi, hard, sigma, method=method, groups=np.zeros(n, int), group_charges=[1.0], **kw
        )
        np.testing.assert_allclose(np.asarray(one.charges), np.asarray(plain.charges), atol=1e-11)
        np.testing.assert_allclose(
            float(one.chemical_potential[0]), float(plain.chemical_potential), rtol=1e-10
        )
        # a constant potential shifts μ and E, not the charges
        shifted = qeq.solve(s, chi, hard, sigma, method=method, phi_ext=np.full(n, 0.3), **kw)
        np.testing.assert_allclose(
            np.asarray(shifted.charges), np.asarray(plain.charges), atol=1e-11
        )
        np.testing.assert_allclose(
            float(shifted.chemical_potential), float(plain.chemical_potential) + 0.3, rtol=1e-10
        )


def test_uniform_field_polarises_neutral_molecules():
    """φ_ext = −E·r: each neutral molecule's dipole turns along E, as the dense solve says."""
    mol = np.array([[0.0, 0.0, 0.0], [0.76, 0.0, 0.59], [-0.76, 0.0, 0.59]])  # water-like
    pos = np.concatenate([mol, mol @ np.diag([1, -1, -1]) + [0.0, 3.2, 0.4]])
    s = cs.System(pos, [8, 1, 1, 8, 1, 1])
    chi = np.array([3.0, -1.0, -1.0, 3.0, -1.0, -1.0])
    hard = np.array([14.0, 12.0, 12.0, 14.0, 12.0, 12.0])
    sigma = np.array([0.9, 0.7, 0.7, 0.9, 0.7, 0.7])
    ids = np.array([0, 0, 0, 1, 1, 1])
    field = np.array([0.05, -0.1, 0.2])  # V/Å
    phi = -pos @ field
    a_el = _coulomb_open(pos, sigma)
    for method in ("dense", "cg"):
        kw = dict(method=method, tol=TOL, groups=ids, group_charges=[0.0, 0.0])
        r0 = qeq.solve(s, chi, hard, sigma, **kw)
        r = qeq.solve(s, chi, hard, sigma, phi_ext=phi, **kw)
        q_ref, _, _ = _reference(a_el, chi, hard, ids, np.zeros(2), phi)
        np.testing.assert_allclose(np.asarray(r.charges), q_ref, atol=1e-8, rtol=0)
        dq = np.asarray(r.charges) - np.asarray(r0.charges)
        for g in range(2):
            sel = ids == g
            assert abs(dq[sel].sum()) < 1e-10  # each molecule stays neutral
            induced = dq[sel] @ pos[sel]
            cos = induced @ field / (np.linalg.norm(induced) * np.linalg.norm(field))
            assert cos > 0.5, (g, induced)
        # the field lowers the energy (E·p with p along E)
        assert float(r.energy) < float(r0.energy)


# ---------------------------------------------------------------------------------------
# derivatives
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["dense", "cg"])
def test_gradients_match_finite_differences(method):
    s, chi, hard, sigma, params, nl, _ = _open_case()
    n = s.n_atoms
    ids = jnp.asarray(np.arange(n) // 4)  # three contiguous groups
    field = jnp.array([0.1, -0.05, 0.08])
    w = jnp.asarray(np.random.default_rng(5).normal(size=n))

    def f(chi, pos, qg, sig):
        r = qeq.solve_arrays(
            pos,
            None,
            chi,
            hard,
            sig,
            None,
            params,
            method=method,
            tol=TOL,
            phi_ext=-pos @ field,
            groups=ids,
            group_charges=qg,
        )
        return r.energy + 5.0 * jnp.dot(w, r.charges), r

    args = [jnp.asarray(chi), s.positions, jnp.array([0.5, -1.0, 0.25]), jnp.asarray(sigma)]
    grads, res = jax.jit(jax.grad(f, (0, 1, 2, 3), has_aux=True))(*args)
    qeq.check(res, tol=1e-10)
    f_jit = jax.jit(lambda *a: f(*a)[0])
    rng = np.random.default_rng(11)
    for k, h in enumerate((1e-4, 1e-4, 1e-4, 1e-5)):
        g = np.asarray(grads[k])
        assert np.abs(g).max() > 1e-3
        v = rng.normal(size=g.shape)
        plus, minus = list(args), list(args)
        plus[k] = args[k] + h * v
        minus[k] = args[k] - h * v
        fd = (float(f_jit(*plus)) - float(f_jit(*minus))) / (2 * h)
        np.testing.assert_allclose(np.sum(g * v), fd, rtol=2e-7, atol=1e-8, err_msg=f"arg {k}")
    # dE*/dQ_g = μ_g
    e_of_qg = jax.jit(
        jax.grad(
            lambda qg: (
                qeq.solve_arrays(
                    args[1],
                    None,
                    args[0],
                    hard,
                    args[3],
                    None,
                    params,
                    method=method,
                    tol=TOL,
                    phi_ext=-args[1] @ field,
                    groups=ids,
                    group_charges=qg,
                ).energy
            )
        )
    )
    np.testing.assert_allclose(
        np.asarray(e_of_qg(args[2])), np.asarray(res.chemical_potential), rtol=1e-8
    )


def test_padding_with_groups_changes_nothing():
    s, chi, hard, sigma, params, nl, _ = _open_case()
    n, pad = s.n_atoms, 3
    ids = np.arange(n) % 2
    qg = jnp.array([0.5, -1.5])
    pos_p = jnp.concatenate([s.positions, jnp.zeros((pad, 3))])
    pad_f = lambda x, v: jnp.asarray(np.concatenate([x, [v] * pad]))  # noqa: E731
    mask = jnp.arange(n + pad) < n
    phi = np.linspace(-0.2, 0.2, n)
    for method in ("dense", "cg"):
        got = solve_arrays(
            pos_p, None, pad_f(chi, 7.0), pad_f(hard, 1.0), pad_f(sigma, 1.0), -1.0, params,
            None, mask, method=method, tol=TOL, phi_ext=pad_f(phi, np.nan),
            groups=jnp.asarray(np.concatenate([ids, [1, 0, 1]])), group_charges=qg,
        )  # fmt: skip
        ref = solve_arrays(
            s.positions, None, chi, hard, sigma, -1.0, params, method=method, tol=TOL,
            phi_ext=phi, groups=jnp.asarray(ids), group_charges=qg,
        )  # fmt: skip
        qeq.check(got)
        np.testing.assert_allclose(np.asarray(got.charges[:n]), np.asarray(ref.charges), atol=1e-11)
        assert np.all(np.asarray(got.charges[n:]) == 0.0)
        np.testing.assert_allclose(float(got.energy), float(ref.energy), rtol=1e-11)


# ---------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------
def test_bad_inputs_raise():
    s = _cluster(n=5)
    chi, hard, sigma = _params(5)
    kw = dict(method="dense")
    with pytest.raises(ValueError, match="groups overlap: atom 2"):
        qeq.solve(s, chi, hard, sigma, groups=[[0, 1, 2], [2, 3, 4]], group_charges=[0, 0], **kw)
    with pytest.raises(ValueError, match="atom 4 is in no group"):
        qeq.solve(s, chi, hard, sigma, groups=[[0, 1], [2, 3]], group_charges=[0, 0], **kw)
    with pytest.raises(ValueError, match=r"groups must have shape \(5,\)"):
        qeq.solve(s, chi, hard, sigma, groups=np.zeros(4, int), group_charges=[0.0], **kw)
    with pytest.raises(ValueError, match="group id 2, outside 0..1"):
        qeq.solve(s, chi, hard, sigma, groups=[0, 1, 2, 0, 1], group_charges=[0, 0], **kw)
    with pytest.raises(ValueError, match="group 1 has no atoms"):
        qeq.solve(s, chi, hard, sigma, groups=np.zeros(5, int), group_charges=[0, 0], **kw)
    with pytest.raises(ValueError, match="group 1 has no atoms"):
        qeq.solve(s, chi, hard, sigma, groups=[range(5), []], group_charges=[0, 0], **kw)
    with pytest.raises(ValueError, match="lists 2 groups but group_charges has 3"):
        qeq.solve(s, chi, hard, sigma, groups=[[0, 1], [2, 3, 4]], group_charges=[0, 0, 0])
    with pytest.raises(ValueError, match="integer"):
        qeq.solve(s, chi, hard, sigma, groups=np.zeros(5), group_charges=[0.0], **kw)
    with pytest.raises(ValueError, match="total charge 0 e differs from the sum of the group"):
        qeq.solve(s, chi, hard, sigma, groups=[0, 0, 1, 1, 1], group_charges=[1.0, 0.0], **kw)
    with pytest.raises(ValueError, match="together"):
        qeq.solve(s, chi, hard, sigma, groups=[0, 0, 1, 1, 1], **kw)
    with pytest.raises(ValueError, match="group_charges is not finite at group 1"):
        qeq.solve(s, chi, hard, sigma, groups=[0, 0, 1, 1, 1], group_charges=[0, np.nan], **kw)
    with pytest.raises(ValueError, match=r"phi_ext must have shape \(5,\)"):
        qeq.solve(s, chi, hard, sigma, phi_ext=np.zeros(3), **kw)
    nan = np.zeros(5)
    nan[3] = np.nan
    with pytest.raises(ValueError, match="phi_ext is not finite at atom 3"):
        qeq.solve(s, chi, hard, sigma, phi_ext=nan, **kw)
    params = el.prepare(s, "direct", sigma=sigma)
    with pytest.raises(ValueError, match="total_charge may be None only when groups"):
        qeq.solve_arrays(s.positions, None, chi, hard, sigma, None, params)
    with pytest.raises(ValueError, match="differs from the sum of the group charges"):
        qeq.solve_arrays(
            s.positions, None, chi, hard, sigma, 2.0, params,
            groups=jnp.zeros(5, jnp.int32), group_charges=jnp.array([1.0]),
        )  # fmt: skip
