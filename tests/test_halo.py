"""Halo geometry of the domain decomposition (celli_scale.distributed.domains.decompose and
ShardedPotential): ghost counts match the NaCl grid's arithmetic, Allegro lists only edges
centred on owned atoms, and a halo of one cut-off is too thin for message passing while
the receptive field is exact."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest

from celli_scale import models
from celli_scale.datasets import nacl_grid
from celli_scale.distributed import domains
from celli_scale.distributed.sharded import ShardedPotential
from celli_scale.models import make_config
from celli_scale.potential import Potential
from celli_scale.study.presets import (
    QUICK_HYPERPARAMS,
    QUICK_MODEL_EXTRAS,
    build_potential,
    model_config,
)

A = 2.2  # NaCl grid spacing (Å)
SHIFT = 0.3  # Å: keeps every site off the brick faces


def _config(model: str, r_cut: float = 3.2) -> dict:
    return model_config(model, "float64", dict(QUICK_HYPERPARAMS, r_cut=r_cut), QUICK_MODEL_EXTRAS)


def _shifted_grid(n: int):
    s = nacl_grid(n, A)
    return s.replace(positions=np.asarray(s.positions) + SHIFT)


def _sites(n: int, bricks: int, k: int, halo: float) -> tuple[int, int]:
    """(owned, owned + ghost) sites along one axis for brick ``k`` of ``bricks``: unwrapped
    indices j with k/M − h ≤ (j + δ)/n < (k+1)/M + h, h = halo / (n a), δ = SHIFT / a."""
    d, h = SHIFT / A, halo / (n * A)
    count = lambda lo, hi: math.ceil(hi * n - d) - math.ceil(lo * n - d)  # noqa: E731
    return count(k / bricks, (k + 1) / bricks), count(k / bricks - h, (k + 1) / bricks + h)


@pytest.mark.parametrize(
    ("n", "mesh", "halo"),
    [(6, (2, 1, 1), 3.7), (6, (2, 3, 1), 5.5), (8, (4, 1, 2), 10.5)],  # 1, 2 and 3 hops
)
def test_ghost_count_matches_grid_arithmetic(n, mesh, halo):
    dec = domains.decompose(_shifted_grid(n), mesh, halo=halo, reach=0.0, r_cut=3.2)
    for s in range(dec.n_shards):
        k = np.unravel_index(s, mesh)
        per_axis = [_sites(n, mesh[a], int(k[a]), halo) for a in range(3)]
        owned = math.prod(o for o, _ in per_axis)
        assert dec.n_owned()[s] == owned
        assert dec.n_ghost()[s] == math.prod(t for _, t in per_axis) - owned
        # no image twice
        assert len(dec.ghost_images(s)) == dec.n_ghost()[s]
    assert dec.n_owned().sum() == n**3


def test_allegro_lists_only_edges_centred_on_owned_atoms():
    # pairs within r_cut + skin = 5.5 Å on the 2.2 Å grid: |v|² ≤ 6.25 a², 80 neighbours
    dec = domains.decompose(nacl_grid(6, A), (2, 1, 1), halo=5.5, reach=0.0, r_cut=5.0)
    for s in range(dec.n_shards):
        em = dec.edge_mask[s, 0]
        snd = dec.senders[s, 0][em]
        assert em.sum() == 80 * dec.n_owned()[s]
        assert np.all(dec.sub_owned[s, 0][snd])
    # message passing (reach = r_cut) also lists edges centred on ghosts
    mp = domains.decompose(nacl_grid(6, A), (2, 1, 1), halo=10.5, reach=5.0, r_cut=5.0)
    assert mp.edge_mask.sum() > dec.edge_mask.sum()


def test_receptive_fields_and_halo_widths():
    assert make_config(_config("allegro", 5.0)).receptive_field == 5.0
    assert make_config(_config("celli", 5.0)).receptive_field == 5.0
    assert make_config(_config("nequip", 5.0)).receptive_field == 10.0  # 2 layers
    assert make_config(_config("mace", 5.0)).receptive_field == 10.0
    allegro = ShardedPotential(Potential(models.build(_config("allegro", 5.0)), None))
    mace = ShardedPotential(Potential(models.build(_config("mace", 5.0)), None))
    assert allegro.halo == 5.0 + domains.SKIN and allegro.reach == 0.0
    assert mace.halo == 10.0 + domains.SKIN and mace.reach == 5.0


@functools.cache
def _reference(model: str):
    pot = build_potential(_config(model))
    system = nacl_grid(6, A, rattle=0.05, seed=1)
    return pot, system, np.asarray(pot(system).forces)


def _forces_error(model: str, thin: bool) -> float:
    pot, system, ref = _reference(model)
    sp = ShardedPotential(pot, mesh_shape=(2, 1, 1))
    if thin:  # one cut-off: the owned atoms' last layer misses the second shell
        sp.halo, sp.reach = pot.config.r_cut + sp.skin, 0.0
    return float(np.abs(np.asarray(sp(system).forces) - ref).max())


@pytest.mark.parametrize("model", ["nequip", "mace"])
def test_one_cutoff_halo_is_too_thin_for_message_passing(model):
    assert _forces_error(model, thin=False) < 1e-10  # the receptive field: exact
    assert _forces_error(model, thin=True) > 1e-9  # 6 orders above the exact one


def test_one_cutoff_halo_is_enough_for_allegro():
    assert _forces_error("allegro", thin=False) < 1e-10
