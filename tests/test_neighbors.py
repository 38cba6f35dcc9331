"""Neighbor lists against ASE's reference implementation, overflow handling, padding."""

from __future__ import annotations

import time

import jax
import numpy as np
import pytest
from ase.neighborlist import neighbor_list as ase_neighbor_list

import celli_scale as cs
from celli_scale import neighbors as nb


def _pair_set(i, j, s):
    s = np.rint(np.asarray(s)).astype(int)
    return set(
        zip(np.asarray(i).tolist(), np.asarray(j).tolist(), map(tuple, s.tolist()), strict=True)
    )


def _ase_set(system: cs.System, r_cut: float):
    i, j, s = ase_neighbor_list("ijS", system.to_ase(), r_cut)
    return _pair_set(i, j, s)


def _nl_set(nl: nb.NeighborList):
    m = np.asarray(nl.mask)
    return _pair_set(
        np.asarray(nl.senders)[m], np.asarray(nl.receivers)[m], np.asarray(nl.shifts)[m]
    )


def _random_system(kind: str, n: int, seed: int) -> cs.System:
    rng = np.random.default_rng(seed)
    if kind == "open":
        return cs.System(rng.uniform(0, 6, (n, 3)), np.full(n, 8), min_distance=0.0)
    if kind == "ortho":
        cell = np.diag([5.0, 6.0, 7.5])
    elif kind == "triclinic":
        # strongly sheared: plane heights well below the vector lengths
        cell = np.array([[4.0, 0.0, 0.0], [3.1, 3.2, 0.0], [-2.2, 1.9, 3.6]])
    elif kind == "mixed":
        cell = np.array([[5.0, 0.0, 0.0], [1.0, 4.0, 0.0], [0.0, 0.0, 20.0]])
        frac = rng.uniform(0, 1, (n, 3))
        return cs.System(
            frac @ cell, np.full(n, 8), cell=cell, pbc=(True, True, False), min_distance=0.0
        )
    else:  # pragma: no cover
        raise ValueError(kind)
    frac = rng.uniform(-0.3, 1.3, (n, 3))  # also atoms outside the cell: wrapping is tested
    return cs.System(frac @ cell, np.full(n, 8), cell=cell, pbc=True, min_distance=0.0)


@pytest.mark.parametrize("kind", ["open", "ortho", "triclinic", "mixed"])
@pytest.mark.parametrize("r_cut", [2.5, 4.0, 9.0])  # 9 Å exceeds every cell's half width
def test_host_list_equals_ase(kind, r_cut):
    s = _random_system(kind, 12, seed=len(kind) * 10 + int(r_cut))
    nl = nb.neighbor_list(s, r_cut)
    ref = _ase_set(s, r_cut)
    assert int(nl.n_pairs) == len(ref)
    assert _nl_set(nl) == ref
    # distances agree with the pair vectors
    vec = np.asarray(nb.edge_vectors(s.positions, s.cell, nl))[np.asarray(nl.mask)]
    assert np.all(np.linalg.norm(vec, axis=1) < r_cut)


def test_cutoff_beyond_cell_sees_own_images():
    cell = np.eye(3) * 3.0
    s = cs.System([[0.5, 0.5, 0.5]], [11], cell=cell, pbc=True)
    nl = nb.neighbor_list(s, 6.5)
    # an atom alone in a 3 Å cubic cell: its images within 6.5 Å
    g = np.array(np.meshgrid(*[np.arange(-3, 4)] * 3, indexing="ij")).reshape(3, -1).T
    d = np.linalg.norm(g * 3.0, axis=1)
    assert int(nl.n_pairs) == int(np.sum((d > 0) & (d < 6.5)))
    assert _nl_set(nl) == _ase_set(s, 6.5)


