"""Allegro: strict locality, energy conservation, E(3)/permutation invariance, padding.

Graphs are built here from host neighbor lists (``celli_scale.neighbors``) so that the
tests depend on the model alone; all numbers in float64.
"""

from __future__ import annotations

import e3nn_jax as e3nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import celli_scale  # noqa: F401  (enables float64)
from celli_scale.models import build
from celli_scale.models.allegro import (
    AllegroConfig,
    channelwise_tp,
    scalar_tp,
    tp_plan,
)
from celli_scale.models.layers import Graph
from celli_scale.neighbors import neighbor_list
from celli_scale.system import System

SPECIES = (11, 17)
R_CUT = 3.5


def small_config(**kw) -> dict:
    cfg = dict(
        name="allegro",
        r_cut=R_CUT,
        l_max=2,
        channels=4,
        n_layers=2,
        n_radial=4,
        species=SPECIES,
        radial_mlp=(16,),
        latent_dim=16,
        species_embed_dim=4,
        latent_mlp=(16,),
        edge_eng_mlp=(8,),
        avg_num_neighbors=6.0,
        dtype="float64",
    )
    cfg.update(kw)
    return cfg


def make_graph(
    system: System, r_cut: float, species=SPECIES, pad_atoms=0, pad_edges=0, total_charge=None
) -> Graph:
    """Padded Graph of a concrete system (extra atoms/edges masked out)."""
    nl = neighbor_list(system, r_cut)
    pos = np.asarray(system.positions, dtype=float)
    n = pos.shape[0]
    spec = np.searchsorted(np.asarray(species), np.asarray(system.species)).astype(np.int32)
    rng = np.random.default_rng(123)
    pos = np.concatenate([pos, rng.uniform(-3, 3, (pad_atoms, 3))])
    spec = np.concatenate([spec, np.zeros(pad_atoms, np.int32)])
    node_mask = np.arange(n + pad_atoms) < n
    e = int(np.asarray(nl.mask).sum())
    snd = np.asarray(nl.senders)[:e]
    rcv = np.asarray(nl.receivers)[:e]
    shf = np.asarray(nl.shifts)[:e]
    # padded edges point at arbitrary (also real) atoms: the mask alone must remove them
    snd = np.concatenate([snd, rng.integers(0, n + pad_atoms, pad_edges)]).astype(np.int32)
    rcv = np.concatenate([rcv, rng.integers(0, n + pad_atoms, pad_edges)]).astype(np.int32)
    shf = np.concatenate([shf, np.zeros((pad_edges, 3))])
    edge_mask = np.arange(e + pad_edges) < e
    cell = np.zeros((3, 3)) if system.cell is None else np.asarray(system.cell, float)
    q = system.total_charge if total_charge is None else total_charge
    return Graph(
        positions=jnp.asarray(pos),
        species=jnp.asarray(spec),
        node_mask=jnp.asarray(node_mask),
        cell=jnp.asarray(cell),
        total_charge=jnp.asarray(q, dtype=jnp.float64),
        senders=jnp.asarray(snd),
        receivers=jnp.asarray(rcv),
        shifts=jnp.asarray(shf),
        edge_mask=jnp.asarray(edge_mask),
        periodic=system.cell is not None,
    )


def random_positions(n, box, min_dist=1.6, seed=0):
    rng = np.random.default_rng(seed)
    pts = []
    while len(pts) < n:
        p = rng.uniform(0, 1, 3) * np.asarray(box)
        if all(np.linalg.norm(p - q) > min_dist for q in pts):
            pts.append(p)
    return np.asarray(pts)


def open_cluster(n=14, seed=0) -> System:
    pos = random_positions(n, (11.0, 5.0, 5.0), seed=seed)
    z = np.where(np.arange(n) % 2 == 0, 11, 17)
    return System(pos, z)


def crystal(seed=1) -> System:
    """8 atoms in a 5 Å triclinic-ish cell (cut-off reaches several images)."""
    cell = np.array([[5.0, 0.0, 0.0], [0.6, 5.2, 0.0], [0.3, -0.4, 4.8]])
    frac = np.random.default_rng(seed).uniform(0, 1, (8, 3))
    frac = np.concatenate(
        [
            np.array(
                [
                    [0, 0, 0],
                    [0.5, 0.5, 0],
                    [0.5, 0, 0.5],
                    [0, 0.5, 0.5],
                    [0.5, 0, 0],
                    [0, 0.5, 0],
                    [0, 0, 0.5],
                    [0.5, 0.5, 0.5],
                ]
            )
            + 0.08 * (frac - 0.5)
        ]
    )
    z = np.array([11, 17, 17, 11, 17, 11, 11, 17])
    return System(frac @ cell, z, cell=cell, pbc=True)


