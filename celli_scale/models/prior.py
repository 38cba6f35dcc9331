"""Physical priors: a short-range pair repulsion added to any model's energy.

A trained potential knows nothing about distances its data never reached; a prior keeps
it repulsive there (atoms pushed together in MD, a bad initial geometry). The prior is a
pair potential switched off smoothly at its own cut-off ``r_c ≤`` the model's ``r_cut``:

    E_prior = ½ Σ_i Σ_{j ∈ graph edges of i} V(r_ij) S(r_ij)

with half of every pair on each atom (the graph lists both directions ``i → j`` and
``j → i``, so atom ``i`` receives ``½ Σ_j V S`` as its ``node_energies`` share).

Pair potentials ``V`` (energies in eV, distances in Å):

* ``zbl`` — Ziegler–Biersack–Littmark universal screened nuclear repulsion
  ``V = k_e Z_i Z_j / r · φ(r/a)``, ``a = 0.8854 a_0 / (Z_i^0.23 + Z_j^0.23)``
  (``0.8854 a_0 = 0.46853`` Å), ``φ(x) = 0.18175 e^{-3.19980 x} + 0.50986 e^{-0.94229 x}
  + 0.28022 e^{-0.40290 x} + 0.02817 e^{-0.20162 x}``, ``k_e = 14.39965`` eV·Å/e²;
* ``exp`` — ``V = a · exp(-r/ρ)``;
* ``power`` — ``V = ε (σ/r)^n``.

Switching: ``S = 1`` below ``r_on``, ``0`` beyond ``r_c`` and the quintic smoothstep
``S = 1 - 10 t³ + 15 t⁴ - 6 t⁵``, ``t = (r - r_on)/(r_c - r_on)``, between: ``S``,
``S'`` and ``S''`` vanish at ``r_c``, so the energy, the force and its derivative go
continuously to zero there, and below ``r_on`` the prior is the bare ``V``.

:func:`with_prior` wraps a model so that every path that calls ``model.apply`` (the
:class:`~celli_scale.potential.Potential`, the data-parallel and sharded paths, training)
includes the prior; the wrapper shares the model's parameter scope, so the parameter tree
is the same with and without a prior.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from celli_scale.models.config import ModelConfig, PriorConfig
from celli_scale.models.layers import Graph, ModelOutput, cast_graph, edge_geometry, scatter_sum

#: Coulomb constant e²/(4π ε₀) in eV·Å (CODATA 2018).
COULOMB = 14.3996454784
#: Bohr radius in Å (CODATA 2018).
BOHR = 0.529177210903
#: ZBL universal screening: (coefficients, exponents) of φ(x) and the length scale (Å).
ZBL_COEFFS = (0.18175, 0.50986, 0.28022, 0.02817)
ZBL_EXPONENTS = (3.19980, 0.94229, 0.40290, 0.20162)
ZBL_LENGTH = 0.8854 * BOHR


def switch(r: jax.Array, r_on: float, r_cut: float) -> jax.Array:
    """Quintic smoothstep: 1 below ``r_on``, 0 beyond ``r_cut`` (Å), C² in between."""
    t = jnp.clip((r - r_on) / (r_cut - r_on), 0.0, 1.0)
    # = 1 - 10 t³ + 15 t⁴ - 6 t⁵, factored: no cancellation (and ≥ 0) near t = 1
    return (1.0 - t) ** 3 * (1.0 + 3.0 * t + 6.0 * t * t)


def zbl(r: jax.Array, z_i: jax.Array, z_j: jax.Array) -> jax.Array:
    """ZBL pair energy (eV) at distance ``r`` (Å) of nuclei with atomic numbers ``z_i, z_j``."""
    zi, zj = z_i.astype(r.dtype), z_j.astype(r.dtype)
    a = ZBL_LENGTH / (zi**0.23 + zj**0.23)
    x = r / a
    phi = sum(c * jnp.exp(-e * x) for c, e in zip(ZBL_COEFFS, ZBL_EXPONENTS, strict=True))
    return COULOMB * zi * zj / r * phi


def pair_energy(prior: PriorConfig, r: jax.Array, z_i: jax.Array, z_j: jax.Array) -> jax.Array:
    """``V(r) S(r)`` (eV) for pairs at distances ``r`` (Å, positive) and atomic numbers."""
    if prior.kind == "zbl":
        v = zbl(r, z_i, z_j)
    elif prior.kind == "exp":
        v = prior.a * jnp.exp(-r / prior.rho)
    else:
        v = prior.epsilon * (prior.sigma / r) ** prior.n
    return v * switch(r, prior.r_on, prior.r_cut)


def prior_node_energies(prior: PriorConfig, species_z: tuple[int, ...], graph: Graph) -> jax.Array:
    """Per-atom prior energies ``(N,)`` (eV): ``½ Σ_j V(r_ij) S(r_ij)`` over the graph's
    edges of atom ``i`` (``graph.species`` indexes ``species_z``). Padded edges and pairs
    beyond ``prior.r_cut`` contribute nothing (double-where: no NaN in any gradient).
    Differentiable w.r.t. positions and cell."""
    _, r = edge_geometry(graph)
    use = graph.edge_mask & (r < prior.r_cut)
    r_safe = jnp.where(use, r, prior.r_cut)
    z = jnp.asarray(np.asarray(species_z, np.int32))[graph.species]
    e = pair_energy(prior, r_safe, z[graph.senders], z[graph.receivers])
    e = jnp.where(use, 0.5 * e, 0.0)
    return scatter_sum(e, graph.senders, graph.n_nodes)


class WithPrior(nn.Module):
    """``model`` plus the prior of ``config.prior``: ``node_energies`` and ``energy`` grow
    by the prior's per-atom energies. Same parameters as ``model`` (shared scope).

    ``apply(params, graph, charges=q)`` and ``apply(params, graph, chi_only=True)`` are
    forwarded to CELLI; with ``chi_only`` the prior adds nothing (χ only), with
    ``charges`` it adds its energy to the local ``node_energies`` as usual.
    """

    model: nn.Module
    config: ModelConfig

    def setup(self) -> None:
        nn.share_scope(self, self.model)

    def __call__(
        self, graph: Graph, charges: jax.Array | None = None, chi_only: bool = False
    ) -> ModelOutput:
        kwargs: dict[str, Any] = {}
        if charges is not None:
            kwargs["charges"] = charges
        if chi_only:
            kwargs["chi_only"] = True
        out = self.model(graph, **kwargs)
        if chi_only:
            return out
        cfg = self.config
        g = cast_graph(graph, cfg.jnp_dtype)
        e = prior_node_energies(cfg.prior, cfg.species, g)
        e = jnp.where(g.node_mask, e, 0.0)
        return out.replace(energy=out.energy + jnp.sum(e), node_energies=out.node_energies + e)


def with_prior(model: nn.Module) -> nn.Module:
    """``model`` wrapped in :class:`WithPrior` when its config has a prior, else itself."""
    if model.config.prior is None:
        return model
    return WithPrior(model, model.config)


__all__ = [
    "COULOMB",
    "WithPrior",
    "pair_energy",
    "prior_node_energies",
    "switch",
    "with_prior",
    "zbl",
]
