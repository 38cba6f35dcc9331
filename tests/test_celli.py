"""CELLI: charge conservation, total-charge dependence, nonlocal charge transfer, forces
through the Qeq layer (finite differences), invariance, padding, config errors (float64)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_allegro import (
    R_CUT,
    Jitted,
    crystal,
    make_graph,
    open_cluster,
    rotation,
    small_config,
)

from celli_scale import electrostatics as el
from celli_scale.models import build
from celli_scale.models.celli import CELLIConfig
from celli_scale.system import System


def celli_config(**kw) -> dict:
    # l_max=1 keeps compile times short; the l_max=2 tensor product is tested with Allegro
    cfg = small_config(
        name="celli",
        l_max=1,
        chi_mlp=(8,),
        charge_embed_mlp=(8,),
        charge_embed_dim=4,
        feedback_mlp=(8,),
        feedback_init=0.5,
    )
    cfg.update(kw)
    return cfg


def celli_graph(system: System, cfg: dict, total_charge=None, **pad):
    """Graph with electrostatics prepared for the largest learnable Gaussian width.

    The real-space pair list is fixed at the given positions and the kernels do not cut
    pairs by distance, so the energy is smooth under the finite-difference displacements.
    """
    c = CELLIConfig.from_dict(cfg)
    g = make_graph(system, c.r_cut, total_charge=total_charge, **pad)
    params = el.prepare(system, c.elec_method, c.elec_accuracy, sigma=c.elec_sigma_max)
    nl = el.real_space_neighbors(system, params)
    return g.replace(elec_params=params, elec_neighbors=nl)


@pytest.fixture(scope="module")
def celli():
    cfg = celli_config()
    model = build(cfg)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), celli_graph(open_cluster(), cfg))
    return Jitted(model), params, cfg


@pytest.fixture(scope="module")
def celli_cg(celli):
    """The same model and parameters with the CG solver (implicit differentiation)."""
    _, params, cfg = celli
    cfg = dict(cfg, qeq_method="cg")
    return Jitted(build(cfg)), params, cfg


# --------------------------------------------------------------------------------------
def test_config_errors_and_defaults():
    c = CELLIConfig(species=(11, 17), n_layers=3)
    assert (c.n_pre, c.n_post, c.qeq_tol) == (1, 2, 1e-10)
    assert CELLIConfig(species=(1,), dtype="float32").qeq_tol == 1e-5
    assert CELLIConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="n_pre \\+ n_post == n_layers"):
        CELLIConfig(n_layers=2, n_pre=1, n_post=2)
    with pytest.raises(ValueError, match="n_pre"):
        CELLIConfig(n_layers=2, n_pre=3)
    with pytest.raises(ValueError, match="qeq_method"):
        CELLIConfig(qeq_method="lu")
    with pytest.raises(ValueError, match="elec_method"):
        build({"name": "celli", "species": [1], "elec_method": "fmm"})


@pytest.mark.parametrize("periodic", [False, True])
def test_charge_conservation_and_total_charge(celli, periodic):
    model, params, cfg = celli
    s = crystal() if periodic else open_cluster()
    energies = {}
    for q_tot in (-1.0, 0.0, 1.0):
        out = model.apply(params, celli_graph(s, cfg, total_charge=q_tot))
        q = np.asarray(out.charges)
        assert abs(q.sum() - q_tot) <= 1e-10
        assert float(out.qeq_residual) <= 1e-8
        assert np.abs(q).max() > 1e-3  # charges are not trivially zero
        energies[q_tot] = float(out.energy)
    assert abs(energies[1.0] - energies[-1.0]) > 1e-4
    # the strictly local model cannot tell the two apart
    amodel = Jitted(build(small_config(l_max=1)))
    ap = jax.jit(amodel.model.init)(jax.random.PRNGKey(0), make_graph(open_cluster(), R_CUT))
    e_plus = float(amodel.apply(ap, make_graph(s, R_CUT, total_charge=1.0)).energy)
    e_minus = float(amodel.apply(ap, make_graph(s, R_CUT, total_charge=-1.0)).energy)
    assert e_plus == e_minus


def test_nonlocal_charge_transfer(celli):
    """Moving an atom far outside r_cut of atom i changes q_i and E_i (via the feedback)."""
    model, params, cfg = celli
    s = open_cluster()
    pos = np.asarray(s.positions)
    d = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
    i, m = np.unravel_index(np.argmax(d), d.shape)
    assert d[i, m] > 2 * R_CUT
    out0 = model.apply(params, celli_graph(s, cfg))
    moved = pos.copy()
    moved[m] += np.array([0.3, -0.2, 0.25])
    s2 = System(moved, np.asarray(s.species))
    assert np.linalg.norm(moved[m] - moved[i]) > 2 * R_CUT
    out1 = model.apply(params, celli_graph(s2, cfg))
    assert abs(float(out1.charges[i]) - float(out0.charges[i])) > 1e-6
    assert abs(float(out1.node_energies[i]) - float(out0.node_energies[i])) > 1e-9
    np.testing.assert_allclose(np.sum(out1.charges), 0.0, atol=1e-10)


@pytest.mark.parametrize("periodic, solver", [(False, "dense"), (False, "cg"), (True, "cg")])
def test_forces_match_finite_differences(celli, celli_cg, periodic, solver):
    """Forces through the Qeq layer (dense: autodiff; CG: implicit differentiation)."""
    model, params, cfg = celli if solver == "dense" else celli_cg
    s = crystal() if periodic else open_cluster()
    g = celli_graph(s, cfg, total_charge=1.0)
    out, grad = model.energy_and_grad(params, g)
    forces = -np.asarray(grad)
    pos = np.asarray(g.positions)
    h = 1e-4
    rng = np.random.default_rng(0)
    comps = [(a, k) for a in range(pos.shape[0]) for k in range(3)]
    comps = [comps[c] for c in rng.choice(len(comps), size=12, replace=False)]
    for a, k in comps:
        dp = np.zeros_like(pos)
        dp[a, k] = h
        ep = float(model.apply(params, g.replace(positions=jnp.asarray(pos + dp))).energy)
        em = float(model.apply(params, g.replace(positions=jnp.asarray(pos - dp))).energy)
        fd = -(ep - em) / (2 * h)
        assert abs(forces[a, k] - fd) <= 1e-6 * np.abs(forces).max(), (a, k, forces[a, k], fd)
    assert np.abs(forces).max() > 1e-3
    assert float(out.qeq_residual) <= 1e-8
    if solver == "cg":  # the CG solution is the dense one
        dense_model, _, _ = celli
        q_dense = np.asarray(dense_model.apply(params, g).charges)
        np.testing.assert_allclose(out.charges, q_dense, atol=1e-8)


@pytest.mark.parametrize("periodic", [False, True])
def test_invariance(celli, periodic):
    model, params, cfg = celli
    s = crystal() if periodic else open_cluster()
    ref = model.apply(params, celli_graph(s, cfg, total_charge=-1.0))
    pos, z = np.asarray(s.positions), np.asarray(s.species)
    cell = None if s.cell is None else np.asarray(s.cell)
    R = rotation(11)
    perm = np.random.default_rng(2).permutation(len(z))
    t = np.array([0.4, 2.0, -1.1])
    variants = {
        "rotation": (pos @ R.T + t, z, None if cell is None else cell @ R.T, None),
        "reflection": (-pos, z, None if cell is None else -cell, None),
        "permutation": (pos[perm], z[perm], cell, perm),
    }
    q_ref = np.asarray(ref.charges)
    for name, (p2, z2, c2, pm) in variants.items():
        s2 = System(p2, z2, cell=c2, pbc=periodic)
        out = model.apply(params, celli_graph(s2, cfg, total_charge=-1.0))
        assert abs(float(out.energy) - float(ref.energy)) <= 1e-9 * abs(float(ref.energy)), name
        np.testing.assert_allclose(
            out.charges,
            q_ref if pm is None else q_ref[pm],
            rtol=0,
            atol=1e-9 * np.abs(q_ref).max(),
            err_msg=name,
        )


def test_padding_invariance(celli):
    model, params, cfg = celli
    s = crystal()
    g = celli_graph(s, cfg)
    gp = celli_graph(s, cfg, pad_atoms=2, pad_edges=9)
    n = g.n_nodes
    out, grad = model.energy_and_grad(params, g)
    out_p, grad_p = model.energy_and_grad(params, gp)
    assert abs(float(out_p.energy) - float(out.energy)) <= 1e-11 * abs(float(out.energy))
    np.testing.assert_allclose(out_p.charges[:n], out.charges, atol=1e-11)
    assert np.all(np.asarray(out_p.charges[n:]) == 0.0)
    np.testing.assert_allclose(grad_p[:n], grad, atol=1e-10)
    assert np.all(np.isfinite(np.asarray(grad_p)))
