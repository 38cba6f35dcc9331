"""Sharded CELLI (ShardedPotential over the distributed Qeq) equals single-device CELLI:
energy (1e-10 relative), forces, charges and stress (1e-8) with Ewald, PME and open
boundaries, net charge, 1-/2-/3-D meshes, sub-bricks, a triclinic cell whose bricks are
narrower than the halo, random decompositions (hypothesis); an MD run through ``update``
follows the single-device trajectory and conserves charge; warm starts cut iterations;
a missed tolerance raises."""

from __future__ import annotations

import textwrap
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import celli_scale as cs
from celli_scale.datasets import nacl_grid
from celli_scale.distributed.sharded import ShardedPotential
from celli_scale.models import build, make_config
from celli_scale.models.celli import qeq_raw_parameters
from celli_scale.potential import Potential
from celli_scale.qeq import QeqConvergenceError
from celli_scale.testing import random_params, run_with_devices, small_celli_config

ROOT = Path(__file__).resolve().parents[1]
A = 2.2
SHEAR = np.array([[1.0, 0.0, 0.0], [0.25, 1.0, 0.0], [0.15, -0.2, 1.0]])
CELLI = small_celli_config(r_cut=3.2, species=(11, 17), elec_sigma_max=1.0)


def _params(params, seed: int = 3):
    """Random weights (forces with structure) and physical Qeq parameters: Na and Cl
    electronegativities 4 V apart, J ≈ 8 and 11 eV/e², σ ≈ 0.8 and 0.95 Å."""
    p = random_params(params, seed, 0.3)
    q = dict(p["params"]["qeq"])
    q["chi_shift"] = jnp.asarray([-2.0, 2.0])
    q.update(qeq_raw_parameters(make_config(CELLI), [8.0, 11.0], [0.8, 0.95]))
    q["chi_scale"] = jnp.asarray(1.0)
    return {"params": dict(p["params"], qeq=q)}


def _periodic(seed: int = 1, total_charge: float = 1.0, n: int = 4) -> cs.System:
    return nacl_grid(n, A, 0.12, seed).replace(total_charge=total_charge)


def _triclinic(seed: int = 2) -> cs.System:
    s = nacl_grid(4, A, 0.1, seed)
    return cs.System(
        np.asarray(s.positions) @ SHEAR, s.species, cell=np.asarray(s.cell) @ SHEAR, pbc=True,
        total_charge=-1.0,
    )  # fmt: skip


def _open(seed: int = 3) -> cs.System:
    s = nacl_grid(4, A, 0.12, seed)
    return cs.System(s.positions, s.species, total_charge=1.0)


@pytest.fixture(scope="module")
def pots() -> dict[str, Potential]:
    out = {}
    for method in ("ewald", "pme", "direct"):
        example = _open() if method == "direct" else _periodic()
        pot = cs.Potential.from_config(dict(CELLI, elec_method=method), seed=0, example=example)
        out[method] = Potential(pot.model, _params(pot.params))
    return out


def assert_same(out, ref, stress: bool = True):
    de = abs(float(out.energy) - float(ref.energy)) / abs(float(ref.energy))
    assert de < 1e-10, de
    f, fr = np.asarray(out.forces), np.asarray(ref.forces)
    assert np.abs(fr).max() > 1e-2
    np.testing.assert_allclose(f, fr, atol=1e-8 * max(1.0, np.abs(fr).max()), rtol=0)
    q, qr = np.asarray(out.charges), np.asarray(ref.charges)
    assert np.abs(qr).max() > 0.1  # charges that mean something
    np.testing.assert_allclose(q, qr, atol=1e-8, rtol=0)
    e_tol = 1e-10 * abs(float(ref.energy))  # the parts to the total's relative precision
    np.testing.assert_allclose(float(out.elec_energy), float(ref.elec_energy), atol=e_tol)
    np.testing.assert_allclose(
        np.asarray(out.node_energies), np.asarray(ref.node_energies), atol=1e-9
    )
    if ref.dipole is not None:  # open systems
        np.testing.assert_allclose(np.asarray(out.dipole), np.asarray(ref.dipole), atol=1e-8)
    else:
        assert out.dipole is None
    if stress:
        s, sr = np.asarray(out.stress), np.asarray(ref.stress)
        assert np.abs(sr).max() > 1e-5
        np.testing.assert_allclose(s, sr, atol=1e-8 * np.abs(sr).max(), rtol=0)


