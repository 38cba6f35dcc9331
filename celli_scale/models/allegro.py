"""Allegro: a strictly local, edge-based equivariant potential.

Musaelian et al., "Learning local equivariant representations for large-scale atomistic
dynamics", Nat. Commun. 14, 579 (2023).

Every quantity lives on a directed edge ``i -> j`` (``i`` = centre = ``graph.senders``):

* two-body latent ``x_ij = MLP([emb(Z_i), emb(Z_j), B(r_ij)]) · u(r_ij)``;
* equivariant edge features ``V_ij[l, c] = w_lc(x_ij) Y_l(r̂_ij)`` (``channels`` copies of
  every ``l = 0..l_max``);
* each layer builds the environment of the centre,
  ``Γ_i = Σ_k w(x_ik) ⊙ Y(r̂_ik) / sqrt(avg_num_neighbors)``, takes the channel-wise tensor
  product ``V_ij ⊗ Γ_i`` (all Clebsch–Gordan paths with ``l_out ≤ l_max``), mixes the paths
  and channels linearly into the new ``V_ij``, and feeds the scalar (``l_out = 0``) outputs
  with ``x_ij`` through the latent MLP: ``x_ij ← (x_ij + α·MLP([x_ij, s_ij])·u) / sqrt(1+α²)``;
* ``E_ij = MLP(x_ij) · u(r_ij)``, ``E_i = scale_Z · Σ_j E_ij + shift_Z``.

Edges are never messages: ``E_i`` depends only on atoms within ``r_cut`` of ``i``, so the
halo of a domain shard is one cut-off wide whatever ``n_layers`` is.

Parity: ``parity=True`` keeps the O(3) features that spherical harmonics span (irrep
``l`` with parity ``(-1)^l``; paths with ``l1 + l2 + l_out`` even — Allegro's
"o3_restricted"); ``parity=False`` is SO(3) and keeps every path.

Implementation notes (speed): inside the model the equivariant features are a list of
``(l_max+1)²`` contiguous ``(E, C)`` arrays, one per component of e3nn's real
spherical-harmonic basis ("component" normalisation); there is no ``(E, D, C)`` array to
slice, pad or concatenate, which on the XLA CPU backend made the backward pass dominate
(one full-size ``pad`` per tensor-product term). The channel-wise tensor product is
unrolled over the non-zero Clebsch–Gordan coefficients (83 for ``l_max = 2``), and the
path/channel mixing of each output component is one ``(E, paths·C) @ (paths·C, C)``
matmul with e3nn's path normalisation, i.e. exactly what ``e3nn.flax.Linear`` would
compute on the same irreps. Scalar constants are Python floats so that a float32 model
stays float32 (NumPy float64 scalars are not weakly typed and would promote).

The building blocks (:class:`TwoBodyEmbedding`, :class:`AllegroLayer`,
:class:`EdgeEnergyReadout`, :func:`atomic_energies`) are shared with CELLI
(:mod:`celli_scale.models.celli`), which inserts a charge-equilibration layer between them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import e3nn_jax as e3nn
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from celli_scale.models.config import ModelConfig
from celli_scale.models.layers import (
    MLP,
    EdgeInputs,
    Graph,
    ModelOutput,
    PerSpeciesScaleShift,
    SpeciesEmbedding,
    cast_graph,
    edge_inputs,
    scatter_sum,
)

# --------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------
#: Values of :attr:`AllegroConfig.tp_mixing`.
TP_MIXING = ("channels", "path_channel", "path")


@dataclass(frozen=True)
class AllegroConfig(ModelConfig):
    """Allegro hyper-parameters (shared keys: see :class:`ModelConfig`).

    Attributes:
      latent_dim: width of the scalar edge latent ``x_ij``.
      species_embed_dim: width of the learnt species embedding fed to the two-body MLP.
      two_body_mlp: hidden widths of the two-body MLP (output ``latent_dim``); ``None``
        uses the shared ``radial_mlp`` widths.
      latent_mlp: hidden widths of each layer's latent MLP (output ``latent_dim``).
      env_embed_mlp: hidden widths of the MLP that maps ``x_ik`` to the environment
        weights (one per channel and ``l``); ``()`` is a linear map, as in Allegro.
      edge_eng_mlp: hidden widths of the edge-energy MLP (output 1).
      residual_coeff: ``α`` of the latent residual update
        ``x ← (x + α·Δx) / sqrt(1 + α²)``.
      tp_mixing: how a layer turns the tensor-product paths into the new features of each
        ``l_out``. ``"channels"`` (default; what model files written before this option
        hold): one learnt ``(paths·C, C)`` matrix per ``l_out`` mixes paths and channels
        (e3nn's ``Linear`` on the path outputs; ``O(paths·C²)`` per edge).
        ``"path_channel"``: a weight per path and channel, no channel mixing
        (nequip-allegro's ``tp_path_channel_coupling=True``); ``"path"``: one weight per
        path shared by all channels (its default). Both are ``O(paths·C)`` per edge.
      channels (shared): multiplicity of every equivariant edge feature ``l = 0..l_max``.
      parity (shared): True = O(3) features with parity ``(-1)^l``; False = SO(3).
    """

    name: str = "allegro"
    latent_dim: int = 64
    species_embed_dim: int = 16
    two_body_mlp: tuple[int, ...] | None = None
    latent_mlp: tuple[int, ...] = (64,)
    env_embed_mlp: tuple[int, ...] = ()
    edge_eng_mlp: tuple[int, ...] = (32,)
    residual_coeff: float = 1.0
    tp_mixing: str = "channels"

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("latent_dim", "species_embed_dim"):
            v = getattr(self, key)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"config {key} must be a positive integer, got {v!r}")
        for key in ("two_body_mlp", "latent_mlp", "env_embed_mlp", "edge_eng_mlp"):
            v = getattr(self, key)
            if v is None:
                continue
            try:
                widths = tuple(int(x) for x in v)
            except TypeError as err:
                raise ValueError(f"config {key} must be a list of widths, got {v!r}") from err
            if any(w < 1 for w in widths):
                raise ValueError(f"config {key} widths must be positive, got {widths}")
            object.__setattr__(self, key, widths)
        if self.tp_mixing not in TP_MIXING:
            raise ValueError(f"config tp_mixing must be one of {TP_MIXING}, got {self.tp_mixing!r}")
        if not self.residual_coeff >= 0:
            raise ValueError(f"config residual_coeff must be >= 0, got {self.residual_coeff}")

    @property
    def two_body_hidden(self) -> tuple[int, ...]:
        return self.radial_mlp if self.two_body_mlp is None else self.two_body_mlp


# --------------------------------------------------------------------------------------
# channel-wise tensor product on plain arrays
# --------------------------------------------------------------------------------------
class TPPlan(NamedTuple):
    """Static description of the channel-wise tensor product ``V ⊗ Γ`` (host constants).

    paths: ``(l1, l2, l_out)`` in output order; slot ``k`` of the output belongs to one path.
    terms: for each output slot ``k``, the non-zero ``(d1, d2, coefficient)`` triples.
    by_l: for each ``l_out``, the indices of its paths (in ``paths``).
    path_slot: first output slot of every path.
    """

    l_max: int
    paths: tuple[tuple[int, int, int], ...]
    terms: tuple[tuple[tuple[int, int, float], ...], ...]
    by_l: tuple[tuple[int, ...], ...]
    path_slot: tuple[int, ...]


@functools.cache
def tp_plan(l_max: int, parity: bool) -> TPPlan:
    """Clebsch–Gordan paths of ``(l ≤ l_max) ⊗ (l ≤ l_max) -> (l ≤ l_max)``.

    Coefficients are e3nn's real CG times ``sqrt(2 l_out + 1)`` ("component"
    normalisation: unit-variance inputs give unit-variance outputs).
    """
    off = [l * l for l in range(l_max + 2)]
    paths, terms, slots = [], [], []
    k = 0
    for l1 in range(l_max + 1):
        for l2 in range(l_max + 1):
            for l3 in range(abs(l1 - l2), min(l1 + l2, l_max) + 1):
                if parity and (l1 + l2 + l3) % 2:
                    continue  # pseudo-tensor output: not an irrep of the features
                cg = np.asarray(e3nn.clebsch_gordan(l1, l2, l3)) * np.sqrt(2 * l3 + 1)
                paths.append((l1, l2, l3))
                slots.append(k)
                for m3 in range(2 * l3 + 1):
                    nz = np.argwhere(np.abs(cg[:, :, m3]) > 1e-12)
                    terms.append(
                        tuple(
                            (off[l1] + int(a), off[l2] + int(b), float(cg[a, b, m3])) for a, b in nz
                        )
                    )
                k += 2 * l3 + 1
    by_l = tuple(
        tuple(p for p, (_, _, l3) in enumerate(paths) if l3 == l) for l in range(l_max + 1)
    )
    return TPPlan(l_max, tuple(paths), tuple(terms), by_l, tuple(slots))


def _components(x: jax.Array) -> list[jax.Array]:
    """``(E, D, C)`` → ``D`` arrays ``(E, C)``.

    One ``split`` (its transpose is a single ``concatenate``), instead of a slice per use
    (whose transposes are full-size ``pad``s that XLA sums one by one: the backward pass of
    the unrolled tensor product used to be dominated by them).
    """
    return [a.reshape(a.shape[0], a.shape[2]) for a in jnp.split(x, x.shape[1], axis=1)]


def _tp_slots(vs: list[jax.Array], gs: list[jax.Array], plan: TPPlan) -> list[jax.Array]:
    """The output slots of :func:`channelwise_tp` as a list of ``(E, C)`` arrays."""
    out = []
    for terms in plan.terms:
        acc = None
        for d1, d2, c in terms:
            t = c * (vs[d1] * gs[d2])
            acc = t if acc is None else acc + t
        out.append(acc)
    return out


def channelwise_tp(v: jax.Array, g: jax.Array, plan: TPPlan) -> jax.Array:
    """All CG paths of ``v ⊗ g``, channel by channel.

    Args:
      v, g: ``(E, (l_max+1)², C)`` features in e3nn's real basis.
    Returns:
      ``(E, K, C)``, the outputs of ``plan.paths`` concatenated (``K = Σ (2 l_out + 1)``).
    """
    return jnp.stack(_tp_slots(_components(v), _components(g), plan), axis=1)


def _scalar_slots(vs: list[jax.Array], gs: list[jax.Array], l_max: int) -> list[jax.Array]:
    """The invariant paths ``(l, l) -> 0`` as a list of ``l_max + 1`` arrays ``(E, C)``."""
    out = []
    for l in range(l_max + 1):
        acc = None
        for d in range(l * l, (l + 1) ** 2):
            t = vs[d] * gs[d]
            acc = t if acc is None else acc + t
        out.append(acc / float(np.sqrt(2 * l + 1)))
    return out


def scalar_tp(v: jax.Array, g: jax.Array, l_max: int) -> jax.Array:
    """Only the invariant paths ``(l, l) -> 0`` of :func:`channelwise_tp`: ``(E, l_max+1, C)``.

    ``CG(l, l, 0) = δ_mn / sqrt(2l+1)``, so each is a per-channel dot product.
    """
    return jnp.stack(_scalar_slots(_components(v), _components(g), l_max), axis=1)


def _sh_components(sh: e3nn.IrrepsArray) -> list[jax.Array]:
    """Spherical harmonics ``(E, (l_max+1)²)`` → ``(l_max+1)²`` arrays ``(E, 1)``."""
    return _components(sh.array[:, :, None])


def _l_index(l_max: int) -> np.ndarray:
    """``(l_max+1)²`` → the ``l`` of every component."""
    return np.concatenate([np.full(2 * l + 1, l) for l in range(l_max + 1)])


# --------------------------------------------------------------------------------------
# building blocks (shared with CELLI)
# --------------------------------------------------------------------------------------
class TwoBodyEmbedding(nn.Module):
    """Initial edge latent ``x_ij`` ``(E, latent_dim)`` and features ``V_ij``.

    ``V_ij`` is a list of ``(l_max+1)²`` arrays ``(E, C)``, one per component.
    """

    config: AllegroConfig

    @nn.compact
    def __call__(
        self, species: jax.Array, senders: jax.Array, receivers: jax.Array, edges: EdgeInputs
    ) -> tuple[jax.Array, list[jax.Array]]:
        cfg = self.config
        dt = cfg.jnp_dtype
        emb = SpeciesEmbedding(cfg.n_species, cfg.species_embed_dim, dtype=dt, name="species")(
            species
        )
        h = jnp.concatenate([emb[senders], emb[receivers], edges.basis], axis=-1)
        x = MLP((*cfg.two_body_hidden, cfg.latent_dim), dtype=dt, name="two_body_mlp")(h)
        x = x * edges.cut[:, None]
        n_l = cfg.l_max + 1
        w = nn.Dense(
            n_l * cfg.channels,
            use_bias=False,
            dtype=dt,
            param_dtype=dt,
            kernel_init=nn.initializers.variance_scaling(1.0, "fan_in", "normal"),
            name="sh_weights",
        )(x)
        c = cfg.channels
        sh = _sh_components(edges.sh)
        v = [w[:, l * c : (l + 1) * c] * sh[d] for d, l in enumerate(_l_index(cfg.l_max))]
        return x, v


class AllegroLayer(nn.Module):
    """One Allegro layer: environment embedding, tensor product, latent update.

    With ``scalars_only`` (the last layer) only the invariant tensor-product paths are
    computed and no new ``V`` is returned.
    """

    config: AllegroConfig
    scalars_only: bool = False

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        v: list[jax.Array],
        senders: jax.Array,
        n_nodes: int,
        edges: EdgeInputs,
    ) -> tuple[jax.Array, list[jax.Array] | None]:
        cfg = self.config
        dt = cfg.jnp_dtype
        n_l, c = cfg.l_max + 1, cfg.channels

        # environment of the centre atom: Γ_i = Σ_k w(x_ik) Y(r̂_ik) / sqrt(<n>)
        w = MLP((*cfg.env_embed_mlp, n_l * c), last_bias=False, dtype=dt, name="env_embed")(x)
        w = w * edges.cut[:, None]
        sh = _sh_components(edges.sh)
        norm = jnp.sqrt(jnp.asarray(cfg.avg_num_neighbors, dt))
        gs = []
        for d, l in enumerate(_l_index(cfg.l_max)):
            gamma = scatter_sum(w[:, l * c : (l + 1) * c] * sh[d], senders, n_nodes)
            gs.append((gamma / norm)[senders])

        if self.scalars_only:
            scalars = jnp.concatenate(_scalar_slots(v, gs, cfg.l_max), axis=-1)
            v_new = None
        else:
            plan = tp_plan(cfg.l_max, cfg.parity)
            slots = _tp_slots(v, gs, plan)
            v_new = []
            scalars = jnp.concatenate([slots[plan.path_slot[p]] for p in plan.by_l[0]], axis=-1)
            for l, ps in enumerate(plan.by_l):
                if cfg.tp_mixing == "channels":
                    wl = self.param(
                        f"linear_l{l}", nn.initializers.normal(1.0), (len(ps), c, c), dt
                    ).reshape(len(ps) * c, c)
                    for m in range(2 * l + 1):
                        # (E, paths·C) @ (paths·C, C): path/channel mixing of component m
                        row = jnp.concatenate([slots[plan.path_slot[p] + m] for p in ps], axis=-1)
                        v_new.append((row @ wl) / float(np.sqrt(len(ps) * c)))
                else:
                    shape = (len(ps), c) if cfg.tp_mixing == "path_channel" else (len(ps), 1)
                    wl = self.param(f"path_weights_l{l}", nn.initializers.normal(1.0), shape, dt)
                    wl = wl / float(np.sqrt(len(ps)))
                    for m in range(2 * l + 1):
                        # Σ_p w_p(c) · slot_p(m): each channel keeps to itself
                        acc = None
                        for k, p in enumerate(ps):
                            t = wl[k] * slots[plan.path_slot[p] + m]
                            acc = t if acc is None else acc + t
                        v_new.append(acc)

        h = jnp.concatenate([x, scalars], axis=-1)
        dx = MLP((*cfg.latent_mlp, cfg.latent_dim), dtype=dt, name="latent_mlp")(h)
        a = cfg.residual_coeff
        x_new = (x + a * dx * edges.cut[:, None]) / float(np.sqrt(1.0 + a * a))
        return x_new, v_new


class EdgeEnergyReadout(nn.Module):
    """Edge energies ``E_ij = MLP(x_ij) · u(r_ij)`` summed onto the centre: ``(N,)``."""

    config: AllegroConfig

    @nn.compact
    def __call__(
        self, x: jax.Array, senders: jax.Array, n_nodes: int, edges: EdgeInputs
    ) -> jax.Array:
        cfg = self.config
        e = MLP((*cfg.edge_eng_mlp, 1), dtype=cfg.jnp_dtype, name="edge_eng_mlp")(x)[:, 0]
        return scatter_sum(e * edges.cut, senders, n_nodes)


# --------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------
def atomic_energies(
    cfg: AllegroConfig, x: jax.Array, graph: Graph, n: int, edges: EdgeInputs
) -> jax.Array:
    """Edge-energy readout summed onto centre atoms, then per-species scale and shift (eV).

    Call from inside a compact ``__call__``: the submodules ("readout", "scale_shift") bind
    to the calling model, so Allegro and CELLI share this code and parameter layout.
    """
    e = EdgeEnergyReadout(cfg, name="readout")(x, graph.senders, n, edges)
    return PerSpeciesScaleShift(
        cfg.n_species,
        cfg.energy_scale,
        cfg.energy_shift,
        dtype=cfg.jnp_dtype,
        name="scale_shift",
    )(e, graph.species, graph.node_mask)


class Allegro(nn.Module):
    """Strictly local Allegro potential; ``apply(params, graph) -> ModelOutput`` (eV).

    Differentiable w.r.t. positions and cell (forces/stress by autodiff in the caller).
    """

    config: AllegroConfig

    @nn.compact
    def __call__(self, graph: Graph) -> ModelOutput:
        cfg = self.config
        graph = cast_graph(graph, cfg.jnp_dtype)
        n = graph.n_nodes
        edges = edge_inputs(graph, cfg)
        x, v = TwoBodyEmbedding(cfg, name="two_body")(
            graph.species, graph.senders, graph.receivers, edges
        )
        for k in range(cfg.n_layers):
            last = k == cfg.n_layers - 1
            x, v = AllegroLayer(cfg, scalars_only=last, name=f"layer_{k}")(
                x, v, graph.senders, n, edges
            )
        node_e = atomic_energies(cfg, x, graph, n, edges)
        return ModelOutput(energy=jnp.sum(node_e), node_energies=node_e)


__all__ = [
    "Allegro",
    "AllegroConfig",
    "AllegroLayer",
    "EdgeEnergyReadout",
    "TwoBodyEmbedding",
    "atomic_energies",
    "channelwise_tp",
    "scalar_tp",
    "tp_plan",
]
