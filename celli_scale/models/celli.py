"""CELLI: Allegro with a charge-equilibration layer (global charge transfer).

The strictly local Allegro trunk (:mod:`celli_scale.models.allegro`, the *same* modules)
is split by a charge-equilibration (Qeq) layer:

1. ``n_pre`` Allegro layers build edge latents ``x_ij``;
2. electronegativities
   ``χ_i = χ⁰_Z + scale_χ Σ_j MLP(x_ij) u(r_ij) / sqrt(avg_num_neighbors)`` (eV/e),
   per-species hardness ``J_Z = softplus(·) > 0`` (eV/e², starting at ``hardness_init``)
   and Gaussian widths ``σ_Z`` (Å, ``sigma_mode``, capped at ``elec_sigma_max``):
   "covalent" ``σ_Z = r_cov(Z) · softplus(ρ_Z) / ln 2`` (learnt, starting at the covalent
   radius, ``ρ_Z = 0``), "fixed_covalent" ``σ_Z = r_cov(Z)``, "learnt"
   ``σ_Z = softplus(·)`` (starting at ``sigma_init`` for every species);
3. charges ``q = argmin Σ χ_i q_i + ½ J_i q_i² + E_elec(q; σ)`` s.t. ``Σ q_i = Q``
   (:func:`celli_scale.qeq.solve_arrays`; the whole structure takes part, so charge moves
   between atoms arbitrarily far apart);
4. charge feedback (``feedback``): "published" ``w_i = Linear([q_i, e_Z])``,
   ``y_ij = MLP([x_ij, w_i]) u(r_ij)`` and ``x_ij ← (x_ij + a y_ij)/(1 + a)``,
   ``a = softplus(α)``; "ours" ``φ_i = MLP([q_i, e_Z])`` and
   ``x_ij ← x_ij + w · MLP([φ_i, φ_j]) u(r_ij)``;
5. ``n_post`` Allegro layers and the Allegro edge-energy readout give ``E_i^local(q)``;
6. ``E = Σ_i E_i^local + E_elec(q; σ)`` (Gaussian-charge electrostatics, direct / Ewald / PME).
   With ``sigma_stop_gradient`` (default) σ enters ``E_elec`` through ``stop_gradient``:
   the widths learn only through the charges, as in the published model.

Open systems also return the dipole ``Σ_i q_i R_i`` (e·Å).

The published choices (chemtrain-deploy's CELLI: feedback, covalent widths with the
stop-gradient, hardness near 14.4 eV/e²) are the defaults; ``feedback="ours"``,
``sigma_mode="learnt"``, ``sigma_stop_gradient=False`` and ``hardness_init=10`` give the
earlier variant of this package, for ablations.

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
FEEDBACK_MODES = ("published", "ours")
SIGMA_MODES = ("covalent", "fixed_covalent", "learnt")
#: Floor of the derived default ``elec_sigma_max`` (Å) and head-room over the largest
#: covalent radius of the species, so that learnt widths can grow by 20 %.
SIGMA_MAX_FLOOR = 1.5
SIGMA_MAX_HEADROOM = 1.2


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
        there (``min(σ, elec_sigma_max)``, no gradient beyond it) and the electrostatics
        must be prepared with ``sigma=elec_sigma_max`` (the real-space cut-off grows with
        it). ``None``: derived once species are known,
        ``max(1.5, 1.2 · max_Z r_cov(Z))`` (and ``≥ sigma_init`` in "learnt" mode), so the
        covalent widths of every species fit with 20 % room to learn. An explicit cap
        below a species' covalent radius clips its width from the start (no gradient).
      qeq_method: "auto" (dense up to ``qeq.DENSE_MAX_ATOMS`` atoms, CG above) | "dense" | "cg".
      qeq_tol: relative residual tolerance of the Qeq solve. ``None`` resolves to 1e-10
        for float64 and 1e-5 for float32 (float32 cannot reach ~1e-10; use ~1e-5).
      qeq_maxiter: CG iteration cap (``None``: the solver's default, ``max(100, 2N)``).
      chi_mlp: hidden widths of the edge MLP whose sum gives ``χ_i`` (output 1).
      chi_scale: initial learnable scale of ``χ`` (eV/e).
      hardness_init: initial per-species hardness ``J`` (eV/e²); 14.4 as published.
      sigma_mode: Gaussian widths, "covalent" (learnt from the covalent radii, published),
        "fixed_covalent" (the covalent radii, ``ase.data.covalent_radii``) or "learnt"
        (every species from ``sigma_init``).
      sigma_init: initial Gaussian width ``σ`` (Å) of every species in "learnt" mode.
      sigma_stop_gradient: σ enters the electrostatic energy through ``stop_gradient``
        (it learns only through the charges; published). Forces are unaffected: σ
        depends on the species only.
      feedback: charge feedback, "published" (``Linear([q_i, e_Z])`` and the mix
        ``(x + a·MLP([x_ij, w_i]) u)/(1 + a)``) or "ours" (the residual
        ``x + w · MLP([φ_i, φ_j]) u``); see the module docstring.
      charge_embed_mlp: hidden widths of ``φ_i = MLP([q_i, emb(Z_i)])`` ("ours"; the
        published ``w_i`` is linear).
      charge_embed_dim: width of ``φ_i`` / ``w_i``.
      feedback_mlp: hidden widths of the feedback MLP (output ``latent_dim``).
      feedback_init: initial feedback weight: the mix ``a`` ("published"; ``None``:
        ``ln 2``, i.e. ``α = 0``) or the residual weight ``w`` ("ours"; ``None``: 0.1).
    """

    name: str = "celli"
    n_pre: int = 1
    n_post: int | None = None
    elec_method: str = "auto"
    elec_accuracy: float = 1e-6
    elec_sigma_max: float | None = None
    qeq_method: str = "auto"
    qeq_tol: float | None = None
    qeq_maxiter: int | None = None
    chi_mlp: tuple[int, ...] = (32,)
    chi_scale: float = 1.0
    hardness_init: float = 14.4
    sigma_mode: str = "covalent"
    sigma_init: float = 1.0
    sigma_stop_gradient: bool = True
    feedback: str = "published"
    charge_embed_mlp: tuple[int, ...] = (16,)
    charge_embed_dim: int = 16
    feedback_mlp: tuple[int, ...] = (32,)
    feedback_init: float | None = None

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
        if self.sigma_mode not in SIGMA_MODES:
            raise ValueError(
                f"config sigma_mode must be one of {SIGMA_MODES}, got {self.sigma_mode!r}"
            )
        if self.feedback not in FEEDBACK_MODES:
            raise ValueError(
                f"config feedback must be one of {FEEDBACK_MODES}, got {self.feedback!r}"
            )
        if self.feedback_init is None:
            init = float(np.log(2.0)) if self.feedback == "published" else 0.1
            object.__setattr__(self, "feedback_init", init)
        if self.feedback == "published" and not self.feedback_init > 0:
            raise ValueError(
                "config feedback_init (the mix a = softplus(α)) must be positive, got "
                f"{self.feedback_init}"
            )
        if self.elec_sigma_max is None and self.species is not None:
            s_max = max(
                SIGMA_MAX_FLOOR, SIGMA_MAX_HEADROOM * float(covalent_radii(self.species).max())
            )
            if self.sigma_mode == "learnt":
                s_max = max(s_max, self.sigma_init)
            object.__setattr__(self, "elec_sigma_max", round(s_max, 6))
        for key in ("hardness_init", "sigma_init", "elec_sigma_max"):
            v = getattr(self, key)
            if v is not None and not v > 0:
                raise ValueError(f"config {key} must be positive, got {v}")
        s_max = self.elec_sigma_max
        if self.sigma_mode == "learnt" and s_max is not None and self.sigma_init > s_max:
            raise ValueError(f"config sigma_init={self.sigma_init} exceeds elec_sigma_max={s_max}")
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


