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

This module plans it on the host: :func:`decompose` cuts space into bricks over a device
mesh, lists each brick's ghosts, the staged exchange that brings them
(:mod:`celli_scale.distributed.halo` runs it with ``ppermute``) and the sub-bricks'
pairs; :mod:`celli_scale.distributed.sharded` evaluates the model on it. Lengths in Å.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.spatial import cKDTree

from celli_scale import cell as cellmod
from celli_scale.system import System

#: Extra width for atoms that move between rebuilds (Å), as in a neighbour-list skin.
SKIN = 0.5


# ---------------------------------------------------------------------------------------
# Domain decomposition over a device mesh (host side). The device side is
# :mod:`celli_scale.distributed.halo` (the exchange) and :mod:`.sharded` (the model).
# Written by hand: no library decomposes an atomistic system for jax.sharding (jax-md's
# partition builds neighbour lists, not domains; LAMMPS' comm_brick is the model here).
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    """The parallelepiped space is cut in: ``x = origin + f @ matrix`` with fractional
    ``f`` in ``[0, 1)³`` for every atom. Periodic axes use the cell's rows; open axes span
    the atoms' extent (+ ``margin``) along the cell's completed row (or Cartesian axes).

    Attributes:
      origin: ``(3,)`` Å. matrix: ``(3, 3)`` rows, Å. periodic: per axis.
      spacing: ``(3,)`` distance between opposite faces (Å).
    """

    origin: np.ndarray
    matrix: np.ndarray
    periodic: tuple[bool, bool, bool]

    @property
    def spacing(self) -> np.ndarray:
        return cellmod.plane_heights(self.matrix)

    def frac(self, positions: np.ndarray) -> np.ndarray:
        return np.linalg.solve(self.matrix.T, (np.asarray(positions) - self.origin).T).T


def frame_of(system: System, margin: float = 1.0) -> Frame:
    """The :class:`Frame` of ``system`` (positions wrapped along periodic axes first)."""
    pbc = np.asarray(system.pbc, dtype=bool)
    cell = np.eye(3) if system.cell is None else np.asarray(system.cell, dtype=float)
    matrix = cellmod.complete_cell(cell, pbc) if pbc.any() else np.eye(3)
    origin = np.zeros(3)
    pos = np.asarray(system.positions, dtype=float)
    if not pbc.all():
        f = np.linalg.solve(matrix.T, pos.T).T
        heights = cellmod.plane_heights(matrix)
        for k in np.flatnonzero(~pbc):
            pad = margin / heights[k]
            lo, hi = f[:, k].min() - pad, f[:, k].max() + pad
            origin = origin + lo * matrix[k]
            matrix[k] = matrix[k] * (hi - lo)
    return Frame(origin, matrix, tuple(bool(p) for p in pbc))


def mesh_for(n_devices: int, spacing: np.ndarray) -> tuple[int, int, int]:
    """Split ``n_devices`` over three axes so that the bricks are as cubic as possible:
    each prime factor (largest first) goes to the axis whose bricks are widest."""
    shape = [1, 1, 1]
    n, p, factors = int(n_devices), 2, []
    while n > 1:
        while n % p == 0:
            factors.append(p)
            n //= p
        p += 1
    for p in sorted(factors, reverse=True):
        k = int(np.argmax(np.asarray(spacing) / np.asarray(shape)))
        shape[k] *= p
    return tuple(shape)  # type: ignore[return-value]


@dataclass
class Stage:
    """One ``ppermute`` of the forward halo exchange: every shard sends entries of its
    buffer to its neighbour one step along mesh ``axis`` in ``direction`` (±1); received
    entries land in the block ``[offset, offset + capacity)`` of the receiver's buffer and
    are shifted by ``wrap × cell[axis]`` (±1 where the step crosses the periodic boundary).

    Attributes:
      send_idx: ``(S, capacity)`` buffer indices each shard sends (padding: 0).
      send_mask: ``(S, capacity)`` True for real entries. wrap: ``(S,)`` per receiver.
    """

    axis: int
    direction: int
    hop: int
    capacity: int
    offset: int
    perm: tuple[tuple[int, int], ...]
    send_idx: np.ndarray
    send_mask: np.ndarray
    wrap: np.ndarray