@pytest.mark.parametrize("kind", ["open", "ortho", "triclinic"])
def test_jit_builder_equals_host_and_flags_overflow(kind):
    s = _random_system(kind, 10, seed=3)
    r_cut = 4.5
    ref = nb.neighbor_list(s, r_cut)
    n = int(ref.n_pairs)
    build = jax.jit(nb.neighbor_list_fn(r_cut, n + 7, s.cell, s.pbc))
    nl = build(s.positions)
    assert not bool(nl.did_buffer_overflow)
    assert _nl_set(nl) == _nl_set(ref)
    small = jax.jit(nb.neighbor_list_fn(r_cut, n - 1, s.cell, s.pbc))(s.positions)
    assert bool(small.did_buffer_overflow)
    assert int(small.n_pairs) == n  # the true count is reported, so the host can regrow
    with pytest.raises(nb.NeighborListOverflowError, match="overflow"):
        nb.check_overflow(small)


def test_host_list_regrows_automatically():
    s = _random_system("ortho", 14, seed=5)
    full = nb.neighbor_list(s, 4.0)
    grown = nb.neighbor_list(s, 4.0, capacity=5)
    assert grown.capacity >= int(full.n_pairs) > 5
    assert not bool(grown.did_buffer_overflow)
    assert _nl_set(grown) == _nl_set(full)
    roomy = nb.neighbor_list(s, 4.0, capacity=int(full.n_pairs) + 50)
    assert roomy.capacity == int(full.n_pairs) + 50
    assert _nl_set(roomy) == _nl_set(full)


def test_batch_padding_invariance():
    systems = [
        _random_system(k, n, seed=n) for k, n in [("open", 5), ("ortho", 9), ("triclinic", 7)]
    ]
    b1 = cs.Batch.from_systems(systems)
    b2 = cs.Batch.from_systems(systems, n_atoms=16)
    nl1 = nb.neighbor_list_batch(b1, 4.0)
    nl2 = nb.neighbor_list_batch(b2, 4.0, capacity=nl1.capacity + 40)
    for k, s in enumerate(systems):
        ref = _nl_set(nb.neighbor_list(s, 4.0))
        for nl in (nl1, nl2):
            m = np.asarray(nl.mask[k])
            got = _pair_set(
                np.asarray(nl.senders[k])[m],
                np.asarray(nl.receivers[k])[m],
                np.asarray(nl.shifts[k])[m],
            )
            assert got == ref
            assert int(nl.n_pairs[k]) == len(ref)
        # padding atoms never appear in any pair
        pad = ~np.asarray(b2.mask[k])
        used = np.concatenate(
            [
                np.asarray(nl2.senders[k])[np.asarray(nl2.mask[k])],
                np.asarray(nl2.receivers[k])[np.asarray(nl2.mask[k])],
            ]
        )
        assert not np.any(pad[used])


def test_bad_r_cut_and_traced_positions():
    s = _random_system("ortho", 4, seed=1)
    with pytest.raises(ValueError, match="r_cut"):
        nb.neighbor_list(s, -1.0)

    def f(p):
        return nb.neighbor_list(cs.System(p, np.full(4, 8), cell=s.cell, pbc=True), 3.0).n_pairs

    with pytest.raises(ValueError, match="concrete"):
        jax.jit(f)(s.positions)


@pytest.mark.parametrize("r_cut", [-1.0, 0.0, np.nan, np.inf, "5", True, None])
def test_bad_r_cut_refused_by_every_builder(r_cut):
    # before: neighbor_list_fn(r_cut=-1) built a list with 0 pairs
    s = _random_system("ortho", 4, seed=1)
    with pytest.raises(ValueError, match="r_cut"):
        nb.neighbor_list_fn(r_cut, 10, s.cell, s.pbc)
    with pytest.raises(ValueError, match="r_cut"):
        nb.neighbor_list_fn(r_cut, 10)
    with pytest.raises(ValueError, match="r_cut"):
        nb.neighbor_list(s, r_cut)
    with pytest.raises(ValueError, match="r_cut"):
        nb.neighbor_list_batch(cs.Batch.from_systems([s]), r_cut)


