"""MD with jax-md (celli_scale.md): energy conservation, thermostats, list overflow and
redo, warm-started Qeq, trajectory output, observables and the ``md`` command."""

from __future__ import annotations

import ase.io
import ase.units
import numpy as np
import pytest
from ase.units import kB

import celli_scale as cs
from celli_scale.datasets.synthetic import nacl_grid
from celli_scale.md import MD, MDConfig, adf, dipole, pressure, rdf

SMALL = {"r_cut": 4.0, "channels": 8, "n_layers": 1, "dtype": "float64"}


@pytest.fixture(scope="module")
def crystal():
    """8 ions of a rattled NaCl grid in a periodic cube of 5.6 Å."""
    return nacl_grid(2, spacing=2.8, rattle=0.05, seed=1)


@pytest.fixture(scope="module")
def celli(crystal):
    return cs.Potential.from_config({"name": "celli", **SMALL}, seed=0, example=crystal)


@pytest.fixture(scope="module")
def allegro(crystal):
    return cs.Potential.from_config({"name": "allegro", **SMALL}, seed=0, example=crystal)


def test_nve_celli_conserves_energy_over_2000_steps(celli, crystal):
    """Velocity Verlet with CELLI (Qeq, Ewald, float64, dt 0.5 fs): the total energy
    drifts less than 2e-4 eV/atom/ps and fluctuates less than 1 % of the kinetic energy's
    fluctuation; the lists are rebuilt inside the loop and the forces of the last frame
    equal a fresh pot(system) call."""
    md = MD(celli, crystal, MDConfig(ensemble="nve", dt=0.5, temperature=300.0, every=100))
    res = md.run(2000, progress=False)
    assert res.energy.size == 2000
    assert abs(res.drift) < 2e-4, res.drift
    assert np.std(res.conserved) < 0.01 * np.std(res.kinetic), (
        np.std(res.conserved),
        np.std(res.kinetic),
    )
    assert res.stats["jit_rebuilds"] >= 1 and res.stats["redone_blocks"] == 0
    f = res.frames[-1]
    out = celli(cs.System(f.positions, crystal.species, cell=crystal.cell, pbc=True))
    np.testing.assert_allclose(f.forces, np.asarray(out.forces), atol=1e-7)
    np.testing.assert_allclose(f.charges, np.asarray(out.charges), atol=1e-7)
    assert abs(f.energy - float(out.energy)) < 1e-8
    assert abs(np.sum(f.charges)) < 1e-8  # the total charge constraint holds


def test_nve_open_cluster_conserves_energy(celli):
    """Open boundaries (direct electrostatics): energy conserved, dipole from the charges."""
    s = cs.datasets.random_cluster(6, seed=3, species=(11, 17), box=5.0, min_distance=2.4)
    pot = cs.Potential(celli.model, celli.params)
    md = MD(pot, s, MDConfig(ensemble="nve", dt=0.5, temperature=200.0, every=50))
    res = md.run(500, progress=False)
    assert np.std(res.conserved) < 0.01 * np.std(res.kinetic)
    f = res.frames[-1]
    out = pot(cs.System(f.positions, s.species))
    np.testing.assert_allclose(dipole(f.positions, f.charges), np.asarray(out.dipole), atol=1e-8)


@pytest.mark.parametrize("ensemble", ["langevin", "nose_hoover"])
def test_nvt_reaches_the_target_temperature(allegro, crystal, ensemble):
    """The mean kinetic temperature after equilibration lies within 3σ of the target (σ
    from block averages); Langevin's instantaneous temperature also has the canonical
    variance 2T²/(3N) within 35 %."""
    target = 400.0
    cfg = MDConfig(
        ensemble=ensemble, dt=1.0, temperature=target, friction=0.05, tau=20.0, every=50, seed=2
    )
    md = MD(allegro, crystal, cfg)
    md.run(500, progress=False)  # equilibrate
    res = md.run(6000, progress=False)
    n = crystal.n_atoms
    temp = 2.0 * res.kinetic / (3 * n * kB)
    blocks = temp.reshape(20, -1).mean(axis=1)
    sigma = blocks.std(ddof=1) / np.sqrt(blocks.size)
    assert abs(temp.mean() - target) < 3 * sigma, (temp.mean(), sigma)
    assert sigma < 0.1 * target  # the test has power: 3σ is under 30 % of the target
    if ensemble == "langevin":
        expected = 2 * target**2 / (3 * n)
        assert 0.65 < temp.var() / expected < 1.35, temp.var() / expected


