"""CELLI: Allegro with a charge-equilibration layer (global charge transfer).

The strictly local Allegro trunk (:mod:`celli_scale.models.allegro`, the *same* modules)
is split by a charge-equilibration (Qeq) layer:

1. ``n_pre`` Allegro layers build edge latents ``x_ij``;
2. electronegativities
   ``χ_i = χ⁰_Z + scale_χ Σ_j MLP(x_ij) u(r_ij) / sqrt(avg_num_neighbors)`` (eV/e),
   per-species hardness ``J_Z = softplus(·) > 0`` (eV/e²) and Gaussian widths
   ``σ_Z = min(softplus(·), elec_sigma_max) > 0`` (Å);
3. charges ``q = argmin Σ χ_i q_i + ½ J_i q_i² + E_elec(q; σ)`` s.t. ``Σ q_i = Q``
   (:func:`celli_scale.qeq.solve_arrays`; the whole structure takes part, so charge moves
   between atoms arbitrarily far apart);
4. charge feedback: ``φ_i = MLP([q_i, emb(Z_i)])`` and
   ``x_ij ← x_ij + w · MLP([φ_i, φ_j]) u(r_ij)`` (learnable ``w``, small at start);
5. ``n_post`` Allegro layers and the Allegro edge-energy readout give ``E_i^local(q)``;
6. ``E = Σ_i E_i^local + E_elec(q; σ)`` (Gaussian-charge electrostatics, direct / Ewald / PME).

Forces are ``-∂E/∂r`` by autodiff of the total energy; the derivative through the Qeq
solve comes from implicit differentiation (the solver's ``custom_linear_solve``, or
autodiff of the dense solve), never from back-propagating through CG iterations.

The graph must carry ``elec_params`` (from :func:`celli_scale.electrostatics.prepare`,
prepared with ``sigma=config.elec_sigma_max`` so that the real-space cut-off serves every
learnable width) and, for periodic systems, ``elec_neighbors``
(:func:`celli_scale.electrostatics.real_space_neighbors`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from celli_scale import electrostatics as el
from celli_scale import qeq
from celli_scale.models.allegro import (
    AllegroConfig,
    AllegroLayer,
    TwoBodyEmbedding,
    atomic_energies,
)
from celli_scale.models.layers import (
    MLP,
    EdgeInputs,
    Graph,
    ModelOutput,
    SpeciesEmbedding,
    cast_graph,
    edge_inputs,
    scatter_sum,
)

_ELEC_METHODS = ("auto", "direct", "ewald", "pme")
_QEQ_METHODS = ("auto", "dense", "cg")


def _inv_softplus(y: float) -> float:
    return float(np.log(np.expm1(y)))


@dataclass(frozen=True)
class CELLIConfig(AllegroConfig):
    """CELLI hyper-parameters: Allegro's (see :class:`AllegroConfig`) plus the Qeq layer.

    Attributes:
      n_pre: Allegro layers before the Qeq layer (``0 ≤ n_pre ≤ n_layers``).
      n_post: Allegro layers after it; ``None`` means ``n_layers - n_pre``. Must satisfy
        ``n_pre + n_post == n_layers``.
      elec_method: electrostatics method, "auto" | "direct" | "ewald" | "pme" (used by the
        caller that prepares ``graph.elec_params``; "auto": open → direct, periodic →
        Ewald/PME by size).
      elec_accuracy: target relative accuracy of the electrostatics.
      elec_sigma_max: largest Gaussian width σ (Å) the model may learn; σ is clipped
        there and the electrostatics must be prepared with ``sigma=elec_sigma_max``.
      qeq_method: "auto" (dense up to ``qeq.DENSE_MAX_ATOMS`` atoms, CG above) | "dense" | "cg".
      qeq_tol: relative residual tolerance of the Qeq solve. ``None`` resolves to 1e-10
        for float64 and 1e-5 for float32 (float32 cannot reach ~1e-10; use ~1e-5).
      qeq_maxiter: CG iteration cap (``None``: the solver's default, ``max(100, 2N)``).
      chi_mlp: hidden widths of the edge MLP whose sum gives ``χ_i`` (output 1).
      chi_scale: initial learnable scale of ``χ`` (eV/e).
      hardness_init: initial per-species hardness ``J`` (eV/e²).
      sigma_init: initial per-species Gaussian width ``σ`` (Å).
      charge_embed_mlp: hidden widths of ``φ_i = MLP([q_i, emb(Z_i)])``.
      charge_embed_dim: width of ``φ_i``.
      feedback_mlp: hidden widths of the feedback MLP ``[φ_i, φ_j] → Δx_ij`` (output
        ``latent_dim``).
      feedback_init: initial residual weight ``w`` of the charge feedback (small, non-zero).
    """

    name: str = "celli"
    n_pre: int = 1
    n_post: int | None = None
    elec_method: str = "auto"
    elec_accuracy: float = 1e-6
    elec_sigma_max: float = 1.5
    qeq_method: str = "auto"
    qeq_tol: float | None = None
    qeq_maxiter: int | None = None
    chi_mlp: tuple[int, ...] = (32,)
    chi_scale: float = 1.0
    hardness_init: float = 10.0
    sigma_init: float = 1.0
    charge_embed_mlp: tuple[int, ...] = (16,)
    charge_embed_dim: int = 16
    feedback_mlp: tuple[int, ...] = (32,)
    feedback_init: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.n_pre, int) or not 0 <= self.n_pre <= self.n_layers:
            raise ValueError(
                f"config n_pre must be an integer in 0..n_layers={self.n_layers}, "
                f"got {self.n_pre!r}"
            )
        if self.n_post is None:
            object.__setattr__(self, "n_post", self.n_layers - self.n_pre)
        if not isinstance(self.n_post, int) or self.n_pre + self.n_post != self.n_layers:
            raise ValueError(
                f"config needs n_pre + n_post == n_layers, got n_pre={self.n_pre}, "
                f"n_post={self.n_post}, n_layers={self.n_layers}"
            )
        if self.elec_method not in _ELEC_METHODS:
            raise ValueError(
                f"config elec_method must be one of {_ELEC_METHODS}, got {self.elec_method!r}"
            )
        if self.qeq_method not in _QEQ_METHODS:
            raise ValueError(
                f"config qeq_method must be one of {_QEQ_METHODS}, got {self.qeq_method!r}"
            )
        if self.qeq_tol is None:
            object.__setattr__(self, "qeq_tol", 1e-10 if self.dtype == "float64" else 1e-5)
        if not 0 < self.qeq_tol < 1:
            raise ValueError(f"config qeq_tol must be in (0, 1), got {self.qeq_tol}")
        if not 0 < self.elec_accuracy <= 0.1:
            raise ValueError(f"config elec_accuracy must be in (0, 0.1], got {self.elec_accuracy}")
        for key in ("hardness_init", "sigma_init", "elec_sigma_max"):
            if not getattr(self, key) > 0:
                raise ValueError(f"config {key} must be positive, got {getattr(self, key)}")
        if self.sigma_init > self.elec_sigma_max:
            raise ValueError(
                f"config sigma_init={self.sigma_init} exceeds elec_sigma_max={self.elec_sigma_max}"
            )
        mi = self.qeq_maxiter
        if mi is not None and (not isinstance(mi, int) or mi < 1):
            raise ValueError(f"config qeq_maxiter must be a positive integer, got {mi!r}")
        if not isinstance(self.charge_embed_dim, int) or self.charge_embed_dim < 1:
            raise ValueError(
                f"config charge_embed_dim must be a positive integer, got {self.charge_embed_dim!r}"
            )
        for key in ("chi_mlp", "charge_embed_mlp", "feedback_mlp"):
            widths = tuple(int(x) for x in getattr(self, key))
            if any(w < 1 for w in widths):
                raise ValueError(f"config {key} widths must be positive, got {widths}")
            object.__setattr__(self, key, widths)


def species_hardness(raw: jax.Array) -> jax.Array:
    """Per-species hardness ``J = softplus(raw) > 0`` (eV/e²)."""
    return jax.nn.softplus(raw)


def species_sigma(raw: jax.Array, sigma_max: float) -> jax.Array:
    """Per-species Gaussian width ``σ = min(softplus(raw), sigma_max) > 0`` (Å)."""
    return jnp.minimum(jax.nn.softplus(raw), sigma_max)


def species_qeq_parameters(params: Any, config: CELLIConfig) -> tuple[jax.Array, jax.Array]:
    """``(J_Z, σ_Z)`` per species index from a CELLI parameter tree (they depend on the
    species only; the distributed Qeq reads them here instead of running the model)."""
    q = params["params"]["qeq"]
    dt = config.jnp_dtype
    return (
        species_hardness(jnp.asarray(q["hardness_raw"], dt)),
        species_sigma(jnp.asarray(q["sigma_raw"], dt), config.elec_sigma_max),
    )


class ChargeEquilibration(nn.Module):
    """``(χ, J, σ)`` from the edge latents, then (``solve=True``) the Qeq solve.

    Returns ``(QeqResult | None, χ, J, σ)`` (per atom)."""

    config: CELLIConfig

    @nn.compact
    def __call__(
        self, x: jax.Array, graph: Graph, edges: EdgeInputs, n_nodes: int, solve: bool = True
    ):
        cfg = self.config
        dt = cfg.jnp_dtype
        ns = cfg.n_species
        e = MLP((*cfg.chi_mlp, 1), dtype=dt, name="chi_mlp")(x)[:, 0] * edges.cut
        scale = self.param("chi_scale", lambda k: jnp.asarray(cfg.chi_scale, dt))
        shift = self.param("chi_shift", nn.initializers.zeros, (ns,), dt)
        chi = scale * scatter_sum(e, graph.senders, n_nodes) / float(np.sqrt(cfg.avg_num_neighbors))
        chi = chi + shift[graph.species]
        raw_j = self.param(
            "hardness_raw", lambda k, s: jnp.full(s, _inv_softplus(cfg.hardness_init), dt), (ns,)
        )
        raw_s = self.param(
            "sigma_raw", lambda k, s: jnp.full(s, _inv_softplus(cfg.sigma_init), dt), (ns,)
        )
        hardness = species_hardness(raw_j)[graph.species]
        sigma = species_sigma(raw_s, cfg.elec_sigma_max)[graph.species]
        if not solve:
            return None, chi, hardness, sigma
        if graph.elec_params is None:
            raise ValueError(
                "CELLI needs graph.elec_params (electrostatics.prepare); build the graph "
                "with celli_scale.Potential"
            )
        cell = graph.cell if graph.elec_params.periodic else None
        result = qeq.solve_arrays(
            graph.positions,
            cell,
            chi,
            hardness,
            sigma,
            graph.total_charge.astype(dt),
            graph.elec_params,
            graph.elec_neighbors,
            mask=graph.node_mask,
            method=cfg.qeq_method,
            tol=cfg.qeq_tol,
            maxiter=cfg.qeq_maxiter,
        )
        return result, chi, hardness, sigma


class ChargeFeedback(nn.Module):
    """``x_ij + w · MLP([φ_i, φ_j]) u(r_ij)`` with ``φ_i = MLP([q_i, emb(Z_i)])``."""

    config: CELLIConfig

    @nn.compact
    def __call__(self, x: jax.Array, q: jax.Array, graph: Graph, edges: EdgeInputs) -> jax.Array:
        cfg = self.config
        dt = cfg.jnp_dtype
        emb = SpeciesEmbedding(cfg.n_species, cfg.species_embed_dim, dtype=dt, name="species")(
            graph.species
        )
        phi = MLP((*cfg.charge_embed_mlp, cfg.charge_embed_dim), dtype=dt, name="charge_embed")(
            jnp.concatenate([q[:, None].astype(dt), emb], axis=-1)
        )
        h = jnp.concatenate([phi[graph.senders], phi[graph.receivers]], axis=-1)
        dx = MLP((*cfg.feedback_mlp, cfg.latent_dim), dtype=dt, name="feedback_mlp")(h)
        w = self.param("weight", lambda k: jnp.asarray(cfg.feedback_init, dt))
        return x + w * dx * edges.cut[:, None]


class CELLI(nn.Module):
    """CELLI potential; ``apply(params, graph) -> ModelOutput`` with charges (e), the
    electrostatic energy (eV) and the Qeq residual (checked on the host by the caller).

    ``apply(params, graph, charges=q)`` evaluates the local part only, with the charges
    given instead of solved (the distributed Qeq solves them across devices): ``energy``
    is then ``Σ_i E_i^local(q)`` and ``chi`` the electronegativities. ``chi_only=True``
    stops after ``χ`` (``energy`` and ``node_energies`` are zero).
    """

    config: CELLIConfig

    @nn.compact
    def __call__(
        self, graph: Graph, charges: jax.Array | None = None, chi_only: bool = False
    ) -> ModelOutput:
        cfg = self.config
        graph = cast_graph(graph, cfg.jnp_dtype)
        n = graph.n_nodes
        edges = edge_inputs(graph, cfg)
        x, v = TwoBodyEmbedding(cfg, name="two_body")(
            graph.species, graph.senders, graph.receivers, edges
        )
        given = charges is not None or chi_only
        result = sigma = chi = q = None
        for k in range(cfg.n_layers + 1):
            if k == cfg.n_pre:  # the Qeq layer sits after layer n_pre - 1
                result, chi, _, sigma = ChargeEquilibration(cfg, name="qeq")(
                    x, graph, edges, n, solve=not given
                )
                if chi_only:
                    zero = jnp.zeros((n,), cfg.jnp_dtype)
                    return ModelOutput(energy=jnp.sum(zero), node_energies=zero, chi=chi)
                q = result.charges if charges is None else charges.astype(cfg.jnp_dtype)
                x = ChargeFeedback(cfg, name="feedback")(x, q, graph, edges)
            if k == cfg.n_layers:
                break
            last = k == cfg.n_layers - 1
            x, v = AllegroLayer(cfg, scalars_only=last, name=f"layer_{k}")(
                x, v, graph.senders, n, edges
            )
        node_e = atomic_energies(cfg, x, graph, n, edges)
        if given:
            return ModelOutput(energy=jnp.sum(node_e), node_energies=node_e, charges=q, chi=chi)
        cell = graph.cell if graph.elec_params.periodic else None
        e_elec = el.energy_arrays(
            graph.positions,
            cell,
            q,
            sigma,
            graph.elec_params,
            graph.elec_neighbors,
            mask=graph.node_mask,
        )
        return ModelOutput(
            energy=jnp.sum(node_e) + e_elec,
            node_energies=node_e,
            charges=q,
            elec_energy=e_elec,
            qeq_residual=result.residual,
            chi=chi,
        )


__all__ = [
    "CELLI",
    "CELLIConfig",
    "ChargeEquilibration",
    "ChargeFeedback",
    "species_hardness",
    "species_qeq_parameters",
    "species_sigma",
]
