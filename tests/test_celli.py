"""CELLI's own checks: charge conservation, total-charge dependence, nonlocal charge
transfer, forces through the CG solve (implicit differentiation), config errors (float64).

Symmetry (charges included), forces through the dense solve, stress, padding and float32
are checked for every model in test_models.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import celli_scale as cs
from celli_scale.models import build
from celli_scale.models.celli import CELLIConfig
from celli_scale.testing import assert_forces_match_fd, small_allegro_config, small_celli_config

SPECIES = (11, 17)
R_CUT = 3.5
# l_max=1: short compile times; the l_max=2 tensor product is tested with Allegro
ALLEGRO = small_allegro_config(r_cut=R_CUT, species=SPECIES, l_max=1)
CELLI = small_celli_config(r_cut=R_CUT, species=SPECIES)


def open_cluster(n: int = 14, seed: int = 0, total_charge: float = 0.0) -> cs.System:
    """``n`` atoms at least 1.6 Å apart in an elongated 11 × 5 × 5 Å box (so that some
    pairs are more than ``2 r_cut`` apart)."""
    rng = np.random.default_rng(seed)
    pts: list[np.ndarray] = []
    while len(pts) < n:
        p = rng.uniform(0, 1, 3) * np.array([11.0, 5.0, 5.0])
        if all(np.linalg.norm(p - q) > 1.6 for q in pts):
            pts.append(p)
    z = np.where(np.arange(n) % 2 == 0, 11, 17)
    return cs.System(np.asarray(pts), z, total_charge=total_charge)


def crystal(seed: int = 1, total_charge: float = 0.0) -> cs.System:
    """8 atoms in a 5 Å triclinic cell (the cut-off reaches several images)."""
    cell = np.array([[5.0, 0.0, 0.0], [0.6, 5.2, 0.0], [0.3, -0.4, 4.8]])
    base = np.array(
        [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]]
        + [[0.5, 0, 0], [0, 0.5, 0], [0, 0, 0.5], [0.5, 0.5, 0.5]]
    )
    frac = base + 0.08 * (np.random.default_rng(seed).uniform(0, 1, (8, 3)) - 0.5)
    z = np.array([11, 17, 17, 11, 17, 11, 11, 17])
    return cs.System(frac @ cell, z, cell=cell, pbc=True, total_charge=total_charge)


def system(periodic: bool, total_charge: float = 0.0) -> cs.System:
    return (
        crystal(total_charge=total_charge) if periodic else open_cluster(total_charge=total_charge)
    )


@pytest.fixture(scope="module")
def celli():
    return cs.Potential.from_config(CELLI, seed=0, example=open_cluster())


@pytest.fixture(scope="module")
def celli_cg(celli):
    """The same model and parameters with the CG solver (implicit differentiation)."""
    return cs.Potential(build(dict(CELLI, qeq_method="cg")), celli.params)


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
    energies = {}
    for q_tot in (-1.0, 0.0, 1.0):
        out = celli(system(periodic, q_tot))
        q = np.asarray(out.charges)
        assert abs(q.sum() - q_tot) <= 1e-10
        assert np.abs(q).max() > 1e-3  # charges are not trivially zero
        # (the Qeq residual is checked against qeq_tol = 1e-10 by the Potential itself)
        energies[q_tot] = float(out.energy)
    assert abs(energies[1.0] - energies[-1.0]) > 1e-4
    # the strictly local model cannot tell the two apart
    allegro = cs.Potential.from_config(ALLEGRO, seed=0, example=open_cluster())
    e_plus = float(allegro(system(periodic, 1.0)).energy)
    e_minus = float(allegro(system(periodic, -1.0)).energy)
    assert e_plus == e_minus


def test_nonlocal_charge_transfer(celli):
    """Moving an atom far outside r_cut of atom i changes q_i and E_i (via the feedback)."""
    s = open_cluster()
    pos = np.asarray(s.positions)
    d = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
    i, m = np.unravel_index(np.argmax(d), d.shape)
    assert d[i, m] > 2 * R_CUT
    out0 = celli(s)
    moved = pos.copy()
    moved[m] += np.array([0.3, -0.2, 0.25])
    assert np.linalg.norm(moved[m] - moved[i]) > 2 * R_CUT
    out1 = celli(cs.System(moved, np.asarray(s.species)))
    assert abs(float(out1.charges[i]) - float(out0.charges[i])) > 1e-6
    assert abs(float(out1.node_energies[i]) - float(out0.node_energies[i])) > 1e-9
    np.testing.assert_allclose(np.sum(out1.charges), 0.0, atol=1e-10)


@pytest.mark.parametrize("periodic", [False, True])
def test_forces_through_cg_solve_match_finite_differences(celli, celli_cg, periodic):
    """Forces through the CG solve (implicit differentiation) against finite differences;
    the CG charges are the dense ones."""
    g = celli_cg.graph(system(periodic, 1.0))
    _, forces, _, out = celli_cg.evaluate(celli_cg.params, g)

    def energy(p):
        return celli_cg.evaluate(celli_cg.params, g.replace(positions=jnp.asarray(p)))[0]

    rng = np.random.default_rng(0)
    comps = [(a, k) for a in range(g.positions.shape[0]) for k in range(3)]
    comps = [comps[c] for c in rng.choice(len(comps), size=12, replace=False)]
    atol = 1e-6 * float(np.abs(forces).max())
    assert_forces_match_fd(energy, g.positions, forces, components=comps, rtol=0.0, atol=atol)
    assert float(out.qeq_residual) <= 1e-8
    q_dense = np.asarray(celli.evaluate(celli.params, g)[3].charges)
    np.testing.assert_allclose(out.charges, q_dense, atol=1e-8)


# --------------------------------------------------------------------------------------
# CELLI as published (chemtrain-deploy), as options; the published choices are defaults
# --------------------------------------------------------------------------------------
def _mlp_np(p: dict, x: np.ndarray) -> np.ndarray:
    """numpy re-implementation of layers.MLP: Dense, normalised SiLU between layers."""
    n = len(p)
    for k in range(n):
        x = x @ np.asarray(p[f"Dense_{k}"]["kernel"]) + np.asarray(p[f"Dense_{k}"]["bias"])
        if k < n - 1:
            x = x / (1 + np.exp(-x)) / 0.6791
    return x


def _softplus(x):
    return np.log1p(np.exp(x))


def test_published_defaults_and_option_errors():
    c = CELLIConfig(species=(11, 17))
    assert (c.feedback, c.sigma_mode, c.sigma_stop_gradient) == ("published", "covalent", True)
    assert c.hardness_init == 14.4
    assert c.feedback_init == pytest.approx(np.log(2.0))  # α = 0
    # the cap covers the covalent radii (Na 1.66 Å) with 20 % room; at least 1.5 Å
    assert c.elec_sigma_max == pytest.approx(1.2 * 1.66)
    assert CELLIConfig(species=(1, 8)).elec_sigma_max == 1.5
    assert CELLIConfig(species=(1, 8), elec_sigma_max=0.9).elec_sigma_max == 0.9
    assert CELLIConfig(feedback="ours").feedback_init == 0.1
    assert CELLIConfig().elec_sigma_max is None  # derived once species are known
    assert CELLIConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="sigma_mode"):
        CELLIConfig(sigma_mode="vdw")
    with pytest.raises(ValueError, match="feedback must be"):
        CELLIConfig(feedback="both")
    with pytest.raises(ValueError, match="feedback_init"):
        CELLIConfig(feedback_init=0.0)
    with pytest.raises(ValueError, match="sigma_init=2.0 exceeds"):
        CELLIConfig(species=(11,), sigma_mode="learnt", sigma_init=2.0, elec_sigma_max=1.5)


def test_sigma_modes_and_hardness_at_init(celli):
    """Covalent widths at init (ase.data.covalent_radii), fixed or learnt; the "learnt"
    mode starts every species at sigma_init; J starts at hardness_init; widths are
    capped at elec_sigma_max; qeq_raw_parameters inverts species_qeq_parameters."""
    from ase.data import covalent_radii

    from celli_scale.models.celli import qeq_raw_parameters, species_qeq_parameters

    r_cov = covalent_radii[[11, 17]]
    hard, sigma = species_qeq_parameters(celli.params, celli.config)
    np.testing.assert_allclose(sigma, r_cov, rtol=1e-14)
    np.testing.assert_allclose(hard, 14.4, rtol=1e-14)
    s = open_cluster()
    for mode, want in (("fixed_covalent", r_cov), ("learnt", [1.0, 1.0])):
        pot = cs.Potential.from_config(dict(CELLI, sigma_mode=mode), seed=0, example=s)
        assert ("sigma_raw" in pot.params["params"]["qeq"]) == (mode == "learnt")
        np.testing.assert_allclose(species_qeq_parameters(pot.params, pot.config)[1], want)
    cfg = celli.config
    for j, sg in (([8.0, 11.0], [0.8, 0.95]), ([20.0, 3.0], [1.9, 0.5])):
        raw = qeq_raw_parameters(cfg, j, sg)
        p = {"params": {"qeq": dict(celli.params["params"]["qeq"], **raw)}}
        got_j, got_s = species_qeq_parameters(p, cfg)
        np.testing.assert_allclose(got_j, j, rtol=1e-12)
        np.testing.assert_allclose(got_s, sg, rtol=1e-12)
    big = {"params": {"qeq": dict(celli.params["params"]["qeq"], sigma_raw=np.array([9.0, 9.0]))}}
    np.testing.assert_allclose(species_qeq_parameters(big, cfg)[1], cfg.elec_sigma_max)


def test_published_feedback_matches_numpy(celli):
    """``w_i = Linear([q_i, e_Z])``, ``y_ij = MLP([x_ij, w_i]) u(r_ij)``,
    ``x ← (x + a y)/(1 + a)``, ``a = softplus(α)``, against numpy; ``a → 0`` leaves the
    latent unmodified; ``feedback_mix`` with ``a = 0`` is the identity."""
    from celli_scale.models.celli import ChargeFeedback, feedback_mix
    from celli_scale.models.layers import edge_inputs

    cfg = celli.config
    g = celli.graph(open_cluster())
    edges = edge_inputs(g, cfg)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(g.senders.shape[0], cfg.latent_dim))
    q = rng.normal(size=g.positions.shape[0])
    p = celli.params["params"]["feedback"]
    p = dict(p, mix_raw=np.asarray(0.3))
    got = np.asarray(ChargeFeedback(cfg).apply({"params": p}, x, q, g, edges))
    emb = np.asarray(p["species"]["Embed_0"]["embedding"])[np.asarray(g.species)]
    w = _mlp_np(p["charge_embed"], np.concatenate([q[:, None], emb], axis=1))
    snd = np.asarray(g.senders)
    y = _mlp_np(p["feedback_mlp"], np.concatenate([x, w[snd]], axis=1))
    y = y * np.asarray(edges.cut)[:, None]
    a = _softplus(0.3)
    np.testing.assert_allclose(got, (x + a * y) / (1 + a), rtol=1e-12, atol=1e-12)
    off = np.asarray(ChargeFeedback(cfg).apply({"params": dict(p, mix_raw=-80.0)}, x, q, g, edges))
    np.testing.assert_allclose(off, x, rtol=1e-30, atol=1e-30)
    np.testing.assert_array_equal(np.asarray(feedback_mix(x, y, 0.0)), x)
    # the edge latent itself enters the feedback MLP (the published form, not ours)
    moved = np.asarray(ChargeFeedback(cfg).apply({"params": p}, x + 0.1, q, g, edges))
    assert np.abs(moved - got - 0.1).max() > 1e-3


def test_ours_feedback_matches_numpy():
    """The earlier variant: ``x + w · MLP([φ_i, φ_j]) u`` with ``φ_i = MLP([q_i, e_Z])``."""
    from celli_scale.models.celli import ChargeFeedback
    from celli_scale.models.layers import edge_inputs

    pot = cs.Potential.from_config(dict(CELLI, feedback="ours"), seed=0, example=open_cluster())
    cfg = pot.config
    g = pot.graph(open_cluster())
    edges = edge_inputs(g, cfg)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(g.senders.shape[0], cfg.latent_dim))
    q = rng.normal(size=g.positions.shape[0])
    p = pot.params["params"]["feedback"]
    assert float(p["weight"]) == 0.5
    got = np.asarray(ChargeFeedback(cfg).apply({"params": p}, x, q, g, edges))
    emb = np.asarray(p["species"]["Embed_0"]["embedding"])[np.asarray(g.species)]
    phi = _mlp_np(p["charge_embed"], np.concatenate([q[:, None], emb], axis=1))
    snd, rcv = np.asarray(g.senders), np.asarray(g.receivers)
    dx = _mlp_np(p["feedback_mlp"], np.concatenate([phi[snd], phi[rcv]], axis=1))
    np.testing.assert_allclose(got, x + 0.5 * dx * np.asarray(edges.cut)[:, None], rtol=1e-12)


def test_sigma_learns_only_through_the_charges(celli):
    """With ``sigma_stop_gradient`` the derivative of the energy w.r.t. the width
    parameters lacks exactly the explicit ``∂E_elec/∂σ`` at fixed charges; what is left
    (through the charges) is non-zero. Forces are the same either way."""
    from celli_scale import electrostatics as el
    from celli_scale.models.celli import species_qeq_parameters

    s = open_cluster(total_charge=1.0)
    g = celli.graph(s)
    on, off = build(CELLI), build(dict(CELLI, sigma_stop_gradient=False))
    params = celli.params

    def d_sigma_raw(model):
        def e(raw):
            qp = dict(params["params"]["qeq"], sigma_raw=raw)
            return model.apply({"params": dict(params["params"], qeq=qp)}, g).energy

        return np.asarray(jax.grad(e)(params["params"]["qeq"]["sigma_raw"]))

    g_on, g_off = d_sigma_raw(on), d_sigma_raw(off)
    q = on.apply(params, g).charges
    cfg = celli.config

    def e_elec_fixed_q(raw):
        qp = dict(params["params"]["qeq"], sigma_raw=raw)
        sigma = species_qeq_parameters({"params": {"qeq": qp}}, cfg)[1][g.species]
        return el.energy_arrays(g.positions, None, q, sigma, g.elec_params, mask=g.node_mask)

    explicit = np.asarray(jax.grad(e_elec_fixed_q)(params["params"]["qeq"]["sigma_raw"]))
    assert np.abs(explicit).min() > 1e-4
    assert np.abs(g_on).max() > 1e-6  # σ still learns, through the charges
    np.testing.assert_allclose(g_off - g_on, explicit, rtol=1e-8, atol=1e-10)
    f_on = cs.Potential(on, params)(s).forces
    f_off = cs.Potential(off, params)(s).forces
    np.testing.assert_array_equal(np.asarray(f_on), np.asarray(f_off))


def test_dipole_open_systems(celli):
    """``dipole = Σ q_i R_i`` (e·Å) for open systems: shifts by ``Q t`` under a
    translation ``t`` of a charged system, invariant for a neutral one; None when
    periodic."""
    t = np.array([1.5, -2.0, 0.7])
    for q_tot in (1.0, 0.0):
        s = open_cluster(total_charge=q_tot)
        out = celli(s)
        want = np.asarray(out.charges) @ np.asarray(s.positions)
        np.testing.assert_allclose(out.dipole, want, rtol=1e-12, atol=1e-12)
        assert np.abs(want).max() > 1e-3
        moved = celli(cs.System(np.asarray(s.positions) + t, s.species, total_charge=q_tot))
        np.testing.assert_allclose(moved.dipole, want + q_tot * t, rtol=1e-10, atol=1e-10)
    assert celli(crystal()).dipole is None


@pytest.mark.parametrize("method", ["ewald", "pme"])
def test_periodic_batch_is_one_stacked_call_matching_single_structures(method):
    """``pot(Batch)`` of periodic CELLI structures with different cells and total charges
    is one stacked, compiled call (electrostatics shapes unified) and gives each
    structure's energy, forces, charges and stress as a single call does, to the
    electrostatics accuracy."""
    from celli_scale.datasets import rocksalt
    from celli_scale.system import Batch

    cfg = small_celli_config(elec_method=method, elec_accuracy=1e-7)
    systems = [
        rocksalt(1, rattle=0.1, seed=1),
        rocksalt(1, a=5.9, rattle=0.1, seed=2).replace(total_charge=1.0),
        rocksalt(2, rattle=0.1, seed=3),
    ]
    pot = cs.Potential.from_config(cfg, seed=0, example=systems[0])
    single = [pot(s) for s in systems]
    graph = pot.batch_graph(systems)
    assert graph.positions.shape == (3, 16, 3)
    b = pot(Batch.from_systems(systems))
    for i, (s, o) in enumerate(zip(systems, single, strict=True)):
        n = s.n_atoms
        assert abs(float(b.energy[i]) - float(o.energy)) < 1e-7 * max(1.0, abs(float(o.energy)))
        np.testing.assert_allclose(b.forces[i][:n], o.forces, atol=1e-6)
        np.testing.assert_allclose(b.charges[i][:n], o.charges, atol=1e-7)
        np.testing.assert_allclose(b.stress[i], o.stress, atol=1e-7)
        assert abs(float(np.sum(b.charges[i])) - s.total_charge) < 1e-8