def test_list_overflow_is_detected_and_the_block_redone(allegro, crystal):
    """Forced overflows (a packed capacity of 1 pair; an in-loop rebuild into a list too
    small) are flagged inside the loop; the block is redone with larger lists and the
    trajectory equals an undisturbed one."""
    cfg = MDConfig(ensemble="nve", dt=1.0, temperature=300.0, every=10, seed=4)
    ref = MD(allegro, crystal, cfg)
    r0 = ref.run(40, progress=False)

    md = MD(allegro, crystal, cfg)
    md._verlet.caps = (1,)  # packed model edges: far too few
    r1 = md.run(40, progress=False)
    assert md.stats["overflows"] >= 1 and md.stats["redone_blocks"] >= 1
    np.testing.assert_allclose(r1.frames[-1].positions, r0.frames[-1].positions, atol=1e-10)

    md = MD(allegro, crystal, cfg)
    st = md._verlet
    n_pairs = int(np.sum(np.asarray(st.graph.edge_mask)))
    cap = n_pairs // 2  # a list with half the room, rebuilt at the first step
    g = st.graph
    st.graph = g.replace(
        senders=g.senders[:cap],
        receivers=g.receivers[:cap],
        shifts=g.shifts[:cap],
        edge_mask=g.edge_mask[:cap],
    )
    st.reference = st.reference + 10.0  # "moved": the loop rebuilds before the first force
    r2 = md.run(40, progress=False)
    assert md.stats["overflows"] >= 1 and md.stats["redone_blocks"] >= 1
    assert md._verlet.graph.senders.shape[0] > n_pairs
    np.testing.assert_allclose(r2.frames[-1].positions, r0.frames[-1].positions, atol=1e-10)


def test_celli_warm_start_same_trajectory_fewer_iterations(celli, crystal):
    """Warm-started Qeq: the same trajectory as cold solves (within the solver tolerance)
    with fewer CG iterations per step (CG solver, tolerance 1e-10)."""
    pot = cs.Potential.from_config(
        {"name": "celli", "qeq_method": "cg", **SMALL}, seed=0, example=crystal
    )
    base = dict(ensemble="nve", dt=0.5, temperature=300.0, every=25, seed=5)
    warm = MD(pot, crystal, MDConfig(qeq="warm", **base)).run(100, progress=False)
    cold = MD(pot, crystal, MDConfig(qeq="cold", **base)).run(100, progress=False)
    np.testing.assert_allclose(warm.frames[-1].positions, cold.frames[-1].positions, atol=1e-7)
    np.testing.assert_allclose(warm.frames[-1].charges, cold.frames[-1].charges, atol=1e-8)
    assert cold.qeq_iterations.min() > 0
    assert warm.qeq_iterations.mean() < cold.qeq_iterations.mean() - 0.5, (
        warm.qeq_iterations.mean(),
        cold.qeq_iterations.mean(),
    )


