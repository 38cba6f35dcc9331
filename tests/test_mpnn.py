"""Message-passing baselines (NequIP, MACE): receptive field, forces, symmetry, padding,
body order, and the fast kernels against direct e3nn references. float64 throughout.

Parameters are re-drawn O(1) at random (not the small-at-init values), so every path
of the networks carries signal and a dropped term shows up.
"""

from __future__ import annotations

import functools

import e3nn_jax as e3nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import celli_scale as cs
from celli_scale.models import build
from celli_scale.models.mace import MACEConfig, SymmetricContraction
from celli_scale.models.layers import Graph, channelwise_conv, conv_paths
from celli_scale.models.nequip import NequIPConfig
from celli_scale.neighbors import neighbor_list

SPECIES = (1, 8)
R_CUT = 3.0
SMALL = dict(
    r_cut=R_CUT,
    l_max=2,
    channels=4,
    n_layers=2,
    n_radial=4,
    radial_mlp=(8,),
    dtype="float64",
    avg_num_neighbors=4.0,
    species=SPECIES,
)
N_PAD, E_PAD = 12, 160  # one padded shape for most graphs: one compilation per model


def make_graph(system: cs.System, n_pad: int | None = N_PAD, e_pad: int | None = E_PAD) -> Graph:
    """Graph of ``system`` padded to ``n_pad`` atoms / ``e_pad`` edges (None: no padding).

    Padded atoms all sit at the origin (coincident: a NaN trap) and padded edges join
    padded atoms, as a careless padding would.
    """
    nl = neighbor_list(system, R_CUT)
    n = system.n_atoms
    n_pad = n if n_pad is None else n_pad
    ne = int(nl.n_pairs)
    e_pad = ne if e_pad is None else e_pad
    assert n_pad >= n and e_pad >= ne
    pos = np.zeros((n_pad, 3))
    pos[:n] = np.asarray(system.positions)
    sp = np.zeros(n_pad, np.int32)
    sp[:n] = np.searchsorted(np.array(SPECIES), np.asarray(system.species))
    snd = np.full(e_pad, n_pad - 1, np.int32)
    rcv = np.full(e_pad, max(n, n_pad - 2), np.int32)
    snd[:ne], rcv[:ne] = np.asarray(nl.senders)[:ne], np.asarray(nl.receivers)[:ne]
    shifts = np.zeros((e_pad, 3))
    shifts[:ne] = np.asarray(nl.shifts)[:ne]
    cell = np.zeros((3, 3)) if system.cell is None else np.asarray(system.cell)
    return Graph(
        positions=jnp.asarray(pos),
        species=jnp.asarray(sp),
        node_mask=jnp.arange(n_pad) < n,
        cell=jnp.asarray(cell),
        total_charge=jnp.asarray(0.0),
        senders=jnp.asarray(snd),
        receivers=jnp.asarray(rcv),
        shifts=jnp.asarray(shifts),
        edge_mask=jnp.arange(e_pad) < ne,
        periodic=bool(np.any(system.pbc)),
    )


def cluster(n: int = 7, seed: int = 0, box: float = 3.2) -> cs.System:
    rng = np.random.default_rng(seed)
    pos: list[np.ndarray] = []
    while len(pos) < n:
        p = rng.uniform(0, box, 3)
        if all(np.linalg.norm(p - q) > 1.0 for q in pos):
            pos.append(p)
    return cs.System(np.array(pos), np.resize(np.array(SPECIES), n))


