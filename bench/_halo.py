"""Geometry of one subdomain and its halo, for the halo-cost benchmark.

A spatial domain decomposition gives each device a brick of *owned* atoms plus *ghost*
copies of every atom within the halo width outside it (DESIGN.md, "Distribution"): the
owned atoms' energies and forces must come out exactly as in the whole system. The width
is the model's receptive field, ``r_cut`` for a strictly local model (Allegro, and the
local trunk of CELLI) and ``n_layers × r_cut`` for message passing (NequIP, MACE), plus a
skin for thermal motion. What a device then computes:

* Allegro: only edges centred on owned atoms (its energy is a sum over edges of the
  centre's environment), so ghosts add atoms but no edge work.
* Message passing with L layers: edges centred on every atom within ``(L - 1) × r_cut``
  (+ skin) of the brick, whose intermediate features the owned atoms' last layer reads.

This module builds that subdomain from a periodic NaCl bulk so the benchmark can time the
device's work against the bulk's own cost. It is geometry for measurement, not the
decomposition itself (which will exchange the halo with ``ppermute``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Models whose receptive field is one cut-off (edge-centred, strictly local).
STRICTLY_LOCAL = ("allegro", "celli")
#: Extra width for atoms that move between rebuilds (Å), as in a neighbour-list skin.
SKIN = 0.5


def receptive_field(config: dict[str, Any]) -> float:
    """Halo width (Å, without skin) the model needs: r_cut or n_layers × r_cut."""
    r = float(config["r_cut"])
    return r if config["name"] in STRICTLY_LOCAL else config["n_layers"] * r


def centre_reach(config: dict[str, Any]) -> float:
    """How far outside the brick (Å, without skin) edge centres are still needed."""
    r = float(config["r_cut"])
    return 0.0 if config["name"] in STRICTLY_LOCAL else (config["n_layers"] - 1) * r


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

    system: Any
    owned: np.ndarray
    bulk: Any
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
    from celli_scale.scaling import nacl_system

    a = float(spacing)
    big = m + 2 * math.ceil(halo / a) + 1
    bulk = nacl_system(big, a, rattle, seed)
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
    import celli_scale as cs

    system = cs.System(allpos, np.asarray(bulk.species)[src], validate=False)
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
    import jax.numpy as jnp

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
    """``fn(params, graph, owned) -> (E_owned, forces)``: the owned atoms' energy and its
    negative gradient on every atom (ghost entries are the contributions a decomposition
    sends back to the ghosts' owners)."""
    import jax
    import jax.numpy as jnp

    def fn(params, graph, owned):
        def energy(pos):
            out = model.apply(params, graph.replace(positions=pos))
            return jnp.sum(jnp.where(owned, out.node_energies, 0.0))

        e, g = jax.value_and_grad(energy)(graph.positions)
        return e, -g

    return jax.jit(fn)


def device_graph(pot: Any, config: dict[str, Any], m: int, *, rattle: float = 0.0, seed=0):
    """``(subdomain, graph, owned)`` of the brick a device of a decomposition would
    evaluate for ``config``'s model (halo = receptive field + skin; edges pruned)."""
    import jax.numpy as jnp

    sub = cut_subdomain(m, receptive_field(config) + SKIN, rattle=rattle, seed=seed)
    graph = pot.graph(sub.system)
    graph = prune_edges(graph, keep_centres(sub, centre_reach(config) + SKIN))
    return sub, graph, jnp.asarray(sub.owned)
