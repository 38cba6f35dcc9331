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

The channel-wise convolution (:func:`~celli_scale.models.layers.channelwise_conv`,
:class:`~celli_scale.models.layers.RadialWeights`) and the edge inputs live in
:mod:`celli_scale.models.layers`, shared with MACE.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import e3nn_jax as e3nn
import flax.linen as nn
import jax
import jax.numpy as jnp

from celli_scale.models.config import ModelConfig
from celli_scale.models.layers import (
    MLP,
    EdgeInputs,
    Graph,
    ModelOutput,
    PerSpeciesScaleShift,
    RadialWeights,
    SpeciesEmbedding,
    channelwise_conv,
    conv_path_groups,
    edge_inputs,
)


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


class NequIPLayer(nn.Module):
    """One interaction block (linear → convolution → linear + species self-connection → gate)."""

    config: NequIPConfig
    irreps_out: e3nn.Irreps  # full multiplicity irreps this layer produces (after the gate)

    @nn.compact
    def __call__(
        self,
        h: e3nn.IrrepsArray,
        species: jax.Array,
        edges: EdgeInputs,
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
        groups = conv_path_groups(x.irreps, edges.sh.irreps, keep)
        w = RadialWeights(cfg.radial_mlp, c, groups, dtype=cfg.jnp_dtype, name="radial")(
            edges.basis, edges.cut
        )
        m = channelwise_conv(x, edges.sh, w, senders, receivers, keep)
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
    def __call__(self, graph: Graph) -> ModelOutput:
        cfg = self.config
        dt = cfg.jnp_dtype
        c = cfg.channels
        edges = edge_inputs(graph, cfg)
        species = graph.species

        h = SpeciesEmbedding(cfg.n_species, c, dtype=dt, name="embedding")(species)
        h = e3nn.IrrepsArray(f"{c}x0e", h)
        hid = c * hidden_irreps(cfg.l_max, cfg.parity, cfg.feature_parities)
        for t in range(cfg.n_layers):
            last = t == cfg.n_layers - 1
            full_in = h.irreps
            out_irreps = e3nn.Irreps(f"{c}x0e") if last else hid
            h_new = NequIPLayer(cfg, out_irreps, name=f"layer_{t}")(
                h, species, edges, graph.senders, graph.receivers
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