def test_bad_capacity_refused():
    for cap in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="capacity"):
            nb.neighbor_list_fn(3.0, cap)


def test_numpy_scalar_r_cut_and_capacity():
    s = _random_system("ortho", 6, seed=2)
    ref = nb.neighbor_list(s, 3.0)
    assert _nl_set(nb.neighbor_list(s, np.float32(3.0))) == _nl_set(ref)
    build = nb.neighbor_list_fn(np.float64(3.0), np.int64(int(ref.n_pairs) + 2), s.cell, s.pbc)
    assert _nl_set(build(s.positions)) == _nl_set(ref)


def test_slab_with_zero_open_vector_equals_slab_with_vacuum():
    # ASE's slab convention: pbc (T, T, F) and a zero third vector
    rng = np.random.default_rng(5)
    ab = np.array([[5.0, 0.0, 0.0], [1.0, 4.0, 0.0]])
    frac = rng.uniform(0, 1, (10, 2))
    pos = np.concatenate([frac @ ab[:, :2], rng.uniform(-2, 2, (10, 1))], axis=1)
    flat = cs.System(
        pos,
        np.full(10, 8),
        cell=np.vstack([ab, [0, 0, 0]]),
        pbc=(True, True, False),
        min_distance=0.0,
    )
    vac = cs.System(
        pos,
        np.full(10, 8),
        cell=np.vstack([ab, [0, 0, 30.0]]),
        pbc=(True, True, False),
        min_distance=0.0,
    )
    for r_cut in (2.5, 7.0):
        ref = nb.neighbor_list(vac, r_cut)
        nl = nb.neighbor_list(flat, r_cut)
        assert int(nl.n_pairs) == int(ref.n_pairs) > 0
        assert _nl_set(nl) == _nl_set(ref) == _ase_set(vac, r_cut)
        build = nb.neighbor_list_fn(r_cut, int(ref.n_pairs) + 5, flat.cell, flat.pbc)
        assert _nl_set(build(flat.positions)) == _nl_set(ref)


def test_too_large_search_refused_up_front():
    # planes 2e-3 Å apart (long vectors, so the System accepts the cell without checks):
    # a 5 Å search needs ~1e10 images; before, this ran into a MemoryError
    cell = np.array([[5.0, 0, 0], [0, 5.0, 0], [5.0, 5.0, 0.002]])
    s = cs.System([[0.0, 0, 0], [2.5, 2.5, 0.001]], [1, 1], cell=cell, pbc=True, validate=False)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="images"):
        nb.neighbor_list(s, 5.0)
    with pytest.raises(ValueError, match="images"):
        nb.neighbor_list_fn(5.0, 100, cell, True)
    # many atoms with a huge cut-off in a real cell: refused naming the memory
    big = _random_system("ortho", 2000, seed=0)
    with pytest.raises(ValueError, match=r"GiB"):
        nb.neighbor_list(big, 60.0)
    assert time.perf_counter() - t0 < 5.0


def test_dense_jit_builder_refuses_huge_searches():
    build = nb.neighbor_list_fn(3.0, 10)
    with pytest.raises(ValueError, match="GiB"):
        jax.eval_shape(build, jax.ShapeDtypeStruct((200_000, 3), np.float64))