CASES = [
    ("ewald", (1, 1, 1), 1),
    ("ewald", (2, 1, 1), 2),
    ("ewald", (2, 2, 1), 1),
    ("pme", (4, 1, 1), 1),
    ("pme", (1, 2, 2), 2),
    ("direct", (2, 2, 1), 1),
    ("direct", (1, 1, 1), 2),
]


@pytest.mark.parametrize("method,mesh,chunks", CASES)
def test_sharded_celli_equals_single_device(pots, method, mesh, chunks):
    pot = pots[method]
    system = _open() if method == "direct" else _periodic()
    ref = pot(system)
    sp = ShardedPotential(pot, mesh_shape=mesh, chunks=chunks)
    out = sp(system)
    assert_same(out, ref, stress=method != "direct")
    assert abs(float(np.sum(out.charges)) - system.total_charge) < 1e-10
    assert sp.stats.qeq_method == method
    assert sp.stats.qeq_iterations[0] > 0 and sp.stats.qeq_iterations[1] > 0
    assert "distributed Qeq" in sp.stats.summary()


def test_triclinic_bricks_narrower_than_the_halo(pots):
    pot = pots["pme"]
    system = _triclinic()
    sp = ShardedPotential(pot, mesh_shape=(2, 2, 1))
    out = sp(system)
    widths = cs.cell.plane_heights(np.asarray(system.cell)) / np.array([2, 2, 1])
    assert sp.decomposition.halo > widths.min()  # several hops
    assert max(s.hop for s in sp.decomposition.stages) > 1
    assert_same(out, pot(system))


@settings(
    max_examples=4,
    deadline=None,
    derandomize=True,
    database=None,
    phases=(Phase.explicit, Phase.generate),  # no shrinking: every example compiles
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    mesh=st.sampled_from([(2, 1, 1), (1, 2, 1), (1, 1, 4), (2, 2, 1)]),
    chunks=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**16),
    charge=st.sampled_from([-1.0, 0.0, 2.0]),
)
def test_property_random_decompositions(pots, mesh, chunks, seed, charge):
    base = _periodic(seed, charge)
    perm = np.random.default_rng(seed).permutation(base.n_atoms)
    system = cs.System(
        np.asarray(base.positions)[perm], np.asarray(base.species)[perm], cell=base.cell,
        pbc=True, total_charge=charge,
    )  # fmt: skip
    out = ShardedPotential(pots["ewald"], mesh_shape=mesh, chunks=chunks)(system)
    assert_same(out, pots["ewald"](system))


def test_md_follows_single_device_and_conserves_charge(pots):
    """Velocity Verlet, 12 steps of 1 fs, through ``sp.update`` (decompositions reused
    within the skin, warm-started solves) and through the single-device potential."""
    pot = pots["pme"]
    system = _periodic(5, total_charge=-1.0)
    masses = np.where(np.asarray(system.species) == 11, 22.99, 35.45)[:, None]
    dt = 1.0 * 0.09822694750253277  # fs in ASE time units (Å sqrt(amu/eV))
    v0 = np.random.default_rng(0).normal(0, 0.02, system.positions.shape)
    sp = ShardedPotential(pot, mesh_shape=(2, 2, 1))

    def run(evaluate):
        x, v = np.asarray(system.positions, float).copy(), v0.copy()
        out = evaluate(system)
        for _ in range(12):
            v = v + 0.5 * dt * np.asarray(out.forces) / masses
            x = x + dt * v
            out = evaluate(system.replace(positions=x))
            v = v + 0.5 * dt * np.asarray(out.forces) / masses
            q = np.asarray(out.charges)
            assert q.shape == (system.n_atoms,)
            assert abs(q.sum() - system.total_charge) < 1e-10
        return x, out

    iters = []

    def sharded(s):
        out = sp(s)
        iters.append(sp.stats.qeq_iterations[0])
        return out

    x_ref, out_ref = run(pot)
    x_sh, out_sh = run(sharded)
    np.testing.assert_allclose(x_sh, x_ref, atol=1e-9, rtol=0)
    assert_same(out_sh, out_ref)
    assert sp.stats.decompositions == 1  # moved < skin/2: the first plan served all steps
    assert max(iters[1:]) < iters[0]  # warm starts from the previous step's charges


