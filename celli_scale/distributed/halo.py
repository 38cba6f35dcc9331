"""Halo exchange inside ``jax.shard_map``: ghosts forward, their forces back.

A :class:`celli_scale.distributed.domains.Decomposition` plans the exchange as a list of
stages, one ``jax.lax.ppermute`` each, along mesh axis ``x``, ``y`` or ``z`` (one step
in one direction; several hops when a domain is narrower than the halo). Stage by stage,
every shard gathers the buffer entries it sends, the permutation delivers them, and the
receiver writes them into its next block, adding ``wrap × cell[axis]`` where the step
crosses the periodic boundary. Ghosts received along ``x`` travel on along ``y`` and
``z``, so corner ghosts need no diagonal message (LAMMPS' staged "borders" exchange).

The reverse exchange runs the stages backwards with the inverse permutation and
scatter-adds what comes back onto the entries that were sent: it is the transpose of
the forward exchange (a test checks it against ``jax.vjp``), which sums the force
contributions computed on ghosts into their owners. Image shifts drop out of forces.

Units: positions Å (any per-atom field may be exchanged without a shift), forces eV/Å.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

#: Names of the (always 3-D, sizes may be 1) device mesh axes, one per frame axis.
MESH_AXES: tuple[str, str, str] = ("x", "y", "z")


def mesh_shape(shape: Any) -> tuple[int, int, int]:
    """Bricks per axis as 3 positive integers (1 to 3 given; missing axes are 1)."""
    try:
        dims = [int(d) for d in shape]
    except (TypeError, ValueError):
        raise ValueError(f"mesh_shape must be 1 to 3 positive integers, got {shape!r}") from None
    if not 1 <= len(dims) <= 3 or min(dims) < 1:
        raise ValueError(f"mesh_shape must be 1 to 3 positive integers, got {shape!r}")
    return tuple(dims + [1] * (3 - len(dims)))  # type: ignore[return-value]


def mesh_devices(n: int) -> list[Any]:
    """The first ``n`` devices JAX lists; a clear error naming the XLA flag when fewer."""
    have = jax.devices()
    if n > len(have):
        raise ValueError(
            f"the decomposition needs {n} devices but JAX sees {len(have)} "
            f"({have[0].platform}); on CPU set XLA_FLAGS=--xla_force_host_platform_device_"
            f"count={n} before JAX starts (the celli-scale run command does this)"
        )
    return have[:n]


def stage_specs(stages: Sequence[Any]) -> tuple[tuple[int, int, int, tuple], ...]:
    """The static part of the stages: ``(axis, offset, capacity, perm)`` per stage."""
    return tuple((s.axis, s.offset, s.capacity, tuple(s.perm)) for s in stages)


def stage_arrays(stages: Sequence[Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(send_idx, send_mask, wrap)``, each a tuple over stages of ``(S, ...)`` arrays."""
    return (
        tuple(s.send_idx for s in stages),
        tuple(s.send_mask for s in stages),
        tuple(s.wrap for s in stages),
    )


def forward(
    values: jax.Array,
    n_buffer: int,
    specs: Sequence[tuple[int, int, int, tuple]],
    send_idx: Sequence[jax.Array],
    wrap: Sequence[jax.Array] | None = None,
    cell: jax.Array | None = None,
) -> jax.Array:
    """One shard's buffer ``(n_buffer, ...)``: its owned ``values`` followed by the ghosts'.

    Call inside ``shard_map`` over a mesh with axes :data:`MESH_AXES`. With ``wrap`` and
    ``cell`` the values are positions and periodic images are shifted; without, any
    per-atom field (charges, features) is copied as it is.
    """
    buf = jnp.zeros((n_buffer, *values.shape[1:]), values.dtype)
    buf = jax.lax.dynamic_update_slice_in_dim(buf, values, 0, axis=0)
    for k, (axis, offset, _cap, perm) in enumerate(specs):
        sent = jax.lax.ppermute(buf[send_idx[k]], MESH_AXES[axis], perm=list(perm))
        if wrap is not None:
            sent = sent + wrap[k].astype(values.dtype) * cell[axis]
        buf = jax.lax.dynamic_update_slice_in_dim(buf, sent, offset, axis=0)
    return buf


def reverse(
    grads: jax.Array,
    n_owned: int,
    specs: Sequence[tuple[int, int, int, tuple]],
    send_idx: Sequence[jax.Array],
    send_mask: Sequence[jax.Array],
) -> jax.Array:
    """Sum a buffer's per-entry contributions (e.g. ``∂E/∂x`` on ghosts) back to the
    owners: the transpose of :func:`forward`. Returns the owned entries ``(n_owned, ...)``."""
    for k in reversed(range(len(specs))):
        axis, offset, cap, perm = specs[k]
        block = jax.lax.dynamic_slice_in_dim(grads, offset, cap, axis=0)
        back = jax.lax.ppermute(block, MESH_AXES[axis], perm=[(b, a) for a, b in perm])
        mask = send_mask[k].reshape(send_mask[k].shape + (1,) * (back.ndim - 1))
        grads = grads.at[send_idx[k]].add(jnp.where(mask, back, 0))
    return grads[:n_owned]


def bytes_per_exchange(decomposition: Any, width: int = 3, itemsize: int = 4) -> int:
    """Bytes one forward exchange moves between devices, all shards together: every
    stage sends its padded block (``capacity × width × itemsize``) from each shard with a
    receiver (the reverse exchange moves the same amount). Sends to itself (a mesh axis of
    size 1) are counted too: they are the periodic images' copy."""
    total = 0
    mesh = decomposition.mesh_shape
    for st in decomposition.stages:
        senders = len(st.perm) * int(np.prod(mesh)) // int(mesh[st.axis])
        total += senders * st.capacity * width * itemsize
    return int(total)


__all__ = [
    "MESH_AXES",
    "bytes_per_exchange",
    "forward",
    "mesh_devices",
    "mesh_shape",
    "reverse",
    "stage_arrays",
    "stage_specs",
]
