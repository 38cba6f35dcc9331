"""The graph every model consumes, and layers shared by all four models.

Sharing the radial basis, envelope, species embedding, MLPs and per-species energy
readout keeps the Allegro / CELLI / NequIP / MACE comparison fair: they differ only in
what makes them what they are (local edge tensor products, charge equilibration,
message passing, ACE products).

Everything here is a pure function of arrays or a small flax module that only holds
parameters; padded atoms/edges (``node_mask``/``edge_mask`` False) never change a result.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import e3nn_jax as e3nn
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class Graph:
    """One (padded) structure as seen by a model.

    Attributes:
      positions: ``(N, 3)`` Å.
      species: ``(N,)`` int32 *index* into the model's species list (0 on padding).
      node_mask: ``(N,)`` bool, True for real atoms.
      cell: ``(3, 3)`` lattice rows in Å (zeros for open systems).
      total_charge: ``()`` e.
      senders, receivers: ``(E,)`` int32 edge ``i -> j`` with ``i`` the centre atom.
      shifts: ``(E, 3)`` integer image shifts; ``r_ij = x[j] - x[i] + shifts @ cell``.
      edge_mask: ``(E,)`` bool.
      elec_params: electrostatics parameters (CELLI only, else None).
      elec_neighbors: real-space neighbor list for the electrostatics (CELLI, periodic).
      periodic: static flag.
    """

    positions: jax.Array
    species: jax.Array
    node_mask: jax.Array
    cell: jax.Array
    total_charge: jax.Array
    senders: jax.Array
    receivers: jax.Array
    shifts: jax.Array
    edge_mask: jax.Array
    elec_params: Any = None
    elec_neighbors: Any = None
    periodic: bool = struct.field(pytree_node=False, default=False)

    @property
    def n_nodes(self) -> int:
        return int(self.positions.shape[0])


def edge_geometry(graph: Graph) -> tuple[jax.Array, jax.Array]:
    """Edge vectors ``(E, 3)`` and safe lengths ``(E,)`` in Å.

    Padded edges get a dummy unit-length vector (the "double where" idiom) so that
    no NaN reaches a gradient; callers multiply their edge outputs by ``edge_mask``.
    """
    vec = graph.positions[graph.receivers] - graph.positions[graph.senders]
    vec = vec + graph.shifts.astype(vec.dtype) @ graph.cell
    dummy = jnp.asarray([1.0, 0.0, 0.0], dtype=vec.dtype)
    vec = jnp.where(graph.edge_mask[:, None], vec, dummy)
    r = jnp.sqrt(jnp.sum(vec**2, axis=-1))
    return vec, r


def radial_embedding(
    r: jax.Array, r_cut: float, n_radial: int, envelope_p: int = 6
) -> tuple[jax.Array, jax.Array]:
    """Bessel radial basis times a smooth polynomial envelope.

    Returns ``(basis (E, n_radial), envelope (E,))``; both vanish smoothly at ``r_cut``
    (the envelope and its first ``envelope_p - 1``... derivatives, as in NequIP/Allegro).
    """
    env = e3nn.poly_envelope(envelope_p - 1, 2, x_max=r_cut)(r)
    env = jnp.where(r < r_cut, env, 0.0)
    basis = e3nn.bessel(r, n_radial, x_max=r_cut)
    return basis * env[:, None], env


def edge_harmonics(vec: jax.Array, l_max: int, parity: bool = True) -> e3nn.IrrepsArray:
    """Spherical harmonics ``Y_l(r̂)``, ``l = 0..l_max`` (component normalisation)."""
    irreps = e3nn.Irreps.spherical_harmonics(l_max, p=-1 if parity else 1)
    return e3nn.spherical_harmonics(irreps, vec, normalize=True, normalization="component")


def scatter_sum(data: jax.Array, index: jax.Array, n: int) -> jax.Array:
    """Sum rows of ``data`` into ``n`` segments by ``index`` (masked rows must be zero)."""
    return jax.ops.segment_sum(data, index, num_segments=n)


def silu_normalized(x: jax.Array) -> jax.Array:
    """SiLU scaled to keep unit second moment for unit-normal input (as e3nn normalises)."""
    return jax.nn.silu(x) / 0.6791


class MLP(nn.Module):
    """Dense MLP on plain arrays; SiLU between layers, none after the last.

    ``features`` lists the output width of every layer. Weights are initialised for
    unit-variance activations; no bias on the last layer when ``last_bias`` is False.
    """

    features: Sequence[int]
    last_bias: bool = True
    dtype: Any = jnp.float64

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for k, f in enumerate(self.features):
            last = k == len(self.features) - 1
            x = nn.Dense(
                f,
                use_bias=(self.last_bias or not last),
                dtype=self.dtype,
                param_dtype=self.dtype,
                kernel_init=nn.initializers.variance_scaling(1.0, "fan_in", "normal"),
            )(x)
            if not last:
                x = silu_normalized(x)
        return x


class SpeciesEmbedding(nn.Module):
    """One learnt vector per species index."""

    n_species: int
    features: int
    dtype: Any = jnp.float64

    @nn.compact
    def __call__(self, species: jax.Array) -> jax.Array:
        return nn.Embed(
            self.n_species,
            self.features,
            dtype=self.dtype,
            param_dtype=self.dtype,
            embedding_init=nn.initializers.normal(1.0),
        )(species)


class PerSpeciesScaleShift(nn.Module):
    """Atomic energy ``E_i = scale_Z · e_i + shift_Z`` (eV), zero on padded atoms.

    ``scale`` and ``shift`` start from config values (e.g. fitted to a data set).
    """

    n_species: int
    scale: float = 1.0
    shift: float = 0.0
    dtype: Any = jnp.float64

    @nn.compact
    def __call__(self, e: jax.Array, species: jax.Array, node_mask: jax.Array) -> jax.Array:
        scale = self.param(
            "scale", lambda k, s: jnp.full(s, self.scale, self.dtype), (self.n_species,)
        )
        shift = self.param(
            "shift", lambda k, s: jnp.full(s, self.shift, self.dtype), (self.n_species,)
        )
        out = scale[species] * e + shift[species]
        return jnp.where(node_mask, out, 0.0)