@pytest.fixture(scope="module")
def model_params():
    model = build(small_config())
    g = make_graph(open_cluster(), R_CUT)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), g)
    return Jitted(model), params


class Jitted:
    """``model`` with one jitted function giving the output and ``∂E/∂positions``.

    ``apply`` reuses it, so each (model, graph shape) compiles once.
    """

    def __init__(self, model):
        self.model = model

        def e_and_grad(params, graph):
            def e(p):
                out = model.apply(params, graph.replace(positions=p))
                return out.energy, out

            (_, out), grad = jax.value_and_grad(e, has_aux=True)(graph.positions)
            return out, grad

        self.energy_and_grad = jax.jit(e_and_grad)

    def apply(self, params, graph):
        return self.energy_and_grad(params, graph)[0]


def rotation(seed: int) -> np.ndarray:
    """A random proper rotation, orthonormal to float64 precision."""
    r = np.asarray(e3nn.rand_matrix(jax.random.PRNGKey(seed), ()), dtype=float)
    u, _, vt = np.linalg.svd(r)
    return u @ vt


def energy_fn(model, params, graph):
    return lambda pos: model.apply(params, graph.replace(positions=pos))


# --------------------------------------------------------------------------------------
def test_config_defaults_and_errors():
    cfg = AllegroConfig(species=(1, 8))
    assert cfg.name == "allegro" and cfg.two_body_hidden == cfg.radial_mlp
    assert AllegroConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="latent_dim"):
        AllegroConfig(latent_dim=0)
    with pytest.raises(ValueError, match="unknown config key"):
        build({"name": "allegro", "species": [1], "bogus": 1})


@pytest.mark.parametrize("parity", [True, False])
def test_tensor_product_equivariant(parity):
    """The unrolled CG product rotates like its output irreps, path by path."""
    l_max = 2
    plan = tp_plan(l_max, parity)
    p = -1 if parity else 1
    irreps_in = e3nn.Irreps.spherical_harmonics(l_max, p=p)
    irreps_out = e3nn.Irreps([(1, (l3, p**l3)) for _, _, l3 in plan.paths])
    rng = np.random.default_rng(0)
    v = jnp.asarray(rng.normal(size=(5, irreps_in.dim, 3)))
    g = jnp.asarray(rng.normal(size=(5, irreps_in.dim, 3)))
    R = rotation(3)
    if parity:
        R = -R  # an improper rotation probes the parities too
    d_in = np.asarray(irreps_in.D_from_matrix(jnp.asarray(R)))
    d_out = np.asarray(irreps_out.D_from_matrix(jnp.asarray(R)))
    out = channelwise_tp(v, g, plan)
    out_rot = channelwise_tp(
        jnp.einsum("ij,ejc->eic", d_in, v), jnp.einsum("ij,ejc->eic", d_in, g), plan
    )
    np.testing.assert_allclose(out_rot, np.einsum("ij,ejc->eic", d_out, out), atol=1e-12)
    # the invariant slots agree with the scalars-only shortcut of the last layer
    slots = [plan.path_slot[k] for k in plan.by_l[0]]
    np.testing.assert_allclose(out[:, slots, :], scalar_tp(v, g, l_max), atol=1e-13)
    # component normalisation: unit-variance inputs keep unit-variance outputs (roughly)
    big = jnp.asarray(rng.normal(size=(4000, irreps_in.dim, 1)))
    big2 = jnp.asarray(rng.normal(size=(4000, irreps_in.dim, 1)))
    assert 0.8 < float(jnp.mean(channelwise_tp(big, big2, plan) ** 2)) < 1.2


def test_locality(model_params):
    """E_i ignores an atom m beyond r_cut of i even when m neighbours i's neighbour."""
    model, params = model_params
    s = open_cluster()
    pos = np.asarray(s.positions)
    d = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
    # an (i, j, m) chain: d(i, j) < r_cut, d(j, m) < r_cut, d(i, m) > r_cut + 0.3
    chain = [
        (i, j, m)
        for i in range(len(pos))
        for j in range(len(pos))
        for m in range(len(pos))
        if 0 < d[i, j] < R_CUT - 0.3 and 0 < d[j, m] < R_CUT - 0.3 and d[i, m] > R_CUT + 0.3
    ]
    assert chain, "test geometry has no second-neighbour chain"
    i, j, m = chain[0]
    g = make_graph(s, R_CUT)
    out0 = model.apply(params, g)
    moved = pos.copy()
    moved[m] += np.array([0.12, -0.08, 0.1])
    s2 = System(moved, np.asarray(s.species))
    out1 = model.apply(params, make_graph(s2, R_CUT))
    e0, e1 = np.asarray(out0.node_energies), np.asarray(out1.node_energies)
    assert abs(e1[i] - e0[i]) <= 1e-12
    assert abs(e1[j] - e0[j]) > 1e-6  # the neighbour of m does see it
    assert abs(e1[m] - e0[m]) > 1e-6
    far = np.linalg.norm(moved - moved[m], axis=-1) > R_CUT
    np.testing.assert_allclose(e1[far & (d[m] > R_CUT)], e0[far & (d[m] > R_CUT)], atol=1e-12)


