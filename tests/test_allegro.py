"""Allegro's own checks: configuration, the unrolled channel-wise tensor product, and
that the shared reflection check can fail (an SO(3)-only model is chiral).

The physics every model shares (symmetry, forces, stress, padding, strict locality up to
``config.receptive_field``, float32) is checked in test_models.py.
"""

from __future__ import annotations

import e3nn_jax as e3nn
import jax.numpy as jnp
import numpy as np
import pytest

import celli_scale as cs
from celli_scale.datasets import random_cluster
from celli_scale.models.allegro import (
    AllegroConfig,
    channelwise_tp,
    scalar_tp,
    tp_plan,
)
from celli_scale.testing import assert_equivariant, orthogonal_matrix, small_allegro_config

SPECIES = (11, 17)
R_CUT = 3.5


def small_config(**kw) -> dict:
    return small_allegro_config(r_cut=R_CUT, species=SPECIES, **kw)


# --------------------------------------------------------------------------------------
def test_config_defaults_and_errors():
    cfg = AllegroConfig(species=(1, 8))
    assert cfg.name == "allegro" and cfg.two_body_hidden == cfg.radial_mlp
    assert AllegroConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="latent_dim"):
        AllegroConfig(latent_dim=0)


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
    R = orthogonal_matrix(3, reflect=parity)  # improper: probes the parities too
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


def test_reflection_breaks_so3_only_model():
    """The reflection checks of test_models.py can fail: SO(3) features are chiral."""
    s = random_cluster(8, seed=3, species=SPECIES, box=5.0)
    pot = cs.Potential.from_config(small_config(parity=False, l_max=1), example=s)
    assert_equivariant(pot, s, seed=1, reflect=False)
    with pytest.raises(AssertionError, match="energy not equivariant"):
        assert_equivariant(pot, s, seed=1, reflect=True, rtol=1e-8)


@pytest.mark.parametrize("mixing", ["path_channel", "path"])
def test_per_channel_tensor_product_option(mixing):
    """``tp_mixing="path_channel"`` is the ``"channels"`` mixing restricted to diagonal
    matrices: with ``linear_l = diag(w_p)·sqrt(C)`` both give the same energy and forces.
    Both per-channel options are E(3)-equivariant."""
    import jax
    from flax.traverse_util import flatten_dict, unflatten_dict

    s = random_cluster(8, seed=3, species=SPECIES, box=5.0)
    pot = cs.Potential.from_config(small_config(tp_mixing=mixing), example=s)
    assert_equivariant(pot, s, seed=2, reflect=True)
    assert any("path_weights_l1" in "/".join(k) for k in flatten_dict(pot.params))
    if mixing == "path":
        return
    c = pot.config.channels
    ref = cs.Potential.from_config(small_config(), example=s)
    flat = flatten_dict(jax.tree_util.tree_map(np.asarray, pot.params))
    mapped = {}
    for key, w in flat.items():
        if key[-1].startswith("path_weights_l"):
            l = key[-1][len("path_weights_l") :]
            w = w * np.sqrt(c)  # "channels" divides by sqrt(paths·C), this by sqrt(paths)
            mapped[(*key[:-1], f"linear_l{l}")] = np.stack([np.diag(row) for row in w])
        else:
            mapped[key] = w
    assert set(mapped) == set(flatten_dict(ref.params))
    ref.params = unflatten_dict(mapped)
    a, b = pot(s), ref(s)
    np.testing.assert_allclose(a.energy, b.energy, rtol=1e-12)
    np.testing.assert_allclose(a.forces, b.forces, atol=1e-12)
    # and the option changes the model: random per-path weights differ from the default
    default = cs.Potential.from_config(small_config(), example=s)(s)
    assert abs(float(default.energy) - float(a.energy)) > 1e-6
