"""``pot(system)`` keeps Verlet lists between calls: the results equal a fresh exact
graph's at every call, the host rebuilds only when an atom moved half the skin (or the
atoms or cell changed), and a pair-count overflow grows the capacity and redoes the call."""

from __future__ import annotations

import numpy as np
import pytest

import celli_scale as cs
from celli_scale.datasets import rocksalt
from celli_scale.neighbors import neighbor_list
from celli_scale.testing import relative_error, small_allegro_config, small_celli_config

CONFIGS = {
    "allegro": small_allegro_config(l_max=1),
    "celli-ewald": small_celli_config(elec_method="ewald"),
    "celli-open": small_celli_config(),
}


def exact(pot, s):
    """Energy, forces, stress, charges from a fresh graph with exact (r_cut) lists (and
    the electrostatics parameters ``pot(s)`` prepared: sized for the current widths)."""
    st = pot._verlet
    g = pot.graph(s, elec_params=None if st is None else st.graph.elec_params)
    e, f, st, out = pot.evaluate(pot.params, g, stress=s.periodic)
    return float(e), np.asarray(f), st, out.charges


def structure(name: str, seed: int = 1) -> cs.System:
    s = rocksalt(2, rattle=0.1, seed=seed)
    if name == "celli-open":
        return cs.System(s.positions, s.species, total_charge=1.0)
    return s


def assert_same(pot, s) -> None:
    o = pot(s)
    e, f, st, q = exact(pot, s)
    assert abs(float(o.energy) - e) < 1e-10 * max(1.0, abs(e))
    assert relative_error(o.forces, f) < 1e-10
    if st is not None:
        assert relative_error(o.stress, st) < 1e-10
    if q is not None:
        np.testing.assert_allclose(o.charges, q, atol=1e-10)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_moving_atoms_match_fresh_lists_and_rebuild_rarely(name):
    s = structure(name)
    pot = cs.Potential.from_config(CONFIGS[name], seed=0, example=s, skin=0.6)
    rng = np.random.default_rng(0)
    pos = np.asarray(s.positions)
    for _ in range(8):
        pos = pos + rng.normal(0, 0.05, pos.shape)
        assert_same(pot, s.replace(positions=pos))
    assert pot.stats["calls"] == 8
    # 0.05 Å per coordinate per call, half the skin 0.3 Å: a rebuild every few calls, not each
    assert 1 < pot.stats["rebuilds"] < 8
    # rebuilt lists keep their padded sizes: one compiled kernel per capacity growth, not
    # one per rebuild (each rebuild recompiled: a 2 s stall every ~50 MD steps)
    assert len(pot._kernels) == 1 + pot.stats["overflows"]


def test_rebuild_rules():
    """Same atoms and cell, small moves: no rebuild; a move of half the skin, another
    cell, other species or an atom wrapped across the boundary: a rebuild."""
    s = structure("allegro")
    pot = cs.Potential.from_config(CONFIGS["allegro"], seed=0, example=s, skin=1.0)
    pot(s)
    assert pot.stats["rebuilds"] == 1
    pos = np.asarray(s.positions).copy()
    pos[3] += [0.2, 0.2, 0.2]  # 0.35 Å < 0.5
    assert_same(pot, s.replace(positions=pos))
    assert pot.stats["rebuilds"] == 1
    pos[3] += [0.3, 0.0, 0.0]  # 0.57 Å from the build
    assert_same(pot, s.replace(positions=pos))
    assert pot.stats["rebuilds"] == 2
    cell = np.asarray(s.cell) * 1.01
    strained = cs.System(pos * 1.01, s.species, cell=cell, pbc=True)
    assert_same(pot, strained)
    assert pot.stats["rebuilds"] == 3
    z = np.asarray(s.species).copy()
    z[[0, 4]] = z[[4, 0]]
    assert_same(pot, cs.System(pos * 1.01, z, cell=cell, pbc=True))
    assert pot.stats["rebuilds"] == 4
    wrapped = pos * 1.01
    wrapped[5] += cell[0]  # the same structure, one atom's periodic image
    assert_same(pot, cs.System(wrapped, z, cell=cell, pbc=True))
    assert pot.stats["rebuilds"] == 5