def test_extended_lagrangian_charges_conserve_energy_like_converged_solves():
    """qeq="xl" (auxiliary charges propagated with the atoms, 4 CG iterations per step):
    the NVE energy conservation of fully converged solves (drift and fluctuation within
    1.5x) at a fixed 4 iterations against the ~13 of cold solves (64 ions, float64)."""
    s = nacl_grid(4, spacing=2.8, rattle=0.05, seed=1)
    pot = cs.Potential.from_config(
        {"name": "celli", "qeq_method": "cg", **SMALL}, seed=0, example=s
    )
    base = dict(ensemble="nve", dt=0.5, temperature=300.0, every=100)
    cold = MD(pot, s, MDConfig(qeq="cold", **base)).run(400, progress=False)
    md = MD(pot, s, MDConfig(qeq="xl", xl_iterations=4, **base))
    xl = md.run(400, progress=False)
    assert np.all(xl.qeq_iterations == 4) and cold.qeq_iterations.mean() > 8
    assert abs(xl.drift) < 1.5 * abs(cold.drift) + 1e-6, (xl.drift, cold.drift)
    fluct = [np.std(r.conserved) / np.std(r.kinetic) for r in (xl, cold)]
    assert fluct[0] < 1.5 * fluct[1], fluct
    assert md.stats["xl_residual_max"] < 1e-4
    assert abs(np.sum(xl.frames[-1].charges)) < 1e-9  # the propagation keeps Σq


def test_host_lists_mode_matches_jit_lists(allegro, crystal):
    """Lists rebuilt on the host between blocks give the trajectory of in-loop rebuilds."""
    base = dict(ensemble="langevin", dt=1.0, temperature=600.0, every=10, seed=6, skin=0.6)
    a = MD(allegro, crystal, MDConfig(neighbors="jit", **base))
    b = MD(allegro, crystal, MDConfig(neighbors="host", **base))
    ra, rb = a.run(200, progress=False), b.run(200, progress=False)
    assert a.stats["jit_rebuilds"] >= 1 and b.stats["host_rebuilds"] >= 2
    # equal up to lattice vectors (the in-loop rebuild wraps atoms back into the cell)
    d = (ra.frames[-1].positions - rb.frames[-1].positions) @ np.linalg.inv(crystal.cell)
    np.testing.assert_allclose(d - np.round(d), 0.0, atol=1e-8)
    assert np.abs(np.round(d)).max() <= 1


def test_trajectory_file_round_trip(allegro, crystal, tmp_path):
    md = MD(allegro, crystal, MDConfig(ensemble="langevin", temperature=300.0, every=5))
    path = tmp_path / "t.xyz"
    res = md.run(15, trajectory=path, progress=False)
    back = ase.io.read(path, index=":")
    assert len(back) == 3
    f = res.frames[-1]  # velocities in Å/fs: ½ Σ m v² is the kinetic energy
    masses = back[-1].get_masses()
    ke = 0.5 * np.sum(masses[:, None] * (f.velocities / ase.units.fs) ** 2)
    assert abs(ke - f.kinetic) < 1e-10 * max(1.0, f.kinetic)
    assert abs(back[-1].get_kinetic_energy() - f.kinetic) < 1e-6
    for a, f in zip(back, res.frames, strict=True):
        np.testing.assert_allclose(a.positions, f.positions, atol=1e-6)
        np.testing.assert_allclose(a.get_forces(), f.forces, atol=1e-6)
        assert abs(a.get_potential_energy() - f.energy) < 1e-6
        np.testing.assert_allclose(a.get_velocities() * ase.units.fs, f.velocities, rtol=1e-6)


def test_rdf_matches_ase(crystal):
    """Our g(r) equals ASE's get_rdf on the same frame."""
    from ase.geometry.rdf import get_rdf

    s = nacl_grid(4, spacing=2.2, rattle=0.2, seed=3)
    r, g = rdf(s.positions, s.cell, 4.0, 40)
    g_ase, r_ase = get_rdf(s.to_ase(), 4.0, 40)
    np.testing.assert_allclose(np.asarray(r), r_ase, atol=1e-12)
    np.testing.assert_allclose(np.asarray(g), g_ase, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="half the smallest cell width"):
        rdf(s.positions, s.cell, 5.0, 10)


def test_adf_of_a_simple_cubic_lattice():
    """Nearest neighbours of a simple cubic lattice: 24 of 30 angles at 90°, 6 at 180°."""
    s = nacl_grid(4, spacing=2.0)
    theta, dens = adf(s.positions, s.cell, 2.1, 18)
    p = np.asarray(dens) * (np.pi / 18)
    assert abs(p[9] - 24 / 30) < 1e-12 and abs(p[17] - 6 / 30) < 1e-12
    assert abs(p.sum() - 1.0) < 1e-12


