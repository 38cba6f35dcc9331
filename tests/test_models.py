"""One parametrised model test run on allegro, celli, nequip and mace (float64).

E(3) invariance, forces and stress against central finite differences, padding and
batching invariance, the ASE calculator, save/load, unknown species.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import random_cluster, rocksalt

import celli_scale as cs
from celli_scale.models import MODEL_NAMES

SMALL = dict(
    r_cut=3.6,
    l_max=2,
    channels=4,
    n_layers=2,
    n_radial=4,
    radial_mlp=[8],
    dtype="float64",
    avg_num_neighbors=8.0,
)


def small_pot(name: str, example: cs.System, seed: int = 0) -> cs.Potential:
    cfg = dict(SMALL, name=name, species=[1, 8, 11, 17])
    return cs.Potential.from_config(cfg, seed=seed, example=example)


def orthogonal(seed: int, reflect: bool) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if (np.linalg.det(q) < 0) != reflect:
        q[:, 0] *= -1
    return q


@pytest.fixture(params=MODEL_NAMES, scope="module")
def name(request):
    return request.param


@pytest.fixture(scope="module")
def periodic():
    return rocksalt(1, a=4.9, rattle=0.1, seed=2)


@pytest.fixture(scope="module")
def pot(name, periodic):
    return small_pot(name, periodic)


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12)


@pytest.mark.parametrize("reflect", [False, True])
def test_e3_and_permutation_invariance(pot, periodic, reflect):
    out = pot(periodic)
    rot = orthogonal(7, reflect)
    perm = np.random.default_rng(3).permutation(periodic.n_atoms)
    shift = np.array([0.3, -1.2, 2.5])
    moved = cs.System(
        (np.asarray(periodic.positions) @ rot.T + shift)[perm],
        np.asarray(periodic.species)[perm],
        cell=np.asarray(periodic.cell) @ rot.T,
        pbc=True,
    )
    out2 = pot(moved)
    assert _rel(out2.energy, out.energy) < 1e-9
    assert _rel(out2.forces, (np.asarray(out.forces) @ rot.T)[perm]) < 1e-8
    assert _rel(out2.stress, rot @ np.asarray(out.stress) @ rot.T) < 1e-8
    if out.charges is not None:
        assert _rel(out2.charges, np.asarray(out.charges)[perm]) < 1e-8


def _fd_forces(pot, system, components, h=1e-4):
    pos = np.asarray(system.positions)
    out = []
    for a, k in components:
        e = []
        for sgn in (1, -1):
            p = pos.copy()
            p[a, k] += sgn * h
            e.append(float(pot(system.replace(positions=p)).energy))
        out.append(-(e[0] - e[1]) / (2 * h))
    return np.array(out)


def test_forces_match_finite_differences(pot, periodic):
    comps = [(0, 0), (3, 1), (6, 2), (7, 0)]
    fd = _fd_forces(pot, periodic, comps)
    f = np.asarray(pot(periodic).forces)
    got = np.array([f[a, k] for a, k in comps])
    np.testing.assert_allclose(got, fd, rtol=1e-6, atol=1e-7 * max(1.0, np.abs(f).max()))


def test_forces_open_cluster(name):
    s = random_cluster(6, seed=4, species=(1, 8))
    p = small_pot(name, s)
    comps = [(0, 0), (2, 1), (5, 2)]
    fd = _fd_forces(p, s, comps)
    f = np.asarray(p(s).forces)
    np.testing.assert_allclose([f[a, k] for a, k in comps], fd, rtol=1e-6, atol=1e-8)
    assert p(s).stress is None


def test_stress_matches_strain_finite_differences(pot, periodic):
    h = 1e-5
    pos = np.asarray(periodic.positions)
    cell = np.asarray(periodic.cell)
    vol = abs(np.linalg.det(cell))
    stress = np.asarray(pot(periodic).stress)
    for a, b in [(0, 0), (1, 2), (2, 2)]:
        e = []
        for sgn in (1, -1):
            eps = np.zeros((3, 3))
            eps[a, b] += sgn * h / 2
            eps[b, a] += sgn * h / 2
            d = np.eye(3) + eps
            e.append(
                float(pot(cs.System(pos @ d, periodic.species, cell=cell @ d, pbc=True)).energy)
            )
        fd = (e[0] - e[1]) / (2 * h) / vol
        assert abs(stress[a, b] - fd) < 1e-6 * max(1.0, np.abs(stress).max())


def test_padding_and_batching_invariance(pot, periodic):
    ref = pot(periodic)
    # more edge capacity and padded atoms change nothing
    g = pot.graph(periodic, n_atoms=periodic.n_atoms + 3, edge_capacity=pot.capacities[0] + 50)
    energy, forces, _, out = pot.evaluate(pot.params, g, stress=True)
    assert _rel(energy, ref.energy) < 1e-12
    assert _rel(np.asarray(forces)[: periodic.n_atoms], ref.forces) < 1e-10
    assert np.all(np.asarray(forces)[periodic.n_atoms :] == 0)
    # a batch with a second, smaller-cell structure gives each structure's own result
    other = rocksalt(1, a=5.3, rattle=0.05, seed=9)
    batch = cs.Batch.from_systems([periodic, other], n_atoms=11)
    bout = pot(batch)
    for k, s in enumerate([periodic, other]):
        r = pot(s)
        assert _rel(bout.energy[k], r.energy) < 1e-10
        assert _rel(np.asarray(bout.forces[k])[: s.n_atoms], r.forces) < 1e-9


def test_ase_calculator_matches_potential(pot, periodic):
    atoms = periodic.to_ase()
    atoms.calc = cs.Calculator(pot)
    ref = pot(periodic)
    assert abs(atoms.get_potential_energy() - float(ref.energy)) < 1e-10
    np.testing.assert_allclose(atoms.get_forces(), ref.forces, atol=1e-10)
    s = np.asarray(ref.stress)
    np.testing.assert_allclose(
        atoms.get_stress(), [s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]], atol=1e-12
    )


def test_save_load_roundtrip(pot, periodic, tmp_path):
    pot.save(tmp_path / "model")
    again = cs.Potential.load(tmp_path / "model")
    assert again.config == pot.config
    assert float(again(periodic).energy) == pytest.approx(float(pot(periodic).energy), abs=1e-12)


def test_unknown_species_named(pot):
    s = cs.System([[0, 0, 0], [1.5, 0, 0]], [1, 6])
    with pytest.raises(ValueError, match="atom 1 has atomic number 6"):
        pot(s)


def test_default_config_builds(name, periodic):
    p = cs.Potential.from_config({"name": name}, example=periodic)
    assert p.config.species == (11, 17)
    assert np.isfinite(float(p(periodic).energy))


def test_unknown_config_key():
    with pytest.raises(ValueError, match="unknown config key"):
        cs.models.build({"name": "allegro", "species": [1], "rcut": 4.0})
    with pytest.raises(ValueError, match="unknown model name"):
        cs.models.build({"name": "schnet", "species": [1]})