def pulled_in(s: cs.System, r_cut: float, skin: float) -> np.ndarray:
    """Positions with one atom moved (< skin/2) so that a pair just outside ``r_cut``
    comes inside and the number of pairs within ``r_cut`` grows."""
    from celli_scale.potential import _pairs_within

    nl = neighbor_list(s, r_cut + skin)
    base = _pairs_within(s, nl, r_cut)
    pos = np.asarray(s.positions)
    m = np.asarray(nl.mask)
    i, j = np.asarray(nl.senders)[m], np.asarray(nl.receivers)[m]
    vec = pos[j] - pos[i]
    if s.cell is not None:
        vec = vec + np.asarray(nl.shifts)[m] @ np.asarray(s.cell)
    d = np.linalg.norm(vec, axis=1)
    for k in np.argsort(np.where(d > r_cut, d, np.inf)):
        step = d[k] - r_cut + 0.02
        if not (0 < step < 0.5 * skin):
            break
        new = pos.copy()
        new[j[k]] -= step * vec[k] / d[k]
        if _pairs_within(s.replace(positions=new), nl, r_cut) > base:
            return new
    raise AssertionError("no pair to pull in")


@pytest.mark.parametrize("name", ["allegro", "celli-open"])
def test_overflow_grows_capacity_and_redoes_the_call(name):
    """Exact capacities (growth 1.0), then a pair just outside the cut-off pulled inside
    (less than half the skin, so no rebuild): more pairs than slots. The call is redone
    with more, and the result is still the exact one."""
    s = structure(name)
    skin = 1.2
    pot = cs.Potential.from_config(CONFIGS[name], seed=0, example=s, skin=skin, capacity_growth=1.0)
    pot(s)
    caps = pot._verlet.caps
    assert_same(pot, s.replace(positions=pulled_in(s, pot.config.r_cut, skin)))
    assert pot.stats["rebuilds"] == 1
    assert pot.stats["overflows"] == 1
    assert pot._verlet.caps[0] > caps[0]


def test_skin_zero_and_bad_skin():
    s = structure("allegro")
    pot = cs.Potential.from_config(CONFIGS["allegro"], seed=0, example=s, skin=0.0)
    assert_same(pot, s)
    assert pot.stats["calls"] == 0  # the plain path, a fresh graph each call
    with pytest.raises(ValueError, match="skin"):
        cs.Potential.from_config(CONFIGS["allegro"], seed=0, example=s, skin=-1.0)


# Allegro only: CELLI through the same decomposition is tested against single-device CELLI
# in test_sharded_celli.py (the chunked path only picks the chunk count)
@pytest.mark.parametrize("name", ["allegro"])
def test_structure_too_large_for_one_pass_is_evaluated_in_chunks(name):
    """With a memory limit below what the compiled call needs, ``pot(system)`` evaluates
    the structure through the domain decomposition on one device, in sub-bricks, with the
    same energy, forces and stress; later calls on the same structure stay there."""
    from celli_scale.datasets import nacl_grid
    from celli_scale.distributed import ShardedPotential

    s = nacl_grid(6, spacing=2.2, rattle=0.05, seed=0)
    pot = cs.Potential.from_config(CONFIGS[name], seed=0, example=s)
    pot(s)  # compiles the one-pass kernel: its memory need
    # the reference: one pass over exact lists, CELLI's electrostatics sized for
    # elec_sigma_max as the decomposition sizes them
    e_ref, f_ref, s_ref, _ = pot.evaluate(pot.params, pot.graph(s), stress=True)
    need = max(n for _, n in pot._kernels.values())
    pot.max_bytes = need // 2
    pot._verlet = None
    out = pot(s)
    sp = pot._chunked[1]
    assert isinstance(sp, ShardedPotential) and sp.chunks >= 4
    assert abs(float(out.energy) - float(e_ref)) < 1e-10 * abs(float(e_ref))
    assert relative_error(out.forces, f_ref) < 1e-10
    assert relative_error(out.stress, s_ref) < 1e-10
    moved = s.replace(positions=np.asarray(s.positions) + 0.01)
    out2 = pot(moved)
    assert pot._chunked[1] is sp
    e, f, _, _ = exact(pot, moved)
    assert abs(float(out2.energy) - e) < 1e-10 * abs(e)
    assert relative_error(out2.forces, f) < 1e-10