def periodic_cell() -> cs.System:
    frac = np.array([[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    cell = np.array([[4.2, 0.0, 0.0], [0.3, 4.0, 0.0], [-0.2, 0.4, 4.4]])  # triclinic
    pos = frac @ cell + np.random.default_rng(5).normal(0, 0.1, (4, 3))
    return cs.System(pos, [1, 8, 8, 1], cell=cell, pbc=True)


def randomise(params, seed: int, scale: float = 1.0):
    """Every parameter redrawn ~ N(0, scale²) (so all paths carry O(1) signal)."""
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return tree.unflatten(
        [scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
    )


class Bundle:
    """A model, O(1) random parameters, and jitted energy / node-energy / force functions."""

    def __init__(self, name: str, **overrides):
        self.model = build({**SMALL, "name": name, **overrides})
        g = make_graph(cluster())
        self.params = randomise(jax.jit(self.model.init)(jax.random.PRNGKey(0), g), 1)
        apply = self.model.apply

        def out(params, graph):
            return apply(params, graph)

        def forces(params, graph):
            return -jax.grad(lambda p: apply(params, graph.replace(positions=p)).energy)(
                graph.positions
            )

        self._out, self._forces = jax.jit(out), jax.jit(forces)

    def __call__(self, graph: Graph, params=None):
        return self._out(self.params if params is None else params, graph)

    def forces(self, graph: Graph):
        return np.asarray(self._forces(self.params, graph))


@functools.cache
def bundle(name: str, **overrides) -> Bundle:
    return Bundle(name, **overrides)


@pytest.fixture(params=["nequip", "mace"])
def name(request):
    return request.param


def _rel(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


# -- receptive field -------------------------------------------------------------------


def chain(c_offset=(0.0, 0.0, 0.0), d_offset=(0.0, 0.0, 0.0)) -> cs.System:
    """A(0) – B(2.0) – C(4.0) – D(6.6) along x (r_cut 3): A sees B; C (4 Å from A) only
    through B; D is beyond 2·r_cut of A and beyond r_cut of B, within r_cut of C."""
    pos = np.array([[0.0, 0.0, 0.0], [2.0, 0.3, 0.0], [4.0, 0.1, 0.4], [6.6, -0.2, 0.1]])
    pos[2] += c_offset
    pos[3] += d_offset
    return cs.System(pos, [1, 8, 8, 1])


def test_receptive_field_is_n_layers_times_r_cut(name):
    b2 = bundle(name)
    e0 = np.asarray(b2(make_graph(chain())).node_energies)
    e_c = np.asarray(b2(make_graph(chain(c_offset=(0.1, 0.2, -0.1)))).node_energies)
    e_d = np.asarray(b2(make_graph(chain(d_offset=(0.1, 0.2, -0.1)))).node_energies)
    # C is beyond r_cut of A but reaches it through B in two layers (a small but real
    # effect at random init: MACE divides each layer's sum by avg_num_neighbors)
    assert abs(e_c[0] - e0[0]) > 1e-9 * abs(e0[0])
    # D is beyond 2·r_cut of A (and beyond r_cut of B): A is blind to it ...
    assert abs(e_d[0] - e0[0]) < 1e-12 * max(abs(e0[0]), 1.0)
    # ... while D's own neighbour C is not
    assert abs(e_d[2] - e0[2]) > 1e-6 * abs(e0[2])
    # a one-layer model is blind to C: the receptive field is n_layers · r_cut
    b1 = bundle(name, n_layers=1)
    e1 = np.asarray(b1(make_graph(chain())).node_energies)
    e1_c = np.asarray(b1(make_graph(chain(c_offset=(0.1, 0.2, -0.1)))).node_energies)
    assert abs(e1_c[0] - e1[0]) < 1e-12 * max(abs(e1[0]), 1.0)
    assert b2.model.config.receptive_field == pytest.approx(2 * R_CUT)


# -- forces, symmetry, padding -----------------------------------------------------------


@pytest.mark.parametrize("kind", ["cluster", "periodic"])
def test_forces_match_central_finite_differences(name, kind):
    b = bundle(name)
    system = cluster() if kind == "cluster" else periodic_cell()
    g = make_graph(system)
    f = b.forces(g)
    n = system.n_atoms
    h = 1e-5
    fd = np.zeros((n, 3))
    pos = np.asarray(g.positions)
    for a in range(n):
        for k in range(3):
            e = []
            for s in (1, -1):
                p = pos.copy()
                p[a, k] += s * h
                e.append(float(b(g.replace(positions=jnp.asarray(p))).energy))
            fd[a, k] = -(e[0] - e[1]) / (2 * h)
    assert np.max(np.abs(f[:n])) > 1e-3  # non-trivial forces
    assert _rel(f[:n], fd) < 1e-6
    assert np.all(f[n:] == 0.0)


def _orthogonal(seed: int, reflect: bool) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if (np.linalg.det(q) < 0) != reflect:
        q[:, 0] *= -1
    return q


@pytest.mark.parametrize("reflect", [False, True])
def test_rotation_reflection_translation_permutation(name, reflect):
    b = bundle(name)
    rot = _orthogonal(11, reflect)
    shift = np.array([0.7, -1.3, 2.1])
    for system in (cluster(), periodic_cell()):
        n = system.n_atoms
        perm = np.random.default_rng(4).permutation(n)
        moved = cs.System(
            (np.asarray(system.positions) @ rot.T + shift)[perm],
            np.asarray(system.species)[perm],
            cell=None if system.cell is None else np.asarray(system.cell) @ rot.T,
            pbc=system.pbc,
        )
        g, g2 = make_graph(system), make_graph(moved)
        o, o2 = b(g), b(g2)
        assert _rel(o2.energy, o.energy) < 1e-9
        assert _rel(np.asarray(o2.node_energies)[:n], np.asarray(o.node_energies)[:n][perm]) < 1e-9
        assert _rel(b.forces(g2)[:n], (b.forces(g)[:n] @ rot.T)[perm]) < 1e-8


def test_padding_changes_nothing(name):
    b = bundle(name)
    system = periodic_cell()
    n = system.n_atoms
    exact = make_graph(system, None, None)
    padded = make_graph(system)  # 12 atoms, 160 edges, coincident padded atoms
    o, op = b(exact), b(padded)
    assert _rel(op.energy, o.energy) < 1e-12
    assert np.all(np.asarray(op.node_energies)[n:] == 0.0)
    f, fp = b.forces(exact), b.forces(padded)
    assert np.all(np.isfinite(fp))
    assert _rel(fp[:n], f) < 1e-12


# -- MACE body order ---------------------------------------------------------------------


def test_mace_correlation_order_is_used():
    b3 = bundle("mace", correlation=3)
    b2 = bundle("mace", correlation=2)
    g = make_graph(cluster())
    # the correlation-2 model is the correlation-3 model with the ν = 3 weights removed
    paths = jax.tree_util.tree_flatten_with_path(b3.params)[0]
    flat = {jax.tree_util.keystr(k): x for k, x in paths}
    assert any("w3_" in k for k in flat)
    zeroed = jax.tree_util.tree_map_with_path(
        lambda k, x: jnp.zeros_like(x) if "w3_" in jax.tree_util.keystr(k) else x, b3.params
    )
    p2 = jax.tree_util.tree_map_with_path(lambda k, x: flat[jax.tree_util.keystr(k)], b2.params)
    e3 = float(b3(g).energy)
    e3_without_nu3 = float(b3(g, zeroed).energy)
    e2 = float(b2(g, p2).energy)
    assert e2 == pytest.approx(e3_without_nu3, rel=1e-12, abs=1e-12)
    assert abs(e3 - e2) > 1e-6 * abs(e2)  # the 4-body (ν = 3) terms contribute


@pytest.mark.parametrize("corr", [0, 1])
def test_mace_correlation_below_two_raises(corr):
    with pytest.raises(ValueError, match="correlation"):
        build({**SMALL, "name": "mace", "correlation": corr})


def test_config_validation_and_defaults():
    with pytest.raises(ValueError, match="feature_parities"):
        build({**SMALL, "name": "nequip", "feature_parities": "odd"})
    m = MACEConfig()
    assert (m.correlation, m.hidden_l_max, m.l_max, m.radial_mlp) == (3, 1, 2, (64, 64, 64))
    q = NequIPConfig()
    assert (q.feature_parities, q.resnet, q.l_max) == ("sh", True, 2)


# -- the fast kernels against direct e3nn references ---------------------------------------


@pytest.mark.parametrize("irreps_in", ["0e", "0e + 1o + 2e", "0e + 0o + 1o + 1e + 2e + 2o"])
def test_channelwise_conv_matches_e3nn_tensor_product(irreps_in):
    rng = np.random.default_rng(0)
    n, e, c = 5, 17, 3
    irreps_in = e3nn.Irreps(irreps_in)
    y_irreps = e3nn.Irreps.spherical_harmonics(2)
    keep = e3nn.Irreps("0e + 0o + 1o + 1e + 2e")
    x = e3nn.IrrepsArray(irreps_in, jnp.asarray(rng.normal(size=(n, c, irreps_in.dim))))
    y = e3nn.IrrepsArray(y_irreps, jnp.asarray(rng.normal(size=(e, y_irreps.dim))))
    snd, rcv = jnp.asarray(rng.integers(0, n, e)), jnp.asarray(rng.integers(0, n, e))
    n_paths = conv_paths(irreps_in, y_irreps, keep)
    w = jnp.ones((e, c, n_paths))
    got = channelwise_conv(x, y, w, snd, rcv, keep)
    # reference: e3nn's tensor product per channel, then the sum over edges
    ref = e3nn.tensor_product(x[rcv], y[:, None, :], filter_ir_out=keep)  # (E, C, irreps)
    ref = e3nn.IrrepsArray(ref.irreps, jax.ops.segment_sum(ref.array, snd, n)).regroup()
    got = got.regroup()
    assert got.irreps == ref.irreps
    np.testing.assert_allclose(got.array, ref.array, rtol=1e-12, atol=1e-12)
    # the path weights multiply one path each (scaling path 0 changes exactly one block)
    w2 = w.at[:, :, 0].set(2.0)
    diff = (
        channelwise_conv(x, y, w2, snd, rcv, keep).array
        - channelwise_conv(x, y, w, snd, rcv, keep).array
    )
    assert 0 < np.count_nonzero(np.abs(diff).sum(axis=(0, 1)) > 1e-12) < diff.shape[-1]


def test_symmetric_contraction_matches_u_tensor_einsum():
    rng = np.random.default_rng(1)
    n, c, corr = 6, 3, 3
    irreps_a = e3nn.Irreps("0e + 1o + 2e")
    irreps_out = e3nn.Irreps("0e + 1o")
    a = e3nn.IrrepsArray(irreps_a, jnp.asarray(rng.normal(size=(n, c, irreps_a.dim))))
    species = jnp.asarray(rng.integers(0, 2, n))
    mod = SymmetricContraction(corr, irreps_out, 2)
    params = randomise(mod.init(jax.random.PRNGKey(0), a, species), 3)
    got = mod.apply(params, a, species)
    x = np.asarray(a.array)
    ref = []
    for ir in irreps_out:
        acc = np.zeros((n, c, ir.ir.dim))
        for nu in range(1, corr + 1):
            u = e3nn.reduced_symmetric_tensor_product_basis(irreps_a, nu, keep_ir=[ir.ir])
            k = u.irreps.count(ir.ir)
            u = np.asarray(u.array).reshape((irreps_a.dim,) * nu + (k, ir.ir.dim)) / k
            w = np.asarray(params["params"][f"w{nu}_{ir.ir}"])[np.asarray(species)]  # (N, k, C)
            letters = "pqrs"[:nu]
            ops = ",".join(f"nc{ch}" for ch in letters)
            full = np.einsum(f"{letters}km,{ops}->nckm", u, *([x] * nu))
            acc += np.einsum("nckm,nkc->ncm", full, w)
        ref.append(acc)
    np.testing.assert_allclose(got.array, np.concatenate(ref, -1), rtol=1e-10, atol=1e-12)
