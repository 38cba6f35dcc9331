"""Forces and stress of any energy function of ``(positions, cell)`` by autodiff: the one
strain derivative that the electrostatics and the models' :class:`Potential` share.

Stress is ``σ = (1/V) ∂E/∂ε`` for a symmetric strain ``ε`` applied to positions and cell
(``r → r (1 + ε)``, ``h → h (1 + ε)``, cell rows ``h``): ASE's sign convention, eV/Å³.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def energy_forces_stress(
    energy_fn: Callable[[jax.Array, jax.Array | None], Any],
    positions: jax.Array,
    cell: jax.Array | None,
    *,
    stress: bool,
    has_aux: bool = False,
) -> tuple[Any, jax.Array, jax.Array | None]:
    """Energy, forces ``-∂E/∂r`` and (when ``stress``) the stress, in one backward pass.

    Args:
      energy_fn: ``(positions (N, 3) Å, cell (3, 3) Å or None) -> E`` in eV, or
        ``(E, aux)`` with ``has_aux``. Pure and jit-able.
      positions: ``(N, 3)`` Å. cell: ``(3, 3)`` lattice rows in Å (may be None when
        ``stress`` is False).
      stress: also differentiate w.r.t. a symmetric strain (needs a cell with a volume).

    Returns:
      ``(value, forces (N, 3) eV/Å, stress (3, 3) eV/Å³ or None)``; ``value`` is ``E`` or
      ``(E, aux)``. Differentiable again (e.g. w.r.t. model parameters).
    """
    if not stress:
        value, grad = jax.value_and_grad(energy_fn, has_aux=has_aux)(positions, cell)
        return value, -grad, None

    dtype = positions.dtype

    def strained(pos, strain):
        deform = jnp.eye(3, dtype=dtype) + 0.5 * (strain + strain.T)
        return energy_fn(pos @ deform, cell @ deform)

    # zero strain built from the cell itself, not a constant: under shard_map a
    # replicated (unvarying) input's gradient is summed over the mesh axis, which gave
    # every structure of a sharded batch the sum of all stresses
    strain0 = jnp.zeros_like(cell) * cell
    value, (g_pos, g_strain) = jax.value_and_grad(strained, argnums=(0, 1), has_aux=has_aux)(
        positions, strain0
    )
    return value, -g_pos, g_strain / jnp.abs(jnp.linalg.det(cell))
