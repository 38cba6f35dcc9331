"""Open-boundary Coulomb interaction of point or Gaussian charges, all pairs, O(N²).

Pair kernel ``COULOMB q_i q_j erf(r/(√2 γ_ij))/r`` with ``γ_ij = sqrt(σ_i² + σ_j²)`` for
Gaussians (plus each Gaussian's self-energy ``COULOMB q_i²/(2 σ_i √π)``), ``1/r`` for
point charges. Pure jnp, differentiable in positions, charges and sigma; padded atoms and
the diagonal are masked with the "double where" idiom so gradients never see NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import erf

from celli_scale.units import COULOMB


def pair_matrix(positions: jax.Array, sigma: jax.Array | None, mask: jax.Array) -> jax.Array:
    """``(N, N)`` matrix ``A_ij`` (1/Å, without COULOMB) of the pair kernel, zero on the
    diagonal and for masked atoms."""
    n = positions.shape[0]
    vec = positions[None, :, :] - positions[:, None, :]
    r2 = jnp.sum(vec * vec, axis=-1)
    valid = (~jnp.eye(n, dtype=bool)) & mask[:, None] & mask[None, :]
    r = jnp.sqrt(jnp.where(valid, r2, 1.0))
    s_i, s_j = (None, None) if sigma is None else (sigma[:, None], sigma[None, :])
    return jnp.where(valid, pair_kernel(r, s_i, s_j), 0.0)


def pair_kernel(r: jax.Array, s_i: jax.Array | None, s_j: jax.Array | None) -> jax.Array:
    """Open-boundary pair kernel (1/Å, without COULOMB): ``erf(r/(√2 γ))/r`` with
    ``γ² = σ_i² + σ_j²``, or ``1/r`` for point charges (``s_i`` None)."""
    if s_i is None:
        return 1.0 / r
    return erf(r / jnp.sqrt(2.0 * (s_i**2 + s_j**2))) / r


def self_potential(q: jax.Array, sigma: jax.Array | None) -> jax.Array:
    """∂/∂q_i of the Gaussian self-energies ``COULOMB q_i²/(2 σ_i √π)`` (V); zero for points."""
    if sigma is None:
        return jnp.zeros_like(q)
    return COULOMB * q / (sigma * jnp.sqrt(jnp.pi))


def potential(positions, q, sigma, mask) -> jax.Array:
    """φ_i = ∂E/∂q_i (V) of the open-boundary energy."""
    a = pair_matrix(positions, sigma, mask)
    return COULOMB * (a @ q) + self_potential(q, sigma)


def energy(positions, q, sigma, mask) -> jax.Array:
    """Open-boundary energy (eV)."""
    a = pair_matrix(positions, sigma, mask)
    return 0.5 * COULOMB * (q @ (a @ q)) + 0.5 * jnp.sum(q * self_potential(q, sigma))
