"""NequIP (Batzner et al., Nat. Commun. 13, 2453, 2022): E(3)-equivariant message passing.

Per layer ``t``::

    x_i   = Linear(h_i)
    m_i   = Σ_j R_t(r_ij) ⊙ [x_j ⊗ Y(r̂_ij)] / sqrt(avg_num_neighbors)      (channel-wise "uvu")
    h_i'  = Gate(Linear(m_i) + SpeciesLinear_{Z_i}(h_i))  [+ h_i when the irreps match]

``R_t`` is an MLP (``radial_mlp``) of the shared Bessel × envelope basis, giving one weight
per (channel, tensor-product path); the envelope and the edge mask multiply its output, so
messages vanish smoothly at ``r_cut`` and padded edges contribute exactly zero. The readout
is an MLP on the final scalars followed by the per-species scale and shift. Each layer sees
one ``r_cut`` further, so the receptive field (and the halo a domain needs) is
``n_layers · r_cut``.

Speed notes (this is a baseline we compare against, so it is tuned honestly):

* The edge tensor product is one batched contraction: with the spherical harmonics ``Y``
  contracted into the Clebsch–Gordan tensor first (``M_e = Y_e · CG``, an ``(E, D_in, K)``
  array), the message is ``x_j (C × D_in) @ M_e (D_in × K)`` per edge. No Python loop over
  paths at run time; the path weights are plain arrays from the radial MLP (one linear head
  per output irrep) expanded to columns by broadcasts, never by a gather, whose transpose
  (a scatter-add over 10^5 edges) dominated the backward pass on CPU.
* The last layer computes only the scalar outputs (``0e``), the only ones the energy
  reads. The energy is *identical* to that of the full-irreps last layer with the same
  parameters (Linear maps never mix irreps, so non-scalar outputs of the last layer are
  dead code); we just do not compute them. The reference implementations do.

The channel-wise convolution (:func:`channelwise_conv`, :func:`conv_path_groups`,
:class:`RadialWeights`) is shared with MACE (``celli_scale.models.mace``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import e3nn_jax as e3nn
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from celli_scale.models.config import ModelConfig
from celli_scale.models.layers import (
    MLP,
    Graph,
    PerSpeciesScaleShift,
    SpeciesEmbedding,
    edge_geometry,
    edge_harmonics,
    radial_embedding,
    scatter_sum,
    silu_normalized,
)

# --------------------------------------------------------------------------------------
# Channel-wise (uvu) edge convolution, shared by NequIP and MACE
# --------------------------------------------------------------------------------------


@functools.cache
def _tp_plan(irreps_in: str, irreps_y: str, keep: tuple[str, ...]):
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


def conv_path_groups(
    irreps_in: e3nn.Irreps, irreps_y: e3nn.Irreps, keep: e3nn.Irreps
) -> tuple[int, ...]:
    """Number of paths per output irrep (in output order) of :func:`channelwise_conv`."""
    keep_t = tuple(sorted(str(ir) for _, ir in e3nn.Irreps(keep)))
    irreps_out = _tp_plan(str(e3nn.Irreps(irreps_in)), str(e3nn.Irreps(irreps_y)), keep_t)[0]
    return tuple(mul for mul, _ in irreps_out)


def conv_paths(irreps_in: e3nn.Irreps, irreps_y: e3nn.Irreps, keep: e3nn.Irreps) -> int:
    """Number of tensor-product paths (radial weights per channel) of :func:`channelwise_conv`."""
    keep_t = tuple(sorted(str(ir) for _, ir in e3nn.Irreps(keep)))
    return _tp_plan(str(e3nn.Irreps(irreps_in)), str(e3nn.Irreps(irreps_y)), keep_t)[3]


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
    irreps_out, cg, _, _ = _tp_plan(str(x.irreps), str(y.irreps), keep_t)
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
        out = jnp.einsum("eci,eik->eck", xe, m)
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


def edge_inputs(graph: Graph, cfg: ModelConfig):
    """Shared edge featurisation: ``(Y (E, sh), radial basis (E, n_radial), cutoff (E,))``.

    Positions and cell are cast to the model's dtype first (float32 models run in float32).
    """
    dt = cfg.jnp_dtype
    g = graph.replace(positions=graph.positions.astype(dt), cell=graph.cell.astype(dt))
    vec, r = edge_geometry(g)
    basis, env = radial_embedding(r, cfg.r_cut, cfg.n_radial, cfg.envelope_p)
    cutoff = jnp.where(graph.edge_mask, env, 0.0).astype(dt)
    y = edge_harmonics(vec, cfg.l_max, cfg.parity)
    return y, basis.astype(dt), cutoff


def hidden_irreps(l_max: int, parity: bool, parities: str) -> e3nn.Irreps:
    """Per-channel hidden irreps ``0e + 1o + 2e + ...`` ("sh") or every parity ("both")."""
    if not parity:
        return e3nn.Irreps([(1, (ell, 1)) for ell in range(l_max + 1)])
    if parities == "both":
        both = e3nn.Irreps([(1, (ell, p)) for ell in range(l_max + 1) for p in (1, -1)])
        return both.sort().irreps
    return e3nn.Irreps.spherical_harmonics(l_max, p=-1)


# --------------------------------------------------------------------------------------
# NequIP
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NequIPConfig(ModelConfig):
    """NequIP hyper-parameters (shared keys: see :class:`ModelConfig`).

    Attributes:
      feature_parities: hidden irreps per channel. "sh": ``0e + 1o + 2e + ...`` up to
        ``l_max`` (the parities of the spherical harmonics); "both": every ``l`` with both
        parities (``0e+0o+1o+1e+...``), as the reference nequip package builds with
        ``parity: true``. Ignored when ``parity`` is False (then ``0e + 1e + 2e + ...``).
      resnet: add the layer input to its output when their irreps match.
      readout_hidden: width of the hidden layer of the scalar readout MLP.
    """

    name: str = "nequip"
    strictly_local: ClassVar[bool] = False  # message passing: n_layers × r_cut
    feature_parities: str = "sh"
    resnet: bool = True
    readout_hidden: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.feature_parities not in ("sh", "both"):
            raise ValueError(
                f"config feature_parities must be 'sh' or 'both', got {self.feature_parities!r}"
            )
        if not isinstance(self.readout_hidden, int) or self.readout_hidden < 1:
            raise ValueError(
                f"config readout_hidden must be a positive integer, got {self.readout_hidden!r}"
            )

    @property
    def receptive_field(self) -> float:
        """Distance (Å) beyond which an atom cannot influence another: ``n_layers · r_cut``."""
        return self.n_layers * self.r_cut


class NequIPLayer(nn.Module):
    """One interaction block (linear → convolution → linear + species self-connection → gate)."""

    config: NequIPConfig
    irreps_out: e3nn.Irreps  # full multiplicity irreps this layer produces (after the gate)

    @nn.compact
    def __call__(
        self,
        h: e3nn.IrrepsArray,
        species: jax.Array,
        y: e3nn.IrrepsArray,
        basis: jax.Array,
        cutoff: jax.Array,
        senders: jax.Array,
        receivers: jax.Array,
    ) -> e3nn.IrrepsArray:
        cfg = self.config
        c = cfg.channels
        irreps_out = e3nn.Irreps(self.irreps_out)
        scalars = irreps_out.filter(keep=["0e", "0o"])
        gated = irreps_out.filter(drop=["0e", "0o"])
        n_gates = gated.num_irreps
        gate_in = (scalars + e3nn.Irreps(f"{n_gates}x0e") + gated) if n_gates else scalars

        x = e3nn.flax.Linear(h.irreps, name="linear_up")(h)
        x = x.mul_to_axis(c)  # (N, C, irreps)
        keep = e3nn.Irreps([ir for _, ir in gate_in])
        groups = conv_path_groups(x.irreps, y.irreps, keep)
        w = RadialWeights(cfg.radial_mlp, c, groups, dtype=cfg.jnp_dtype, name="radial")(
            basis, cutoff
        )
        m = channelwise_conv(x, y, w, senders, receivers, keep)
        m = m.axis_to_mul() / math.sqrt(cfg.avg_num_neighbors)
        out = e3nn.flax.Linear(gate_in, force_irreps_out=True, name="linear_down")(m)
        onehot = jax.nn.one_hot(species, cfg.n_species, dtype=h.dtype)
        sc = e3nn.flax.Linear(gate_in, force_irreps_out=True, name="self_connection")(onehot, h)
        out = out + sc
        out = e3nn.gate(
            out,
            even_act=jax.nn.silu,
            odd_act=jnp.tanh,
            even_gate_act=jax.nn.silu,
            odd_gate_act=jnp.tanh,
        )
        return out


class NequIP(nn.Module):
    """NequIP energy model; ``apply(params, graph) -> ModelOutput`` (energies in eV)."""

    config: NequIPConfig

    @nn.compact
    def __call__(self, graph: Graph):
        from celli_scale.models import ModelOutput  # registry module imports us lazily

        cfg = self.config
        dt = cfg.jnp_dtype
        c = cfg.channels
        y, basis, cutoff = edge_inputs(graph, cfg)
        species = graph.species

        h = SpeciesEmbedding(cfg.n_species, c, dtype=dt, name="embedding")(species)
        h = e3nn.IrrepsArray(f"{c}x0e", h)
        hid = c * hidden_irreps(cfg.l_max, cfg.parity, cfg.feature_parities)
        for t in range(cfg.n_layers):
            last = t == cfg.n_layers - 1
            full_in = h.irreps
            out_irreps = e3nn.Irreps(f"{c}x0e") if last else hid
            h_new = NequIPLayer(cfg, out_irreps, name=f"layer_{t}")(
                h, species, y, basis, cutoff, graph.senders, graph.receivers
            )
            # residual where the full layer's irreps match (the last layer keeps scalars only)
            if cfg.resnet and full_in == hid:
                h_new = h_new + h.filter(keep=h_new.irreps)
            h = h_new

        s = h.filter(keep=["0e"]).array
        e = MLP((cfg.readout_hidden, 1), dtype=dt, name="readout")(s)[:, 0]
        node_e = PerSpeciesScaleShift(
            cfg.n_species, cfg.energy_scale, cfg.energy_shift, dtype=dt, name="scale_shift"
        )(e, species, graph.node_mask)
        return ModelOutput(energy=jnp.sum(node_e), node_energies=node_e)
