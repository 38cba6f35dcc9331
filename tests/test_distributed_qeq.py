"""The distributed Qeq (celli_scale.distributed.qeq) against the single-device solvers:
charges equal the dense bordered solve (Ewald, PME, open), with net charge, groups and an
external potential; the distributed adjoint equals jax.grad through the single-device CG
(implicit differentiation); charge moves from one domain to the farthest one exactly as on
one device; a warm start cuts iterations; the lowered program has at most 2 all-reduces
per CG iteration; bad solves raise."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import celli_scale as cs
from celli_scale import electrostatics as el
from celli_scale import qeq
from celli_scale.datasets import nacl_grid
from celli_scale.distributed import domains
from celli_scale.distributed import qeq as dq

A = 2.2


def _periodic(seed: int = 1, total_charge: float = 1.0) -> cs.System:
    return nacl_grid(4, A, 0.12, seed).replace(total_charge=total_charge)


def _open(seed: int = 2, total_charge: float = -1.0) -> cs.System:
    s = nacl_grid(4, A, 0.12, seed)
    return cs.System(s.positions, s.species, total_charge=total_charge)


def _inputs(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    chi = rng.normal(0.0, 2.0, n)
    hard = 8.0 + 4.0 * rng.random(n)
    sigma = 0.8 + 0.3 * rng.random(n)
    return chi, hard, sigma


CASES = [("ewald", _periodic), ("pme", _periodic), ("direct", _open)]


@pytest.mark.parametrize("devices", [1, 2, 4])
@pytest.mark.parametrize("method,make", CASES, ids=[c[0] for c in CASES])
def test_charges_and_implicit_gradients_equal_single_device(method, make, devices):
    system = make()
    n = system.n_atoms
    chi, hard, sigma = _inputs(n)
    w = np.random.default_rng(5).normal(size=n)
    dense = qeq.solve(system, chi, hard, sigma, method="dense", electrostatics=method)
    out = dq.solve(system, chi, hard, sigma, devices=devices, method=method, weights=w, tol=1e-12)
    assert out.method == method
    q = np.asarray(out.charges)
    np.testing.assert_allclose(q, np.asarray(dense.charges), atol=1e-8, rtol=0)
    assert abs(q.sum() - system.total_charge) < 1e-10
    assert np.abs(q).max() > 0.05  # charges that mean something
    np.testing.assert_allclose(
        float(out.chemical_potential), float(dense.chemical_potential), atol=1e-8
    )

    # implicit gradients of L = w·q: single-device CG (custom_linear_solve) under jax.grad
    params = el.prepare(system, method=method, sigma=sigma)
    nl = el.real_space_neighbors(system, params)

    def loss(pos, c):
        r = qeq.solve(
            system.replace(positions=pos), c, hard, sigma, method="cg", params=params,
            neighbors=nl, tol=1e-12, check=False,
        )  # fmt: skip
        return jnp.dot(w, r.charges)

    gx, gc = jax.grad(loss, argnums=(0, 1))(jnp.asarray(system.positions), jnp.asarray(chi))
    np.testing.assert_allclose(np.asarray(out.chi_grad), np.asarray(gc), atol=1e-9, rtol=0)
    np.testing.assert_allclose(np.asarray(out.position_grad), np.asarray(gx), atol=1e-9, rtol=0)
    assert np.abs(np.asarray(gx)).max() > 1e-3


@pytest.mark.parametrize("method,make", CASES, ids=[c[0] for c in CASES])
def test_groups_and_external_potential_equal_dense(method, make):
    system = make(3, total_charge=-1.0)
    n = system.n_atoms
    chi, hard, sigma = _inputs(n, 1)
    phi = np.random.default_rng(2).normal(0.0, 0.5, n)
    groups = np.arange(n) % 3
    gq = np.array([0.5, -1.0, -0.5])
    dense = qeq.solve(
        system, chi, hard, sigma, method="dense", electrostatics=method, phi_ext=phi,
        groups=groups, group_charges=gq,
    )  # fmt: skip
    out = dq.solve(
        system, chi, hard, sigma, devices=4, method=method, phi_ext=phi, groups=groups,
        group_charges=gq,
    )  # fmt: skip
    q = np.asarray(out.charges)
    np.testing.assert_allclose(q, np.asarray(dense.charges), atol=1e-8, rtol=0)
    for g in range(3):
        assert abs(q[groups == g].sum() - gq[g]) < 1e-10
    np.testing.assert_allclose(
        np.asarray(out.chemical_potential), np.asarray(dense.chemical_potential), atol=1e-8
    )


def test_charge_transfer_reaches_the_farthest_domain():
    """Raising χ in the first brick of a periodic 4 × 1 × 1 mesh changes the charges in the
    farthest brick (the third), exactly as the single-device solve does."""
    system = nacl_grid(4, A, 0.1, 7).replace(total_charge=0.0)
    cell = np.asarray(system.cell)
    n = system.n_atoms
    chi, hard, sigma = _inputs(n, 3)
    plan = domains.decompose(system, (4, 1, 1), halo=1.0, reach=0.0, r_cut=0.5)
    first, last = plan.owned_ids[0], plan.owned_ids[2]
    first, last = first[first >= 0], last[last >= 0]
    frac = plan.positions @ np.linalg.inv(cell)
    assert frac[last, 0].min() - frac[first, 0].max() > 0.2  # a brick between them
    assert frac[first, 0].min() + 1.0 - frac[last, 0].max() > 0.2  # on either side
    chi2 = chi.copy()
    chi2[first] += 0.5
    kw = dict(method="pme", mesh_shape=(4, 1, 1))
    d0 = dq.solve(system, chi, hard, sigma, **kw)
    d1 = dq.solve(system, chi2, hard, sigma, **kw)
    s0 = qeq.solve(system, chi, hard, sigma, method="dense", electrostatics="pme")
    s1 = qeq.solve(system, chi2, hard, sigma, method="dense", electrostatics="pme")
    dq_sharded = np.asarray(d1.charges) - np.asarray(d0.charges)
    dq_single = np.asarray(s1.charges) - np.asarray(s0.charges)
    assert np.abs(dq_single[last]).max() > 1e-3  # the far domain's charges do change
    np.testing.assert_allclose(dq_sharded, dq_single, atol=1e-8, rtol=0)
    assert dq_sharded[first].sum() < -0.1  # charge leaves the brick whose χ was raised


def test_warm_start_cuts_iterations():
    """An MD-like step (3 mÅ, χ changed by 3 mV): the previous charges as the start save
    the decades of residual they already have (the tolerance is relative to the cold
    start's residual, so the saving is a fraction of the iterations, not all of them)."""
    system = _periodic(4)
    n = system.n_atoms
    chi, hard, sigma = _inputs(n, 4)
    cold = dq.solve(system, chi, hard, sigma, devices=2, method="pme")
    moved = system.replace(
        positions=np.asarray(system.positions) + np.random.default_rng(1).normal(0, 0.003, (n, 3))
    )
    chi2 = chi + np.random.default_rng(2).normal(0, 0.003, n)
    again = dq.solve(moved, chi2, hard, sigma, devices=2, method="pme")
    warm = dq.solve(moved, chi2, hard, sigma, devices=2, method="pme", q0=cold.charges)
    np.testing.assert_allclose(np.asarray(warm.charges), np.asarray(again.charges), atol=1e-8)
    assert warm.iterations <= 0.75 * again.iterations, (warm.iterations, again.iterations)


@pytest.mark.parametrize("method,make", CASES, ids=[c[0] for c in CASES])
def test_at_most_two_all_reduces_per_cg_iteration(method, make):
    """Counted in the lowered program: the CG loop is the while body with the most
    collectives; it has 2 all-reduces (periodic: plus the halo ppermutes) or, open,
    1 all-gather and 1 all-reduce."""
    system = make()
    chi, hard, sigma = _inputs(system.n_atoms)
    text = dq.lowered_solve_text(system, chi, hard, sigma, devices=4, method=method)
    loops = dq.loop_collectives(text)
    cg = max(loops, key=lambda c: sum(c.values()))
    assert cg["all_reduce"] == (1 if method == "direct" else 2), loops
    assert max(c["all_reduce"] for c in loops) <= 2
    if method == "direct":
        assert cg["all_gather"] == 1 and cg["collective_permute"] == 0
    else:
        assert cg["all_gather"] == 0 and cg["collective_permute"] > 0  # the halo exchange
    # the counter itself can fail: a made-up loop with three all-reduces is counted so
    fake = "stablehlo.while cond { } do { stablehlo.all_reduce x stablehlo.all_reduce " + (
        "y call @f } func.func private @f(%a) { stablehlo.all_reduce z }"
    )
    assert dq.loop_collectives(fake)[0]["all_reduce"] == 3


def test_bytes_per_iteration_reported():
    system = _periodic()
    chi, hard, sigma = _inputs(system.n_atoms)
    ew = dq.solve(system, chi, hard, sigma, devices=2, method="ewald")
    pm = dq.solve(system, chi, hard, sigma, devices=2, method="pme")
    params = el.prepare(system, method="pme", sigma=sigma)
    k = el.prepare(system, method="ewald", sigma=sigma).kvecs.shape[0]
    assert ew.bytes_per_iteration["all_reduce"] == (2 * k + 2 + 3) * 8
    assert pm.bytes_per_iteration["all_reduce"] == (int(np.prod(params.grid)) + 2 + 3) * 8
    assert ew.bytes_per_iteration["halo"] > 0


def test_auto_method(monkeypatch):
    system = _periodic()
    chi, hard, sigma = _inputs(system.n_atoms)
    assert dq.choose_method(_open(), 4, 1e-6, sigma) == "direct"
    assert dq.choose_method(system, 1, 1e-6, sigma) in ("ewald", "pme")
    out = dq.solve(system, chi, hard, sigma, devices=2)
    assert out.method == dq.choose_method(system, 2, 1e-6, sigma)
    # Ewald's parameters refused (as its single-device estimate does at ~30k atoms): PME
    real = el.prepare

    def refuse_ewald(system, method="auto", **kw):
        if method == "ewald":
            raise ValueError("electrostatics (ewald) would need about 34 GiB")
        return real(system, method=method, **kw)

    monkeypatch.setattr(dq.el, "prepare", refuse_ewald)
    assert dq.choose_method(system, 1, 1e-6, sigma) == "pme"


def test_bad_solves_raise():
    system = _periodic()
    n = system.n_atoms
    chi, hard, sigma = _inputs(n)
    with pytest.raises(qeq.QeqConvergenceError, match="did not converge"):
        dq.solve(system, chi, hard, sigma, devices=2, method="ewald", maxiter=2)
    with pytest.raises(ValueError, match="not positive definite"):
        dq.solve(system, chi, np.full(n, -30.0), sigma, devices=2, method="ewald")
    with pytest.raises(ValueError, match="chi"):
        dq.solve(system, chi[:-1], hard, sigma, devices=2)
    with pytest.raises(ValueError, match="group"):
        dq.solve(system, chi, hard, sigma, groups=np.zeros(n, int), group_charges=[0.0, 1.0])
