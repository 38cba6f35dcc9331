"""Spatial subdomains: a brick of owned atoms and the ghost atoms of its halo.

A spatial domain decomposition gives each device a brick of *owned* atoms plus *ghost*
copies of every atom within the halo width outside it (DESIGN.md, "Distribution"): the
owned atoms' energies and forces must come out exactly as in the whole system. The width
is the model's receptive field (:attr:`celli_scale.models.ModelConfig.receptive_field`:
``r_cut`` for a strictly local model, Allegro and the local trunk of CELLI;
``n_layers × r_cut`` for message passing, NequIP and MACE), plus a skin for thermal
motion. What a device then computes:

* strictly local (edge-centred) models: only edges centred on owned atoms, so ghosts add
  atoms but no edge work;
* message passing with L layers: edges centred on every atom within
  ``receptive_field − r_cut = (L − 1) × r_cut`` (+ skin) of the brick, whose intermediate
  features the owned atoms' last layer reads.

This module builds such a subdomain from a periodic NaCl bulk (the halo-cost benchmark
``bench/bench_halo.py`` times it against the bulk) and evaluates the owned energy through
the package's one derivative path (:func:`celli_scale.potential.energy_and_derivatives`
with ``owned=``). It is the start of the domain decomposition; the halo exchange
(``ppermute``) comes with it. Lengths in Å, energies eV, forces eV/Å.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from celli_scale.datasets.synthetic import nacl_grid
from celli_scale.models import ModelConfig, make_config
from celli_scale.potential import energy_and_derivatives
from celli_scale.system import System

#: Extra width for atoms that move between rebuilds (Å), as in a neighbour-list skin.
SKIN = 0.5


def halo_width(config: dict[str, Any] | ModelConfig, skin: float = SKIN) -> float:
    """Halo width (Å) a device needs for ``config``'s model: its receptive field + ``skin``."""
    return make_config(config).receptive_field + float(skin)


def centre_reach(config: dict[str, Any] | ModelConfig) -> float:
    """How far outside the brick (Å, without skin) edge centres are still needed:
    ``receptive_field − r_cut`` (0 for strictly local models)."""
    cfg = make_config(config)
    return cfg.receptive_field - cfg.r_cut


@dataclass
class Subdomain:
    """A brick of ``m³`` owned NaCl sites and its ghosts, cut from a periodic bulk.

    Attributes:
      system: open :class:`celli_scale.System` of owned + ghost atoms (owned first).
      owned: ``(n,)`` bool, True for owned atoms.
      bulk: the periodic bulk (``M³`` sites) it was cut from.
      bulk_index: ``(n,)`` index of each atom's original in ``bulk``.
      lo, hi: the brick's corners (Å); ghosts lie within ``halo`` of it.
      halo: halo width used (Å, skin included).
    """

    system: System
    owned: np.ndarray
    bulk: System
    bulk_index: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    halo: float

    @property
    def n_owned(self) -> int:
        return int(self.owned.sum())

    @property
    def n_ghost(self) -> int:
        return int((~self.owned).sum())


def cut_subdomain(
    m: int, halo: float, spacing: float = 2.2, rattle: float = 0.0, seed: int = 0
) -> Subdomain:
    """Owned sites ``[0, m)³`` of a periodic NaCl grid and every periodic image within
    ``halo`` Å of the brick ``[-a/2, (m - 1/2)·a)³`` (``a`` = spacing) as ghosts.

    The bulk is made large enough (``M ≥ m + 2·ceil(halo/a) + 1`` sites per axis) that no
    atom appears twice.
    """
    a = float(spacing)
    big = m + 2 * math.ceil(halo / a) + 1
    bulk = nacl_grid(big, a, rattle, seed)
    pos = np.asarray(bulk.positions)
    idx = np.stack(np.meshgrid(*[np.arange(big)] * 3, indexing="ij"), -1).reshape(-1, 3)
    owned_bulk = np.all(idx < m, axis=1)
    lo = np.full(3, -0.5 * a)
    hi = lo + m * a
    side = big * a
    shifts = np.stack(np.meshgrid(*[np.arange(-1, 2)] * 3, indexing="ij"), -1).reshape(-1, 3)
    ghost_pos, ghost_src = [], []
    for s in shifts:
        p = pos + s * side
        inside = np.all((p >= lo - halo) & (p < hi + halo), axis=1)
        if not s.any():
            inside &= ~owned_bulk
        ghost_pos.append(p[inside])
        ghost_src.append(np.nonzero(inside)[0])
    own = np.nonzero(owned_bulk)[0]
    src = np.concatenate([own, *ghost_src])
    allpos = np.concatenate([pos[own], *ghost_pos])
    system = System(allpos, np.asarray(bulk.species)[src], validate=False)
    owned = np.zeros(len(src), dtype=bool)
    owned[: len(own)] = True
    return Subdomain(system, owned, bulk, src, lo, hi, float(halo))


def keep_centres(sub: Subdomain, reach: float) -> np.ndarray:
    """``(n,)`` bool: atoms whose edges the device must compute (within ``reach`` Å of
    the brick; owned atoms always)."""
    p = np.asarray(sub.system.positions)
    inside = np.all((p >= sub.lo - reach) & (p < sub.hi + reach), axis=1)
    return inside | sub.owned


def prune_edges(graph: Any, centres: np.ndarray) -> Any:
    """``graph`` with only the edges centred on ``centres`` (compacted, exact capacity)."""
    snd = np.asarray(graph.senders)
    keep = np.asarray(graph.edge_mask) & centres[snd]
    sel = np.nonzero(keep)[0]
    return graph.replace(
        senders=jnp.asarray(snd[sel]),
        receivers=jnp.asarray(np.asarray(graph.receivers)[sel]),
        shifts=jnp.asarray(np.asarray(graph.shifts)[sel]),
        edge_mask=jnp.ones(sel.size, dtype=bool),
    )


def owned_energy_forces(model: Any):
    """``fn(params, graph, owned) -> (E_owned, forces)``, jitted: the owned atoms' energy
    (eV, the sum of their local atomic energies) and its negative gradient on every atom
    (eV/Å; ghost entries are the contributions a decomposition sends back to the ghosts'
    owners), by :func:`celli_scale.potential.energy_and_derivatives` with ``owned=``."""

    def fn(params, graph, owned):
        energy, forces, _, _ = energy_and_derivatives(model, params, graph, owned=owned)
        return energy, forces

    return jax.jit(fn)


def device_graph(pot: Any, m: int, *, rattle: float = 0.0, seed: int = 0, skin: float = SKIN):
    """``(subdomain, graph, owned)`` of the brick of ``m³`` sites a device of a
    decomposition would evaluate for ``pot``'s model: halo = receptive field + ``skin``,
    edges pruned to the centres the owned atoms' energies read."""
    sub = cut_subdomain(m, halo_width(pot.config, skin), rattle=rattle, seed=seed)
    graph = pot.graph(sub.system)
    graph = prune_edges(graph, keep_centres(sub, centre_reach(pot.config) + skin))
    return sub, graph, jnp.asarray(sub.owned)


__all__ = [
    "SKIN",
    "Subdomain",
    "centre_reach",
    "cut_subdomain",
    "device_graph",
    "halo_width",
    "keep_centres",
    "owned_energy_forces",
    "prune_edges",
]