def test_celli_real_space_cutoff_sized_for_the_current_widths():
    """``pot(s)`` prepares CELLI's electrostatics for the Gaussian widths of its parameters
    (covalent radii here, below elec_sigma_max): a shorter real-space cut-off, the same
    result to the electrostatics accuracy; parameters with wider Gaussians re-prepare."""
    from celli_scale.models.celli import qeq_raw_parameters, species_qeq_parameters

    s = structure("celli-ewald")
    pot = cs.Potential.from_config(
        dict(CONFIGS["celli-ewald"], elec_accuracy=1e-8), seed=0, example=s
    )
    hard, sig = species_qeq_parameters(pot.params, pot.config)
    assert float(np.max(sig)) < pot.config.elec_sigma_max
    o = pot(s)
    r_now = pot._verlet.graph.elec_params.r_cut
    full = pot.batch_graphs([s])[0]  # training graphs: sized for elec_sigma_max
    assert r_now < 0.95 * full.elec_params.r_cut
    e, f, _, _ = pot.evaluate(pot.params, full)
    assert abs(float(o.energy) - float(e)) < 1e-7 * max(1.0, abs(float(e)))
    assert relative_error(o.forces, f) < 1e-6
    wider = np.minimum(np.asarray(sig) * 1.15, pot.config.elec_sigma_max)
    raw = qeq_raw_parameters(pot.config, np.asarray(hard), wider)
    qeq = dict(pot.params["params"]["qeq"], **raw)
    pot.params = {"params": dict(pot.params["params"], qeq=qeq)}
    assert_same(pot, s)
    assert pot.stats["rebuilds"] == 2
    assert pot._verlet.graph.elec_params.r_cut > r_now


def test_celli_warm_start_same_result_fewer_iterations():
    """CELLI's CG Qeq solve starts ``pot(system)`` from the previous call's charges: along
    small MD-like moves the charges and energy equal the independent (cold) solve's within
    the solver tolerance, in fewer CG iterations; a new structure starts from zero."""
    cfg = dict(CONFIGS["celli-ewald"], qeq_method="cg", qeq_tol=1e-10)
    s = structure("celli-ewald")
    pots = {
        w: cs.Potential.from_config(cfg, seed=0, example=s, warm_start=w) for w in (True, False)
    }
    rng = np.random.default_rng(3)
    pos = np.asarray(s.positions)
    iters = {True: [], False: []}
    for k in range(5):
        moved = s.replace(positions=pos + rng.normal(0, 0.01, pos.shape) * k)
        out = {w: pot(moved) for w, pot in pots.items()}
        for w in pots:
            iters[w].append(int(out[w].qeq_iterations))
        # relative CG residual 1e-10 on charges of order 1 e and a condition number of
        # order 10^2: agreement to ~1e-8 e
        np.testing.assert_allclose(out[True].charges, out[False].charges, atol=1e-8)
        de = abs(float(out[True].energy) - float(out[False].energy))
        assert de < 1e-8 * max(1.0, abs(float(out[False].energy)))
        assert relative_error(out[True].forces, out[False].forces) < 1e-7
    assert iters[True][0] == iters[False][0]  # the first call: no previous charges
    assert sum(iters[True][1:]) < sum(iters[False][1:])
    assert min(iters[False]) > 0
    # another structure (one atom fewer): the guess is reset, not reshaped or reused
    small = cs.System(
        np.asarray(s.positions)[:-1], np.asarray(s.species)[:-1], cell=s.cell, pbc=True
    )
    a, b = pots[True](small), pots[False](small)
    assert int(a.qeq_iterations) == int(b.qeq_iterations)
    np.testing.assert_allclose(a.charges, b.charges, atol=1e-8)


# -- pot(Batch) --------------------------------------------------------------------------
def batch_structures(name: str) -> list[cs.System]:
    """Three structures of different sizes (and, periodic, different cells)."""
    out = [
        rocksalt(2, rattle=0.1, seed=1),
        rocksalt(1, a=5.9, rattle=0.1, seed=2),
        rocksalt(1, rattle=0.1, seed=3),
    ]
    if name == "celli-open":
        out = [cs.System(s.positions, s.species, total_charge=float(k)) for k, s in enumerate(out)]
    return out


def exact_batch(pot, batch: cs.Batch):
    """The plain batch path: fresh exact lists, the electrostatics parameters unified for
    the current widths (as ``pot(Batch)`` prepares them)."""
    g = pot.batch_graph(list(batch), n_atoms=batch.n_atoms_padded, sigma_max=pot.sigma_bound())
    return pot.evaluate_batch(pot.params, g, stress=all(any(p) for p in batch.pbc))


