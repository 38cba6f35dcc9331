"""``ShardedPotential``: a potential evaluated over a spatial domain decomposition.

``sp = ShardedPotential(pot, devices=8)`` cuts space into bricks over a device mesh
(:func:`celli_scale.distributed.domains.decompose`), brings each device its ghosts by the
halo exchange (:mod:`celli_scale.distributed.halo`, ``ppermute`` inside ``jax.shard_map``)
and evaluates the model's own ``apply`` on each brick's sub-bricks one after another
(``chunks=K``: peak memory follows the sub-brick, not the system). Per sub-brick it takes
the owned atoms' energy and its gradient on owned and ghost entries; the reverse exchange
sums the ghosts' contributions into their owners. ``sp(system)`` returns the same fields
as ``pot(system)`` (energy, forces, stress, per-atom energies, in the system's order).

Strictly local models (Allegro) evaluate only edges centred on owned atoms; message
passing (NequIP, MACE) evaluates edges centred on every atom within
``(n_layers − 1) × r_cut`` (+ skin) of the sub-brick, the layers the receptive field needs.

Decompositions are reused while no atom moved more than half the skin (Verlet's rule:
the halo and the pair lists hold a skin), so an MD loop calls ``sp.update(positions)``
cheaply; beyond it, or when the cell, the atom count or the species change, space is cut
again (atoms migrate to the brick they are now in). Array capacities only grow, so the
compiled program is reused until a decomposition needs more room; then the capacities
grow (never an atom dropped) and :attr:`stats` counts it.

Stress ``(1/V) ∂E/∂ε`` comes from the virial ``Σ x ⊗ ∂E/∂x`` over every sub-brick's
nodes at their image positions (exact: ghosts are images of owned atoms shifted by cell
rows, so a strain moves them together).

CELLI: the halo also covers the electrostatics' real-space cut-off (sub-bricks keep the
model's), and one call runs χ on the sub-bricks, the distributed Qeq
(:mod:`celli_scale.distributed.qeq`), the local energy with halo-exchanged charges, the
distributed adjoint solve and the χ path of the forces, and the electrostatic terms; the
outputs add charges, the electrostatic energy and (open systems) the dipole. The
reciprocal part of the stress is the strain derivative at fixed fractional coordinates.
Both solves start from the previous call's solution.

Multi-process (``jax.distributed``, :mod:`celli_scale.distributed.multihost`): the mesh
may span the devices of several processes (``jax.devices()`` lists them all). Every
process calls ``sp(system)`` with the same system; the host-side decomposition is
deterministic, so each builds the same plan and puts its own bricks on its devices.
Every read back to the host goes through :func:`~celli_scale.distributed.multihost.
to_host` (a gather over the processes, so every process gets the full outputs, as
process-local arrays); it is a collective, so every process must make the same calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from celli_scale import cell as cellmod
from celli_scale.distributed import domains, halo
from celli_scale.distributed import qeq as dq
from celli_scale.distributed.multihost import host_arrays, to_host
from celli_scale.models import Graph
from celli_scale.potential import Potential, PotentialOutput, structure_key
from celli_scale.system import System


@dataclass
class ShardStats:
    """What the last decomposition looks like and what it cost.

    Attributes:
      mesh_shape: bricks per axis; chunk_shape: sub-bricks per brick per axis.
      halo: ghost width (Å, skin included).
      owned, ghosts, edges: ``(S,)`` per shard (edges: real pairs in its sub-bricks).
      owned_max_over_mean: load imbalance (1 = perfect).
      ghosts_per_owned: all ghosts / all owned atoms.
      bytes_per_exchange: bytes one forward position exchange moves (padded blocks, all
        shards; the force exchange moves the same).
      stages: ``ppermute`` stages per exchange.
      decompositions: how many times space was cut (the first included).
      capacity_growths: decompositions that needed larger arrays (a recompilation).
      migrated: atoms whose shard changed at the last re-decomposition.
      capacities: the padded array sizes in use.
      qeq_method: CELLI's electrostatics on the shards (``"ewald"``, ``"pme"``,
        ``"direct"``), else None. qeq_iterations: CG iterations of the last call's charge
        solve and adjoint solve; qeq_residuals: their relative residuals.
        qeq_bytes_per_iteration: communication volume of one CG
        iteration (:func:`celli_scale.distributed.qeq.bytes_per_iteration`).
    """

    mesh_shape: tuple[int, int, int]
    chunk_shape: tuple[int, int, int]
    halo: float
    owned: np.ndarray
    ghosts: np.ndarray
    edges: np.ndarray
    owned_max_over_mean: float
    ghosts_per_owned: float
    bytes_per_exchange: int
    stages: int
    decompositions: int = 0
    capacity_growths: int = 0
    migrated: int = 0
    capacities: dict[str, Any] = field(default_factory=dict)
    qeq_method: str | None = None
    qeq_iterations: tuple[int, int] | None = None
    qeq_residuals: tuple[float, float] | None = None
    qeq_bytes_per_iteration: dict[str, int] | None = None

    def summary(self) -> str:
        """A few lines for humans (the CLI prints them)."""
        mesh = "x".join(map(str, self.mesh_shape))
        chunks = "x".join(map(str, self.chunk_shape))
        return "\n".join(
            [
                f"mesh {mesh} ({len(self.owned)} shards), sub-bricks per shard {chunks}, "
                f"halo {self.halo:.2f} Å, {self.stages} exchange stages",
                f"owned atoms per shard: min {self.owned.min()}, max {self.owned.max()}, "
                f"max/mean {self.owned_max_over_mean:.3f}",
                f"ghosts per owned atom: {self.ghosts_per_owned:.3f}; edges per shard: "
                f"max {self.edges.max()}",
                f"bytes per halo exchange: {self.bytes_per_exchange / 2**20:.3f} MiB "
                "(forward; the force exchange moves the same)",
                f"decompositions: {self.decompositions} (capacity growths "
                f"{self.capacity_growths}, atoms migrated last time {self.migrated})",
            ]
            + (
                [
                    f"distributed Qeq: {self.qeq_method}, CG iterations (charges, adjoint) "
                    f"{self.qeq_iterations}, bytes per iteration {self.qeq_bytes_per_iteration}"
                ]
                if self.qeq_method
                else []
            )
        )


def _put(tree: Any, sharding: NamedSharding) -> Any:
    """``jax.device_put(tree, sharding)``. With several processes the leaves go through
    host arrays first: every process holds the same values (the same system, parameters
    and decomposition), and an array committed to one process's device (e.g. loaded
    parameters) cannot be moved onto another process's devices."""
    return jax.device_put(host_arrays(tree), sharding)


