"""CELLI's own checks: charge conservation, total-charge dependence, nonlocal charge
transfer, forces through the CG solve (implicit differentiation), config errors (float64).

Symmetry (charges included), forces through the dense solve, stress, padding and float32
are checked for every model in test_models.py.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import celli_scale as cs
from celli_scale.models import build
from celli_scale.models.celli import CELLIConfig
from celli_scale.testing import assert_forces_match_fd, small_allegro_config

SPECIES = (11, 17)
R_CUT = 3.5
# l_max=1: short compile times; the l_max=2 tensor product is tested with Allegro
ALLEGRO = small_allegro_config(r_cut=R_CUT, species=SPECIES, l_max=1)
CELLI = dict(
    ALLEGRO,
    name="celli",
    chi_mlp=(8,),
    charge_embed_mlp=(8,),
    charge_embed_dim=4,
    feedback_mlp=(8,),
    feedback_init=0.5,
)


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
