"""The force-matching loss on padded batches.

``L = w_E Σ_b m_b (ΔE_b/N_b)² / B + w_F Σ_bi m_bi |ΔF_bi|² / (3 N_atoms)
    + w_Q Σ_bi m_bi Δq_bi² / N_q + w_S Σ_b m_b |Δσ_b|²_F / (9 B_S)``

where ``m`` masks padding atoms/structures and missing labels; ``ΔE`` eV, ``ΔF`` eV/Å,
``Δq`` e, ``Δσ`` eV/Å³. Every term is returned as a *sum* over the structures given;
the normalisers (counts over the whole batch) are computed on the host, so a batch split
over devices sums to exactly the same loss. Padding contributes exactly nothing: masked
entries go through ``where`` before squaring (no NaN/inf reaches the gradient).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from celli_scale.potential import energy_and_derivatives

TARGETS = ("energy", "forces", "charges", "stress")


def predict(model: Any, params: Any, graph: Any, stress: bool) -> dict[str, jax.Array]:
    """Predictions for one graph: energy (eV), forces (eV/Å), charges (e; zeros for
    models without charges), stress (eV/Å³; zeros unless ``stress``)."""
    e, f, s, out = energy_and_derivatives(model, params, graph, stress=stress)
    q = out.charges if out.charges is not None else jnp.zeros_like(graph.positions[:, 0])
    s = s if s is not None else jnp.zeros((3, 3), e.dtype)
    return {"energy": e, "forces": f, "charges": q, "stress": s}


def _sq(mask: jax.Array, d: jax.Array) -> jax.Array:
    return jnp.where(mask, jnp.where(mask, d, 0.0) ** 2, 0.0)


def squared_errors(pred: dict, labels: dict) -> dict[str, jax.Array]:
    """Per-target *sums* of squared and absolute errors for one structure
    (``{target: (sum_sq, sum_abs)}``), masked by ``labels[...+'_mask']``."""
    n = jnp.maximum(jnp.sum(labels["node_mask"]), 1).astype(pred["energy"].dtype)
    em = labels["energy_mask"]
    de = (pred["energy"] - labels["energy"]) / n
    fm = labels["node_mask"][:, None] & labels["forces_mask"]
    df = pred["forces"] - labels["forces"]
    qm = labels["node_mask"] & labels["charges_mask"]
    dq = pred["charges"] - labels["charges"]
    sm = jnp.broadcast_to(labels["stress_mask"], (3, 3))
    ds = pred["stress"] - labels["stress"]
    out = {}
    for k, m, d in (
        ("energy", em, de),
        ("forces", fm, df),
        ("charges", qm, dq),
        ("stress", sm, ds),
    ):
        out[k] = (jnp.sum(_sq(m, d)), jnp.sum(jnp.where(m, jnp.abs(jnp.where(m, d, 0.0)), 0.0)))
    return out
