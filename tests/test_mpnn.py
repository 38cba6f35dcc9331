"""Message-passing baselines' own checks (NequIP, MACE): the body order of MACE, config
validation, and the fast kernels against direct e3nn references. float64 throughout.

The physics every model shares (receptive field ``n_layers · r_cut``, symmetry, forces,
padding, float32) is checked in test_models.py. Parameters are redrawn O(1) at random
(``celli_scale.testing.random_params``), so every path carries signal and a dropped term
shows up.
"""

from __future__ import annotations

import e3nn_jax as e3nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import celli_scale as cs
from celli_scale.datasets import random_cluster
from celli_scale.models import build
from celli_scale.models.layers import channelwise_conv, conv_paths, edge_matmul
from celli_scale.models.mace import MACEConfig, SymmetricContraction
from celli_scale.models.nequip import NequIPConfig
from celli_scale.testing import random_params

SMALL = dict(
    r_cut=3.0,
    l_max=2,
    channels=4,
    n_layers=2,
    n_radial=4,
    radial_mlp=(8,),
    dtype="float64",
    avg_num_neighbors=4.0,
    species=(1, 8),
)


# -- MACE body order ---------------------------------------------------------------------


def test_mace_correlation_order_is_used():
    s = random_cluster(7, seed=0, species=(1, 8), box=3.2)
    pot3 = cs.Potential.from_config({**SMALL, "name": "mace", "correlation": 3}, example=s)
    pot2 = cs.Potential.from_config({**SMALL, "name": "mace", "correlation": 2}, example=s)
    p3 = random_params(pot3.params, 1)
    g = pot3.graph(s)

    def energy(pot, params):
        return float(pot.evaluate(params, g)[0])

    # the correlation-2 model is the correlation-3 model with the ν = 3 weights removed
    flat = {jax.tree_util.keystr(k): x for k, x in jax.tree_util.tree_flatten_with_path(p3)[0]}
    assert any("w3_" in k for k in flat)
    zeroed = jax.tree_util.tree_map_with_path(
        lambda k, x: jnp.zeros_like(x) if "w3_" in jax.tree_util.keystr(k) else x, p3
    )
    p2 = jax.tree_util.tree_map_with_path(lambda k, x: flat[jax.tree_util.keystr(k)], pot2.params)
    e3, e3_without_nu3, e2 = energy(pot3, p3), energy(pot3, zeroed), energy(pot2, p2)
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


@pytest.mark.parametrize("d, k", [(9, 3), (4, 21)])  # both backward forms (k ≤ 2d, k > 2d)
def test_edge_matmul_first_and_second_derivatives_equal_einsum(d, k):
    """The hand-written VJP of the per-edge product against autodiff of the plain einsum:
    values, gradients, and the gradient of a gradient (what force matching differentiates)."""
    rng = np.random.default_rng(2)
    xe = jnp.asarray(rng.normal(size=(7, 3, d)))
    m = jnp.asarray(rng.normal(size=(7, d, k)))
    ct = jnp.asarray(rng.normal(size=(7, 3, k)))
    ref_f = lambda a, b: jnp.einsum("eci,eik->eck", a, b)  # noqa: E731

    def loss(f, a, b):  # a scalar whose gradient is itself differentiated below
        g_a, g_b = jax.grad(lambda a, b: jnp.sum(jnp.sin(f(a, b)) * ct), argnums=(0, 1))(a, b)
        return jnp.sum(g_a**2) + jnp.sum(jnp.cos(g_b))

    np.testing.assert_allclose(edge_matmul(xe, m), ref_f(xe, m), rtol=1e-13, atol=1e-13)
    for argnums in (0, 1):
        got = jax.grad(lambda a, b: loss(edge_matmul, a, b), argnums=argnums)(xe, m)
        ref = jax.grad(lambda a, b: loss(ref_f, a, b), argnums=argnums)(xe, m)
        np.testing.assert_allclose(got, ref, rtol=1e-11, atol=1e-11)


def test_symmetric_contraction_matches_u_tensor_einsum():
    rng = np.random.default_rng(1)
    n, c, corr = 6, 3, 3
    irreps_a = e3nn.Irreps("0e + 1o + 2e")
    irreps_out = e3nn.Irreps("0e + 1o")
    a = e3nn.IrrepsArray(irreps_a, jnp.asarray(rng.normal(size=(n, c, irreps_a.dim))))
    species = jnp.asarray(rng.integers(0, 2, n))
    mod = SymmetricContraction(corr, irreps_out, 2)
    params = random_params(mod.init(jax.random.PRNGKey(0), a, species), 3)
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