def test_pressure_equals_minus_volume_derivative(allegro, crystal):
    """At rest, the virial pressure equals -dE/dV under isotropic scaling (central
    differences)."""
    out = allegro(crystal)
    vol = abs(np.linalg.det(crystal.cell))
    p = pressure(np.asarray(out.stress), 0.0, vol)

    def energy(scale):
        s = cs.System(
            np.asarray(crystal.positions) * scale,
            crystal.species,
            cell=np.asarray(crystal.cell) * scale,
            pbc=True,
        )
        return float(cs.Potential(allegro.model, allegro.params, skin=0.0)(s).energy)

    h = 1e-5
    dedv = (energy(1 + h) - energy(1 - h)) / (vol * ((1 + h) ** 3 - (1 - h) ** 3))
    assert abs(p - (-dedv)) < 1e-7 * max(1.0, abs(dedv)), (p, -dedv)
    assert abs(p) > 1e-4  # not trivially zero


def test_bad_md_input_is_rejected(allegro, crystal):
    with pytest.raises(ValueError, match="ensemble"):
        MDConfig(ensemble="npt")
    with pytest.raises(ValueError, match="dt"):
        MDConfig(dt=-1.0)
    with pytest.raises(ValueError, match="temperature > 0"):
        MDConfig(ensemble="langevin", temperature=0.0)
    with pytest.raises(ValueError, match="velocities"):
        MD(allegro, crystal, velocities=np.zeros((3, 3)))
    with pytest.raises(ValueError, match="masses"):
        MD(allegro, crystal, masses=-np.ones(crystal.n_atoms))


def test_md_command(tmp_path):
    """``celli-scale md CONFIG.yaml`` writes the trajectory, the log, the RDF and a plot."""
    from celli_scale.cli import main

    cfg = tmp_path / "md.yaml"
    cfg.write_text(
        "model: {name: allegro, r_cut: 4.0, channels: 8, n_layers: 1, dtype: float64}\n"
        "structure: {nacl_grid: {n: 2, spacing: 2.8, rattle: 0.05}}\n"
        "md: {ensemble: nve, dt: 0.5, temperature: 200, every: 10}\n"
        "steps: 30\nout: run\nrdf: {r_max: 2.8, n_bins: 14}\nprogress: false\n"
    )
    assert main(["md", str(cfg)]) == 0
    out = tmp_path / "run"
    assert len(ase.io.read(out / "traj.xyz", index=":")) == 3
    log = np.genfromtxt(out / "log.csv", delimiter=",", names=True)
    assert log.size == 3 and np.all(np.isfinite(log["conserved_eV"]))
    assert np.ptp(log["conserved_eV"]) < 1e-3
    assert (out / "rdf.csv").exists() and (out / "md.png").stat().st_size > 1000
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: allegro}\nstructure: x.xyz\nsteps: 1\nbogus: 1\n")
    assert main(["md", str(bad)]) == 2


