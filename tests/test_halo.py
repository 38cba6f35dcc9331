"""Subdomain geometry (celli_scale.distributed.domains): a brick plus its ghosts
reproduces the bulk's atomic energies exactly when the halo is the model's receptive field,
and not when it is thinner; ghost and edge counts match the grid's arithmetic."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from celli_scale.distributed import domains
from celli_scale.models import make_config
from celli_scale.study.presets import (
    QUICK_HYPERPARAMS,
    QUICK_MODEL_EXTRAS,
    build_potential,
    model_config,
)

A = 2.2  # NaCl grid spacing (Å)


def _config(model: str, r_cut: float = 3.2) -> dict:
    return model_config(model, "float64", dict(QUICK_HYPERPARAMS, r_cut=r_cut), QUICK_MODEL_EXTRAS)


def _sites_per_axis(m: int, halo: float) -> int:
    """Grid indices i with -a/2 - halo <= i a < (m - 1/2) a + halo."""
    lo = math.ceil(-0.5 - halo / A)
    hi = math.ceil(m - 0.5 + halo / A) - 1
    return hi - lo + 1


@pytest.mark.parametrize(("m", "halo"), [(2, 3.7), (3, 5.5), (2, 10.5)])
def test_ghost_count_matches_grid_arithmetic(m, halo):
    sub = domains.cut_subdomain(m, halo)
    assert sub.n_owned == m**3
    assert sub.n_ghost == _sites_per_axis(m, halo) ** 3 - m**3
    pos = np.asarray(sub.system.positions)
    assert np.all(pos >= sub.lo - halo) and np.all(pos < sub.hi + halo)
    # no atom twice (the bulk is large enough that images do not overlap)
    assert len({tuple(np.round(p, 6)) for p in pos}) == len(pos)
    # species follow the bulk's: Na where i + j + k is even
    z_bulk = np.asarray(sub.bulk.species)[sub.bulk_index]
    np.testing.assert_array_equal(np.asarray(sub.system.species), z_bulk)


@pytest.mark.parametrize("model", ["allegro", "nequip", "mace"])
def test_receptive_field_halo_reproduces_bulk_energies(model):
    cfg = _config(model)
    pot = build_potential(cfg)
    sub, graph, owned = domains.device_graph(pot, 2, rattle=0.05, seed=1)
    e_owned, forces = domains.owned_energy_forces(pot.model)(pot.params, graph, owned)
    bulk = pot.model.apply(pot.params, pot.graph(sub.bulk)).node_energies
    ref = np.asarray(bulk)[sub.bulk_index[sub.owned]]
    assert float(e_owned) == pytest.approx(float(ref.sum()), rel=1e-10, abs=1e-12)
    assert np.all(np.isfinite(np.asarray(forces)))
    # each owned atom's energy, not only the sum
    node = pot.model.apply(pot.params, graph).node_energies
    np.testing.assert_allclose(np.asarray(node)[sub.owned], ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("model", ["nequip", "mace"])
def test_one_cutoff_halo_is_too_thin_for_message_passing(model):
    cfg = _config(model)
    pot = build_potential(cfg)
    sub = domains.cut_subdomain(2, cfg["r_cut"] + domains.SKIN, rattle=0.05, seed=1)
    graph = domains.prune_edges(pot.graph(sub.system), domains.keep_centres(sub, domains.SKIN))
    e_thin, _ = domains.owned_energy_forces(pot.model)(pot.params, graph, jnp.asarray(sub.owned))
    bulk = pot.model.apply(pot.params, pot.graph(sub.bulk)).node_energies
    ref = float(np.asarray(bulk)[sub.bulk_index[sub.owned]].sum())
    # the right halo agrees to ~1e-17 eV (above); a thin one misses the second shell
    assert abs(float(e_thin) - ref) > 1e-9


def test_receptive_fields_and_allegro_edge_count():
    assert make_config(_config("allegro", 5.0)).receptive_field == 5.0
    assert make_config(_config("celli", 5.0)).receptive_field == 5.0
    assert make_config(_config("nequip", 5.0)).receptive_field == 10.0  # 2 layers
    assert domains.halo_width(_config("nequip", 5.0)) == 10.0 + domains.SKIN
    assert domains.centre_reach(_config("allegro", 5.0)) == 0.0
    assert domains.centre_reach(_config("mace", 5.0)) == 5.0
    cfg = _config("allegro", 5.0)
    pot = build_potential(cfg)
    sub, graph, _ = domains.device_graph(pot, 3)
    # Allegro evaluates only edges centred on owned atoms: 56 per atom within 5 Å
    assert int(graph.senders.shape[0]) == 56 * 27
    assert np.all(np.asarray(sub.owned)[np.asarray(graph.senders)])
