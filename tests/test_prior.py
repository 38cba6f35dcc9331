"""Physical priors (celli_scale.models.prior): the ZBL, exponential and power-law pair
repulsions against independent numpy formulas (energies 1e-12 relative, forces 1e-9),
forces = finite differences, smooth switch-off at the prior's cut-off, padding
invariance, a close approach to 0.3 Å, config checks and save/load, CELLI's
``charges=``/``chi_only`` forwarding, and the sharded path (2 devices) = Potential."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import celli_scale as cs
from celli_scale.datasets import nacl_grid
from celli_scale.distributed.sharded import ShardedPotential
from celli_scale.models import build, make_config
from celli_scale.models.config import PriorConfig
from celli_scale.models.prior import WithPrior, pair_energy, switch
from celli_scale.potential import Potential
from celli_scale.testing import (
    assert_forces_match_fd,
    assert_padding_invariant,
    random_params,
    small_allegro_config,
)

SPECIES = (1, 6, 8, 11, 17)
R_CUT = 3.0
PRIOR = {"kind": "zbl", "r_cut": 2.0, "r_on": 1.0}
BASE = small_allegro_config(r_cut=R_CUT, species=SPECIES, l_max=1)


# -- independent reference (numpy, from the published ZBL constants) ----------------------
def zbl_np(r: np.ndarray, zi: float, zj: float) -> np.ndarray:
    """ZBL universal screened Coulomb repulsion (eV), r in Å (Ziegler, Biersack and
    Littmark, 1985): a = 0.8854 a0 / (Zi^0.23 + Zj^0.23)."""
    a0 = 0.529177210903
    a = 0.8854 * a0 / (zi**0.23 + zj**0.23)
    x = r / a
    phi = (
        0.18175 * np.exp(-3.1998 * x)
        + 0.50986 * np.exp(-0.94229 * x)
        + 0.28022 * np.exp(-0.4029 * x)
        + 0.02817 * np.exp(-0.20162 * x)
    )
    return 14.3996454784 * zi * zj / r * phi


def smoothstep_np(r: np.ndarray, r_on: float, r_c: float) -> np.ndarray:
    t = np.clip((r - r_on) / (r_c - r_on), 0.0, 1.0)
    return 1 - 10 * t**3 + 15 * t**4 - 6 * t**5


def prior_np(r: np.ndarray, zi: float, zj: float, r_on: float, r_c: float) -> np.ndarray:
    return np.where(r < r_c, zbl_np(r, zi, zj) * smoothstep_np(r, r_on, r_c), 0.0)


def dimer(r: float, zi: int, zj: int) -> cs.System:
    d = np.array([0.3, 0.5, 0.8]) / np.linalg.norm([0.3, 0.5, 0.8])
    return cs.System(np.stack([np.zeros(3), r * d]) + 1.0, np.array([zi, zj]))


def cluster(seed: int = 0, n: int = 8) -> cs.System:
    """``n`` atoms 0.9–2.5 Å apart: some pairs inside r_on, some in the switch window."""
    rng = np.random.default_rng(seed)
    pts: list[np.ndarray] = []
    while len(pts) < n:
        p = rng.uniform(0, 3.5, 3)
        d = [np.linalg.norm(p - q) for q in pts]
        if not d or (min(d) > 0.9 and min(d) < 2.5):
            pts.append(p)
    return cs.System(np.asarray(pts), np.asarray(SPECIES)[np.arange(n) % len(SPECIES)])


@pytest.fixture(scope="module")
def pots() -> tuple[Potential, Potential]:
    """The same Allegro parameters without and with the ZBL prior."""
    plain = cs.Potential.from_config(BASE, seed=0, example=cluster())
    with_p = cs.Potential(build(dict(BASE, prior=PRIOR)), plain.params)
    return plain, with_p


# --------------------------------------------------------------------------------------
def test_config_checks_and_round_trip():
    cfg = make_config(dict(BASE, prior=PRIOR))
    assert isinstance(cfg.prior, PriorConfig)
    assert make_config(cfg.to_dict()) == cfg
    assert PriorConfig(r_cut=1.2).r_on == 0.6  # default switch window: [r_cut/2, r_cut]
    with pytest.raises(ValueError, match="exceeds the model r_cut"):
        make_config(dict(BASE, prior={"kind": "zbl", "r_cut": R_CUT + 0.1}))
    with pytest.raises(ValueError, match="unknown config prior key"):
        make_config(dict(BASE, prior={"kind": "zbl", "rcut": 1.0}))
    with pytest.raises(ValueError, match="prior kind"):
        make_config(dict(BASE, prior={"kind": "lj"}))
    with pytest.raises(ValueError, match="r_on"):
        make_config(dict(BASE, prior={"r_cut": 1.0, "r_on": 1.0}))
    with pytest.raises(ValueError, match="prior r_cut must be a number"):
        make_config(dict(BASE, prior={"r_cut": "1"}))
    # no prior: the plain model, not a wrapper; with one: the same parameter tree
    assert not isinstance(build(BASE), WithPrior)
    assert isinstance(build(dict(BASE, prior=PRIOR)), WithPrior)


@pytest.mark.parametrize(("zi", "zj"), [(1, 1), (6, 8), (11, 17)])
def test_zbl_energy_and_forces_match_analytic(pots, zi, zj):
    """The prior's share of energy and forces (with minus without, same parameters) is
    the analytic ZBL × switch; below r_on exactly ZBL, in the window switched, beyond
    r_cut zero."""
    plain, with_p = pots
    for r in (0.35, 0.7, 1.0, 1.3, 1.75, 1.99, 2.2):
        s = dimer(r, zi, zj)
        a, b = plain(s), with_p(s)
        e = float(b.energy) - float(a.energy)
        e_ref = float(prior_np(np.asarray(r), zi, zj, 1.0, 2.0))
        assert e == pytest.approx(e_ref, rel=1e-12, abs=1e-12), (r, e, e_ref)
        # -dE/dr along the bond, by a central difference of the numpy reference
        h = 1e-6
        e_p, e_m = (prior_np(np.asarray(r + d), zi, zj, 1.0, 2.0) for d in (h, -h))
        dedr = (e_p - e_m) / (2 * h)
        u = (np.asarray(s.positions[1]) - np.asarray(s.positions[0])) / r
        f = np.asarray(b.forces) - np.asarray(a.forces)
        np.testing.assert_allclose(f[1], -dedr * u, rtol=1e-7, atol=1e-7 * max(1, abs(dedr)))
        np.testing.assert_allclose(f[0], -f[1], atol=1e-9 * max(1, abs(dedr)))
        # half of the pair on each atom
        ne = np.asarray(b.node_energies) - np.asarray(a.node_energies)
        np.testing.assert_allclose(ne, [e_ref / 2, e_ref / 2], rtol=1e-12, atol=1e-13)


def test_pair_repulsions_exp_and_power():
    r = np.array([0.4, 0.8, 1.2, 1.6, 1.9, 2.1])
    z = np.ones(r.size, np.int32)
    exp = PriorConfig(kind="exp", r_cut=2.0, r_on=1.0, a=500.0, rho=0.25)
    got = np.asarray(pair_energy(exp, jax.numpy.asarray(r), z, z))
    want = np.where(r < 2.0, 500 * np.exp(-r / 0.25) * smoothstep_np(r, 1.0, 2.0), 0.0)
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-12)
    power = PriorConfig(kind="power", r_cut=2.0, r_on=1.0, epsilon=0.3, sigma=1.1, n=9)
    got = np.asarray(pair_energy(power, jax.numpy.asarray(r), z, z))
    want = np.where(r < 2.0, 0.3 * (1.1 / r) ** 9 * smoothstep_np(r, 1.0, 2.0), 0.0)
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-12)


def test_smooth_at_the_cutoff():
    """Energy, force and force derivative of the switched prior go continuously to zero
    at r_cut (S, S', S'' vanish there); the switch is 1 below r_on."""
    cfg = PriorConfig(kind="zbl", r_cut=2.0, r_on=1.0)
    z = np.array([11], np.int32)

    def e(r):
        return pair_energy(cfg, jax.numpy.asarray([r]), z, z)[0]

    de, d2e = jax.grad(e), jax.grad(jax.grad(e))
    for r in (2.0 - 1e-4, 2.0 - 1e-6):
        eps = 2.0 - r
        assert abs(float(e(r))) < 50 * eps**3
        assert abs(float(de(r))) < 500 * eps**2
        assert abs(float(d2e(r))) < 5000 * eps
    for r in (2.0, 2.0 + 1e-6, 2.5):
        assert float(e(r)) == 0.0 and float(de(r)) == 0.0 and float(d2e(r)) == 0.0
    rs = np.linspace(0.2, 1.0, 9)
    np.testing.assert_array_equal(np.asarray(switch(jax.numpy.asarray(rs), 1.0, 2.0)), 1.0)


def test_forces_match_finite_differences_and_padding(pots):
    _, pot = pots
    s = cluster(1)
    g = pot.graph(s)
    _, forces, _, _ = pot.evaluate(pot.params, g)

    def energy(p):
        return pot.evaluate(pot.params, g.replace(positions=jax.numpy.asarray(p)))[0]

    assert_forces_match_fd(energy, g.positions, forces, h=1e-5, rtol=1e-6)
    assert_padding_invariant(pot, s)


def test_close_approach_stays_finite_and_repulsive(pots):
    """Two atoms pushed from 2.5 Å to 0.3 Å (an MD collision): the energy stays finite
    and grows monotonically, the force pushes them apart, strongly at 0.3 Å; without
    the prior the same model is not repulsive there."""
    plain, pot = pots
    rs = np.linspace(2.5, 0.3, 45)
    es, fs = [], []
    for r in rs:
        out = pot(dimer(r, 11, 17))
        u = np.asarray(dimer(r, 11, 17).positions[1] - dimer(r, 11, 17).positions[0]) / r
        es.append(float(out.energy))
        fs.append(float(np.asarray(out.forces)[1] @ u))  # along the bond, + = apart
    es, fs = np.asarray(es), np.asarray(fs)
    assert np.all(np.isfinite(es)) and np.all(np.isfinite(fs))
    inside = rs < 1.5
    assert np.all(np.diff(es[inside]) > 0)
    assert np.all(fs[inside] > 0)
    assert fs[-1] > 1e3  # eV/Å: ZBL Na–Cl at 0.3 Å
    e_ref = float(prior_np(np.asarray(0.3), 11, 17, 1.0, 2.0))
    assert es[-1] == pytest.approx(e_ref + float(plain(dimer(0.3, 11, 17)).energy), rel=1e-12)


def test_save_load_keeps_the_prior(pots, tmp_path):
    _, pot = pots
    pot.save(tmp_path / "m")
    loaded = Potential.load(tmp_path / "m")
    assert loaded.config.prior == pot.config.prior
    assert isinstance(loaded.model, WithPrior)
    s = cluster(2)
    a, b = pot(s), loaded(s)
    assert float(a.energy) == pytest.approx(float(b.energy), rel=1e-13)
    np.testing.assert_allclose(np.asarray(a.forces), np.asarray(b.forces), rtol=0, atol=1e-12)


def test_celli_forwards_charges_and_chi_only():
    """CELLI with a prior: ``chi_only`` is untouched, ``charges=q`` adds the prior to the
    local node energies, the full call adds it to the energy."""
    cfg = dict(
        small_allegro_config(r_cut=R_CUT, species=(11, 17), l_max=1),
        name="celli", chi_mlp=(8,), charge_embed_mlp=(8,), charge_embed_dim=4,
        feedback_mlp=(8,),
    )  # fmt: skip
    s = cs.System(np.asarray(cluster(3, 6).positions), np.array([11, 17] * 3))
    plain = cs.Potential.from_config(cfg, seed=0, example=s)
    model = build(dict(cfg, prior=PRIOR))
    g = plain.graph(s)
    p = plain.params
    ref = plain.model.apply(p, g)
    out = model.apply(p, g)
    z = np.asarray(s.species)
    pos = np.asarray(s.positions)
    d = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
    pair = prior_np(np.where(d > 0, d, 1.0), z[:, None], z[None], 1.0, 2.0)
    np.fill_diagonal(pair, 0.0)
    node = 0.5 * pair.sum(1)
    assert node.max() > 1e-3  # some pairs inside the prior's range
    np.testing.assert_allclose(out.node_energies - ref.node_energies, node, rtol=1e-11)
    assert float(out.energy - ref.energy) == pytest.approx(node.sum(), rel=1e-11)
    np.testing.assert_allclose(out.charges, ref.charges, atol=1e-12)
    chi_p = model.apply(p, g, chi_only=True)
    chi_0 = plain.model.apply(p, g, chi_only=True)
    np.testing.assert_array_equal(np.asarray(chi_p.chi), np.asarray(chi_0.chi))
    assert float(chi_p.energy) == 0.0
    given_p = model.apply(p, g, charges=ref.charges)
    given_0 = plain.model.apply(p, g, charges=ref.charges)
    np.testing.assert_allclose(given_p.node_energies - given_0.node_energies, node, rtol=1e-11)


def test_sharded_equals_single_device_with_prior():
    """ShardedPotential over 2 devices = Potential for a model with a ZBL prior whose
    range covers the nearest neighbours of a rattled NaCl grid."""
    cfg = dict(
        small_allegro_config(r_cut=3.2, species=(11, 17), l_max=1),
        prior={"kind": "zbl", "r_cut": 2.6, "r_on": 1.5},
    )
    s = nacl_grid(4, 2.2, 0.15, 5)
    pot = cs.Potential.from_config(cfg, seed=0, example=s)
    pot = Potential(pot.model, random_params(pot.params, 1, 0.3))
    ref = pot(s)
    plain = Potential(build(dict(cfg, prior=None)), pot.params)(s)
    assert float(ref.energy) - float(plain.energy) > 1.0  # the prior matters here
    out = ShardedPotential(pot, mesh_shape=(2, 1, 1))(s)
    assert float(out.energy) == pytest.approx(float(ref.energy), rel=1e-10)
    scale = np.abs(np.asarray(ref.forces)).max()
    np.testing.assert_allclose(
        np.asarray(out.forces), np.asarray(ref.forces), rtol=0, atol=1e-8 * scale
    )
    np.testing.assert_allclose(
        np.asarray(out.node_energies), np.asarray(ref.node_energies), rtol=0, atol=1e-10
    )
    np.testing.assert_allclose(
        np.asarray(out.stress), np.asarray(ref.stress), rtol=0,
        atol=1e-8 * np.abs(np.asarray(ref.stress)).max(),
    )  # fmt: skip


def test_sharded_celli_with_prior_equals_single_device():
    """Sharded CELLI (χ pass, distributed Qeq, local pass with the charges given) with a
    ZBL prior equals the single-device Potential: the wrapper forwards ``chi_only`` and
    ``charges=`` and the prior enters the local energies once."""
    cfg = dict(
        small_allegro_config(r_cut=3.2, species=(11, 17), l_max=1),
        name="celli", chi_mlp=(8,), charge_embed_mlp=(8,), charge_embed_dim=4,
        feedback_mlp=(8,), elec_method="direct", prior={"kind": "zbl", "r_cut": 2.6, "r_on": 1.5},
    )  # fmt: skip
    g = nacl_grid(4, 2.2, 0.15, 6)
    s = cs.System(g.positions, g.species, total_charge=1.0)
    pot = cs.Potential.from_config(cfg, seed=0, example=s)
    p = random_params(pot.params, 2, 0.3)
    qp = dict(p["params"]["qeq"], chi_shift=np.array([-2.0, 2.0]), chi_scale=np.asarray(1.0))
    pot = Potential(pot.model, {"params": dict(p["params"], qeq=qp)})
    ref = pot(s)
    assert np.abs(np.asarray(ref.charges)).max() > 0.1
    out = ShardedPotential(pot, mesh_shape=(2, 1, 1))(s)
    assert float(out.energy) == pytest.approx(float(ref.energy), rel=1e-10)
    scale = np.abs(np.asarray(ref.forces)).max()
    np.testing.assert_allclose(
        np.asarray(out.forces), np.asarray(ref.forces), rtol=0, atol=1e-8 * scale
    )
    np.testing.assert_allclose(np.asarray(out.charges), np.asarray(ref.charges), atol=1e-8)
