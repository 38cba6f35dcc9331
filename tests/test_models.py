"""The shared model checks, run on allegro, celli, nequip and mace (one home for them).

E(3) and permutation symmetry, forces and stress against finite differences, NaN-trapping
padding, batching, wrapped positions, locality up to ``config.receptive_field``, float32
end to end, a ``shard_map`` over the fake CPU devices, the ASE calculator, save/load and
config errors. Everything is evaluated through the public API (``Potential``,
``energy_and_derivatives``) with the helpers of :mod:`celli_scale.testing`.
Model-specific checks live in test_allegro.py, test_celli.py and test_mpnn.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import celli_scale as cs
from celli_scale.datasets import random_cluster, rocksalt
from celli_scale.models import MODEL_NAMES, make_config
from celli_scale.potential import energy_and_derivatives
from celli_scale.testing import (
    assert_dtype_preserved,
    assert_equivariant,
    assert_forces_match_fd,
    assert_padding_invariant,
    assert_stress_matches_fd,
    random_params,
    relative_error,
)

SMALL = dict(
    r_cut=3.6,
    l_max=2,
    channels=4,
    n_layers=2,
    n_radial=4,
    radial_mlp=[8],
    avg_num_neighbors=8.0,
    species=[1, 8, 11, 17],
)
#: Models whose parameters are redrawn O(1) (their e3nn linears and product weights are
#: O(1) by design; at initialisation some paths carry almost no signal). Allegro's and
#: CELLI's flax MLPs would blow up with O(1) weights: they keep their initial values.
RANDOMISED = ("nequip", "mace")
#: Relative tolerances of the symmetry / padding comparisons per dtype.
RTOL = {"float64": 1e-9, "float32": 2e-4}
#: Models whose atomic energies are local (CELLI's depend on the global charges).
LOCAL_ENERGY_MODELS = [
    n for n in MODEL_NAMES if not hasattr(make_config({"name": n}), "elec_method")
]


def periodic_system(seed: int = 2, rattle: float = 0.1) -> cs.System:
    """8 atoms of rock salt in a sheared (triclinic) cell, net charge +1 e (CELLI)."""
    s = rocksalt(1, a=4.9, rattle=rattle, seed=seed)
    shear = np.array([[1.0, 0.0, 0.0], [0.08, 1.0, 0.0], [-0.05, 0.06, 1.0]])
    return cs.System(
        np.asarray(s.positions) @ shear,
        s.species,
        cell=np.asarray(s.cell) @ shear,
        pbc=True,
        total_charge=1.0,
    )


def open_system() -> cs.System:
    s = random_cluster(8, seed=4, species=(1, 8))
    return cs.System(s.positions, s.species, total_charge=-1.0)


PERIODIC = periodic_system()
OPEN = open_system()
SYSTEMS = {"periodic": PERIODIC, "open": OPEN}
SHARDED = [periodic_system(seed=10 + k) for k in range(4)]  # one per fake CPU device


@functools.cache
def make_pot(name: str, dtype: str = "float64", **overrides) -> cs.Potential:
    """A small potential; float32 ones carry the float64 parameters cast down."""
    cfg = dict(SMALL, name=name, dtype=dtype, **overrides)
    if dtype == "float32":
        ref = make_pot(name, "float64", **overrides)
        p32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), ref.params)
        pot = cs.Potential(cs.models.build(cfg), p32)
    else:
        pot = cs.Potential.from_config(cfg, seed=0, example=PERIODIC)
        if name in RANDOMISED:
            pot.params = random_params(pot.params, seed=1)
    for s in (*SHARDED, PERIODIC, OPEN):  # one edge capacity for all: fewer compilations
        pot.graph(s)
    return pot


@pytest.fixture(params=MODEL_NAMES)
def name(request):
    return request.param


@pytest.fixture(params=["periodic", "open"])
def kind(request):
    return request.param


#: (dtype, kind) of the symmetry and padding checks: float32 on the periodic structure
#: (its compilations are the costly part; the float64 checks cover open systems too).
DTYPE_KIND = [("float64", "periodic"), ("float64", "open"), ("float32", "periodic")]


# -- symmetry, derivatives, padding ---------------------------------------------------------


@pytest.mark.parametrize("reflect", [False, True])
@pytest.mark.parametrize("dtype, kind", DTYPE_KIND)
def test_equivariant(name, dtype, kind, reflect):
    pot = make_pot(name, dtype)
    assert_equivariant(pot, SYSTEMS[kind], seed=7, reflect=reflect, rtol=RTOL[dtype])


def test_forces_match_finite_differences(name, kind):
    pot = make_pot(name)
    system = SYSTEMS[kind]
    g = pot.graph(system)
    stress = system.periodic  # the function pot(system) runs: compiled once
    _, forces, _, _ = pot.evaluate(pot.params, g, stress=stress)

    def energy(p):
        return pot.evaluate(pot.params, g.replace(positions=jnp.asarray(p)), stress=stress)[0]

    n = system.n_atoms
    comps = [(a, k) for a in range(n) for k in range(3)]
    # absolute tolerance: 1e-8 eV/Å (open), 1e-7 of the largest force (periodic)
    atol = 1e-8 if kind == "open" else 1e-7 * max(1.0, float(np.abs(forces).max()))
    assert_forces_match_fd(energy, g.positions, forces, components=comps, h=1e-5, atol=atol)
    assert np.all(np.asarray(forces)[n:] == 0.0)


def test_stress_matches_strain_finite_differences(name):
    pot = make_pot(name)
    g = pot.graph(PERIODIC)
    _, _, stress, _ = pot.evaluate(pot.params, g, stress=True)

    def energy(positions, cell):
        return pot.evaluate(pot.params, g.replace(positions=positions, cell=cell), stress=True)[0]

    assert_stress_matches_fd(energy, g.positions, g.cell, stress)
    assert relative_error(pot(PERIODIC).stress, stress) < 1e-12
    assert pot(OPEN).stress is None


@pytest.mark.parametrize("dtype, kind", DTYPE_KIND)
def test_padding_invariant(name, dtype, kind):
    """NaN-trapping padded atoms and edges change nothing (and no NaN leaks into forces)."""
    pot = make_pot(name, dtype)
    rtol = 1e-12 if dtype == "float64" else 1e-5
    assert_padding_invariant(pot, SYSTEMS[kind], n_atoms=3, n_edges=17, rtol=rtol)


def test_float32_end_to_end(name):
    """A float32 model keeps float32 everywhere and stays close to float64."""
    pot32, pot64 = make_pot(name, "float32"), make_pot(name)
    g = pot32.graph(PERIODIC)
    assert_dtype_preserved(g.positions, jnp.float32)
    result = pot32.evaluate(pot32.params, g, stress=True)
    assert_dtype_preserved(result, jnp.float32)
    assert_dtype_preserved(pot32(PERIODIC), jnp.float32)
    ref = pot64(PERIODIC)
    e32, f32 = result[0], result[1]
    assert abs(float(e32) - float(ref.energy)) <= 1e-4 * max(abs(float(ref.energy)), 1.0)
    assert relative_error(f32, ref.forces) < 1e-3


def test_batching_invariance(name):
    """A batch with a second, smaller-cell structure gives each structure its own result
    (CELLI: to the electrostatics accuracy, the batch sharing one Ewald split)."""
    pot = make_pot(name)
    other = rocksalt(1, a=5.3, rattle=0.05, seed=9)
    batch = cs.Batch.from_systems([PERIODIC, other], n_atoms=11)
    bout = pot(batch)
    tol = 1e-10 if not pot.is_charge_model else 10 * pot.config.elec_accuracy
    for k, s in enumerate([PERIODIC, other]):
        r = pot(s)
        assert relative_error(bout.energy[k], r.energy) < tol
        assert relative_error(np.asarray(bout.forces[k])[: s.n_atoms], r.forces) < 10 * tol


def test_wrapped_positions(name):
    """Moving atoms by lattice vectors (other images) changes nothing."""
    pot = make_pot(name)
    cell = np.asarray(PERIODIC.cell)
    pos = np.asarray(PERIODIC.positions).copy()
    pos[0] += cell[0]
    pos[3] -= cell[1] + cell[2]
    pos[6] += 2 * cell[2] - cell[0]
    moved = cs.System(pos, PERIODIC.species, cell=cell, pbc=True, total_charge=1.0)
    ref, out = pot(PERIODIC), pot(moved)
    assert relative_error(out.energy, ref.energy) < 1e-10
    assert relative_error(out.forces, ref.forces) < 1e-9
    assert relative_error(out.stress, ref.stress) < 1e-9
    assert relative_error(out.node_energies, ref.node_energies) < 1e-9
    if ref.charges is not None:
        assert relative_error(out.charges, ref.charges) < 1e-9


# -- locality: config.receptive_field ---------------------------------------------------------


def chain(n: int, spacing: float, moved: bool = False) -> cs.System:
    """``n`` atoms along x, ``spacing`` Å apart (zig-zag ±0.3 Å in y); ``moved`` displaces
    the last one by 0.25 Å at most."""
    pos = np.zeros((n, 3))
    pos[:, 0] = np.arange(n) * spacing
    pos[:, 1] = 0.3 * (-1) ** np.arange(n)
    if moved:
        pos[-1] += [0.1, 0.2, -0.1]
    return cs.System(pos, np.resize([1, 8], n))


@pytest.mark.parametrize(
    "model, n_layers",
    [(m, 2) for m in LOCAL_ENERGY_MODELS]
    + [(m, 1) for m in LOCAL_ENERGY_MODELS if not make_config({"name": m}).strictly_local],
)
def test_receptive_field(model, n_layers):
    """Moving an atom changes no atomic energy beyond ``config.receptive_field`` of it
    (also through a chain of neighbours), and does change the farthest one inside."""
    pot = make_pot(model, n_layers=n_layers)
    cfg = pot.config
    rf = cfg.receptive_field
    assert rf == pytest.approx(cfg.r_cut if cfg.strictly_local else n_layers * cfg.r_cut)
    spacing = 0.8 * cfg.r_cut  # neighbours along the chain; second neighbours are not
    n = int(np.ceil(rf / spacing)) + 2
    e0 = np.asarray(pot(chain(n, spacing)).node_energies)
    e1 = np.asarray(pot(chain(n, spacing, moved=True)).node_energies)
    d = (n - 1 - np.arange(n)) * spacing  # distance (along x) to the moved atom
    scale = np.abs(e0).max()
    beyond = d > rf + 0.5
    inside = np.flatnonzero(d < rf - 0.5)
    assert beyond.any() and inside.size > 1
    np.testing.assert_allclose(e1[beyond], e0[beyond], rtol=0, atol=1e-12 * scale)
    far_inside = inside[np.argmax(d[inside])]
    assert abs(e1[far_inside] - e0[far_inside]) > 1e-9 * scale
    neighbour = n - 2  # the moved atom's direct neighbour sees it clearly
    assert abs(e1[neighbour] - e0[neighbour]) > 1e-6 * scale


# -- several devices ------------------------------------------------------------------------


def sharded_batch(pot: cs.Potential, systems, *, stress: bool):
    """``energy_and_derivatives`` over a batch, one structure per (fake CPU) device."""
    devices = jax.devices()[: len(systems)]
    assert len(devices) == len(systems), "conftest sets up 4 host devices"
    mesh = jax.sharding.Mesh(np.asarray(devices), ("batch",))

    def per_device(params, gs):
        return jax.lax.map(
            lambda g: energy_and_derivatives(pot.model, params, g, stress=stress), gs
        )

    fn = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("batch")), out_specs=P("batch"))
    graphs = pot.batch_graph(systems, sigma_max=pot.sigma_bound())  # as pot(s) prepares
    return jax.jit(fn)(pot.params, graphs)


def test_shard_map_matches_single_device(name):
    """4 structures sharded over 4 (fake CPU) devices give the single-device results."""
    pot = make_pot(name)
    systems = SHARDED
    energy, forces, _, out = sharded_batch(pot, systems, stress=False)
    for k, s in enumerate(systems):
        ref = pot(s)
        assert relative_error(energy[k], ref.energy) < 1e-10
        assert relative_error(forces[k], ref.forces) < 1e-8
        if ref.charges is not None:
            assert relative_error(out.charges[k], ref.charges) < 1e-8


def test_shard_map_stress_per_structure():
    # before: the strain was a replicated constant, so under shard_map its gradient was
    # summed over the batch axis and each structure got the sum of all stresses
    pot = make_pot("allegro")
    systems = SHARDED
    _, _, stress, _ = sharded_batch(pot, systems, stress=True)
    for k, s in enumerate(systems):
        assert relative_error(stress[k], pot(s).stress) < 1e-8


# -- calculator, persistence, configuration --------------------------------------------------


def test_ase_calculator_matches_potential(name):
    pot = make_pot(name)
    atoms = PERIODIC.to_ase()
    atoms.calc = cs.Calculator(pot)
    ref = pot(PERIODIC)
    assert abs(atoms.get_potential_energy() - float(ref.energy)) < 1e-10
    np.testing.assert_allclose(atoms.get_forces(), ref.forces, atol=1e-10)
    s = np.asarray(ref.stress)
    np.testing.assert_allclose(
        atoms.get_stress(), [s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]], atol=1e-12
    )


def test_save_load_roundtrip(name, tmp_path):
    pot = make_pot(name)
    pot.save(tmp_path / "model")
    again = cs.Potential.load(tmp_path / "model")
    assert again.config == pot.config
    assert float(again(PERIODIC).energy) == pytest.approx(float(pot(PERIODIC).energy), abs=1e-12)


def test_unknown_species_named(name):
    pot = make_pot(name)
    s = cs.System([[0, 0, 0], [1.5, 0, 0]], [1, 6])
    with pytest.raises(ValueError, match="atom 1 has atomic number 6"):
        pot(s)


def test_default_config_builds(name):
    p = cs.Potential.from_config({"name": name}, example=PERIODIC)
    assert p.config.species == (11, 17)
    assert np.isfinite(float(p(PERIODIC).energy))


def test_unknown_config_key():
    with pytest.raises(ValueError, match="unknown config key"):
        cs.models.build({"name": "allegro", "species": [1], "rcut": 4.0})
    with pytest.raises(ValueError, match="unknown model name"):
        cs.models.build({"name": "schnet", "species": [1]})
