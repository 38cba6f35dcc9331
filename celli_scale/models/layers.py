"""The graph every model consumes, what every model returns, and layers shared by all four.

Sharing the edge inputs (radial basis × envelope, spherical harmonics), species
embedding, MLPs, per-species energy readout and the channel-wise edge convolution
(NequIP and MACE) keeps the Allegro / CELLI / NequIP / MACE comparison fair: they differ
only in what makes them what they are (local edge tensor products, charge equilibration,
message passing, ACE products).

Everything here is a pure function of arrays or a small flax module that only holds
parameters; padded atoms/edges (``node_mask``/``edge_mask`` False) never change a result.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import e3nn_jax as e3nn
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from celli_scale.models.config import ModelConfig


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
      charges_guess: ``(N,)`` e, a warm start for CELLI's CG Qeq solve (e.g. the previous
        call's charges; never differentiated, changes a result only within the solver
        tolerance), or None.
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
    charges_guess: Any = None
    periodic: bool = struct.field(pytree_node=False, default=False)

    @property
    def n_nodes(self) -> int:
        return int(self.positions.shape[0])


@struct.dataclass
class ModelOutput:
    """What a model returns for one (padded) graph.

    energy: ``()`` total energy (eV); node_energies: ``(N,)`` local atomic energies (eV,
    zero on padding); charges: ``(N,)`` atomic charges (e) for charge-aware models, else None;
    elec_energy: ``()`` electrostatic energy (eV) for CELLI, else None;
    qeq_residual: ``()`` relative residual of the charge-equilibration solve (CELLI), which
    the host checks against the tolerance (a solve cannot raise inside jit);
    qeq_iterations: ``()`` int32 CG iterations of that solve (0: dense solver; CELLI);
    chi: ``(N,)`` electronegativities (eV/e, CELLI), else None;
    dipole: ``(3,)`` ``Σ_i q_i R_i`` (e·Å) of an open system (CELLI), else None.
    """

    energy: jax.Array
    node_energies: jax.Array
    charges: jax.Array | None = None
    elec_energy: jax.Array | None = None
    qeq_residual: jax.Array | None = None
    qeq_iterations: jax.Array | None = None
    chi: jax.Array | None = None
    dipole: jax.Array | None = None


def cast_graph(graph: Graph, dtype: Any) -> Graph:
    """The graph with positions and cell in the model dtype (a differentiable cast)."""
    return graph.replace(positions=graph.positions.astype(dtype), cell=graph.cell.astype(dtype))


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


class EdgeInputs(NamedTuple):
    """What every model reads from a graph's edges, in the model dtype.

    basis: ``(E, n_radial)`` Bessel basis × envelope (zero on padded edges);
    cut: ``(E,)`` envelope × edge mask (every edge output is multiplied by it, so edges
    vanish smoothly at ``r_cut`` and padded edges contribute exactly nothing);
    sh: ``(E, (l_max+1)²)`` spherical harmonics ``Y_l(r̂)``, ``l = 0..l_max``;
    r: ``(E,)`` edge lengths (Å; 1 on padded edges).
    """

    basis: jax.Array
    cut: jax.Array
    sh: e3nn.IrrepsArray
    r: jax.Array


def edge_inputs(graph: Graph, config: ModelConfig) -> EdgeInputs:
    """Radial basis, cut-off weight and spherical harmonics of every edge of ``graph``.

    Positions and cell are cast to ``config``'s dtype first (a float32 model runs in
    float32). Differentiable w.r.t. positions and cell; padded edges never produce NaN.
    """
    dt = config.jnp_dtype
    vec, r = edge_geometry(cast_graph(graph, dt))
    basis, env = radial_embedding(r, config.r_cut, config.n_radial, config.envelope_p)
    cut = jnp.where(graph.edge_mask, env, 0.0).astype(dt)
    basis = jnp.where(graph.edge_mask[:, None], basis, 0.0).astype(dt)
    sh = edge_harmonics(vec, config.l_max, config.parity)
    sh = e3nn.IrrepsArray(sh.irreps, sh.array.astype(dt))
    return EdgeInputs(basis, cut, sh, r)


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


# --------------------------------------------------------------------------------------
# Channel-wise (uvu) edge convolution, shared by NequIP and MACE
# --------------------------------------------------------------------------------------


@functools.cache
def _conv_plan(irreps_in: str, irreps_y: str, keep: tuple[str, ...]):
    """Static plan of the channel-wise tensor product ``x (irreps_in) ⊗ Y (irreps_y)``.

    Returns ``(irreps_out, cg (D_in, D_y, K), path_of_column (K,), n_paths)``; output
    columns are grouped by irrep (sorted), so ``irreps_out`` needs no regrouping.
    Clebsch–Gordan coefficients use e3nn's "component" normalisation, as
    ``e3nn.tensor_product`` does.
    """
    ir_in, ir_y = e3nn.Irreps(irreps_in), e3nn.Irreps(irreps_y)
    keep_set = {e3nn.Irrep(k) for k in keep}
    if any(mul != 1 for mul, _ in ir_in) or any(mul != 1 for mul, _ in ir_y):
        raise ValueError("channel-wise tensor product expects multiplicity-1 irreps per channel")
    paths = []
    for (_, a), sa in zip(ir_in, ir_in.slices(), strict=True):
        for (_, b), sb in zip(ir_y, ir_y.slices(), strict=True):
            for c in a * b:
                if c in keep_set:
                    paths.append((c, a, b, sa, sb))
    paths.sort(key=lambda p: p[0])  # stable: group columns by output irrep
    k_total = sum(p[0].dim for p in paths)
    cg = np.zeros((ir_in.dim, ir_y.dim, k_total))
    path_of_column = np.zeros(k_total, dtype=np.int32)
    col = 0
    for n, (c, a, b, sa, sb) in enumerate(paths):
        block = np.asarray(e3nn.clebsch_gordan(a.l, b.l, c.l)) * math.sqrt(c.dim)
        cg[sa, sb, col : col + c.dim] = block
        path_of_column[col : col + c.dim] = n
        col += c.dim
    irreps_out = e3nn.Irreps([(1, p[0]) for p in paths]).simplify()
    return irreps_out, cg, path_of_column, len(paths)


# Per-edge (C, D) @ (D, K) products with D, K ≤ ~25: XLA's CPU batched dot runs one tiny
# matrix product per edge; its transpose in the backward pass of NequIP's and MACE's last
# layers was the most expensive single op of their energy + forces (~110 of ~600 ms for
# NequIP at N = 1000). The forward is written as D broadcast multiply-adds (one fused loop),
# and so is the gradient of xe; the gradient of m is a broadcast-reduce for wide outputs
# (MACE), but stays the batched dot for narrow ones (NequIP: no form we tried measured
# faster there). Written by hand because no library we use has a faster CPU kernel for
# it (e3nn-jax's tensor products loop over paths with the same batched dots).
@jax.custom_vjp
def edge_matmul(xe: jax.Array, m: jax.Array) -> jax.Array:
    """``out[e, c, k] = Σ_i xe[e, c, i] m[e, i, k]``, i.e. ``einsum("eci,eik->eck")``.

    Reverse mode to any order (its backward pass is plain jnp, so force-matching's
    second derivatives work); no forward mode (``jax.jvp``) through it (a custom VJP).
    """
    return _edge_matmul_fwd(xe, m)[0]


def _edge_matmul_fwd(xe, m):
    out = xe[:, :, 0, None] * m[:, None, 0, :]
    for i in range(1, xe.shape[2]):
        out = out + xe[:, :, i, None] * m[:, None, i, :]
    return out, (xe, m)


def _edge_matmul_bwd(res, g):
    xe, m = res
    d, k = m.shape[1], m.shape[2]
    g_xe = g[:, :, 0, None] * m[:, None, :, 0]
    for j in range(1, k):
        g_xe = g_xe + g[:, :, j, None] * m[:, None, :, j]
    if k > 2 * d:  # wide outputs (MACE): one fused broadcast-reduce over the channels
        g_m = jnp.sum(xe[:, :, :, None] * g[:, :, None, :], axis=1)
    else:
        g_m = jnp.einsum("eci,eck->eik", xe, g)
    return g_xe, g_m


edge_matmul.defvjp(_edge_matmul_fwd, _edge_matmul_bwd)


def conv_path_groups(
    irreps_in: e3nn.Irreps, irreps_y: e3nn.Irreps, keep: e3nn.Irreps
) -> tuple[int, ...]:
    """Number of paths per output irrep (in output order) of :func:`channelwise_conv`."""
    keep_t = tuple(sorted(str(ir) for _, ir in e3nn.Irreps(keep)))
    irreps_out = _conv_plan(str(e3nn.Irreps(irreps_in)), str(e3nn.Irreps(irreps_y)), keep_t)[0]
    return tuple(mul for mul, _ in irreps_out)


def conv_paths(irreps_in: e3nn.Irreps, irreps_y: e3nn.Irreps, keep: e3nn.Irreps) -> int:
    """Number of tensor-product paths (radial weights per channel) of :func:`channelwise_conv`."""
    keep_t = tuple(sorted(str(ir) for _, ir in e3nn.Irreps(keep)))
    return _conv_plan(str(e3nn.Irreps(irreps_in)), str(e3nn.Irreps(irreps_y)), keep_t)[3]


def channelwise_conv(
    x: e3nn.IrrepsArray,
    y: e3nn.IrrepsArray,
    weights: jax.Array | Sequence[jax.Array],
    senders: jax.Array,
    receivers: jax.Array,
    keep: e3nn.Irreps,
) -> e3nn.IrrepsArray:
    """``m_i = Σ_{edges (i, j)} w_e ⊙ (x_j ⊗ Y_e)``, channel by channel.

    Args:
      x: ``(N, C, irreps_in)`` node features, channel axis explicit (``mul_to_axis``).
      y: ``(E, irreps_y)`` edge spherical harmonics.
      weights: per-edge path weights (zero on padded edges), e.g. from :class:`RadialWeights`:
        one ``(E, C, n_paths)`` array (``n_paths = conv_paths(...)``), or a list with one
        ``(E, C, n_g)`` array per output irrep (``n_g`` from :func:`conv_path_groups`),
        which avoids slicing (and, in the backward pass, padding) a joint array.
      senders: ``(E,)`` centre atoms ``i`` (messages are summed here).
      receivers: ``(E,)`` neighbours ``j`` (whose features are sent).
      keep: output irreps to compute (others are never formed).

    Returns:
      ``(N, C, irreps_out)`` summed messages (not normalised). Differentiable in all inputs.
    """
    keep_t = tuple(sorted(str(ir) for _, ir in e3nn.Irreps(keep)))
    irreps_out, cg, _, _ = _conv_plan(str(x.irreps), str(y.irreps), keep_t)
    dtype = x.dtype
    n_edges = y.shape[0]
    if not isinstance(weights, (list, tuple)):
        sizes = np.cumsum([0] + [mul for mul, _ in irreps_out])
        weights = [weights[:, :, a:b] for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
    # path weights expanded to the K output columns by broadcasts (no gather, whose
    # transpose would be a slow scatter-add): columns of one output irrep are contiguous
    cols = [
        jnp.broadcast_to(w[:, :, :, None], w.shape + (ir.dim,)).reshape(n_edges, -1, mul * ir.dim)
        for w, (mul, ir) in zip(weights, irreps_out, strict=True)
    ]
    w_cols = jnp.concatenate(cols, axis=-1) if len(cols) > 1 else cols[0]  # (E, C, K)
    xe = x.array[receivers]  # (E, C, D_in)
    if cg.shape[0] == 1:  # scalar input features: an outer product x_j[c] (Y_e CG)[k]
        m = y.array @ jnp.asarray(cg[0], dtype)  # (E, K)
        out = xe * m[:, None, :]
    else:  # Y contracted into CG first: M_e (D_in, K); then x_j (C, D_in) @ M_e per edge
        m = jnp.einsum("ej,ijk->eik", y.array, jnp.asarray(cg, dtype))
        out = edge_matmul(xe, m)
    out = out * w_cols
    msg = scatter_sum(out, senders, x.shape[0])
    return e3nn.IrrepsArray(irreps_out, msg)


class RadialWeights(nn.Module):
    """Per-edge, per-channel path weights ``R(r)``: MLP of the radial basis.

    The output is multiplied by ``cutoff`` (envelope × edge mask), so weights vanish
    smoothly at ``r_cut`` and are exactly zero on padded edges. Returns one ``(E, C, n_g)``
    array per path group (``groups`` from :func:`conv_path_groups`); the last layer is one
    linear head per group (together exactly one linear layer).
    """

    hidden: tuple[int, ...]
    channels: int
    groups: tuple[int, ...]
    dtype: Any = jnp.float64

    @nn.compact
    def __call__(self, basis: jax.Array, cutoff: jax.Array) -> list[jax.Array]:
        hid = MLP(self.hidden, dtype=self.dtype)(basis)
        hid = silu_normalized(hid)
        out = []
        for g, n in enumerate(self.groups):
            w = nn.Dense(
                self.channels * n,
                use_bias=False,
                dtype=self.dtype,
                param_dtype=self.dtype,
                kernel_init=nn.initializers.variance_scaling(1.0, "fan_in", "normal"),
                name=f"head_{g}",
            )(hid)
            w = w * cutoff[:, None]
            out.append(w.reshape(w.shape[0], self.channels, n))
        return out
