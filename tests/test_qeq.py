"""Charge equilibration: CG vs dense, analytic two-atom case, implicit gradients vs
finite differences and the dense solve, Hellmann–Feynman forces, warm start, failures,
padding. float64 throughout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.special import erf

import celli_scale as cs
from celli_scale import electrostatics as el
from celli_scale import qeq
from celli_scale.datasets import random_cluster
from celli_scale.units import COULOMB

jax.config.update("jax_enable_x64", True)

TOL = 1e-12  # solver tolerance where results are compared tightly
# compiled once per shape/static set (eager while_loops and jacfwd would dominate the run time)
solve_arrays = jax.jit(qeq.solve_arrays, static_argnames=("method", "tol", "maxiter"))


# ---------------------------------------------------------------------------------------
# structures and parameters
# ---------------------------------------------------------------------------------------
def _cluster(n=10, seed=0, box=6.5, dmin=1.8) -> cs.System:
    return random_cluster(n, seed, species=(8, 1, 1), box=box, min_distance=dmin)


def _rocksalt(nx=2, a=5.64, rattle=0.1, seed=1) -> cs.System:
    base = np.array([[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]], dtype=float)
    frac = np.concatenate([base, base + [0.5, 0, 0]])
    frac = np.concatenate([frac + [i, 0, 0] for i in range(nx)]) / [nx, 1, 1]
    cell = np.diag([a * nx, a, a])
    pos = frac @ cell + np.random.default_rng(seed).normal(0, rattle, (8 * nx, 3))
    return cs.System(pos, np.tile([11] * 4 + [17] * 4, nx), cell=cell, pbc=True)


def _qeq_params(system: cs.System, seed=0, gaussian=True):
    """χ (eV/e), J (eV/e²), σ (Å): species-like values plus a random spread."""
    rng = np.random.default_rng(seed)
    z = np.asarray(system.species)
    n = z.size
    chi = np.where(z == z[0], -1.5, 2.0) + rng.normal(0, 0.3, n)
    hard = np.where(z == z[0], 11.0, 13.0) + rng.uniform(0, 2, n)
    sigma = rng.uniform(0.8, 1.2, n) if gaussian else None
    return chi, hard, sigma


CASES = {
    "open-point": (False, False),
    "open-gauss": (False, True),
    "ewald-point": (True, False),
    "ewald-gauss": (True, True),
}


def _case(name):
    periodic, gaussian = CASES[name]
    s = _rocksalt() if periodic else _cluster()
    chi, hard, sigma = _qeq_params(s, gaussian=gaussian)
    params = el.prepare(s, "ewald" if periodic else "direct", accuracy=1e-6, sigma=sigma)
    nl = el.real_space_neighbors(s, params)
    return s, chi, hard, sigma, params, nl


# ---------------------------------------------------------------------------------------
# solver agreement and the constraint
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_cg_equals_dense_and_conserves_charge(case):
    s, chi, hard, sigma, params, nl = _case(case)
    for total in (0.0, 1.0, -2.0):
        sq = s.replace(total_charge=total)
        kw = dict(params=params, neighbors=nl, tol=TOL)
        rd = qeq.solve(sq, chi, hard, sigma, method="dense", **kw)
        rc = qeq.solve(sq, chi, hard, sigma, method="cg", **kw)
        qd, qc = np.asarray(rd.charges), np.asarray(rc.charges)
        np.testing.assert_allclose(qc, qd, atol=1e-8, rtol=0)
        assert abs(qc.sum() - total) < 1e-10 and abs(qd.sum() - total) < 1e-10
        np.testing.assert_allclose(float(rc.energy), float(rd.energy), rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(
            float(rc.chemical_potential), float(rd.chemical_potential), rtol=1e-7, atol=1e-8
        )
        assert bool(rc.converged) and bool(rd.converged)
        assert float(rc.residual) <= TOL and float(rd.residual) <= 1e-10
        assert int(rc.iterations) > 0 and int(rd.iterations) == 0
        # the solution is stationary: ∂E/∂q_i = χ_i + (A q)_i = μ on every atom
        phi = el.potential_arrays(sq.positions, sq.cell, rc.charges, sigma, params, nl)
        grad_e = chi + hard * qc + np.asarray(phi)
        np.testing.assert_allclose(grad_e, float(rc.chemical_potential), atol=1e-7)
        # and the energy is the functional at that point
        e_ref = chi @ qc + 0.5 * hard @ qc**2 + 0.5 * qc @ np.asarray(phi)
        np.testing.assert_allclose(float(rc.energy), e_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("gaussian", [False, True])
@pytest.mark.parametrize("method", ["dense", "cg"])
def test_two_atoms_closed_form(gaussian, method):
    r = 2.3
    s = cs.System([[0.0, 0.0, 0.0], [0.3, -0.4, r * np.sqrt(1 - 0.25 / r**2)]], [11, 17])
    dist = float(np.linalg.norm(np.asarray(s.positions[1] - s.positions[0])))
    chi = np.array([-1.2, 2.5])
    hard = np.array([9.0, 14.0])
    sig = np.array([0.9, 1.3]) if gaussian else None
    if gaussian:
        gamma = np.hypot(*sig)
        k = COULOMB * float(erf(dist / (np.sqrt(2) * gamma))) / dist
        jd = hard + COULOMB / (sig * np.sqrt(np.pi))
    else:
        k, jd = COULOMB / dist, hard
    for total in (0.0, 1.0):
        # minimise χ1 q1 + χ2 q2 + ½ jd1 q1² + ½ jd2 q2² + k q1 q2 with q2 = Q − q1
        q1 = (chi[1] - chi[0] + (jd[1] - k) * total) / (jd[0] + jd[1] - 2 * k)
        q = np.array([q1, total - q1])
        e = chi @ q + 0.5 * jd @ q**2 + k * q[0] * q[1]
        mu = chi[0] + jd[0] * q[0] + k * q[1]
        res = qeq.solve(s.replace(total_charge=total), chi, hard, sig, method=method, tol=TOL)
        np.testing.assert_allclose(np.asarray(res.charges), q, rtol=0, atol=1e-12)
        np.testing.assert_allclose(float(res.energy), e, rtol=1e-12)
        np.testing.assert_allclose(float(res.chemical_potential), mu, rtol=1e-11)


# ---------------------------------------------------------------------------------------
# derivatives
# ---------------------------------------------------------------------------------------
def _objective(s, params, nl, method, tol=TOL):
    """f(chi, J, sigma, positions, strain) = E* + Σ w_i q_i (charges enter non-trivially)."""
    n = s.n_atoms
    w = jnp.asarray(np.random.default_rng(5).normal(size=n))
    periodic = s.periodic

    def f(chi, hard, sigma, pos, strain):
        deform = jnp.eye(3) + strain
        cell = s.cell @ deform if periodic else None
        res = qeq.solve_arrays(
            pos @ deform,
            cell,
            chi,
            hard,
            sigma,
            s.total_charge,
            params,
            nl,
            method=method,
            tol=tol,
        )
        return res.energy + 5.0 * jnp.dot(w, res.charges)

    return f


@pytest.mark.parametrize("case", ["open-gauss", "ewald-gauss", "ewald-point"])
def test_implicit_gradients_match_finite_differences_and_dense(case):
    s, chi, hard, sigma, params, nl = _case(case)
    s = s.replace(total_charge=1.0)
    gaussian = sigma is not None
    args = [
        jnp.asarray(chi),
        jnp.asarray(hard),
        None if sigma is None else jnp.asarray(sigma),
        s.positions,
        jnp.zeros((3, 3)),
    ]
    argnums = (0, 1, 3, 4) + ((2,) if gaussian else ())
    f_cg = _objective(s, params, nl, "cg")
    f_dense = _objective(s, params, nl, "dense")
    g_cg = jax.jit(jax.grad(f_cg, argnums))(*args)
    g_dense = jax.jit(jax.grad(f_dense, argnums))(*args)
    f_jit = jax.jit(f_cg)
    rng = np.random.default_rng(11)
    steps = {0: 1e-4, 1: 1e-4, 2: 1e-5, 3: 1e-4, 4: 1e-5}
    for k, argnum in enumerate(argnums):
        gc, gd = np.asarray(g_cg[k]), np.asarray(g_dense[k])
        np.testing.assert_allclose(
            gc,
            gd,
            rtol=1e-7,
            atol=1e-8 * np.abs(gd).max(),
            err_msg=f"implicit vs dense, argument {argnum}",
        )
        v = rng.normal(size=gc.shape)
        if argnum == 4:
            v = v + v.T  # symmetric strain
        h = steps[argnum]
        plus, minus = list(args), list(args)
        plus[argnum] = args[argnum] + h * v
        minus[argnum] = args[argnum] - h * v
        fd = (float(f_jit(*plus)) - float(f_jit(*minus))) / (2 * h)
        np.testing.assert_allclose(
            np.sum(gc * v),
            fd,
            rtol=2e-7,
            atol=1e-8,
            err_msg=f"implicit vs finite differences, argument {argnum}",
        )


def test_energy_gradient_is_force_at_fixed_charges_and_dE_dQ_is_mu():
    """dE*/dr = ∂E/∂r at q* (the charges are stationary), and dE*/dQ = μ."""
    s, chi, hard, sigma, params, nl = _case("ewald-gauss")
    s = s.replace(total_charge=-1.0)

    def e_star(pos, total):
        return qeq.solve_arrays(pos, s.cell, chi, hard, sigma, total, params, nl, tol=TOL).energy

    res = solve_arrays(s.positions, s.cell, chi, hard, sigma, -1.0, params, nl, tol=TOL)
    q = jax.lax.stop_gradient(res.charges)

    def e_fixed(pos):
        return el.energy_arrays(pos, s.cell, q, sigma, params, nl)  # χ and J terms: no r

    g_star, de_dq = jax.jit(jax.grad(e_star, (0, 1)))(s.positions, -1.0)
    g_fixed = jax.jit(jax.grad(e_fixed))(s.positions)
    np.testing.assert_allclose(
        np.asarray(g_star),
        np.asarray(g_fixed),
        rtol=1e-8,
        atol=1e-9 * float(jnp.abs(g_fixed).max()),
    )
    assert float(jnp.abs(g_fixed).max()) > 1e-3  # a real force, not a trivial zero
    np.testing.assert_allclose(float(de_dq), float(res.chemical_potential), rtol=1e-9)


# ---------------------------------------------------------------------------------------
# warm start, failures, validation
# ---------------------------------------------------------------------------------------
def test_warm_start_reduces_iterations():
    s = _cluster(n=30, seed=3, box=9.0, dmin=1.6)
    chi, hard, sigma = _qeq_params(s, seed=2)
    prev = qeq.solve(s, chi, hard, sigma, method="cg", tol=1e-10)
    moved = s.replace(positions=s.positions + 0.01 * np.random.default_rng(0).normal(size=(30, 3)))
    cold = qeq.solve(moved, chi, hard, sigma, method="cg", tol=1e-10)
    warm = qeq.solve(moved, chi, hard, sigma, method="cg", tol=1e-10, q0=prev.charges)
    assert int(warm.iterations) < int(cold.iterations), (int(warm.iterations), int(cold.iterations))
    np.testing.assert_allclose(np.asarray(warm.charges), np.asarray(cold.charges), atol=1e-9)
    # a useless guess (wrong scale) costs nothing: the start is a line search along it
    odd = qeq.solve(moved, chi, hard, sigma, method="cg", tol=1e-10, q0=-1e3 * prev.charges)
    np.testing.assert_allclose(np.asarray(odd.charges), np.asarray(cold.charges), atol=1e-9)


def test_non_convergence_raises():
    s, chi, hard, sigma, params, nl = _case("ewald-gauss")
    with pytest.raises(qeq.QeqConvergenceError, match=r"after 2 iterations"):
        qeq.solve(s, chi, hard, sigma, method="cg", maxiter=2, params=params, neighbors=nl)
    res = solve_arrays(s.positions, s.cell, chi, hard, sigma, 0.0, params, nl, maxiter=2)
    assert not bool(res.converged) and int(res.iterations) == 2 and float(res.residual) > 1e-6
    with pytest.raises(qeq.QeqConvergenceError, match="residual"):
        qeq.check(res)
    # check=False hands back the (reported) unconverged result
    res2 = qeq.solve(
        s, chi, hard, sigma, method="cg", maxiter=2, params=params, neighbors=nl, check=False
    )
    assert not bool(res2.converged)
    # a looser tolerance on check() than the solve's own is still a failure when missed
    ok = qeq.solve(s, chi, hard, sigma, method="cg", params=params, neighbors=nl, tol=1e-4)
    with pytest.raises(qeq.QeqConvergenceError):
        qeq.check(ok, tol=1e-14)


@pytest.mark.parametrize("method", ["dense", "cg"])
def test_indefinite_hardness_raises(method):
    s = _cluster(n=6)
    chi, hard, _ = _qeq_params(s, gaussian=False)
    bad = hard.copy()
    bad[1] = -0.5
    with pytest.raises(ValueError, match="atom 1"):
        qeq.solve(s, chi, bad, None, method=method)
    # diagonal positive but the Coulomb coupling wins (polarisation catastrophe of close
    # point charges): found by Cholesky (dense) or by negative curvature (CG)
    two = cs.System([[0.0, 0, 0], [0, 0, 1.0]], [1, 1])
    with pytest.raises(ValueError, match="not positive definite"):
        qeq.solve(two, [0.0, 1.0], [5.0, 5.0], None, method=method)
    params = el.prepare(two, "direct")
    res = solve_arrays(
        two.positions,
        None,
        jnp.array([0.0, 1.0]),
        jnp.array([5.0, 5.0]),
        None,
        0.0,
        params,
        method=method,
    )
    assert bool(res.indefinite) and not bool(res.converged)
    # with Gaussian charges the same pair is fine
    ok = qeq.solve(two, [0.0, 1.0], [5.0, 5.0], [0.7, 0.7], method=method)
    assert bool(ok.converged) and float(ok.charges[0]) > 0


def test_bad_inputs_raise():
    s = _cluster(n=5)
    chi, hard, sigma = _qeq_params(s)
    with pytest.raises(ValueError, match=r"chi must have shape \(5,\)"):
        qeq.solve(s, np.zeros(6), hard, sigma)
    with pytest.raises(ValueError, match="hardness must have shape"):
        qeq.solve(s, chi, hard[:, None], sigma)
    with pytest.raises(ValueError, match="sigma must have shape"):
        qeq.solve(s, chi, hard, sigma[:3])
    neg = sigma.copy()
    neg[2] = 0.0
    with pytest.raises(ValueError, match="atom 2"):
        qeq.solve(s, chi, hard, neg)
    nan = chi.copy()
    nan[0] = np.nan
    with pytest.raises(ValueError, match="chi is not finite at atom 0"):
        qeq.solve(s, nan, hard, sigma)
    with pytest.raises(ValueError, match="q0 must have shape"):
        qeq.solve(s, chi, hard, sigma, method="cg", q0=np.zeros(4))
    with pytest.raises(ValueError, match="method"):
        qeq.solve(s, chi, hard, sigma, method="lu")
    with pytest.raises(ValueError, match="tol"):
        qeq.solve(s, chi, hard, sigma, tol=0.0)


# ---------------------------------------------------------------------------------------
# padding, jit, vmap
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["open-gauss", "ewald-gauss"])
def test_padding_changes_nothing(case):
    s, chi, hard, sigma, params, nl = _case(case)
    s = s.replace(total_charge=1.0)
    n, pad = s.n_atoms, 3
    pos_p = jnp.concatenate([s.positions, jnp.zeros((pad, 3))])  # padding sits at the origin
    chi_p = jnp.asarray(np.concatenate([chi, [1e3, -7.0, np.nan]]))
    hard_p = jnp.asarray(np.concatenate([hard, [0.0, -1.0, np.inf]]))
    sig_p = jnp.asarray(np.concatenate([sigma, [0.0, -1.0, 0.0]]))
    mask = jnp.arange(n + pad) < n
    cell = s.cell if s.periodic else None
    for method in ("dense", "cg"):

        def e_pad(p, method=method):
            r = qeq.solve_arrays(
                p, cell, chi_p, hard_p, sig_p, 1.0, params, nl, mask, method=method, tol=TOL
            )
            return r.energy, r

        def e_ref(p, method=method):
            r = qeq.solve_arrays(p, cell, chi, hard, sigma, 1.0, params, nl, method=method, tol=TOL)
            return r.energy, r

        g_pad, got = jax.jit(jax.grad(e_pad, has_aux=True))(pos_p)
        g_ref, ref = jax.jit(jax.grad(e_ref, has_aux=True))(s.positions)
        qeq.check(got)
        np.testing.assert_allclose(np.asarray(got.charges[:n]), np.asarray(ref.charges), atol=1e-11)
        assert np.all(np.asarray(got.charges[n:]) == 0.0)
        np.testing.assert_allclose(float(got.energy), float(ref.energy), rtol=1e-11)
        np.testing.assert_allclose(float(got.residual), float(ref.residual), atol=TOL)
        np.testing.assert_allclose(np.asarray(g_pad[:n]), np.asarray(g_ref), rtol=1e-8, atol=1e-9)
        assert np.all(np.asarray(g_pad[n:]) == 0.0)


def test_jit_and_vmap():
    s, chi, hard, sigma, params, nl = _case("open-gauss")
    f = jax.jit(
        lambda c, t: qeq.solve_arrays(s.positions, None, c, hard, sigma, t, params, tol=TOL)
    )
    chis = jnp.stack([jnp.asarray(chi), jnp.asarray(chi)[::-1]])
    totals = jnp.array([0.0, 2.0])
    batched = jax.vmap(f)(chis, totals)
    qeq.check(batched)
    for k in range(2):
        one = qeq.solve(
            s.replace(total_charge=float(totals[k])),
            np.asarray(chis[k]),
            hard,
            sigma,
            method="dense",
            params=params,
        )
        np.testing.assert_allclose(
            np.asarray(batched.charges[k]), np.asarray(one.charges), atol=1e-9
        )
    bad = batched.replace(converged=jnp.array([True, False]))
    with pytest.raises(qeq.QeqConvergenceError):
        qeq.check(bad)


def test_auto_method():
    s, chi, hard, sigma, params, nl = _case("open-point")
    r = qeq.solve(s, chi, hard, None)  # small → dense
    assert int(r.iterations) == 0


def test_second_order_force_loss_gradient():
    """Training on forces needs d/dχ of (dE*/dr): implicit differentiation twice."""
    s, chi, hard, sigma, params, nl = _case("open-gauss")

    def loss(chi, method):
        forces = -jax.grad(
            lambda p: (
                qeq.solve_arrays(
                    p, None, chi, hard, sigma, 0.0, params, method=method, tol=TOL
                ).energy
            )
        )(s.positions)
        return jnp.sum(forces**2)

    g = jax.jit(jax.grad(loss), static_argnums=1)
    gc, gd = np.asarray(g(jnp.asarray(chi), "cg")), np.asarray(g(jnp.asarray(chi), "dense"))
    assert np.abs(gd).max() > 1e-3
    np.testing.assert_allclose(gc, gd, rtol=1e-7, atol=1e-9 * np.abs(gd).max())


def test_tol_accepts_numpy_reals_and_refuses_bad_values():
    # before: tol=np.float32(1e-8) was refused as "not a positive number"
    s = cs.System([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0]], [11, 17])
    chi, hard = np.array([0.0, 1.0]), np.array([20.0, 20.0])
    r32 = qeq.solve(s, chi, hard, None, method="dense", tol=np.float32(1e-6))
    r64 = qeq.solve(s, chi, hard, None, method="dense", tol=1e-6)
    np.testing.assert_allclose(np.asarray(r32.charges), np.asarray(r64.charges), rtol=0, atol=0)
    for bad in (True, float("nan"), float("inf"), -1.0, "1e-8"):
        with pytest.raises(ValueError, match="tol must be a positive, finite number"):
            qeq.solve(s, chi, hard, None, method="dense", tol=bad)