def _grew(before: dict[str, Any], after: dict[str, Any]) -> bool:
    """Whether a decomposition needed larger arrays than ``before`` (a recompilation)."""
    keys = ("owned", "nodes", "edges", "cut_edges")
    if any(k in before and after[k] > before[k] for k in keys):
        return True
    old, new = tuple(before.get("stages", ())), tuple(after["stages"])
    return len(old) == len(new) and any(b > a for a, b in zip(old, new, strict=True))


class ShardedPotential:
    """A :class:`celli_scale.Potential` evaluated over a domain decomposition.

    Args:
      pot: the potential (Allegro, NequIP, MACE or CELLI; CELLI's charge equilibration is
        solved across the devices by :mod:`celli_scale.distributed.qeq`, its halo also
        holds the electrostatics' real-space cut-off, and the outputs include charges
        and the electrostatic energy).
      devices: number of devices (the mesh is then chosen per structure to make bricks
        as cubic as possible). Default 1.
      mesh: a ``jax.sharding.Mesh`` of 1 to 3 axes; its axes cut frame axes 0, 1, 2.
      mesh_shape: bricks per axis, e.g. ``(2, 2, 2)`` (1 to 3 numbers), on the first
        devices JAX lists.
      chunks: sub-bricks per device, evaluated one after another.
      skin: extra halo and pair-list width (Å); a decomposition is reused while atoms
        move less than half of it.
      capacities: starting array sizes (``{"owned", "nodes", "edges", "cut_edges", "stages"}``);
        they grow when a decomposition needs more.
      capacity_growth: head-room factor when a capacity grows.
      progress: show a progress bar while cutting space.

    Example:
      >>> sp = ShardedPotential(pot, devices=4, chunks=2)   # doctest: +SKIP
      >>> out = sp(system); out.energy, out.forces, sp.stats.summary()
    """

    def __init__(
        self,
        pot: Potential,
        *,
        devices: int | None = None,
        mesh: Mesh | None = None,
        mesh_shape: Any = None,
        chunks: int = 1,
        skin: float = domains.SKIN,
        capacities: dict[str, Any] | None = None,
        capacity_growth: float = 1.2,
        progress: bool = False,
    ) -> None:
        if not isinstance(pot, Potential):
            raise ValueError(f"ShardedPotential needs a Potential, got {type(pot).__name__}")
        if sum(x is not None for x in (devices, mesh, mesh_shape)) > 1:
            raise ValueError("give one of devices=, mesh= or mesh_shape=")
        if isinstance(chunks, bool) or not isinstance(chunks, int | np.integer) or chunks < 1:
            raise ValueError(f"chunks must be a positive integer, got {chunks!r}")
        if not (isinstance(skin, int | float) and math.isfinite(skin) and skin >= 0):
            raise ValueError(f"skin must be a finite number of Å ≥ 0, got {skin!r}")
        if not (
            isinstance(capacity_growth, int | float)
            and math.isfinite(capacity_growth)
            and capacity_growth >= 1
        ):
            raise ValueError(f"capacity_growth must be a number ≥ 1, got {capacity_growth!r}")
        self.pot = pot
        self.chunks = int(chunks)
        self.skin = float(skin)
        self.capacity_growth = float(capacity_growth)
        self.progress = bool(progress)
        self._fixed_shape: tuple[int, int, int] | None = None
        self._n_devices = 1
        if mesh is not None:
            if not isinstance(mesh, Mesh) or mesh.devices.ndim > 3:
                raise ValueError("mesh must be a jax.sharding.Mesh with 1 to 3 axes")
            self._fixed_shape = halo.mesh_shape(mesh.devices.shape)
            self._device_list = list(mesh.devices.flat)
            self._n_devices = len(self._device_list)
        else:
            if mesh_shape is not None:
                self._fixed_shape = halo.mesh_shape(mesh_shape)
                self._n_devices = int(np.prod(self._fixed_shape))
            elif devices is not None:
                if isinstance(devices, bool) or not isinstance(devices, int | np.integer):
                    raise ValueError(f"devices must be a positive integer, got {devices!r}")
                if devices < 1:
                    raise ValueError(f"devices must be a positive integer, got {devices!r}")
                self._n_devices = int(devices)
            self._device_list = halo.mesh_devices(self._n_devices)
        cfg = pot.config
        self.halo = cfg.receptive_field + self.skin
        self.reach = cfg.receptive_field - cfg.r_cut
        self._caps: dict[str, Any] = dict(capacities or {})
        self._plan: domains.Decomposition | None = None
        self._arrays: Any = None
        self._key: tuple | None = None
        self._system: System | None = None
        self._fns: dict[tuple, Any] = {}
        self._meshes: dict[tuple[int, int, int], Mesh] = {}
        self._shard_of: np.ndarray | None = None
        self.stats: ShardStats | None = None
        self._n_decomp = 0
        self._n_growth = 0
        self._params_key: tuple | None = None
        self._params_dev: Any = None
        # CELLI: electrostatics, the owned pair list, warm starts of both Qeq solves
        self._elec: Any = None
        self._warm: tuple[np.ndarray, np.ndarray] | None = None
        self._elec_cap = 0

    # -- delegation ---------------------------------------------------------------------
    @property
    def config(self):
        return self.pot.config

    @property
    def params(self):
        return self.pot.params

    @property
    def model(self):
        return self.pot.model

    @property
    def is_charge_model(self) -> bool:
        return self.pot.is_charge_model

    @property
    def decomposition(self) -> domains.Decomposition | None:
        """The decomposition in use (None before the first call)."""
        return self._plan

    # -- decomposition ------------------------------------------------------------------
    def decompose(self, system: System) -> domains.Decomposition:
        """Cut ``system``'s space again (atoms migrate to the bricks they are in now)."""
        if not isinstance(system, System):
            raise ValueError(f"expected a System, got {type(system).__name__}")
        self.pot.species_index(system.species)  # unknown species: a clear error first
        if not np.all(np.isfinite(np.asarray(system.positions, dtype=float))):
            raise ValueError("positions contain NaN or inf")
        shape = self._fixed_shape or domains.mesh_for(
            self._n_devices, domains.frame_of(system).spacing
        )
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=3, desc="decomposing", unit="phase", leave=False)

        def tick(name: str) -> None:
            if bar is not None:
                bar.set_postfix_str(name)
                bar.update(1)

        before = dict(self._caps)
        halo_width, sub_halo, elec = self.halo, None, None
        if self.is_charge_model:
            elec = self._electrostatics(system)
            halo_width = max(self.config.receptive_field, elec["r_cut"]) + self.skin
            sub_halo = self.config.receptive_field + self.skin
        plan = domains.decompose(
            system,
            shape,
            halo=halo_width,
            sub_halo=sub_halo,
            reach=self.reach,
            r_cut=self.config.r_cut,
            skin=self.skin,
            chunks=self.chunks,
            species_map=self.pot.species_index,
            capacities=self._caps,
            growth=self.capacity_growth,
            progress=tick,
        )
        if bar is not None:
            bar.close()
        self._n_decomp += 1
        caps = plan.capacities
        if _grew(before, caps):
            self._n_growth += 1
        self._caps = caps
        shard_of = np.full(system.n_atoms, -1)
        for s in range(plan.n_shards):
            ids = plan.owned_ids[s]
            shard_of[ids[ids >= 0]] = s
        if np.any(shard_of < 0):  # a dropped atom would be a bug in decompose
            raise RuntimeError(f"decomposition lost atoms {np.flatnonzero(shard_of < 0)[:5]}")
        migrated = 0
        if self._shard_of is not None and self._shard_of.shape == shard_of.shape:
            migrated = int(np.sum(self._shard_of != shard_of))
        self._shard_of = shard_of
        self._plan = plan
        self._system = system
        self._raw = np.asarray(system.positions, dtype=float).copy()
        self._key = structure_key(system)
        if elec is not None:
            self._elec = self._elec_plan(system, plan, elec)
        self._arrays = self._device_arrays(plan)
        owned, ghosts = plan.n_owned(), plan.n_ghost()
        self.stats = ShardStats(
            mesh_shape=plan.mesh_shape,
            chunk_shape=plan.chunk_shape,
            halo=plan.halo,
            owned=owned,
            ghosts=ghosts,
            edges=plan.edge_mask.sum(axis=(1, 2)),
            owned_max_over_mean=float(owned.max() / max(owned.mean(), 1e-300)),
            ghosts_per_owned=float(ghosts.sum() / max(owned.sum(), 1)),
            bytes_per_exchange=halo.bytes_per_exchange(
                plan, itemsize=np.dtype(self.config.dtype).itemsize
            ),
            stages=len(plan.stages),
            decompositions=self._n_decomp,
            capacity_growths=self._n_growth,
            migrated=migrated,
            capacities=caps,
        )
        if elec is not None:
            self.stats.capacities = dict(caps, elec_pairs=self._elec_cap)
            self.stats.capacity_growths = self._n_growth
            self.stats.qeq_method = self._elec["layout"].method
            self.stats.qeq_bytes_per_iteration = dq.bytes_per_iteration(
                self._elec["layout"], plan, np.dtype(self.config.dtype).itemsize
            )
        return plan

    # -- CELLI: the distributed charge equilibration -------------------------------------
    def _electrostatics(self, system: System) -> dict[str, Any]:
        """Electrostatics parameters of ``system`` as single-device CELLI prepares them
        (for the widths of the current parameters, :meth:`Potential.sigma_bound`);
        ``elec_method="auto"`` picks Ewald or PME for the device count
        (:func:`celli_scale.distributed.qeq.choose_method`)."""
        cfg = self.config
        if any(system.pbc) and not all(system.pbc):
            raise NotImplementedError(
                f"CELLI electrostatics for partly periodic systems (pbc={tuple(system.pbc)}) "
                "is not implemented; use a fully periodic cell with vacuum or an open system"
            )
        bound = self.pot.sigma_bound()
        self._sigma = float(cfg.elec_sigma_max) if bound is None else bound
        sigma = np.full(system.n_atoms, self._sigma)
        method = cfg.elec_method
        if method == "auto":
            method = dq.choose_method(system, self._n_devices, cfg.elec_accuracy, sigma)
        params = dq.prepare(system, method, cfg.elec_accuracy, sigma)
        return {"params": params, "r_cut": float(params.r_cut) if params.periodic else 0.0}

    def _elec_plan(self, system: System, plan: domains.Decomposition, elec: dict) -> dict:
        params = elec["params"]
        cell = None if system.cell is None else np.asarray(system.cell, float)
        n_sh = plan.n_shards
        if params.periodic:
            old = self._elec_cap
            pairs = domains.owned_pairs(
                plan, cell, elec["r_cut"] + self.skin, old, self.capacity_growth
            )
            self._elec_cap = pairs.capacity
            if 0 < old < pairs.capacity:
                self._n_growth += 1
            pair_arrays = (pairs.centers, pairs.others, pairs.mask)
        else:
            pair_arrays = (np.zeros((n_sh, 1), np.int32),) * 2 + (np.zeros((n_sh, 1), bool),)
        ids = plan.buffer_ids
        species = self.pot.species_index(np.asarray(system.species))
        buf_species = np.where(ids >= 0, species[np.maximum(ids, 0)], 0).astype(np.int32)
        layout = dq.Layout(
            method=params.method, n_own=int(plan.owned_ids.shape[1]),
            n_buffer=int(ids.shape[1]), specs=halo.stage_specs(plan.stages), n_groups=1,
            n_shards=n_sh, alpha=float(params.alpha), r_cut=elec["r_cut"],
            grid=tuple(params.grid), order=int(params.order), gaussian=True,
            n_k=int(params.kvecs.shape[0]),
        )  # fmt: skip
        mesh = self._mesh(plan.mesh_shape)
        return {
            "params": _put(params, NamedSharding(mesh, P())),
            "layout": layout,
            "host": {
                "pairs": pair_arrays,
                "buf_species": buf_species,
                "own_mask": plan.owned_ids >= 0,
            },
        }

    def _mesh(self, shape: tuple[int, int, int]) -> Mesh:
        """The 3-D device mesh of ``shape`` (built once per shape: every call uses it)."""
        if shape not in self._meshes:
            devs = np.asarray(self._device_list, dtype=object).reshape(shape)
            self._meshes[shape] = Mesh(devs, halo.MESH_AXES)
        return self._meshes[shape]

    def _device_arrays(self, plan: domains.Decomposition) -> Any:
        sharding = NamedSharding(self._mesh(plan.mesh_shape), P(halo.MESH_AXES))
        send_idx, send_mask, wrap = halo.stage_arrays(plan.stages)
        host = {
            "send_idx": send_idx,
            "send_mask": send_mask,
            "wrap": wrap,
            "sub": (
                plan.sub_idx,
                plan.sub_mask,
                plan.sub_owned,
                plan.sub_species,
                plan.senders,
                plan.receivers,
                plan.edge_mask,
            ),
        }
        if self._elec is not None:
            host.update(self._elec["host"])
        return _put(host, sharding)

    # -- evaluation ---------------------------------------------------------------------
    def _needs_decomposition(self, system: System) -> tuple[bool, np.ndarray | None]:
        """Whether ``system`` needs a new decomposition; else its owned positions."""
        if self._plan is None:
            return True, None
        if structure_key(system) != self._key:
            return True, None
        if self.is_charge_model and (self.pot.sigma_bound() or 0.0) > self._sigma:
            return True, None  # the parameters widened: a longer real-space cut-off
        disp = np.asarray(system.positions, dtype=float) - self._raw
        pbc = np.asarray(system.pbc, dtype=bool)
        if pbc.any():
            cell = np.asarray(system.cell, dtype=float)
            full = cellmod.complete_cell(cell, pbc)
            d = np.linalg.solve(full.T, disp.T).T
            d = np.where(pbc, d - np.round(d), d)
            disp = d @ full
        if not np.all(np.isfinite(disp)):
            raise ValueError("positions contain NaN or inf")
        if np.max(np.linalg.norm(disp, axis=1), initial=0.0) > 0.5 * self.skin:
            return True, None
        return False, self._plan.positions + disp

    def update(self, positions: Any) -> PotentialOutput:
        """Evaluate the last structure at new ``positions`` (Å, ``(N, 3)``), reusing its
        decomposition while every atom moved less than half the skin."""
        if self._system is None:
            raise ValueError("update() needs a first call sp(system)")
        return self(self._system.replace(positions=np.asarray(positions, dtype=float)))

    def __call__(self, system: System) -> PotentialOutput:
        if self.params is None:
            raise ValueError("Potential has no parameters")
        if not isinstance(system, System):
            raise ValueError(f"ShardedPotential evaluates one System, got {type(system).__name__}")
        redo, pos = self._needs_decomposition(system)
        if redo:
            self.decompose(system)
            pos = self._plan.positions
        else:
            self._system = system
        plan = self._plan
        dtype = self.config.jnp_dtype
        own = np.zeros((*plan.owned_ids.shape, 3))
        ok = plan.owned_ids >= 0
        own[ok] = pos[plan.owned_ids[ok]]
        mesh = self._mesh(plan.mesh_shape)
        own = _put(jnp.asarray(own, dtype), NamedSharding(mesh, P(halo.MESH_AXES)))
        cell = np.zeros((3, 3)) if system.cell is None else np.asarray(system.cell, float)
        pbc = np.asarray(system.pbc, dtype=bool)
        cell = np.where(pbc[:, None], cell, 0.0)  # open axes never shift an image
        cell_j = jnp.asarray(cell, dtype)
        extra: dict[str, Any] = {}
        while True:
            fn = self._function(plan)
            params = self._replicated_params(mesh)
            if self.is_charge_model:
                warm = self._warm_start(system.n_atoms, plan, dtype, mesh)
                q_tot = jnp.asarray(float(system.total_charge), dtype)
                out = fn(params, cell_j, own, self._arrays, q_tot, *warm)
                forces, node_e, energy, virial, n_max, extra = out
            else:
                forces, node_e, energy, virial, n_max = fn(params, cell_j, own, self._arrays)
            need = int(to_host(n_max))
            if need <= plan.cut_capacity:
                break
            # more pairs within r_cut than the compacted list holds (atoms moved closer):
            # grow it and evaluate again, never a missing pair
            plan.cut_capacity = min(
                max(int(math.ceil(need * self.capacity_growth)), need), plan.senders.shape[2]
            )
            self._caps = plan.capacities
            self._n_growth += 1
            self.stats.capacity_growths = self._n_growth
            self.stats.capacities = self._caps
        # device -> host: gathered from every process when the mesh spans several (a
        # collective: every process reads the same arrays in the same order)
        forces = to_host(forces)
        node_e = to_host(node_e)
        energy = to_host(energy)
        virial = to_host(virial)
        extra = {k: to_host(v) for k, v in extra.items()}
        n = system.n_atoms
        f_out = np.zeros((n, 3), forces.dtype)
        e_out = np.zeros(n, node_e.dtype)
        f_out[plan.owned_ids[ok]] = forces[ok]
        e_out[plan.owned_ids[ok]] = node_e[ok]
        charges = elec_energy = dipole = None
        if self.is_charge_model:
            charges, elec_energy = self._check_qeq(extra, plan, n)
            if not pbc.any():  # Σ q_i R_i, as the single-device CELLI reports it
                pos = np.asarray(system.positions, dtype=float)
                dipole = jnp.asarray(np.asarray(charges, dtype=float) @ pos, dtype)
        stress = None
        if pbc.all():
            vol = abs(np.linalg.det(cell))
            if vol > 0:
                v = np.asarray(virial)
                stress = jnp.asarray(0.5 * (v + v.T) / vol, dtype)
        return PotentialOutput(
            energy=jnp.asarray(energy),
            forces=jnp.asarray(f_out),
            stress=stress,
            node_energies=jnp.asarray(e_out),
            charges=charges,
            elec_energy=elec_energy,
            dipole=dipole,
        )

    def _warm_start(self, n: int, plan: domains.Decomposition, dtype, mesh) -> tuple:
        """Owned-slot seeds of both Qeq solves: the last call's charges and adjoint (by atom,
        so they survive migration); zeros on the first call (the cold start)."""
        q, mu = self._warm if self._warm is not None and self._warm[0].shape == (n,) else (
            np.zeros(n), np.zeros(n)
        )  # fmt: skip
        ok = plan.owned_ids >= 0
        out = []
        for v in (q, mu):
            a = np.zeros(plan.owned_ids.shape)
            a[ok] = v[plan.owned_ids[ok]]
            out.append(_put(jnp.asarray(a, dtype), NamedSharding(mesh, P(halo.MESH_AXES))))
        return tuple(out)

    def _check_qeq(self, extra: dict, plan: domains.Decomposition, n: int):
        """Host check of both distributed solves (as :func:`celli_scale.qeq.check`),
        then the charges in the system's order; keeps them as the next warm start."""
        from celli_scale.qeq import QeqConvergenceError, check_residual

        ok = plan.owned_ids >= 0
        its = (int(extra["iterations"]), int(extra["adj_iterations"]))
        self.stats.qeq_iterations = its
        self.stats.qeq_residuals = (float(extra["residual"]), float(extra["adj_residual"]))
        if bool(extra["indefinite"]) or bool(extra["adj_indefinite"]):
            raise ValueError(
                "CELLI's Qeq matrix is not positive definite on the charge-conservation "
                "surface (atoms too close together, or unphysical hardness/widths)"
            )
        tol = self.pot.qeq_tol
        check_residual(extra["residual"], tol, where=" (distributed, charges)")
        # the adjoint (forces' response) counts as converged at tol or at the precision
        # floor of its right-hand side (float32 reaches ~1e-4 relative there)
        if not bool(extra["adj_converged"]):
            raise QeqConvergenceError(
                "distributed Qeq adjoint solve (forces) did not converge: relative residual "
                f"{float(extra['adj_residual']):.3g} after {its[1]} iterations (raise the Qeq "
                "maxiter, loosen qeq_tol, or check the structure for atoms too close together)"
            )
        q_sh, mu_sh = np.asarray(extra["q"]), np.asarray(extra["mu"])  # host (to_host)
        q, mu = np.zeros(n, q_sh.dtype), np.zeros(n, mu_sh.dtype)
        q[plan.owned_ids[ok]] = q_sh[ok]
        mu[plan.owned_ids[ok]] = mu_sh[ok]
        self._warm = (q, mu)
        return jnp.asarray(q), jnp.asarray(extra["elec_energy"])

    def _replicated_params(self, mesh: Mesh) -> Any:
        """The parameters on every device of ``mesh`` (a loaded potential's live on one
        device; jit refuses to mix them with arrays on the others). Cached per params object."""
        key = (id(self.params), mesh.devices.shape)
        if self._params_key != key:
            self._params_dev = _put(self.params, NamedSharding(mesh, P()))
            self._params_key = key
        return self._params_dev

    def _function(self, plan: domains.Decomposition):
        specs = halo.stage_specs(plan.stages)
        c_own = int(plan.owned_ids.shape[1])
        n_buf = int(plan.buffer_ids.shape[1])
        cut = plan.cut_capacity
        key = (plan.mesh_shape, specs, c_own, n_buf, plan.sub_idx.shape, plan.senders.shape, cut)
        if self._elec is not None:
            layout = self._elec["layout"]
            key = (*key, layout, self._elec_cap)
            if key not in self._fns:
                self._fns[key] = self._build_celli(
                    plan.mesh_shape, specs, c_own, n_buf, cut, layout
                )
            return self._fns[key]
        if key not in self._fns:
            self._fns[key] = self._build(plan.mesh_shape, specs, c_own, n_buf, cut)
        return self._fns[key]

    def _sub_graph(self, x, sub, cut_cap: int):
        """A sub-brick's graph: its (r_cut + skin) list compacted on the device to the
        pairs within r_cut, so the skin costs no model work (more pairs than ``cut_cap``:
        ``count`` reports it and the host answers with a larger capacity)."""
        rc2 = float(self.config.r_cut) ** 2
        dtype = self.config.jnp_dtype
        _, nmask, _, species, snd, rcv, emask = sub
        vec = x[rcv] - x[snd]
        within = emask & (jnp.sum(vec * vec, axis=-1) < rc2)
        count = jnp.sum(within, dtype=jnp.int32)
        sel = jnp.nonzero(within, size=cut_cap, fill_value=0)[0]
        graph = Graph(
            positions=x,
            species=species,
            node_mask=nmask,
            cell=jnp.zeros((3, 3), dtype),
            total_charge=jnp.zeros((), dtype),
            senders=snd[sel],
            receivers=rcv[sel],
            shifts=jnp.zeros((cut_cap, 3), dtype),
            edge_mask=jnp.arange(cut_cap) < count,
        )
        return graph, count

    def _build(self, mesh_shape, specs, c_own: int, n_buf: int, cut_cap: int):
        model = self.model
        dtype = self.config.jnp_dtype

        def chunk_energy(params, x, sub):
            owned = sub[2]
            graph, count = self._sub_graph(x, sub, cut_cap)
            out = model.apply(params, graph)
            energy = jnp.sum(jnp.where(owned, out.node_energies, 0.0))
            return energy, (out.node_energies, count)

        def shard_fn(params, cell, own, arrays):
            own = own[0]
            arrays = jax.tree_util.tree_map(lambda a: a[0], arrays)
            buf = halo.forward(own, n_buf, specs, arrays["send_idx"], arrays["wrap"], cell)

            def body(carry, sub):
                gbuf, e_sum, vir, node_e, n_max = carry
                idx, nmask, owned = sub[0], sub[1], sub[2]
                x = buf[idx]
                (e, (ne, count)), g = jax.value_and_grad(chunk_energy, argnums=1, has_aux=True)(
                    params, x, sub
                )
                g = jnp.where(nmask[:, None], g, 0.0)
                gbuf = gbuf.at[idx].add(g)
                vir = vir + jnp.where(nmask[:, None], x, 0.0).T @ g
                node_e = node_e.at[jnp.where(owned, idx, c_own)].add(ne, mode="drop")
                return (gbuf, e_sum + e, vir, node_e, jnp.maximum(n_max, count)), None

            init = (
                jnp.zeros((n_buf, 3), dtype),
                jnp.zeros((), dtype),
                jnp.zeros((3, 3), dtype),
                jnp.zeros((c_own,), dtype),
                jnp.zeros((), jnp.int32),
            )
            (gbuf, energy, virial, node_e, n_max), _ = jax.lax.scan(body, init, arrays["sub"])
            grad = halo.reverse(gbuf, c_own, specs, arrays["send_idx"], arrays["send_mask"])
            energy = jax.lax.psum(energy, halo.MESH_AXES)
            virial = jax.lax.psum(virial, halo.MESH_AXES)
            n_max = jax.lax.pmax(n_max, halo.MESH_AXES)
            return -grad[None], node_e[None], energy, virial, n_max

        spec = P(halo.MESH_AXES)
        fn = jax.shard_map(
            shard_fn,
            mesh=self._mesh(mesh_shape),
            in_specs=(P(), P(), spec, spec),
            out_specs=(spec, spec, P(), P(), P()),
            # the models' flax internals carry values not marked as varying over the mesh
            check_vma=False,
        )
        return jax.jit(fn)

    def _build_celli(self, mesh_shape, specs, c_own: int, n_buf: int, cut_cap: int, layout):
        """CELLI over the shards: χ from the layers before the Qeq layer (pass A), the
        distributed Qeq, the local energy with halo-exchanged charges (pass B: its
        gradients w.r.t. positions and charges), the distributed adjoint solve for the
        charges' response, the χ path of the forces (pass C) and the electrostatic terms
        (:func:`celli_scale.distributed.qeq.shard_bilinear_grads`). Nothing is
        differentiated through a collective or a CG iteration."""
        from celli_scale.models.celli import species_qeq_parameters

        model = self.model
        cfg = self.config
        dtype = cfg.jnp_dtype
        tol = float(self.pot.qeq_tol)
        maxiter = cfg.qeq_maxiter or max(100, 2 * c_own * layout.n_shards)
        sub_graph = self._sub_graph

        def scatter_owned(vals, idx, owned, values):
            return vals.at[jnp.where(owned, idx, c_own)].add(values, mode="drop")

        def shard_fn(params, eparams, cell, own, arrays, q_tot, q0, mu0):
            a = jax.tree_util.tree_map(lambda v: v[0], arrays)
            own, q0, mu0 = own[0], q0[0], mu0[0]
            send_idx, send_mask = a["send_idx"], a["send_mask"]
            x_buf = halo.forward(own, n_buf, specs, send_idx, a["wrap"], cell)
            subs = a["sub"]

            # pass A: electronegativities of the owned atoms
            def chi_body(chi, sub):
                idx, owned = sub[0], sub[2]
                graph, count = sub_graph(x_buf[idx], sub, cut_cap)
                out = model.apply(params, graph, chi_only=True)
                return scatter_owned(chi, idx, owned, out.chi), count

            chi, counts = jax.lax.scan(chi_body, jnp.zeros((c_own,), dtype), subs)
            hard_z, sigma_z = species_qeq_parameters(params, cfg)
            sp = a["buf_species"]
            sigma_buf = sigma_z[sp]
            hard = hard_z[sp[:c_own]]
            mask = a["own_mask"]
            gid = jnp.zeros((c_own,), jnp.int32)
            geom = dq.shard_setup(layout, eparams, cell, x_buf, sigma_buf, mask, gid, a["pairs"])
            sol = dq.shard_cg(
                layout, geom, send_idx, hard, -chi, q_tot[None], q0=q0, tol=tol, maxiter=maxiter
            )
            q = sol.x
            phi_el, _ = dq.shard_matvec(layout, geom, send_idx, q)
            e_el = 0.5 * jax.lax.psum(jnp.dot(q, phi_el), halo.MESH_AXES)
            q_buf = halo.forward(q, n_buf, specs, send_idx)

            # pass B: local energy with the charges given; its gradients
            def local_energy(x, qs, sub):
                graph, count = sub_graph(x, sub, cut_cap)
                out = model.apply(params, graph, charges=qs)
                return jnp.sum(jnp.where(sub[2], out.node_energies, 0.0)), (
                    out.node_energies,
                    count,
                )

            def b_body(carry, sub):
                gx, gq, vir, node_e, e_sum, n_max = carry
                idx, nmask, owned = sub[0], sub[1], sub[2]
                x = x_buf[idx]
                (e, (ne, count)), (g, h) = jax.value_and_grad(
                    local_energy, argnums=(0, 1), has_aux=True
                )(x, q_buf[idx], sub)
                g = jnp.where(nmask[:, None], g, 0.0)
                gx = gx.at[idx].add(g)
                gq = gq.at[idx].add(jnp.where(nmask, h, 0.0))
                vir = vir + jnp.where(nmask[:, None], x, 0.0).T @ g
                node_e = scatter_owned(node_e, idx, owned, ne)
                return (gx, gq, vir, node_e, e_sum + e, jnp.maximum(n_max, count)), None

            init = (
                jnp.zeros((n_buf, 3), dtype),
                jnp.zeros((n_buf,), dtype),
                jnp.zeros((3, 3), dtype),
                jnp.zeros((c_own,), dtype),
                jnp.zeros((), dtype),
                jnp.max(counts),
            )
            (gx, gq, vir, node_e, e_loc, n_max), _ = jax.lax.scan(b_body, init, subs)

            # the charges' response: adjoint solve with dE/dq (local + electrostatic)
            dedq = halo.reverse(gq, c_own, specs, send_idx, send_mask) + phi_el
            adj = dq.shard_cg(
                layout, geom, send_idx, hard, dedq, jnp.zeros((1,), dtype), q0=mu0, tol=tol,
                maxiter=maxiter,
            )  # fmt: skip
            mu = adj.x
            mu_buf = jnp.zeros((n_buf,), dtype).at[:c_own].set(mu)

            # pass C: dE/dχ = −μ through the layers before the Qeq layer
            def chi_term(x, sub):
                idx, owned = sub[0], sub[2]
                graph, _ = sub_graph(x, sub, cut_cap)
                out = model.apply(params, graph, chi_only=True)
                return -jnp.sum(jnp.where(owned, mu_buf[idx] * out.chi, 0.0))

            def c_body(carry, sub):
                gx, vir = carry
                idx, nmask = sub[0], sub[1]
                x = x_buf[idx]
                g = jnp.where(nmask[:, None], jax.grad(chi_term)(x, sub), 0.0)
                return (gx.at[idx].add(g), vir + jnp.where(nmask[:, None], x, 0.0).T @ g), None

            (gx, vir), _ = jax.lax.scan(c_body, (gx, vir), subs)

            # electrostatics: E_el = ½ qᵀA q at fixed q, and −μᵀ (∂A/∂x) q
            g_buf, g_own, vir_el, w_cell = dq.shard_bilinear_grads(
                layout, eparams, cell, x_buf, sigma_buf, mask, a["pairs"], 0.5 * q - mu, q, q_buf
            )
            grad = halo.reverse(gx + g_buf, c_own, specs, send_idx, send_mask) + g_own
            axes = halo.MESH_AXES
            energy = jax.lax.psum(e_loc, axes) + e_el
            virial = jax.lax.psum(vir + vir_el, axes) + w_cell
            n_max = jax.lax.pmax(n_max, axes)
            extra = {
                "q": q[None], "mu": mu[None], "elec_energy": e_el,
                "iterations": sol.iterations, "residual": sol.residual,
                "converged": sol.converged, "indefinite": sol.indefinite,
                "adj_iterations": adj.iterations, "adj_residual": adj.residual,
                "adj_converged": adj.converged, "adj_indefinite": adj.indefinite,
            }  # fmt: skip
            return -grad[None], node_e[None], energy, virial, n_max, extra

        spec = P(halo.MESH_AXES)
        extra_specs = {
            k: (spec if k in ("q", "mu") else P())
            for k in (
                "q", "mu", "elec_energy", "iterations", "residual", "converged", "indefinite",
                "adj_iterations", "adj_residual", "adj_converged", "adj_indefinite",
            )
        }  # fmt: skip
        fn = jax.jit(
            jax.shard_map(
                shard_fn,
                mesh=self._mesh(mesh_shape),
                in_specs=(P(), P(), P(), spec, spec, P(), spec, spec),
                out_specs=(spec, spec, P(), P(), P(), extra_specs),
                check_vma=False,
            )
        )

        def call(params, cell, own, arrays, q_tot, q0, mu0):
            return fn(params, self._elec["params"], cell, own, arrays, q_tot, q0, mu0)

        return call


__all__ = ["ShardStats", "ShardedPotential"]