def test_missed_tolerance_raises():
    pot = cs.Potential.from_config(
        dict(CELLI, elec_method="ewald", qeq_maxiter=2), seed=0, example=_periodic()
    )
    pot = Potential(build(dict(CELLI, elec_method="ewald", qeq_maxiter=2)), _params(pot.params))
    with pytest.raises(QeqConvergenceError, match="distributed"):
        ShardedPotential(pot, devices=2)(_periodic())


def test_slab_is_refused(pots):
    s = _periodic()
    slab = cs.System(s.positions, s.species, cell=np.diag([8.8, 8.8, 0.0]), pbc=(True, True, False))
    with pytest.raises(NotImplementedError, match="partly periodic"):
        ShardedPotential(pots["pme"], devices=2)(slab)


EIGHT = textwrap.dedent(
    """
    import jax
    jax.config.update("jax_enable_x64", True)
    import numpy as np
    import celli_scale as cs
    from celli_scale.potential import Potential
    from celli_scale.distributed.sharded import ShardedPotential
    from tests.test_sharded_celli import CELLI, _params, _periodic

    assert len(jax.devices()) == 8
    system = _periodic(6, total_charge=1.0)
    pot = cs.Potential.from_config(dict(CELLI, elec_method="pme"), seed=0, example=system)
    pot = Potential(pot.model, _params(pot.params))
    ref = pot(system)
    sp = ShardedPotential(pot, devices=8)
    out = sp(system)
    assert sp.stats.mesh_shape == (2, 2, 2), sp.stats.mesh_shape
    de = abs(float(out.energy) - float(ref.energy)) / abs(float(ref.energy))
    df = np.abs(np.asarray(out.forces) - np.asarray(ref.forces)).max()
    dq = np.abs(np.asarray(out.charges) - np.asarray(ref.charges)).max()
    ds = np.abs(np.asarray(out.stress) - np.asarray(ref.stress)).max()
    print("errors", de, df, dq, ds)
    assert de < 1e-10 and df < 1e-8 and dq < 1e-8 and ds < 1e-8
    # the distributed Qeq on its own, over 8 devices, against the dense solve
    from celli_scale import qeq
    from celli_scale.distributed import qeq as dqeq
    n = system.n_atoms
    rng = np.random.default_rng(0)
    chi, hard, sig = rng.normal(0, 2, n), 8 + 4 * rng.random(n), 0.8 + 0.3 * rng.random(n)
    for method in ("ewald", "pme"):
        dense = qeq.solve(system, chi, hard, sig, method="dense", electrostatics=method)
        dist = dqeq.solve(system, chi, hard, sig, devices=8, method=method)
        err = np.abs(np.asarray(dist.charges) - np.asarray(dense.charges)).max()
        print(method, "charges", err)
        assert err < 1e-8 and abs(float(np.sum(dist.charges)) - 1.0) < 1e-10
    print("EIGHT OK")
    """
)


@pytest.mark.slow
def test_eight_devices_in_subprocess():
    res = run_with_devices(EIGHT, 8, ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "EIGHT OK" in res.stdout