@dataclass
class Decomposition:
    """A system cut into ``prod(mesh_shape)`` bricks (shards, row-major over the mesh),
    each with owned atoms, ghosts and the sub-bricks (``chunks``) it is evaluated in.

    Buffers (per shard, fixed capacity): entries ``[0, n_owned_cap)`` are the owned atoms,
    then one block per :class:`Stage`. Sub-brick arrays index into the buffer.

    Attributes:
      frame, mesh_shape, halo (Å, skin included), reach (Å, edge centres needed outside a
        sub-brick, skin excluded), skin, r_cut, chunk_shape (sub-bricks per brick per axis).
      owned_ids: ``(S, C)`` atom index of each owned slot (-1: padding).
      buffer_ids: ``(S, B)`` atom index of every buffer entry (-1: empty);
        buffer_shift: ``(S, B, 3)`` its periodic image (in cell rows).
      stages: the forward exchange, in order.
      sub_idx, sub_mask, sub_owned: ``(S, K, n)`` sub-brick nodes (buffer indices), real
        nodes, nodes owned by the sub-brick. sub_species: ``(S, K, n)`` atomic numbers.
      senders, receivers, edge_mask: ``(S, K, E)`` pairs within ``r_cut + skin`` centred on
        the sub-brick's owned atoms (and, for message passing, on nodes within ``reach``).
      positions: ``(N, 3)`` wrapped reference positions the plan was built for (Å).
      offsets: ``(N, 3)`` integer cells subtracted when wrapping.
      cut_capacity: edges a sub-brick evaluates: its pairs within ``r_cut`` itself
        (+ head-room), compacted on the device from the ``r_cut + skin`` list, so the skin
        costs no model work; more pairs than this while atoms move is an overflow the
        caller answers with a larger capacity.
    """

    frame: Frame
    mesh_shape: tuple[int, int, int]
    halo: float
    reach: float
    skin: float
    r_cut: float
    chunk_shape: tuple[int, int, int]
    owned_ids: np.ndarray
    buffer_ids: np.ndarray
    buffer_shift: np.ndarray
    stages: list[Stage]
    sub_idx: np.ndarray
    sub_mask: np.ndarray
    sub_owned: np.ndarray
    sub_species: np.ndarray
    senders: np.ndarray
    receivers: np.ndarray
    edge_mask: np.ndarray
    positions: np.ndarray
    offsets: np.ndarray
    cut_capacity: int

    @property
    def n_shards(self) -> int:
        return int(np.prod(self.mesh_shape))

    @property
    def capacities(self) -> dict[str, Any]:
        """Array sizes (the compiled program's shapes): owned, per-stage, sub-brick nodes
        and edges."""
        return {
            "owned": int(self.owned_ids.shape[1]),
            "stages": tuple(s.capacity for s in self.stages),
            "nodes": int(self.sub_idx.shape[2]),
            "edges": int(self.senders.shape[2]),
            "cut_edges": int(self.cut_capacity),
        }

    def n_owned(self) -> np.ndarray:
        return (self.owned_ids >= 0).sum(axis=1)

    def n_ghost(self) -> np.ndarray:
        return (self.buffer_ids >= 0).sum(axis=1) - self.n_owned()

    def ghost_images(self, shard: int) -> set[tuple[int, int, int, int]]:
        """``{(atom, sx, sy, sz)}`` of the shard's ghosts (for checks against brute force)."""
        ids = self.buffer_ids[shard]
        c = self.owned_ids.shape[1]
        sel = np.flatnonzero(ids >= 0)
        sel = sel[sel >= c]
        return {(int(ids[i]), *map(int, self.buffer_shift[shard, i])) for i in sel}


def _grow(need: int, have: int, growth: float) -> int:
    """A capacity for ``need`` entries: ``have`` if it holds them, else ``need × growth``
    plus 8 (small blocks, e.g. a second hop's, fluctuate by a few atoms), and at least
    1.5 × ``have`` when growing an existing one, so an MD run recompiles O(log) times."""
    need = max(int(need), 1)
    if have >= need:
        return have
    new = int(math.ceil(need * growth)) + 8
    return max(new, int(math.ceil(1.5 * have)) if have > 0 else 0)