def test_potential_energy_fn_and_sampler_for_reweighting(celli, crystal):
    """The reweighting bridge: energy_fn(params, positions) equals pot(system).energy on
    sampled frames (vmapped, lists built inside), its parameter gradient equals a central
    difference, and the sampler returns the frames an MD run with that seed gives."""
    import types

    import jax
    import jax.numpy as jnp

    from celli_scale.md import potential_energy_fn, potential_sampler

    sampler = potential_sampler(
        celli,
        crystal,
        MDConfig(ensemble="langevin", dt=1.0, temperature=300.0),
        n_equilibration=20,
        n_frames=3,
        stride=10,
    )
    sp = types.SimpleNamespace(positions=crystal.positions, temperature=500.0, masses=23.0)
    frames = sampler(celli.params, jax.random.PRNGKey(0), sp)
    assert frames.shape == (3, crystal.n_atoms, 3)
    again = sampler(celli.params, jax.random.PRNGKey(0), sp)
    np.testing.assert_array_equal(np.asarray(frames), np.asarray(again))

    efn = potential_energy_fn(celli, crystal)
    e = jax.jit(jax.vmap(efn, (None, 0)))(celli.params, frames)
    for k in range(3):
        ref = celli(crystal.replace(positions=np.asarray(frames[k]), min_distance=0.0)).energy
        assert abs(float(e[k]) - float(ref)) < 1e-9

    # the trainers' pressure (strain of positions and box) is the model's virial
    from celli_scale.train.difftre import pressure as difftre_pressure
    from celli_scale.train.reweight import StatePoint

    spt = StatePoint(frames[2], np.diag(crystal.cell), 500.0, masses=23.0)
    p_tr = float(difftre_pressure(efn)(celli.params, frames[2], spt))
    out = celli(crystal.replace(positions=np.asarray(frames[2]), min_distance=0.0))
    kin = crystal.n_atoms * spt.kT / spt.volume
    p_model = pressure(np.asarray(out.stress), 0.0, spt.volume) + kin
    assert abs(p_tr - p_model) < 1e-8 * max(1.0, abs(p_model)) + 1e-10, (p_tr, p_model)

    leaves, tree = jax.tree_util.tree_flatten(celli.params)
    rng = np.random.default_rng(0)
    d = [jnp.asarray(rng.normal(size=x.shape)) for x in leaves]
    direction = jax.tree_util.tree_unflatten(tree, d)

    @jax.jit
    def f(t):
        p = jax.tree_util.tree_map(lambda a, b: a + t * b, celli.params, direction)
        return efn(p, frames[1])

    g = jax.jit(jax.grad(lambda p: efn(p, frames[1])))(celli.params)
    analytic = sum(
        float(jnp.vdot(a, b)) for a, b in zip(jax.tree_util.tree_leaves(g), d, strict=True)
    )
    h = 1e-5
    fd = (float(f(h)) - float(f(-h))) / (2 * h)
    assert abs(analytic - fd) < 1e-6 * max(1.0, abs(fd)), (analytic, fd)


def test_md_driven_by_a_sharded_potential(allegro, crystal):
    """MD of a ShardedPotential (here one device, two sub-bricks) follows the trajectory of
    the same model through Potential (float64)."""
    from celli_scale.distributed import ShardedPotential

    cfg = MDConfig(ensemble="nose_hoover", dt=1.0, temperature=300.0, tau=50.0, every=5, seed=3)
    ref = MD(allegro, crystal, cfg).run(20, progress=False)
    sp = ShardedPotential(cs.Potential(allegro.model, allegro.params), devices=1, chunks=2)
    md = MD(sp, crystal, cfg)
    assert md.sharded and md.neighbors == "sharded"
    res = md.run(20, progress=False)
    d = (res.frames[-1].positions - ref.frames[-1].positions) @ np.linalg.inv(crystal.cell)
    np.testing.assert_allclose(d - np.round(d), 0.0, atol=1e-8)
    np.testing.assert_allclose(res.conserved, ref.conserved, atol=1e-8)


def test_potential_energy_fn_is_nan_for_an_unconverged_qeq(crystal):
    """A Qeq solve that misses its tolerance (CG capped at one iteration) gives a NaN
    energy in the reweighting energy function, not a wrong number; converged, it matches."""
    from celli_scale.md import potential_energy_fn

    base = {"name": "celli", "qeq_method": "cg", **SMALL}
    capped = cs.Potential.from_config({**base, "qeq_maxiter": 1}, seed=0, example=crystal)
    full = cs.Potential(cs.models.build({**base, "species": [11, 17]}), capped.params)
    pos = np.asarray(crystal.positions)
    assert np.isnan(float(potential_energy_fn(capped, crystal)(capped.params, pos)))
    e = float(potential_energy_fn(full, crystal)(full.params, pos))
    assert abs(e - float(full(crystal).energy)) < 1e-8