def assert_same_batch(pot, systems, n_atoms=None) -> None:
    batch = cs.Batch.from_systems(systems, n_atoms=n_atoms)
    o = pot(batch)
    e, f, st, out = exact_batch(pot, batch)
    np.testing.assert_allclose(o.energy, e, rtol=1e-10, atol=1e-10)
    assert relative_error(o.forces, f) < 1e-10
    if st is not None:
        assert relative_error(o.stress, st) < 1e-10
    if out.charges is not None:
        np.testing.assert_allclose(o.charges, out.charges, atol=1e-10)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_batch_keeps_verlet_lists_and_matches_fresh_lists(name):
    """``pot(Batch)`` keeps Verlet lists between calls like ``pot(system)``: along moves
    of every structure each call equals the plain batch path on fresh exact lists, the
    host rebuilds only every few calls, one compiled kernel (plus one per overflow); a
    batch of other structures (or another padding) rebuilds (Allegro)."""
    systems = batch_structures(name)
    pot = cs.Potential.from_config(CONFIGS[name], seed=0, example=systems[0], skin=0.6)
    rng = np.random.default_rng(0)
    pos = [np.asarray(s.positions) for s in systems]
    for _ in range(6):
        pos = [p + rng.normal(0, 0.05, p.shape) for p in pos]
        moved = [s.replace(positions=p) for s, p in zip(systems, pos, strict=True)]
        assert_same_batch(pot, moved, 20)
    assert pot.stats["calls"] == 6
    assert 1 < pot.stats["rebuilds"] < 6
    assert len(pot._kernels) == 1 + pot.stats["overflows"]
    if name != "allegro":
        return  # the rebuild rules below do not depend on the model (compiles saved)
    rebuilds = pot.stats["rebuilds"]
    moved = [s.replace(positions=p) for s, p in zip(systems, pos, strict=True)]
    assert_same_batch(pot, moved[::-1], 20)  # other order: other structures per slot
    assert pot.stats["rebuilds"] == rebuilds + 1
    assert_same_batch(pot, moved[::-1])  # padded to 16, not 20
    assert pot.stats["rebuilds"] == rebuilds + 2
    assert pot._verlet is None  # pot(Batch) keeps its own state, not pot(system)'s


def test_batch_overflow_grows_capacity_and_redoes_the_call():
    """Exact capacities, then one structure of the batch gains a pair within the cut-off
    without a rebuild: the call is redone with more slots, the result the exact one."""
    systems = batch_structures("allegro")
    skin = 1.2
    cfg = CONFIGS["allegro"]
    pot = cs.Potential.from_config(cfg, seed=0, example=systems[0], skin=skin, capacity_growth=1.0)
    pot(cs.Batch.from_systems(systems))
    caps = pot._verlet_batch.caps
    # the largest structure sets the packed capacity: pull a pair into it
    systems[0] = systems[0].replace(positions=pulled_in(systems[0], pot.config.r_cut, skin))
    assert_same_batch(pot, systems)
    assert pot.stats["rebuilds"] == 1 and pot.stats["overflows"] == 1
    assert pot._verlet_batch.caps[0] > caps[0]


def test_batch_celli_warm_start_same_result_fewer_iterations():
    """CELLI's CG solves in ``pot(Batch)`` start from the previous call's charges: the
    same charges within the tolerance as cold solves, in fewer iterations."""
    cfg = dict(CONFIGS["celli-ewald"], qeq_method="cg", qeq_tol=1e-10)
    systems = batch_structures("celli-ewald")
    pots = {
        w: cs.Potential.from_config(cfg, seed=0, example=systems[0], warm_start=w)
        for w in (True, False)
    }
    rng = np.random.default_rng(3)
    iters = {True: 0, False: 0}
    for k in range(4):
        moved = [
            s.replace(positions=np.asarray(s.positions) + rng.normal(0, 0.01, (s.n_atoms, 3)) * k)
            for s in systems
        ]
        batch = cs.Batch.from_systems(moved)
        out = {w: pot(batch) for w, pot in pots.items()}
        np.testing.assert_allclose(out[True].charges, out[False].charges, atol=1e-8)
        np.testing.assert_allclose(out[True].energy, out[False].energy, rtol=1e-8)
        if k:
            for w in pots:
                iters[w] += int(np.sum(out[w].qeq_iterations))
    assert 0 < iters[True] < iters[False]


def test_batch_over_the_memory_limit_is_evaluated_one_by_one():
    """A batch whose compiled call needs more than ``pot.max_bytes`` is evaluated one
    structure at a time (padded), with the plain batch path's results."""
    systems = batch_structures("allegro")
    pot = cs.Potential.from_config(CONFIGS["allegro"], seed=0, example=systems[0])
    pot.max_bytes = 1
    assert_same_batch(pot, systems)
    assert pot._verlet_batch is None