def _interval_hits(u: np.ndarray, h: float, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Sub-brick indices ``j`` (of ``k`` unit-wide ones) whose interval expanded by ``h``
    contains ``u``: ``j − h ≤ u < j + 1 + h``, as ``[lo, hi]`` per entry (clipped)."""
    lo = np.maximum(np.floor(u - 1.0 - h).astype(np.int64) + 1, 0)
    hi = np.minimum(np.floor(u + h).astype(np.int64), k - 1)
    return lo, hi


def _expanded_membership(
    u: np.ndarray, h: np.ndarray, shape: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs ``(entry, sub_brick)`` with entry ``u`` (``(m, 3)``, in sub-brick units) in
    the sub-brick's box expanded by ``h`` (per axis, same units); sub-bricks row-major."""
    los, his = [], []
    for a in range(3):
        lo, hi = _interval_hits(u[:, a], h[a], shape[a])
        los.append(lo)
        his.append(hi)
    span = [int(max((hi - lo).max(initial=-1) + 1, 0)) for lo, hi in zip(los, his, strict=True)]
    ent, sub = [], []
    for o in np.ndindex(*span):
        j = [los[a] + o[a] for a in range(3)]
        ok = (j[0] <= his[0]) & (j[1] <= his[1]) & (j[2] <= his[2])
        idx = np.flatnonzero(ok)
        ent.append(idx)
        sub.append((j[0][idx] * shape[1] + j[1][idx]) * shape[2] + j[2][idx])
    if not ent:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(ent), np.concatenate(sub)


def decompose(
    system: System,
    mesh_shape: tuple[int, int, int],
    *,
    halo: float,
    reach: float,
    r_cut: float,
    skin: float = SKIN,
    chunks: int = 1,
    species_map: Any = None,
    capacities: dict[str, Any] | None = None,
    growth: float = 1.2,
    progress: Any = None,
    sub_halo: float | None = None,
) -> Decomposition:
    """Cut ``system`` into bricks over ``mesh_shape`` (mesh axis ``k`` cuts frame axis
    ``k``) and plan the halo exchange and the sub-bricks.

    Ghosts of a brick are all periodic images of atoms whose fractional coordinates lie in
    the brick expanded by ``halo / spacing`` per axis (LAMMPS' definition for triclinic
    cells: a superset of the atoms within ``halo`` Å). They arrive axis by axis, with as
    many hops as the halo spans bricks (domains narrower than the halo); ghosts received
    along one axis are forwarded along the next, so corners need no diagonal messages.

    Args:
      system: a concrete structure (Å).
      mesh_shape: bricks per frame axis.
      halo: ghost width (Å; receptive field + skin). reach: how far outside a sub-brick
        edge centres are needed (Å, without skin: ``receptive_field − r_cut``; 0 for
        strictly local models, whose only centres are the owned atoms; otherwise the
        skin is added). r_cut: model cut-off (Å); pairs are listed within ``r_cut + skin``.
      chunks: sub-bricks per brick (evaluated one after another on the device).
      species_map: callable atomic numbers → values stored in ``sub_species`` (default:
        atomic numbers).
      capacities: sizes to pad to at least (a previous plan's :attr:`Decomposition.capacities`);
        a need beyond one grows it by ``growth`` (the caller sees the new sizes).
      progress: optional callable ``progress(step_name)`` called per phase.
      sub_halo: ghost width of the sub-bricks the model is evaluated on (Å, skin
        included; default ``halo``). CELLI's halo also holds the electrostatics' real-space
        cut-off, wider than the model needs: its sub-bricks take only ``sub_halo``.

    Raises:
      ValueError: a bad mesh shape or chunk count, or a periodic axis split into bricks
        narrower than ``r_cut`` where the cut-off spans more than the whole mesh.
    """
    tick = progress or (lambda _name: None)
    mesh_shape = tuple(int(m) for m in mesh_shape)  # type: ignore[assignment]
    if len(mesh_shape) != 3 or min(mesh_shape) < 1:
        raise ValueError(f"mesh_shape must be 3 positive integers, got {mesh_shape}")
    if isinstance(chunks, bool) or not isinstance(chunks, int | np.integer) or chunks < 1:
        raise ValueError(f"chunks must be a positive integer, got {chunks!r}")
    caps = dict(capacities or {})
    frame = frame_of(system)
    pbc = np.asarray(frame.periodic)
    raw = np.asarray(system.positions, dtype=float)
    if pbc.any():
        pos, offsets = cellmod.wrap(raw, np.asarray(system.cell, dtype=float), pbc)
    else:
        pos, offsets = raw.copy(), np.zeros(raw.shape, dtype=int)
    f = frame.frac(pos)
    f = np.where(pbc, np.clip(f, 0.0, np.nextafter(1.0, 0.0)), f)
    n_mesh = np.asarray(mesh_shape)
    brick = np.clip(np.floor(f * n_mesh).astype(np.int64), 0, n_mesh - 1)
    shard_of = (brick[:, 0] * n_mesh[1] + brick[:, 1]) * n_mesh[2] + brick[:, 2]
    n_shards = int(np.prod(n_mesh))
    coords = np.stack(np.unravel_index(np.arange(n_shards), mesh_shape), axis=1)
    hfrac = halo / frame.spacing
    cell_rows = frame.matrix

    tick("owned atoms")
    owned = [np.flatnonzero(shard_of == s) for s in range(n_shards)]
    c_own = _grow(max(len(o) for o in owned), caps.get("owned", 0), growth)
    # per shard: buffer entries as (atom id, image shift, unwrapped fractional coords)
    ids = [list([o]) for o in owned]
    shift = [[np.zeros((len(o), 3), np.int64)] for o in owned]
    frac = [[f[o]] for o in owned]
    where = [[np.arange(len(o))] for o in owned]  # buffer index of each block's entries
    n_buf = c_own
    stages: list[Stage] = []
    old_stage_caps = list(caps.get("stages", ()))

    tick("halo exchange plan")
    for axis in range(3):
        n = int(n_mesh[axis])
        h = float(hfrac[axis])
        if pbc[axis]:
            hops = int(math.ceil(h * n - 1e-12))
        else:
            hops = min(int(math.ceil(h * n - 1e-12)), n - 1)
        core = [
            (
                np.concatenate(ids[s]),
                np.concatenate(shift[s]),
                np.concatenate(frac[s]),
                np.concatenate(where[s]),
            )
            for s in range(n_shards)
        ]
        for direction in (1, -1):
            prev = core
            for hop in range(1, hops + 1):
                sends, recv = {}, {}
                perm = []
                for s in range(n_shards):
                    c = coords[s].copy()
                    t = c[axis] + direction
                    w = 0
                    if t < 0 or t >= n:
                        if not pbc[axis]:
                            continue
                        w = -direction
                        t %= n
                    c[axis] = t
                    r = int(np.ravel_multi_index(tuple(c), mesh_shape))
                    pid, psh, pf, pw = prev[s]
                    fa = pf[:, axis] + w
                    if direction > 0:
                        sel = fa >= t / n - h
                    else:
                        sel = fa < (t + 1) / n + h
                    sel = np.flatnonzero(sel)
                    sends[s] = (r, pw[sel], w)
                    nsh = psh[sel].copy()
                    nsh[:, axis] += w
                    nf = pf[sel].copy()
                    nf[:, axis] += w
                    recv[r] = (pid[sel], nsh, nf)
                    if (coords[s][axis], t) not in perm:
                        perm.append((int(coords[s][axis]), int(t)))
                need = max([len(v[1]) for v in sends.values()] + [0])
                i_stage = len(stages)
                old = old_stage_caps[i_stage] if i_stage < len(old_stage_caps) else 0
                cap = _grow(need, old, growth)
                send_idx = np.zeros((n_shards, cap), np.int32)
                send_mask = np.zeros((n_shards, cap), bool)
                wrap = np.zeros(n_shards, np.int32)
                nxt = []
                for s in range(n_shards):
                    if s in sends:
                        r, idx, w = sends[s]
                        send_idx[s, : len(idx)] = idx
                        send_mask[s, : len(idx)] = True
                        wrap[r] = w
                for s in range(n_shards):
                    if s in recv:
                        rid, rsh, rf = recv[s]
                    else:
                        rid = np.zeros(0, np.int64)
                        rsh = np.zeros((0, 3), np.int64)
                        rf = np.zeros((0, 3))
                    rw = n_buf + np.arange(len(rid))
                    ids[s].append(rid)
                    shift[s].append(rsh)
                    frac[s].append(rf)
                    where[s].append(rw)
                    nxt.append((rid, rsh, rf, rw))
                stages.append(
                    Stage(axis, direction, hop, cap, n_buf, tuple(perm), send_idx, send_mask, wrap)
                )
                n_buf += cap
                prev = nxt

    buffer_ids = np.full((n_shards, n_buf), -1, np.int64)
    buffer_shift = np.zeros((n_shards, n_buf, 3), np.int64)
    buffer_frac = np.zeros((n_shards, n_buf, 3))
    for s in range(n_shards):
        w = np.concatenate(where[s])
        buffer_ids[s, w] = np.concatenate(ids[s])
        buffer_shift[s, w] = np.concatenate(shift[s])
        buffer_frac[s, w] = np.concatenate(frac[s])
    owned_ids = np.full((n_shards, c_own), -1, np.int64)
    for s in range(n_shards):
        owned_ids[s, : len(owned[s])] = owned[s]

    tick("sub-bricks and pairs")
    widths = frame.spacing / n_mesh
    chunk_shape = mesh_for(int(chunks), widths)
    k_arr = np.asarray(chunk_shape)
    n_sub = int(np.prod(k_arr))
    zmap = species_map or (lambda z: z)
    species = np.asarray(system.species)
    per_sub: list[list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]] = []
    h_sub = hfrac if sub_halo is None else min(float(sub_halo), halo) / frame.spacing
    h_sub = h_sub * n_mesh * k_arr
    reach_sub = ((reach + skin) / frame.spacing) * n_mesh * k_arr
    list_cut = float(r_cut) + float(skin)
    max_nodes = max_edges = max_cut = 1
    for s in range(n_shards):
        valid = np.flatnonzero(buffer_ids[s] >= 0)
        u = (buffer_frac[s, valid] - coords[s] / n_mesh) * n_mesh * k_arr
        ent, sub = _expanded_membership(u, h_sub, chunk_shape)
        order = np.lexsort((ent, sub))
        ent, sub = ent[order], sub[order]
        bounds = np.searchsorted(sub, np.arange(n_sub + 1))
        own_sub = np.full(len(valid), -1)
        n_o = int((valid < c_own).sum())
        uo = np.clip(np.floor(u[:n_o]).astype(np.int64), 0, k_arr - 1)
        own_sub[:n_o] = (uo[:, 0] * k_arr[1] + uo[:, 1]) * k_arr[2] + uo[:, 2]
        rows = []
        for j in range(n_sub):
            e = ent[bounds[j] : bounds[j + 1]]
            bidx = valid[e]
            is_own = own_sub[e] == j
            x = pos[buffer_ids[s, bidx]] + buffer_shift[s, bidx] @ np.where(
                pbc[:, None], cell_rows, 0.0
            )
            if reach > 0:
                # message passing: also centres within reach (+ skin) of the sub-brick
                jc = np.asarray(np.unravel_index(j, chunk_shape))
                ue = u[e]
                centre = is_own | np.all((ue >= jc - reach_sub) & (ue < jc + 1 + reach_sub), axis=1)
            else:
                centre = is_own
            snd, rcv, _, dist = cellmod.host_pairs(x, None, False, list_cut)
            keep = centre[snd]
            snd, rcv = snd[keep], rcv[keep]
            max_cut = max(max_cut, int(np.sum(dist[keep] < float(r_cut))))
            rows.append((bidx, is_own, snd, rcv))
            max_nodes = max(max_nodes, len(bidx))
            max_edges = max(max_edges, len(snd))
        per_sub.append(rows)
    n_cap = _grow(max_nodes, caps.get("nodes", 0), growth)
    e_cap = _grow(max_edges, caps.get("edges", 0), growth)
    # pairs within r_cut itself: the device compacts the (r_cut + skin) list to these
    cut_cap = min(_grow(max_cut, caps.get("cut_edges", 0), growth), e_cap)
    shape = (n_shards, n_sub)
    sub_idx = np.zeros((*shape, n_cap), np.int32)
    sub_mask = np.zeros((*shape, n_cap), bool)
    sub_owned = np.zeros((*shape, n_cap), bool)
    sub_species = np.zeros((*shape, n_cap), np.int32)
    senders = np.zeros((*shape, e_cap), np.int32)
    receivers = np.zeros((*shape, e_cap), np.int32)
    edge_mask = np.zeros((*shape, e_cap), bool)
    z0 = zmap(species[:1])[0]
    for s in range(n_shards):
        for j, (bidx, is_own, snd, rcv) in enumerate(per_sub[s]):
            m, e = len(bidx), len(snd)
            sub_idx[s, j, :m] = bidx
            sub_mask[s, j, :m] = True
            sub_owned[s, j, :m] = is_own
            sub_species[s, j, :] = z0
            sub_species[s, j, :m] = zmap(species[buffer_ids[s, bidx]])
            senders[s, j, :e] = snd
            receivers[s, j, :e] = rcv
            edge_mask[s, j, :e] = True
    return Decomposition(
        frame, mesh_shape, float(halo), float(reach), float(skin), float(r_cut), chunk_shape,
        owned_ids, buffer_ids, buffer_shift, stages, sub_idx, sub_mask, sub_owned,
        sub_species, senders, receivers, edge_mask, pos, offsets, cut_capacity=cut_cap,
    )  # fmt: skip


