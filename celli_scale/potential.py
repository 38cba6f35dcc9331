"""Energy, forces, stress and charges from any model.

:class:`Potential` binds a model (a flax module, pure function of ``(params, graph)``)
to its parameters. It builds the graph on the host (neighbor lists, electrostatics
parameters), then evaluates one jitted function that returns the energy and its
derivatives: forces ``-∂E/∂r`` (through the charge equilibration for CELLI, by implicit
differentiation) and stress ``(1/V) ∂E/∂ε`` by the strain derivative.

Units: energy eV, forces eV/Å, stress eV/Å³ (ASE's sign convention), charges e.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import warnings
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from celli_scale import models as models_mod
from celli_scale.models import Graph, ModelConfig, ModelOutput
from celli_scale.neighbors import NeighborList, compact, neighbor_list, with_row_capacity
from celli_scale.strain import energy_forces_stress
from celli_scale.system import Batch, System

#: File in a saved potential's directory holding the model config.
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
#: File listing the sha256 of ``config.json`` and of every file under ``params/``.
MANIFEST_FILE = "manifest.json"
#: Default Verlet skin (Å) of ``pot(system)``'s neighbor lists: lists are rebuilt on the host
#: only once an atom has moved half of it (about 50 MD steps of 0.01 Å).
DEFAULT_SKIN = 1.0
#: Head-room of the packed model-edge capacity of ``pot(system)`` over the pairs within
#: the cut-off when the lists are built (at most ``capacity_growth``): every padded slot
#: costs as much as a real edge (10 % head-room made the N = 1000 call ~12 % slower than
#: the exact kernel, bench/RESULTS.md), while the count moves by well under 1 % between
#: rebuilds in MD. An overflow redoes the call with PACK_GROWTH times the pairs found (and
#: compiles once more); the rows of the electrostatics lists grow by the same factor.
PACK_HEADROOM = 1.03
PACK_GROWTH = 1.05
#: Version tag of the saved-potential layout, stored in the manifest.
SAVE_FORMAT = "celli_scale.potential/1"


class SavedModelError(ValueError):
    """A saved potential cannot be loaded: missing, altered, malformed or unreadable files.
    The message names the directory or file and the problem."""


@struct.dataclass
class PotentialOutput:
    """Result for one structure (or stacked over a batch's leading axis).

    energy (eV), forces (N, 3) eV/Å, stress (3, 3) eV/Å³ or None for open systems,
    charges (N,) e or None, node_energies (N,) eV (local part), elec_energy (eV) or None,
    dipole (3,) e·Å ``Σ q_i R_i`` for an open system with charges (CELLI), else None,
    qeq_iterations: CG iterations of CELLI's Qeq solve (0: dense solver), else None.
    """

    energy: jax.Array
    forces: jax.Array
    stress: jax.Array | None = None
    charges: jax.Array | None = None
    node_energies: jax.Array | None = None
    elec_energy: jax.Array | None = None
    dipole: jax.Array | None = None
    qeq_iterations: jax.Array | None = None


def energy_and_derivatives(
    model: Any,
    params: Any,
    graph: Graph,
    *,
    stress: bool = False,
    owned: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array | None, ModelOutput]:
    """Energy and its derivatives for one graph: the one derivative path of the package.

    Every caller (``Potential``, the data-parallel and sharded paths, the training step,
    the halo code, the benchmarks) evaluates a model through this function, so a fix or
    an optimisation here reaches them all. Pure and jit-able (``stress`` is static);
    differentiable again w.r.t. ``params`` (training) and positions.

    Args:
      model: a flax model (``model.apply(params, graph) -> ModelOutput``).
      params: its parameters.
      graph: one padded graph (:meth:`Potential.graph`).
      stress: also return the strain derivative (periodic graphs only).
      owned: optional ``(N,)`` bool. When given, the energy differentiated is the sum of
        the *local* atomic energies of the owned atoms (``ModelOutput.node_energies``),
        as one device of a spatial domain decomposition computes it; forces then include
        the contributions on ghost atoms that the decomposition sends back.

    Returns:
      ``(energy, forces, stress, out)``: energy ``()`` eV, forces ``(N, 3)`` eV/Å
      (``-∂E/∂r``, through the Qeq solve for CELLI by implicit differentiation), stress
      ``(3, 3)`` eV/Å³ ``(1/V) ∂E/∂ε`` or None, and the model's :class:`ModelOutput`.
    """

    def energy_fn(positions, cell):
        out: ModelOutput = model.apply(params, graph.replace(positions=positions, cell=cell))
        if owned is None:
            return out.energy, out
        return jnp.sum(jnp.where(owned, out.node_energies, 0.0)), out

    (energy, out), forces, virial = energy_forces_stress(
        energy_fn, graph.positions, graph.cell, stress=stress, has_aux=True
    )
    return energy, forces, virial, out


def compact_graph(graph: Graph, r_cut: float, caps: tuple) -> tuple[Graph, jax.Array]:
    """``graph`` with its Verlet list of model edges packed to the pairs within ``r_cut``
    in ``caps[0]`` slots (:func:`celli_scale.neighbors.compact`); and the pair count,
    which the caller compares with ``caps`` (overflow: redo with more). Jit-able.

    The electrostatics list of a charge model stays as built (to its cut-off plus the
    skin): its real-space sum masks the pairs beyond the cut-off, and packing it cost
    more than the masked pairs (measured, bench/RESULTS.md)."""
    cell = graph.cell
    edges = NeighborList(
        senders=graph.senders,
        receivers=graph.receivers,
        shifts=graph.shifts,
        mask=graph.edge_mask,
        n_pairs=jnp.zeros((), jnp.int32),
        r_cut=float(r_cut),
    )
    c = compact(edges, graph.positions, cell, r_cut, caps[0])
    graph = graph.replace(
        senders=c.senders, receivers=c.receivers, shifts=c.shifts, edge_mask=c.mask
    )
    return graph, jnp.stack([c.n_pairs])


class Potential:
    """A model plus its parameters: ``pot(system) -> PotentialOutput``.

    Args:
      model: a model built by :func:`celli_scale.models.build` (has a ``config``).
      params: its flax parameters.
      capacity_growth: head-room factor for edge capacities, so that MD steps reuse one
        compiled function (padding never changes a result).
      skin: Verlet skin (Å) of the lists ``pot(system)`` and ``pot(Batch)`` keep between
        calls (0: build exact lists on every call).
      warm_start: CELLI: start ``pot(system)``'s CG Qeq solve from the charges of the
        previous call on the same structure (changes results only within the solver
        tolerance ``qeq_tol``; False makes every call independent of the previous ones).

    Example:
      >>> pot = Potential.from_config({"name": "allegro"}, example=system)  # doctest: +SKIP
      >>> out = pot(system); out.energy, out.forces
    """

    def __init__(
        self,
        model,
        params,
        *,
        capacity_growth: float = 1.2,
        skin: float = DEFAULT_SKIN,
        warm_start: bool = True,
    ) -> None:
        self.model = model
        self.config: ModelConfig = model.config
        self.params = params
        self.capacity_growth = float(capacity_growth)
        skin = float(skin)
        if not (np.isfinite(skin) and skin >= 0):
            raise ValueError(f"skin must be a finite number of Å >= 0, got {skin!r}")
        self.skin = skin
        self.warm_start = bool(warm_start)
        self._verlet: _VerletState | None = None
        self._verlet_batch: _VerletState | None = None  # pot(Batch)'s, kept apart
        #: Bytes one ``pot(system)`` call may use (None: 85 % of the memory available,
        #: :func:`celli_scale.memory.available_memory_bytes`). A structure whose compiled
        #: program needs more is evaluated in chunks (sub-bricks of the domain
        #: decomposition, :class:`celli_scale.distributed.ShardedPotential` on one device).
        self.max_bytes: int | None = None
        self._kernels: dict[tuple, tuple[Any, int]] = {}
        self._chunked: tuple[tuple, Any] | None = None
        #: Counters of ``pot(system)`` and ``pot(Batch)`` calls: ``calls``, ``rebuilds``
        #: (host neighbor-list builds), ``overflows`` (compaction capacity grown and the
        #: call redone).
        self.stats = {"calls": 0, "rebuilds": 0, "overflows": 0}
        self._zmap = np.full(119, -1, dtype=np.int32)
        self._zmap[np.asarray(self.config.species)] = np.arange(self.config.n_species)
        self._edge_capacity = 0
        self._elec_capacity = 0
        self._elec_row_capacity = 0  # pairs per atom of the electrostatics lists (rows)
        efs = partial(energy_and_derivatives, model)
        #: The compiled kernel ``evaluate(params, graph, stress=False) -> (energy, forces,
        #: stress, ModelOutput)`` (:func:`energy_and_derivatives`, jitted; ``stress`` is
        #: static). Use it with :meth:`graph` to time or lower exactly what ``pot(s)`` runs.
        self.evaluate = jax.jit(efs, static_argnames=("stress",))

        def batched(p, gs, stress=False):
            # lax.map over the structures of a batch, not vmap: on CPU vmap's batched
            # gathers/scatters were 1.2-1.8x slower per structure (bench/RESULTS.md).
            return jax.lax.map(lambda g: efs(p, g, stress=stress), gs)

        #: ``evaluate_batch(params, graphs, stress=False)`` over a stacked graph
        #: (:meth:`batch_graph`), structure by structure.
        self.evaluate_batch = jax.jit(batched, static_argnames=("stress",))

        def verlet(p, graph, caps, stress=False):
            graph, counts = compact_graph(graph, self.config.r_cut, caps)
            return (*efs(p, graph, stress=stress), counts)

        #: ``evaluate_verlet(params, graph, caps, stress=False) -> (energy, forces, stress,
        #: ModelOutput, pair counts)``: the kernel of ``pot(system)``. ``graph`` holds
        #: Verlet lists (cut-offs + :attr:`skin`); the model edges are packed inside the
        #: call to the pairs within the cut-off (``caps``: ``(model edges,)``; static).
        self.evaluate_verlet = jax.jit(verlet, static_argnames=("caps", "stress"))

        def verlet_batch(p, graphs, caps, stress=False):
            return jax.lax.map(lambda g: verlet(p, g, caps, stress=stress), graphs)

        #: ``evaluate_verlet_batch(params, graphs, caps, stress=False)``: the kernel of
        #: ``pot(Batch)``, :attr:`evaluate_verlet` over a stacked graph (pair counts
        #: ``(B, 1)``).
        self.evaluate_verlet_batch = jax.jit(verlet_batch, static_argnames=("caps", "stress"))

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_config(
        cls,
        config: dict[str, Any] | ModelConfig,
        seed: int = 0,
        example: System | None = None,
        **kwargs: Any,
    ) -> Potential:
        """A freshly initialised potential. ``species`` defaults to those in ``example``.

        Raises:
          ValueError: ``config`` is not a dict or config dataclass, a key is unknown or a
            value has the wrong type (naming the field), ``seed`` is not an integer.
        """
        if isinstance(config, ModelConfig):
            cfg = config.to_dict()
        elif isinstance(config, dict):
            cfg = dict(config)
        else:
            raise ValueError(
                "from_config needs a dict (e.g. {'name': 'allegro'}) or a model config "
                f"dataclass, got {type(config).__name__}"
            )
        if isinstance(seed, bool | np.bool_) or not isinstance(seed, int | np.integer):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        if example is not None and not isinstance(example, System):
            raise ValueError(f"example must be a System, got {type(example).__name__}")
        if cfg.get("species") is None:
            if example is None:
                raise ValueError("from_config needs config['species'] or an example system")
            cfg["species"] = sorted({int(z) for z in np.asarray(example.species)})
        model = models_mod.build(cfg)
        pot = cls(model, None, **kwargs)
        if example is None:
            example = _dummy_system(pot.config)
        graph = pot.graph(example)
        pot.params = jax.jit(model.init)(jax.random.PRNGKey(seed), graph)
        return pot

    @property
    def is_charge_model(self) -> bool:
        return getattr(self.config, "elec_method", None) is not None

    def species_index(self, species: Any) -> np.ndarray:
        """Map atomic numbers to the model's species indices (ValueError names unknown ones)."""
        z = np.asarray(species)
        idx = self._zmap[np.clip(z, 0, 118)]
        bad = np.flatnonzero((idx < 0) | (z < 0) | (z > 118))
        if bad.size:
            k = int(bad[0])
            raise ValueError(
                f"unknown species: atom {k} has atomic number {int(z[k])}, but the model "
                f"knows only {list(self.config.species)}"
            )
        return idx.astype(np.int32)

    @property
    def capacities(self) -> tuple[int, int]:
        """``(edges, electrostatics pairs)`` the next graph is padded to at least: they
        only grow (so MD steps reuse one compiled function) until :meth:`reset_capacities`."""
        return self._edge_capacity, self._elec_capacity

    def reset_capacities(self) -> None:
        """Size the next graph exactly (no spare edges from earlier, larger structures)."""
        self._edge_capacity = 0
        self._elec_capacity = 0
        self._elec_row_capacity = 0  # pairs per atom of the electrostatics lists (rows)

    def batch_graphs(
        self,
        systems: Sequence[System],
        n_atoms: int | None = None,
        sigma_max: float | None = None,
    ) -> list[Graph]:
        """Graphs of ``systems`` that stack: ``n_atoms`` atoms each (default: the largest
        system), one common edge capacity (the largest need) and, for charge models, one
        set of electrostatics shapes (:func:`celli_scale.electrostatics.params.unify`:
        common Ewald split and cut-offs, k-vectors padded, the largest PME grid; every
        structure at least as accurate as alone). Periodic and open structures of a charge
        model cannot share a batch (ValueError). ``sigma_max``: the Gaussian width (Å) the
        electrostatics must serve (default ``elec_sigma_max``, any width training may
        reach; ``pot(Batch)`` passes :meth:`sigma_bound`)."""
        n_pad = max(s.n_atoms for s in systems) if n_atoms is None else int(n_atoms)
        elec = self._batch_elec_params(systems, sigma_max)
        pairs = zip(systems, elec, strict=True)
        graphs = [self.graph(s, n_atoms=n_pad, elec_params=e) for s, e in pairs]
        caps = self.capacities

        def elec_cap(g: Graph) -> int:
            return 0 if g.elec_neighbors is None else g.elec_neighbors.senders.shape[0]

        graphs = [
            g
            if g.senders.shape[0] == caps[0] and elec_cap(g) in (0, caps[1])
            else self.graph(s, n_atoms=n_pad, edge_capacity=caps[0], elec_params=e)
            for g, s, e in zip(graphs, systems, elec, strict=True)
        ]
        # one row capacity for all, so that the graphs stack (a larger one is still a bound)
        rows = [g.elec_neighbors.row_capacity for g in graphs if g.elec_neighbors is not None]
        if rows:
            most = None if None in rows else max(rows)
            graphs = [
                g.replace(elec_neighbors=g.elec_neighbors.replace(row_capacity=most))
                if g.elec_neighbors is not None
                else g
                for g in graphs
            ]
        return graphs

    def _batch_elec_params(self, systems: Sequence[System], sigma_max: float | None) -> list:
        """One set of electrostatics shapes for ``systems`` (charge models; else Nones):
        :func:`celli_scale.electrostatics.params.unify` of each structure's parameters."""
        if not self.is_charge_model:
            return [None] * len(systems)
        from celli_scale.electrostatics.params import unify

        cells = [np.zeros((3, 3)) if s.cell is None else np.asarray(s.cell) for s in systems]
        elec = [self.elec_params(s, sigma_max=sigma_max) for s in systems]
        methods = {p.method for p in elec}
        if len(methods) > 1 and "direct" not in methods:
            # "auto" picked Ewald for the small cells and PME for the large: all take
            # the method of the largest structure
            big = max(range(len(systems)), key=lambda i: systems[i].n_atoms)
            elec = [self.elec_params(s, elec[big].method, sigma_max) for s in systems]
        smax = getattr(self.config, "elec_sigma_max", None) if sigma_max is None else sigma_max
        return unify(elec, cells, float(smax or 0.0))

    def batch_graph(
        self, systems: Sequence[System], n_atoms: int | None = None, sigma_max: float | None = None
    ) -> Graph:
        """:meth:`batch_graphs` stacked along a leading axis (one compiled call)."""
        graphs = self.batch_graphs(systems, n_atoms, sigma_max)
        if len({g.periodic for g in graphs}) > 1:
            raise ValueError("a batch mixes periodic and open structures")
        return jax.tree_util.tree_map(lambda *x: jnp.stack(x), *graphs)

    @property
    def qeq_tol(self) -> float | None:
        """The model's Qeq tolerance (charge models), else None."""
        tol = getattr(self.config, "qeq_tol", None)
        return None if tol is None else float(tol)

    def check_output(self, out: ModelOutput) -> None:
        """Host check of a model output (single or batched): raises
        :class:`celli_scale.qeq.QeqConvergenceError` if a Qeq solve missed its tolerance."""
        if out.qeq_residual is not None and self.qeq_tol is not None:
            from celli_scale.qeq import check_residual

            check_residual(out.qeq_residual, self.qeq_tol)

    def graph(
        self,
        system: System,
        n_atoms: int | None = None,
        edge_capacity: int | None = None,
        elec_params: Any = None,
    ) -> Graph:
        """Host-side graph of a concrete ``system``, optionally padded to ``n_atoms`` atoms
        and ``edge_capacity`` edges; charge models take ``elec_params`` (e.g. unified over
        a batch) instead of preparing their own for the Gaussian widths of the current
        parameters (:meth:`sigma_bound`; training graphs come from :meth:`batch_graphs`,
        sized for ``elec_sigma_max``, any width the parameters may learn)."""
        n_pad = system.n_atoms if n_atoms is None else int(n_atoms)
        nl = neighbor_list(
            system,
            self.config.r_cut,
            capacity=self._edge_capacity if edge_capacity is None else edge_capacity,
            growth=self.capacity_growth,
        )
        self._edge_capacity = max(self._edge_capacity, nl.capacity)
        elec_nl = None
        if self.is_charge_model:
            if elec_params is None:  # as pot(system) prepares them: for the current widths
                elec_params = self.elec_params(system, sigma_max=self.sigma_bound())
            elec_nl = self._elec_neighbors(system, elec_params)
        return self._assemble(system, n_pad, nl, elec_params, elec_nl)

    def _assemble(self, system: System, n_pad: int, nl, elec_params, elec_nl) -> Graph:
        """The padded :class:`Graph` of ``system`` with the given lists and parameters."""
        dtype = self.config.jnp_dtype
        n = system.n_atoms
        pos = np.zeros((n_pad, 3))
        pos[:n] = np.asarray(system.positions)
        spc = np.zeros(n_pad, dtype=np.int32)
        spc[:n] = self.species_index(system.species)
        mask = np.zeros(n_pad, dtype=bool)
        mask[:n] = True
        cell = np.zeros((3, 3)) if system.cell is None else np.asarray(system.cell, dtype=float)
        if elec_params is not None:
            # the arrays are padded to n_pad atoms: say so (graphs of one padded size stack)
            elec_params = elec_params.replace(n_atoms=n_pad)
        return Graph(
            positions=jnp.asarray(pos, dtype=dtype),
            species=jnp.asarray(spc),
            node_mask=jnp.asarray(mask),
            cell=jnp.asarray(cell, dtype=dtype),
            total_charge=jnp.asarray(float(system.total_charge), dtype=dtype),
            senders=nl.senders,
            receivers=nl.receivers,
            shifts=nl.shifts.astype(dtype),
            edge_mask=nl.mask,
            elec_params=elec_params,
            elec_neighbors=elec_nl,
            periodic=system.periodic,
        )

    def elec_params(
        self, system: System, method: str | None = None, sigma_max: float | None = None
    ):
        """Electrostatics parameters of a charge model for ``system``
        (:func:`celli_scale.electrostatics.prepare` at the model's method and accuracy),
        the real-space cut-off sized for Gaussian widths up to ``sigma_max`` Å (default
        ``elec_sigma_max``: any width training may reach)."""
        from celli_scale import electrostatics as el

        # Graphs for training serve any width the parameters may learn: the model caps them
        # at elec_sigma_max, so the real-space cut-off is chosen for that width. pot(system)
        # passes the widths of the parameters it evaluates (sigma_max).
        if sigma_max is None:
            sigma_max = getattr(self.config, "elec_sigma_max", None)
        return el.prepare(
            system,
            method=self.config.elec_method if method is None else method,
            accuracy=self.config.elec_accuracy,
            sigma=None if sigma_max is None else np.full(system.n_atoms, float(sigma_max)),
        )

    def _elec_neighbors(self, system: System, params: Any):
        if not params.periodic:
            return None
        # same growth rule as the model's list: head-room so that later structures reuse
        # the compiled function, one build per call
        nl = neighbor_list(
            system, params.r_cut, capacity=self._elec_capacity, growth=self.capacity_growth
        )
        self._elec_capacity = max(self._elec_capacity, nl.capacity)
        nl = with_row_capacity(nl, self._elec_row_capacity, self.capacity_growth)
        self._elec_row_capacity = max(self._elec_row_capacity, nl.row_capacity or 0)
        return nl

    # -- evaluation ---------------------------------------------------------------------
    def __call__(self, system: System | Batch) -> PotentialOutput:
        if self.params is None:
            raise ValueError("Potential has no parameters")
        if isinstance(system, Batch):
            return self._call_batch(system)
        return self._single(system)

    def _single(self, system: System, n_pad: int | None = None) -> PotentialOutput:
        if n_pad is None and self.skin > 0:
            return self._verlet_call(system)
        graph = self.graph(system, n_atoms=n_pad)
        return self._output(*self.evaluate(self.params, graph, stress=_has_volume(system)))

    def _verlet_call(self, system: System) -> PotentialOutput:
        """``pot(system)`` on Verlet lists kept between calls: the host work of a call is a
        displacement check and copying the positions while no atom has moved more than
        half the skin since the lists were built (same atoms, species and cell); then the
        lists are rebuilt, keeping the electrostatics parameters while the cell is the
        same. The model edges are packed to the cut-off inside the compiled call; when more
        exist than its capacity holds, the capacity grows and the call is redone."""
        self.stats["calls"] += 1
        pos = np.asarray(system.positions, dtype=float)
        st = self._verlet
        key = structure_key(system)
        if self._chunked is not None and self._chunked[0] == key:
            return self._chunked[1](system)  # too large for one pass: its decomposition
        if self._stale(st, key, pos):
            st = self._verlet = self.verlet_state(system, st)
            self.stats["rebuilds"] += 1
        dtype = self.config.jnp_dtype
        graph = st.graph.replace(
            positions=jnp.asarray(pos, dtype=dtype),
            total_charge=jnp.asarray(float(system.total_charge), dtype=dtype),
            charges_guess=st.charges if self.warm_start else None,
        )
        out = self._evaluate_kept(st, graph, _has_volume(system))
        if isinstance(out, int):  # too large for one pass
            return self._chunked_call(system, key, out)
        return out

    def _stale(self, st: _VerletState | None, key: tuple, pos: np.ndarray, mask=None) -> bool:
        """Whether the kept state ``st`` cannot serve positions ``pos`` (Å; ``mask``: the
        real atoms of a padded batch) of the structure(s) ``key``: none kept yet, other
        structures, Gaussians wider than it was prepared for, or an atom that has moved
        half the skin since the lists were built."""
        if st is None or st.key != key:
            return True
        sigma = self.sigma_bound()
        if sigma is not None and sigma > st.sigma:
            return True
        d2 = np.sum((pos - st.reference) ** 2, axis=-1)
        if mask is not None:
            d2 = d2[mask]
        return bool(np.max(d2, initial=0.0) >= (0.5 * self.skin) ** 2)

    def _evaluate_kept(
        self, st: _VerletState, graph: Graph, stress: bool, batched: bool = False
    ) -> PotentialOutput | int:
        """The compiled call on the kept lists (:attr:`evaluate_verlet`, ``batched``:
        :attr:`evaluate_verlet_batch`). When the model edges within the cut-off outnumber
        the packed capacity, the capacity grows and the call is redone. Returns the bytes
        the compiled program needs instead when that is over :meth:`_byte_limit` (the
        caller falls back)."""
        while True:
            kernel, need = self._kernel(graph, st.caps, stress, batched)
            if need > self._byte_limit():
                return int(need)
            *res, counts = kernel(self.params, graph)
            # (caps,) for one structure, (B, caps) for a batch: the largest per capacity
            counts = np.asarray(counts).reshape(-1, len(st.caps)).max(axis=0)
            if all(int(c) <= cap for c, cap in zip(counts, st.caps, strict=True)):
                result = self._output(*res)
                if st.charges is not None:  # the next call's warm start (stays on device)
                    st.charges = res[3].charges
                return result
            self.stats["overflows"] += 1
            # 5 % more: with capacity_growth 1 (exact lists) every extra pair would
            # recompile the kernel
            st.caps = tuple(
                max(cap, int(np.ceil(int(c) * PACK_GROWTH)))
                for c, cap in zip(counts, st.caps, strict=True)
            )

    def _kernel(self, graph: Graph, caps: tuple, stress: bool, batched: bool = False):
        """``(compiled, bytes needed)`` of :attr:`evaluate_verlet` (``batched``:
        :attr:`evaluate_verlet_batch`) for these shapes (compiled once, kept)."""
        from celli_scale import memory

        leaves, tree = jax.tree_util.tree_flatten(graph)
        key = (tree, tuple((x.shape, x.dtype) for x in leaves), caps, stress, batched)
        if key not in self._kernels:
            if len(self._kernels) >= 16:  # many shapes seen: keep the memory bounded
                self._kernels.clear()
            fn = self.evaluate_verlet_batch if batched else self.evaluate_verlet
            lowered = fn.lower(self.params, graph, caps=caps, stress=stress)
            compiled = lowered.compile()
            self._kernels[key] = (compiled, memory.compiled_bytes(compiled))
        return self._kernels[key]

    def _byte_limit(self) -> int:
        from celli_scale import memory

        if self.max_bytes is not None:
            return int(self.max_bytes)
        return int(0.85 * memory.available_memory_bytes())

    def _chunked_call(self, system: System, key: tuple, need: int) -> PotentialOutput:
        """Evaluate a structure too large for one pass through the domain decomposition
        on one device, in enough sub-bricks that each needs about half the limit."""
        import logging

        from celli_scale.distributed import ShardedPotential

        limit = self._byte_limit()
        chunks = max(2, math.ceil(2 * need / max(limit, 1)))
        logging.getLogger(__name__).warning(
            "%d atoms need about %.3g GiB in one pass (limit %.3g GiB): evaluating in %d "
            "chunks of a domain decomposition",
            system.n_atoms,
            need / 2**30,
            limit / 2**30,
            chunks,
        )
        self._verlet = None  # the decomposition keeps its own lists
        sp = ShardedPotential(self, devices=1, chunks=chunks, skin=self.skin)
        self._chunked = (key, sp)
        return sp(system)

    def verlet_state(
        self,
        system: System,
        old: _VerletState | None = None,
        *,
        skin: float | None = None,
        min_capacity: tuple[int, int] = (0, 0),
    ) -> _VerletState:
        """What ``pot(system)`` keeps between calls, built on the host: Verlet lists to the
        cut-offs plus ``skin`` Å (default :attr:`skin`), the electrostatics parameters
        (kept from ``old`` while cell, atoms and widths are the same), the packed
        capacities and the warm-start charges. The lists keep ``old``'s padded sizes for
        the same structure, and hold at least ``min_capacity`` (model edges,
        electrostatics pairs) slots (MD grows them after an overflow in its loop)."""
        skin = self.skin if skin is None else float(skin)
        key = structure_key(system)
        # the lists keep their padded sizes across rebuilds of one structure (a new size
        # would recompile the kernel at every rebuild)
        same = old is not None and old.key == key
        nl = neighbor_list(
            system,
            self.config.r_cut + skin,
            capacity=max(old.graph.senders.shape[0] if same else 0, min_capacity[0]) or None,
            growth=self.capacity_growth,
        )
        elec_params = elec_nl = None
        counts = [_pairs_within(system, nl, self.config.r_cut)]
        sigma = self.sigma_bound()
        if self.is_charge_model:
            if (
                old is not None
                and old.key[2] == key[2]
                and old.key[0] == key[0]
                and (sigma is None or sigma <= old.sigma)
            ):
                elec_params = old.graph.elec_params  # same cell, atom count and widths
                sigma = old.sigma
            else:
                elec_params = self.elec_params(system, sigma_max=sigma)
            if elec_params.periodic:
                keep = same and old.graph.elec_neighbors is not None
                keep = keep and elec_params is old.graph.elec_params
                cap = old.graph.elec_neighbors.senders.shape[0] if keep else 0
                elec_nl = neighbor_list(
                    system,
                    elec_params.r_cut + skin,
                    capacity=max(cap, min_capacity[1]) or None,
                    growth=self.capacity_growth,
                )
                rows = old.graph.elec_neighbors.row_capacity if keep else None
                elec_nl = with_row_capacity(elec_nl, rows or 0, PACK_GROWTH)
        caps = self._packed_caps(counts, old)
        graph = self._assemble(system, system.n_atoms, nl, elec_params, elec_nl)
        charges = self._kept_charges(old if same else None, (system.n_atoms,))
        pos = np.asarray(system.positions, dtype=float)
        return _VerletState(key, pos, graph, caps, sigma, charges)

    def _packed_caps(self, counts: Sequence[int], old: _VerletState | None) -> tuple:
        """Packed capacities for ``counts`` pairs within the cut-off(s): PACK_HEADROOM
        (at most ``capacity_growth``) above them, never below ``old``'s (so that a rebuild
        does not recompile)."""
        head = min(self.capacity_growth, PACK_HEADROOM)
        caps = tuple(max(int(np.ceil(c * head)), 1) for c in counts)
        if old is not None and len(old.caps) == len(caps):
            caps = tuple(max(a, b) for a, b in zip(caps, old.caps, strict=True))
        return caps

    def _kept_charges(self, same: _VerletState | None, shape: tuple) -> Any:
        """Charge models: the warm start (e) kept in ``same`` (the state of the same
        structures), else zeros of ``shape`` (a guess of zeros is no warm start, and one
        compiled kernel serves both); None for other models."""
        if not self.is_charge_model:
            return None
        if same is not None and same.charges is not None:
            return same.charges
        return jnp.zeros(shape, self.config.jnp_dtype)

    def sigma_bound(self) -> float | None:
        """The largest Gaussian width (Å) of the current parameters (CELLI: over the
        model's species, computed on the host from the raw parameters), else None.
        ``pot(system)`` sizes the electrostatics' real-space cut-off for it rather than
        for ``elec_sigma_max``, and re-prepares when the parameters widen."""
        smax = getattr(self.config, "elec_sigma_max", None)
        if smax is None or self.params is None:
            return None
        from celli_scale.models.celli import covalent_radii

        try:
            q = self.params["params"]["qeq"]
        except (KeyError, TypeError):
            return float(smax)
        mode = getattr(self.config, "sigma_mode", "learnt")
        if mode == "fixed_covalent":
            sig = np.asarray(covalent_radii(self.config.species), float)
        else:
            raw = np.asarray(q["sigma_raw"], dtype=float)
            soft = np.logaddexp(0.0, raw)
            sig = soft if mode == "learnt" else covalent_radii(self.config.species) * soft
            if mode != "learnt":
                sig = sig / np.log(2.0)
        # a relative margin over the round-off of the float32 model's own evaluation
        return float(min(np.max(sig) * (1 + 1e-6), float(smax)))

    def _call_batch(self, batch: Batch) -> PotentialOutput:
        n_pad = batch.n_atoms_padded
        cells = np.asarray(batch.cell, dtype=float)
        periodic = [_cell_has_volume(p, c) for p, c in zip(batch.pbc, cells, strict=True)]
        if any(periodic) and not all(periodic):
            # mixed periodic/open batches differ in outputs (stress, dipole) and, for
            # charge models, in electrostatics method: evaluate one by one, padded
            return self._one_by_one(list(batch), n_pad)
        if self.skin > 0:
            return self._verlet_batch_call(batch, stress=all(periodic))
        systems = list(batch)
        stacked = self.batch_graph(systems, n_atoms=n_pad, sigma_max=self.sigma_bound())
        return self._output(*self.evaluate_batch(self.params, stacked, stress=all(periodic)))

    def _one_by_one(self, systems: list[System], n_pad: int) -> PotentialOutput:
        """Structures evaluated one at a time on graphs padded to ``n_pad`` atoms, the
        outputs stacked (NaN stress / dipole where a structure has none)."""
        outs = [self._single(s, n_pad) for s in systems]
        outs = [
            o
            if o.stress is not None
            else o.replace(stress=jnp.full((3, 3), jnp.nan, o.energy.dtype))
            for o in outs
        ]
        if any(o.dipole is not None for o in outs):  # open and periodic CELLI mixed
            nan3 = jnp.full((3,), jnp.nan, outs[0].energy.dtype)
            outs = [o if o.dipole is not None else o.replace(dipole=nan3) for o in outs]
        return jax.tree_util.tree_map(lambda *x: jnp.stack(x), *outs)

    def _verlet_batch_call(self, batch: Batch, stress: bool) -> PotentialOutput:
        """``pot(Batch)`` on Verlet lists kept between calls, as :meth:`_verlet_call` for
        one structure: while the batch holds the same structures (atom counts, species,
        cells) and no atom has moved half the skin since the lists were built, a call
        copies the positions and runs one compiled call over the stacked graph (model
        edges packed inside it; an overflow grows the capacity and redoes the call).
        Otherwise every structure's lists are rebuilt on the host, keeping the unified
        electrostatics parameters while the cells and widths are the same."""
        self.stats["calls"] += 1
        pos = np.asarray(batch.positions, dtype=float)
        mask = np.asarray(batch.mask)
        key = _batch_key(batch)
        st = self._verlet_batch
        if self._stale(st, key, pos, mask):
            st = self._verlet_batch = self.verlet_batch_state(batch, st)
            self.stats["rebuilds"] += 1
        dtype = self.config.jnp_dtype
        graph = st.graph.replace(
            positions=jnp.asarray(pos, dtype=dtype),
            total_charge=jnp.asarray(np.asarray(batch.total_charge, float), dtype=dtype),
            charges_guess=st.charges if self.warm_start else None,
        )
        out = self._evaluate_kept(st, graph, stress, batched=True)
        if isinstance(out, int):
            import logging

            logging.getLogger(__name__).warning(
                "a batch of %d structures needs about %.3g GiB in one call: evaluating "
                "them one at a time",
                batch.n_systems,
                out / 2**30,
            )
            self._verlet_batch = None
            return self._one_by_one(list(batch), batch.n_atoms_padded)
        return out

    def verlet_batch_state(self, batch: Batch, old: _VerletState | None = None) -> _VerletState:
        """What ``pot(Batch)`` keeps between calls (:meth:`verlet_state` for a batch): the
        stacked graph of ``batch``'s structures, Verlet lists to the cut-offs
        plus :attr:`skin` with one capacity (kept from ``old`` for the same structures),
        the unified electrostatics parameters (kept from ``old`` while cells and widths
        are the same), the packed capacity of model edges per structure and the
        warm-start charges ``(B, A)``."""
        skin = self.skin
        systems = list(batch)
        n_pad = batch.n_atoms_padded
        key = _batch_key(batch)
        same = old is not None and old.key == key
        sigma = self.sigma_bound()
        if (
            self.is_charge_model
            and same
            and old.graph.elec_params is not None
            and (sigma is None or sigma <= old.sigma)
        ):
            elec, sigma = old.elec, old.sigma
        else:
            elec = self._batch_elec_params(systems, sigma)

        def lists(r_cut: float, old_cap: int) -> list[NeighborList]:
            nls = [
                neighbor_list(s, r_cut, capacity=old_cap or None, growth=self.capacity_growth)
                for s in systems
            ]
            cap = max(nl.capacity for nl in nls)
            return [_padded(nl, cap) for nl in nls]

        nls = lists(self.config.r_cut + skin, old.graph.senders.shape[-1] if same else 0)
        counts = [
            max(_pairs_within(s, nl, self.config.r_cut) for s, nl in zip(systems, nls, strict=True))
        ]
        elec_nls: list[Any] = [None] * len(systems)
        if elec[0] is not None and elec[0].periodic:
            keep = same and old.graph.elec_neighbors is not None and elec is old.elec
            cap = old.graph.elec_neighbors.senders.shape[-1] if keep else 0
            elec_nls = lists(elec[0].r_cut + skin, cap)
            rows = old.graph.elec_neighbors.row_capacity if keep else None
            elec_nls = [with_row_capacity(nl, rows or 0, PACK_GROWTH) for nl in elec_nls]
            row_caps = [nl.row_capacity for nl in elec_nls]
            most = None if None in row_caps else max(row_caps)
            elec_nls = [nl.replace(row_capacity=most) for nl in elec_nls]
        caps = self._packed_caps(counts, old)
        graphs = [
            self._assemble(s, n_pad, nl, e, enl)
            for s, nl, e, enl in zip(systems, nls, elec, elec_nls, strict=True)
        ]
        graph = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *graphs)
        charges = self._kept_charges(old if same else None, (len(systems), n_pad))
        pos = np.asarray(batch.positions, dtype=float)
        return _VerletState(key, pos, graph, caps, sigma, charges, elec)

    def _output(self, energy, forces, stress, out: ModelOutput) -> PotentialOutput:
        self.check_output(out)
        return PotentialOutput(
            energy=energy,
            forces=forces,
            stress=stress,
            charges=out.charges,
            node_energies=out.node_energies,
            elec_energy=out.elec_energy,
            dipole=out.dipole,
            qeq_iterations=out.qeq_iterations,
        )

    # -- persistence --------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Save as a directory: ``config.json``, an orbax checkpoint of the parameters in
        ``params/`` and ``manifest.json`` (the layout version and the sha256 of
        ``config.json`` and of every file under ``params/``), written last.
        Loading never runs code (no pickle) and checks the manifest."""
        import orbax.checkpoint as ocp

        path = Path(path).absolute()
        # With several jax.distributed processes every one calls save (orbax's save is a
        # collective; its primary process writes) and process 0 writes the JSON files.
        leader = jax.process_index() == 0
        path.mkdir(parents=True, exist_ok=True)
        if leader:
            # a save interrupted from here on leaves no manifest, so load refuses it clearly
            (path / MANIFEST_FILE).unlink(missing_ok=True)
            (path / CONFIG_FILE).write_text(json.dumps(self.config.to_dict(), indent=2))
        from celli_scale.distributed.multihost import host_arrays

        ckpt = ocp.StandardCheckpointer()
        ckpt.save(path / PARAMS_DIR, host_arrays(self.params), force=True)
        ckpt.wait_until_finished()
        if not leader:
            return
        manifest = {"format": SAVE_FORMAT, "sha256": _hash_files(path)}
        tmp = path / f".{MANIFEST_FILE}.tmp"
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
        os.replace(tmp, path / MANIFEST_FILE)

    @classmethod
    def load(cls, path: str | os.PathLike, **kwargs: Any) -> Potential:
        """Load a directory written by :meth:`save`.

        The manifest is checked first: a file that changed, is missing or was added under
        ``params/`` is refused, naming it. A directory without ``manifest.json`` (saved
        before manifests existed, or by hand) loads with a ``UserWarning``: its files cannot
        be checked. The config's values are type-checked strictly (``r_cut: true`` or
        ``"5"`` is refused), and unreadable parameters raise one clear error.

        Raises:
          SavedModelError: (a ``ValueError``) naming the directory or file and the problem.
        """
        import orbax.checkpoint as ocp

        path = Path(path).absolute()
        if not path.is_dir():
            raise SavedModelError(f"{path}: not a saved potential (no such directory)")
        cfg_file = path / CONFIG_FILE
        if not cfg_file.is_file():
            raise SavedModelError(f"{path}: not a saved potential (missing {CONFIG_FILE})")
        if (path / MANIFEST_FILE).is_file():
            _verify_manifest(path)
        else:
            warnings.warn(
                f"{path}: no {MANIFEST_FILE}; the files cannot be checked for changes "
                "(re-save the potential to add one)",
                UserWarning,
                stacklevel=2,
            )
        try:
            cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SavedModelError(f"{cfg_file}: malformed JSON ({exc})") from None
        if not isinstance(cfg, dict):
            raise SavedModelError(
                f"{cfg_file}: expected a JSON object of config keys, got {type(cfg).__name__}"
            )
        try:
            model = models_mod.build(cfg)
        except ValueError as exc:
            raise SavedModelError(f"{cfg_file}: {exc}") from None
        pot = cls(model, None, **kwargs)
        graph = pot.graph(_dummy_system(pot.config))
        # on this process's first device: in a multi-process run every process loads its
        # own copy (a checkpoint saved by process 0 would otherwise be restored onto
        # process 0's device topology, which other processes cannot address)
        local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree_util.tree_map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=local),
            jax.eval_shape(model.init, jax.random.PRNGKey(0), graph),
        )
        params_dir = path / PARAMS_DIR
        if not params_dir.is_dir():
            raise SavedModelError(f"{path}: not a saved potential (missing {PARAMS_DIR}/)")
        try:
            params = ocp.StandardCheckpointer().restore(params_dir, target)
        except Exception as exc:  # orbax/tensorstore raise many types for damaged files
            first = " ".join(str(exc).split("See full TensorStore details")[0].split())[:200]
            raise SavedModelError(
                f"{params_dir}: the parameter checkpoint is damaged or does not match "
                f"{CONFIG_FILE} ({type(exc).__name__}: {first})"
            ) from None
        for (kp, want), got in zip(
            jax.tree_util.tree_leaves_with_path(target),
            jax.tree_util.tree_leaves(params),
            strict=True,
        ):
            if got.shape != want.shape or got.dtype != want.dtype:
                raise SavedModelError(
                    f"{params_dir}: parameter {jax.tree_util.keystr(kp)} has "
                    f"{got.dtype}{list(got.shape)}, but {CONFIG_FILE} needs "
                    f"{want.dtype}{list(want.shape)}"
                )
        pot.params = params
        return pot


def _hash_files(path: Path) -> dict[str, str]:
    """sha256 of ``config.json`` and of every file under ``params/`` (relative POSIX names)."""
    files = [path / CONFIG_FILE]
    params = path / PARAMS_DIR
    if params.is_dir():
        files += sorted(p for p in params.rglob("*") if p.is_file() or p.is_symlink())
    out = {}
    for f in files:
        name = f.relative_to(path).as_posix()
        if f.is_symlink():
            raise SavedModelError(f"{f}: a saved potential must not contain symbolic links")
        h = hashlib.sha256()
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        out[name] = h.hexdigest()
    return out


def _verify_manifest(path: Path) -> None:
    mfile = path / MANIFEST_FILE
    try:
        manifest = json.loads(mfile.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SavedModelError(f"{mfile}: malformed JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != SAVE_FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else manifest
        raise SavedModelError(f"{mfile}: field 'format': expected {SAVE_FORMAT!r}, got {got!r}")
    want = manifest.get("sha256")
    if not isinstance(want, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in want.items()
    ):
        raise SavedModelError(f"{mfile}: field 'sha256' must map file names to hex digests")
    have = _hash_files(path)
    for name in sorted(set(want) | set(have)):
        if name not in have:
            raise SavedModelError(f"{path / name}: listed in {MANIFEST_FILE} but missing")
        if name not in want:
            raise SavedModelError(f"{path / name}: not listed in {MANIFEST_FILE} (added later?)")
        if have[name] != want[name]:
            raise SavedModelError(
                f"{path / name}: changed since the potential was saved (sha256 differs "
                f"from {MANIFEST_FILE})"
            )


@dataclasses.dataclass
class _VerletState:
    """What ``pot(system)`` keeps between calls: the structure key (atom count, species,
    pbc, cell), the positions the lists were built at, the graph holding the Verlet lists
    (and the electrostatics parameters), the packed capacities, the Gaussian width the
    electrostatics were prepared for and (charge models) the last charges, the warm start
    of the next Qeq solve."""

    key: tuple
    reference: np.ndarray
    graph: Graph
    caps: tuple
    sigma: float | None = None
    charges: Any = None
    elec: Any = None  # pot(Batch): the per-structure electrostatics parameters


def structure_key(system: System) -> tuple:
    """What lists, electrostatics parameters or a decomposition are valid for besides the
    positions: ``(atom count, species, cell, pbc)`` (hashable, host)."""
    return (
        system.n_atoms,
        np.asarray(system.species).tobytes(),
        None if system.cell is None else np.asarray(system.cell, float).tobytes(),
        tuple(system.pbc),
    )


def _batch_key(batch: Batch) -> tuple:
    """:func:`structure_key` of a whole batch: ``(shape, species, mask, cells, pbc)``."""
    return (
        tuple(batch.positions.shape),
        np.asarray(batch.species).tobytes(),
        np.asarray(batch.mask).tobytes(),
        np.asarray(batch.cell, float).tobytes(),
        batch.pbc,
    )


def _padded(nl: NeighborList, capacity: int) -> NeighborList:
    """The host list ``nl`` padded (masked slots) to ``capacity`` pairs (≥ its own)."""
    extra = capacity - nl.capacity
    if extra == 0:
        return nl

    def pad(x):
        x = np.asarray(x)
        return jnp.asarray(np.pad(x, [(0, extra)] + [(0, 0)] * (x.ndim - 1)))

    return nl.replace(
        senders=pad(nl.senders),
        receivers=pad(nl.receivers),
        shifts=pad(nl.shifts),
        mask=pad(nl.mask),
    )


def _pairs_within(system: System, nl, r_cut: float) -> int:
    """How many pairs of the host list ``nl`` lie within ``r_cut`` (host)."""
    pos = np.asarray(system.positions, dtype=float)
    m = np.asarray(nl.mask)
    i, j = np.asarray(nl.senders)[m], np.asarray(nl.receivers)[m]
    vec = pos[j] - pos[i]
    if system.cell is not None:
        vec = vec + np.asarray(nl.shifts, dtype=float)[m] @ np.asarray(system.cell, dtype=float)
    return int(np.sum(np.sum(vec * vec, axis=1) < r_cut**2))


def _has_volume(system: System) -> bool:
    """Stress ``(1/V) ∂E/∂ε`` needs a periodic cell with a volume: a slab written with
    ASE's zero vector along its open axis has none (its stress is None, not ±inf)."""
    return _cell_has_volume(system.pbc, system.cell)


def _cell_has_volume(pbc: Sequence[bool], cell: Any) -> bool:
    """:func:`_has_volume` from a structure's ``pbc`` and cell (``None`` or ``(3, 3)`` Å)."""
    if not any(pbc):
        return False
    return bool(abs(np.linalg.det(np.asarray(cell, dtype=float))) > 0.0)


def _dummy_system(config: ModelConfig) -> System:
    """A small structure with one atom of every species (for initialisation): open, or in
    a periodic box when the model's electrostatics method needs one (Ewald, PME)."""
    z = np.asarray(config.species)
    n = max(2, z.size)
    pos = np.stack([np.arange(n) * 1.1, np.zeros(n), np.zeros(n)], axis=1)
    if getattr(config, "elec_method", None) in ("ewald", "pme"):
        side = max(12.0, 1.1 * n + 4.0, 8.0 * float(config.elec_sigma_max))
        return System(pos, np.resize(z, n), cell=np.eye(3) * side, pbc=True)
    return System(pos, np.resize(z, n))