def test_row_layout_sums_like_a_scatter_and_flags_what_does_not_fit():
    """Pairs one row per atom: per-atom sums equal segment_sum over the flat list (host
    list, and a Verlet list packed in jit); a row capacity below the largest count, or
    pairs out of sender order, give fits=False."""
    s = _random_system("triclinic", 40, 5)
    nl = cs.neighbors.with_row_capacity(nb.neighbor_list(s, 4.0, capacity=4000))
    counts = np.bincount(np.asarray(nl.senders)[np.asarray(nl.mask)], minlength=40)
    assert nl.row_capacity == counts.max()
    x = np.random.default_rng(0).normal(size=nl.capacity)
    x = np.where(np.asarray(nl.mask), x, 0.0)
    ref = np.asarray(jax.ops.segment_sum(x, nl.senders, num_segments=40))

    def row_sums(lst):
        rows, fits = nb.row_layout(lst, 40)
        return np.asarray(np.concatenate([x, [0.0]])[np.asarray(rows)].sum(axis=1)), bool(fits)

    got, fits = row_sums(nl)
    assert fits and np.allclose(got, ref, rtol=1e-12, atol=1e-12)
    assert not row_sums(nl.replace(row_capacity=int(counts.max()) - 1))[1]
    perm = np.random.default_rng(1).permutation(nl.capacity)
    shuffled = nl.replace(
        senders=nl.senders[perm], receivers=nl.receivers[perm], mask=nl.mask[perm]
    )
    assert not bool(nb.row_layout(shuffled, 40)[1])
    # grown by growth, never below at_least
    assert cs.neighbors.with_row_capacity(nl, growth=1.5).row_capacity == int(
        np.ceil(counts.max() * 1.5)
    )
    assert cs.neighbors.with_row_capacity(nl, at_least=500).row_capacity == 500
    # a Verlet list packed inside jit keeps sender order: rows still fit
    verlet = cs.neighbors.with_row_capacity(nb.neighbor_list(s, 4.5))
    packed = jax.jit(lambda p: nb.compact(verlet, p, s.cell, 4.0, nl.capacity))(s.positions)
    assert packed.row_capacity == verlet.row_capacity
    rows, fits = nb.row_layout(packed, 40)
    d2 = np.sum(np.asarray(nb.edge_vectors(s.positions, s.cell, packed)) ** 2, axis=1)
    assert bool(fits) and int(packed.n_pairs) == int(nl.n_pairs)
    assert np.all(d2[np.asarray(packed.mask)] < 16.0)


@pytest.mark.parametrize("rows", ["fit", "outgrown"])
def test_edge_vectors_through_rows_equal_the_plain_gather_to_second_derivatives(rows):
    """``edge_vectors`` on a list with a row layout (its sender gather differentiated as a
    row sum, :func:`take_senders`) gives the plain gather's vectors, gradients and
    gradient-of-gradient w.r.t. positions and cell (float64); a list that outgrew its
    rows takes the plain gather through the same call."""
    s = _random_system("triclinic", 40, 5)
    plain = nb.neighbor_list(s, 4.0, capacity=4000)
    laid = cs.neighbors.with_row_capacity(plain)
    if rows == "outgrown":
        laid = laid.replace(row_capacity=laid.row_capacity - 1)
        assert not bool(nb.row_layout(laid, 40)[1])
    pos = jax.numpy.asarray(s.positions, dtype=np.float64)
    cell = jax.numpy.asarray(s.cell, dtype=np.float64)

    def f(p, c, lst):
        v = nb.edge_vectors(p, c, lst)
        r = jax.numpy.sqrt(jax.numpy.sum(v * v, axis=-1))
        return jax.numpy.sum(jax.numpy.where(lst.mask, jax.numpy.sin(r) * v[:, 0] ** 2, 0.0))

    def curvature(p, c, lst):  # gradient of |dE/dR|², as force matching differentiates
        return jax.grad(lambda p, c: jax.numpy.sum(jax.grad(f)(p, c, lst) ** 2), (0, 1))(p, c)

    for fn in (nb.edge_vectors, jax.grad(f, (0, 1)), curvature):
        want = jax.jit(fn)(pos, cell, plain)
        got = jax.jit(fn)(pos, cell, laid)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-10)
    # the row path really is taken: its derivative has no scatter onto the senders
    hlo = jax.jit(jax.grad(f)).lower(pos, cell, laid).as_text()
    assert "unique_indices = true" in hlo or "unique_indices=true" in hlo