@dataclass
class OwnedPairs:
    """Per shard, every ordered pair ``(i, j)`` of an owned atom ``i`` and a buffer entry
    ``j`` (owned or ghost image) closer than ``cutoff``: the real-space part of the
    distributed electrostatics. Arrays ``(S, E)``: ``centers`` index the owned slots,
    ``others`` the buffer; ``mask`` marks real pairs."""

    cutoff: float
    centers: np.ndarray
    others: np.ndarray
    mask: np.ndarray

    @property
    def capacity(self) -> int:
        return int(self.centers.shape[1])


def owned_pairs(
    plan: Decomposition, cell: np.ndarray | None, cutoff: float, capacity: int = 0,
    growth: float = 1.2,
) -> OwnedPairs:  # fmt: skip
    """:class:`OwnedPairs` within ``cutoff`` Å (``plan.halo`` must cover it), padded to
    at least ``capacity`` (grown by ``growth`` when more are needed)."""
    if cutoff > plan.halo * (1 + 1e-12):
        raise ValueError(f"pair cut-off {cutoff:.4g} Å exceeds the halo {plan.halo:.4g} Å")
    pbc = np.asarray(plan.frame.periodic)
    rows = np.where(pbc[:, None], np.zeros((3, 3)) if cell is None else np.asarray(cell), 0.0)
    c_own = plan.owned_ids.shape[1]
    found = []
    for s in range(plan.n_shards):
        valid = np.flatnonzero(plan.buffer_ids[s] >= 0)
        x = plan.positions[plan.buffer_ids[s, valid]] + plan.buffer_shift[s, valid] @ rows
        n_o = int(np.sum(valid < c_own))  # owned slots come first in the buffer
        # k-d trees of the owned atoms and of the whole buffer: only owned-centred pairs
        # are searched (the electrostatics cut-off is long; ghost-ghost pairs would be
        # most of an all-pairs search)
        sdm = cKDTree(x[:n_o]).sparse_distance_matrix(cKDTree(x), cutoff, output_type="ndarray")
        i, j = sdm["i"].astype(np.int64), sdm["j"].astype(np.int64)
        keep = (i != j) & (sdm["v"] < cutoff)
        i, j = i[keep], j[keep]
        order = np.argsort(i, kind="stable")  # centre-major: local reads in the matvec
        found.append((valid[i[order]], valid[j[order]]))
    cap = _grow(max(len(i) for i, _ in found), capacity, growth)
    centers = np.zeros((plan.n_shards, cap), np.int32)
    others = np.zeros((plan.n_shards, cap), np.int32)
    mask = np.zeros((plan.n_shards, cap), bool)
    for s, (i, j) in enumerate(found):
        centers[s, : len(i)], others[s, : len(j)], mask[s, : len(i)] = i, j, True
    return OwnedPairs(float(cutoff), centers, others, mask)


__all__ = [
    "SKIN",
    "OwnedPairs",
    "owned_pairs",
    "Decomposition",
    "Frame",
    "Stage",
    "decompose",
    "frame_of",
    "mesh_for",
]