def covalent_radii(species: tuple[int, ...] | np.ndarray) -> np.ndarray:
    """Covalent radii (Å, ``ase.data.covalent_radii``) of atomic numbers ``species``."""
    from ase.data import covalent_radii as radii

    return np.asarray(radii, dtype=np.float64)[np.asarray(species, dtype=np.int64)]


def species_hardness(raw: jax.Array) -> jax.Array:
    """Per-species hardness ``J = softplus(raw) > 0`` (eV/e²)."""
    return jax.nn.softplus(raw)


def species_sigma(raw: jax.Array | None, config: CELLIConfig) -> jax.Array:
    """Per-species Gaussian widths ``σ_Z > 0`` (Å) of ``config.sigma_mode``, capped at
    ``elec_sigma_max`` (``min``: no gradient once capped):

    * "covalent": ``r_cov(Z) · softplus(raw) / ln 2`` (``raw = 0``: the covalent radius);
    * "fixed_covalent": ``r_cov(Z)`` (``raw`` unused, may be None);
    * "learnt": ``softplus(raw)``.

    Differentiable w.r.t. ``raw``."""
    dt = config.jnp_dtype
    if config.sigma_mode == "learnt":
        sigma = jax.nn.softplus(raw)
    else:
        r_cov = jnp.asarray(covalent_radii(config.species), dt)
        if config.sigma_mode == "fixed_covalent":
            sigma = r_cov
        else:
            sigma = r_cov * jax.nn.softplus(raw) / float(np.log(2.0))
    return jnp.minimum(sigma, float(config.elec_sigma_max))


def species_qeq_parameters(params: Any, config: CELLIConfig) -> tuple[jax.Array, jax.Array]:
    """``(J_Z, σ_Z)`` per species index from a CELLI parameter tree (they depend on the
    species only; the distributed Qeq reads them here instead of running the model)."""
    q = params["params"]["qeq"]
    dt = config.jnp_dtype
    raw_s = q.get("sigma_raw") if config.sigma_mode != "fixed_covalent" else None
    return (
        species_hardness(jnp.asarray(q["hardness_raw"], dt)),
        species_sigma(None if raw_s is None else jnp.asarray(raw_s, dt), config),
    )


