"""MACE (Batatia et al., NeurIPS 2022): message passing with higher-body-order messages.

Per layer ``t`` (as mace-torch's ``RealAgnostic(Residual)InteractionBlock`` +
``EquivariantProductBasisBlock``)::

    A_i  = Linear(Σ_j R_t(r_ij) ⊙ [Linear(h_j) ⊗ Y(r̂_ij)]) / avg_num_neighbors  (channel-wise;
           layer 0: then a species-dependent linear, mace-torch's skip_tp)
    B_i  = Σ_{ν=1..correlation} Σ_k w^{(ν)}_{Z_i,k,c} U^{(ν)}_k : A_{i,c}^{⊗ν}  (symmetric contr.)
    h_i' = Linear(B_i) + SpeciesLinear_{Z_i}(h_i)      (no species residual in layer 0)
    E_i  = Σ_t readout_t(h_i^{(t)})   (linear for intermediate layers, MLP for the last)

``U^{(ν)}`` is e3nn's ``reduced_symmetric_tensor_product_basis`` of order ``ν``; weights are
per species and per channel (channel-wise product basis, as in MACE/mace-jax). Hidden
features are ``channels × (0e + 1o [+ 2e ...])`` up to ``hidden_l_max`` (MACE's usual
``32x0e + 32x1o`` is ``hidden_l_max = 1``); the spherical harmonics and the one-particle
basis ``A`` go up to ``l_max`` (the shared key). The last layer keeps only scalars, as MACE
does. Receptive field ``n_layers · r_cut``.

Speed: the symmetric contraction is evaluated on the *distinct monomials* of ``A``
(``i_1 ≤ … ≤ i_ν``; 165 instead of 729 products for ν = 3 and 9-dimensional ``A``): the
U-tensors are summed over index permutations once, at trace time, so the contraction is one
dense matmul ``(N·C, n_monomials) @ (n_monomials, Σ k·dim)`` followed by the per-species
weights. This is exactly the same function as the U-tensor einsum of mace-torch/mace-jax.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import ClassVar

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
    RadialWeights,
    SpeciesEmbedding,
    channelwise_conv,
    conv_path_groups,
    edge_inputs,
)


@dataclass(frozen=True)
class MACEConfig(ModelConfig):
    """MACE hyper-parameters (shared keys: see :class:`ModelConfig`).

    Attributes:
      correlation: body order of the product basis minus one (``ν_max``); at least 2
        (``correlation = 1`` would be a two-body message, i.e. not MACE). Default 3.
      hidden_l_max: largest ``l`` of the hidden node features between layers (default 1:
        ``channels x (0e + 1o)``, MACE's usual ``32x0e + 32x1o``). The spherical harmonics
        and the one-particle basis ``A`` use ``l_max`` (default 2).
      radial_mlp: hidden widths of the radial MLP; mace-torch's default ``(64, 64, 64)``.
      readout_hidden: width of the last layer's non-linear readout (mace-torch: 16).
    """

    name: str = "mace"
    strictly_local: ClassVar[bool] = False  # message passing: n_layers × r_cut
    correlation: int = 3
    hidden_l_max: int = 1
    radial_mlp: tuple[int, ...] = (64, 64, 64)
    readout_hidden: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.correlation, int) or self.correlation < 2:
            raise ValueError(
                f"config correlation must be an integer >= 2 (MACE body order - 1), "
                f"got {self.correlation!r}"
            )
        if not isinstance(self.hidden_l_max, int) or self.hidden_l_max < 0:
            raise ValueError(
                f"config hidden_l_max must be a non-negative integer, got {self.hidden_l_max!r}"
            )
        if not isinstance(self.readout_hidden, int) or self.readout_hidden < 1:
            raise ValueError(
                f"config readout_hidden must be a positive integer, got {self.readout_hidden!r}"
            )


def _sh_like(l_max: int, parity: bool) -> e3nn.Irreps:
    return e3nn.Irreps.spherical_harmonics(l_max, p=-1 if parity else 1)


@functools.cache
def _symmetric_plan(irreps_in: str, correlation: int, irreps_out: str):
    """Monomial form of the symmetric contraction.

    Returns ``(monomials, blocks)``: ``monomials`` lists, per order ``ν``, an int array
    ``(n_mono_ν, ν)`` of sorted index tuples; ``blocks`` lists, per output irrep, a tuple
    ``(irrep, [(ν, k_ν, P_ν (n_mono_ν, k_ν, dim))...])`` where ``P_ν`` is the U-tensor of
    order ``ν`` summed over the index permutations of each monomial and scaled by
    ``1/k_ν`` (e3nn's normalisation of the symmetric tensor product).
    """
    irreps = e3nn.Irreps(irreps_in)
    d = irreps.dim
    monomials = []
    mono_id = []
    for nu in range(1, correlation + 1):
        combos = list(itertools.combinations_with_replacement(range(d), nu))
        index = {c: n for n, c in enumerate(combos)}
        flat = np.array([index[tuple(sorted(t))] for t in itertools.product(range(d), repeat=nu)])
        monomials.append(np.array(combos, dtype=np.int32).reshape(len(combos), nu))
        mono_id.append((flat, len(combos)))
    blocks = []
    for _, ir in e3nn.Irreps(irreps_out):
        per_order = []
        for nu in range(1, correlation + 1):
            u = e3nn.reduced_symmetric_tensor_product_basis(irreps, nu, keep_ir=[ir])
            if u.irreps.dim == 0:
                continue
            k = u.irreps.count(ir)
            arr = np.asarray(u.array).reshape(d**nu, k, ir.dim) / k
            flat, n_mono = mono_id[nu - 1]
            p = np.zeros((n_mono, k, ir.dim))
            np.add.at(p, flat, arr)
            per_order.append((nu, k, p))
        blocks.append((ir, per_order))
    return monomials, blocks


class SymmetricContraction(nn.Module):
    """Channel-wise, species-dependent symmetric product basis of order ``1..correlation``.

    ``B_{c,LM} = Σ_ν Σ_k w^{(ν)}_{Z,k,c} Σ_{i_1..i_ν} U^{(ν)}_{i_1..i_ν,k,LM} A_{c,i_1}…A_{c,i_ν}``
    (U: e3nn's reduced symmetric tensor-product basis).
    Input ``(N, C, irreps_in)`` (channel axis explicit), output ``(N, C, irreps_out)``.
    """

    correlation: int
    irreps_out: e3nn.Irreps  # per channel, multiplicity 1 each
    n_species: int

    @nn.compact
    def __call__(self, a: e3nn.IrrepsArray, species: jax.Array) -> e3nn.IrrepsArray:
        out_irreps = str(e3nn.Irreps(self.irreps_out))
        monomials, blocks = _symmetric_plan(str(a.irreps), self.correlation, out_irreps)
        x = a.array  # (N, C, D)
        n, c = x.shape[0], x.shape[1]
        dt = x.dtype
        # distinct monomials of each order: (N, C, n_mono_ν)
        monos = [x]
        for nu in range(2, self.correlation + 1):
            idx = monomials[nu - 1]
            # prefix (sorted tuple without its last index) is a monomial of order nu-1
            prev = {tuple(t): i for i, t in enumerate(monomials[nu - 2].tolist())}
            pre = np.array([prev[tuple(t[:-1])] for t in idx.tolist()], dtype=np.int32)
            monos.append(monos[-1][:, :, pre] * x[:, :, idx[:, -1]])
        mono = jnp.concatenate(monos, axis=-1)  # (N, C, M)
        offsets = np.cumsum([0] + [m.shape[0] for m in monomials])
        cols, layout = [], []
        for ir, per_order in blocks:
            ks = []
            for nu, k, p in per_order:
                full = np.zeros((offsets[-1], k, ir.dim))
                full[offsets[nu - 1] : offsets[nu]] = p
                cols.append(full.reshape(offsets[-1], k * ir.dim))
                ks.append((nu, k))
            layout.append((ir, ks))
        proj = jnp.asarray(np.concatenate(cols, axis=1), dt)  # (M, Σ k·dim)
        q = mono @ proj  # (N, C, Σ k·dim)
        out, col = [], 0
        for ir, ks in layout:
            acc = None
            for nu, k in ks:
                w = self.param(
                    f"w{nu}_{ir}", nn.initializers.normal(1.0), (self.n_species, k, c), dt
                )[species]  # (N, k, C)
                qk = q[:, :, col : col + k * ir.dim].reshape(n, c, k, ir.dim)
                term = jnp.einsum("nckm,nkc->ncm", qk, w)
                acc = term if acc is None else acc + term
                col += k * ir.dim
            out.append(jnp.zeros((n, c, ir.dim), dt) if acc is None else acc)
        irreps = e3nn.Irreps([(1, ir) for ir, _ in layout])
        return e3nn.IrrepsArray(irreps, jnp.concatenate(out, axis=-1))


class MACELayer(nn.Module):
    """Interaction (one-particle basis A) + product basis + update; returns new features."""

    config: MACEConfig
    first: bool
    irreps_out: e3nn.Irreps  # full multiplicity output irreps

    @nn.compact
    def __call__(
        self,
        h: e3nn.IrrepsArray,
        species: jax.Array,
        onehot: jax.Array,
        edges: EdgeInputs,
        senders: jax.Array,
        receivers: jax.Array,
    ) -> e3nn.IrrepsArray:
        cfg = self.config
        c = cfg.channels
        a_irreps = _sh_like(cfg.l_max, cfg.parity)  # per channel
        sc = None
        if not self.first:
            sc = e3nn.flax.Linear(self.irreps_out, force_irreps_out=True, name="skip")(onehot, h)
        x = e3nn.flax.Linear(h.irreps, name="linear_up")(h).mul_to_axis(c)
        groups = conv_path_groups(x.irreps, edges.sh.irreps, a_irreps)
        w = RadialWeights(cfg.radial_mlp, c, groups, dtype=cfg.jnp_dtype, name="radial")(
            edges.basis, edges.cut
        )
        m = channelwise_conv(x, edges.sh, w, senders, receivers, a_irreps).axis_to_mul()
        a = e3nn.flax.Linear(c * a_irreps, force_irreps_out=True, name="linear")(m)
        a = a / cfg.avg_num_neighbors
        if self.first:  # mace-torch RealAgnosticInteractionBlock: species-dependent skip_tp
            a = e3nn.flax.Linear(c * a_irreps, force_irreps_out=True, name="skip_tp")(onehot, a)
        per_channel = e3nn.Irreps([(1, ir) for _, ir in e3nn.Irreps(self.irreps_out)])
        b = SymmetricContraction(cfg.correlation, per_channel, cfg.n_species, name="product")(
            a.mul_to_axis(c), species
        ).axis_to_mul()
        h_new = e3nn.flax.Linear(self.irreps_out, force_irreps_out=True, name="linear_out")(b)
        if sc is not None:
            h_new = h_new + sc
        return h_new


class MACE(nn.Module):
    """MACE energy model; ``apply(params, graph) -> ModelOutput`` (energies in eV)."""

    config: MACEConfig

    @nn.compact
    def __call__(self, graph: Graph) -> ModelOutput:
        cfg = self.config
        dt = cfg.jnp_dtype
        c = cfg.channels
        edges = edge_inputs(graph, cfg)
        species = graph.species
        onehot = jax.nn.one_hot(species, cfg.n_species, dtype=dt)

        h = SpeciesEmbedding(cfg.n_species, c, dtype=dt, name="embedding")(species)
        h = e3nn.IrrepsArray(f"{c}x0e", h)
        hid = c * _sh_like(cfg.hidden_l_max, cfg.parity)
        e = jnp.zeros(species.shape, dt)
        for t in range(cfg.n_layers):
            last = t == cfg.n_layers - 1
            out_irreps = e3nn.Irreps(f"{c}x0e") if last else hid
            h = MACELayer(cfg, t == 0, out_irreps, name=f"layer_{t}")(
                h, species, onehot, edges, graph.senders, graph.receivers
            )
            s = h.filter(keep=["0e"]).array
            if last:
                mlp = MLP((cfg.readout_hidden, 1), last_bias=False, dtype=dt, name=f"readout_{t}")
                e_t = mlp(s)
            else:
                e_t = MLP((1,), last_bias=False, dtype=dt, name=f"readout_{t}")(s)
            e = e + e_t[:, 0]
        node_e = PerSpeciesScaleShift(
            cfg.n_species, cfg.energy_scale, cfg.energy_shift, dtype=dt, name="scale_shift"
        )(e, species, graph.node_mask)
        return ModelOutput(energy=jnp.sum(node_e), node_energies=node_e)