@pytest.mark.parametrize("periodic", [False, True])
def test_forces_match_finite_differences(model_params, periodic):
    model, params = model_params
    s = crystal() if periodic else open_cluster()
    g = make_graph(s, R_CUT)
    f = energy_fn(model, params, g)
    forces = -np.asarray(model.energy_and_grad(params, g)[1])
    pos = np.asarray(g.positions)
    h = 1e-4
    fd = np.zeros_like(pos)
    for a in range(pos.shape[0]):
        for k in range(3):
            dp = np.zeros_like(pos)
            dp[a, k] = h
            fd[a, k] = -(
                float(f(jnp.asarray(pos + dp)).energy) - float(f(jnp.asarray(pos - dp)).energy)
            ) / (2 * h)
    assert np.abs(forces).max() > 1e-3  # non-trivial
    np.testing.assert_allclose(forces, fd, rtol=0, atol=1e-6 * np.abs(forces).max())


@pytest.mark.parametrize("periodic", [False, True])
def test_e3_and_permutation_invariance(model_params, periodic):
    model, params = model_params
    s = crystal() if periodic else open_cluster()
    ref = model.apply(params, make_graph(s, R_CUT))
    e_ref = float(ref.energy)
    scale = np.abs(np.asarray(ref.node_energies)).max()
    pos, z = np.asarray(s.positions), np.asarray(s.species)
    cell = None if s.cell is None else np.asarray(s.cell)
    R = rotation(7)
    t = np.array([1.3, -2.1, 0.7])
    perm = np.random.default_rng(5).permutation(len(z))
    variants = {
        "rotation": (pos @ R.T + t, z, None if cell is None else cell @ R.T, None),
        "reflection": (-pos, z, None if cell is None else -cell, None),
        "permutation": (pos[perm], z[perm], cell, perm),
    }
    for name, (p2, z2, c2, pm) in variants.items():
        s2 = System(p2, z2, cell=c2, pbc=periodic)
        out = model.apply(params, make_graph(s2, R_CUT))
        assert abs(float(out.energy) - e_ref) <= 1e-9 * abs(e_ref), name
        ne = np.asarray(ref.node_energies)
        np.testing.assert_allclose(
            out.node_energies, ne if pm is None else ne[pm], rtol=0, atol=1e-9 * scale, err_msg=name
        )


def test_reflection_breaks_so3_only_model():
    """Sanity check that the reflection test above can fail: SO(3) features are chiral."""
    model = Jitted(build(small_config(parity=False, l_max=1)))  # l_max=1 compiles faster
    s = open_cluster()
    g = make_graph(s, R_CUT)
    params = jax.jit(model.model.init)(jax.random.PRNGKey(1), g)
    e = float(model.apply(params, g).energy)
    e_ref = float(
        model.apply(
            params, make_graph(System(-np.asarray(s.positions), np.asarray(s.species)), R_CUT)
        ).energy
    )
    assert abs(e - e_ref) > 1e-8 * abs(e)


@pytest.mark.parametrize("periodic", [False, True])
def test_padding_invariance(model_params, periodic):
    model, params = model_params
    s = crystal() if periodic else open_cluster()
    g = make_graph(s, R_CUT)
    gp = make_graph(s, R_CUT, pad_atoms=3, pad_edges=17)
    n = g.n_nodes

    out, grad = model.energy_and_grad(params, g)
    out_p, gradp = model.energy_and_grad(params, gp)
    e, ep = out.energy, out_p.energy
    assert abs(float(ep) - float(e)) <= 1e-12 * abs(float(e))
    np.testing.assert_allclose(gradp[:n], grad, atol=1e-12)
    assert np.all(np.asarray(gradp[n:]) == 0.0)
    assert np.all(np.asarray(out_p.node_energies[n:]) == 0.0)
    assert np.all(np.isfinite(np.asarray(gradp)))


def test_float32_close_to_float64():
    s = crystal()
    g = make_graph(s, R_CUT)
    m64 = Jitted(build(small_config(l_max=1)))
    m32 = Jitted(build(small_config(l_max=1, dtype="float32")))
    params = jax.jit(m64.model.init)(jax.random.PRNGKey(0), g)
    p32 = jax.tree.map(lambda a: a.astype(jnp.float32), params)
    e64 = float(m64.apply(params, g).energy)
    out32 = m32.apply(p32, g)
    assert out32.energy.dtype == jnp.float32
    assert abs(float(out32.energy) - e64) <= 1e-4 * max(abs(e64), 1.0)