def qeq_raw_parameters(config: CELLIConfig, hardness: Any, sigma: Any = None) -> dict:
    """The raw Qeq parameters that give per-species hardness ``J`` (eV/e²) and widths
    ``σ`` (Å, below ``elec_sigma_max``): ``{"hardness_raw": ..., "sigma_raw": ...}``
    (no ``sigma_raw`` in "fixed_covalent" mode, where σ is not a parameter). The inverse
    of :func:`species_qeq_parameters`, for tests and for setting physical values."""
    dt = config.jnp_dtype
    out = {"hardness_raw": jnp.asarray(np.log(np.expm1(np.asarray(hardness, float))), dt)}
    if config.sigma_mode == "fixed_covalent" or sigma is None:
        return out
    s = np.asarray(sigma, float)
    if config.sigma_mode == "covalent":
        s = s * np.log(2.0) / covalent_radii(config.species)
    out["sigma_raw"] = jnp.asarray(np.log(np.expm1(s)), dt)
    return out


def feedback_mix(x: jax.Array, y: jax.Array, a: jax.Array) -> jax.Array:
    """The published feedback update ``(x + a·y) / (1 + a)`` (``a ≥ 0``; ``a = 0``: ``x``)."""
    return (x + a * y) / (1.0 + a)


def open_dipole(positions: jax.Array, charges: jax.Array, mask: jax.Array) -> jax.Array:
    """Dipole ``Σ_i q_i R_i`` (e·Å) of the real atoms of an open system. Origin-dependent
    unless the total charge is zero (``R → R + t`` adds ``Q t``)."""
    q = jnp.where(mask, charges, 0.0)
    return jnp.sum(q[:, None] * positions, axis=0)


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
        if cfg.sigma_mode == "fixed_covalent":
            raw_s = None
        else:
            s0 = _inv_softplus(cfg.sigma_init) if cfg.sigma_mode == "learnt" else 0.0
            raw_s = self.param("sigma_raw", lambda k, s: jnp.full(s, s0, dt), (ns,))
        hardness = species_hardness(raw_j)[graph.species]
        sigma = species_sigma(raw_s, cfg)[graph.species]
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
            q0=graph.charges_guess,
        )
        return result, chi, hardness, sigma


class ChargeFeedback(nn.Module):
    """The charge feedback on the edge latents ``x`` ``(E, latent_dim)``:

    * "published": ``w_i = Linear([q_i, e_Z])``, ``y_ij = MLP([x_ij, w_i]) u(r_ij)``,
      ``x_ij ← (x_ij + a y_ij)/(1 + a)``, ``a = softplus(α)`` (parameter ``mix_raw``);
    * "ours": ``φ_i = MLP([q_i, e_Z])``, ``x_ij ← x_ij + w · MLP([φ_i, φ_j]) u(r_ij)``.
    """

    config: CELLIConfig

    @nn.compact
    def __call__(self, x: jax.Array, q: jax.Array, graph: Graph, edges: EdgeInputs) -> jax.Array:
        cfg = self.config
        dt = cfg.jnp_dtype
        emb = SpeciesEmbedding(cfg.n_species, cfg.species_embed_dim, dtype=dt, name="species")(
            graph.species
        )
        qe = jnp.concatenate([q[:, None].astype(dt), emb], axis=-1)
        if cfg.feedback == "published":
            w = MLP((cfg.charge_embed_dim,), dtype=dt, name="charge_embed")(qe)
            h = jnp.concatenate([x, w[graph.senders]], axis=-1)
            y = MLP((*cfg.feedback_mlp, cfg.latent_dim), dtype=dt, name="feedback_mlp")(h)
            alpha = self.param(
                "mix_raw", lambda k: jnp.asarray(_inv_softplus(cfg.feedback_init), dt)
            )
            return feedback_mix(x, y * edges.cut[:, None], jax.nn.softplus(alpha))
        phi = MLP((*cfg.charge_embed_mlp, cfg.charge_embed_dim), dtype=dt, name="charge_embed")(qe)
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
        periodic = graph.elec_params.periodic
        cell = graph.cell if periodic else None
        e_elec = el.energy_arrays(
            graph.positions,
            cell,
            q,
            jax.lax.stop_gradient(sigma) if cfg.sigma_stop_gradient else sigma,
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
            qeq_iterations=result.iterations,
            chi=chi,
            dipole=None if periodic else open_dipole(graph.positions, q, graph.node_mask),
        )


__all__ = [
    "CELLI",
    "CELLIConfig",
    "ChargeEquilibration",
    "ChargeFeedback",
    "FEEDBACK_MODES",
    "SIGMA_MODES",
    "covalent_radii",
    "feedback_mix",
    "open_dipole",
    "qeq_raw_parameters",
    "species_hardness",
    "species_qeq_parameters",
    "species_sigma",
]
