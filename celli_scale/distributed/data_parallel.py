"""Data-parallel evaluation: a batch of whole structures sharded over devices.

The batch axis of a stacked graph (:meth:`celli_scale.potential.Potential.batch_graph`)
is sharded over a 1-D mesh of devices (``jax.shard_map``); every device evaluates its own
structures, one after another, through the model's one derivative path
(:attr:`Potential.evaluate <celli_scale.potential.Potential.evaluate>`, i.e.
:func:`celli_scale.potential.energy_and_derivatives`). No structure is split: that is the
domain decomposition's job (:mod:`celli_scale.distributed.domains`). With several
processes (``jax.distributed``, :mod:`celli_scale.distributed.launch`) the mesh spans
every process's devices and one code path serves one or many workers.

Units: energy eV, forces eV/Å.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from celli_scale.distributed.launch import HOST_DEVICE_FLAG

#: Name of the mesh axis the batch is sharded over.
BATCH_AXIS = "batch"


def batch_mesh(devices: int) -> Mesh:
    """A 1-D mesh (axis :data:`BATCH_AXIS`) over the first ``devices`` of
    ``jax.devices()`` (every process's devices in a multi-process run).

    Raises:
      RuntimeError: fewer devices are visible.
    """
    devs = jax.devices()
    if len(devs) < devices:
        raise RuntimeError(
            f"{devices} devices requested, {len(devs)} visible (on CPU set "
            f"XLA_FLAGS={HOST_DEVICE_FLAG}={devices} before JAX starts)"
        )
    return Mesh(np.asarray(devs[:devices]), (BATCH_AXIS,))


def data_parallel_energy_forces(pot: Any, devices: int) -> tuple[Any, NamedSharding]:
    """``(fn, sharding)`` for data-parallel energy + forces of a stacked batch.

    ``fn(params, graphs) -> (energy (B,), forces (B, N, 3), summary (3,))`` is jitted
    with the batch axis of ``graphs`` sharded as ``sharding`` (over the first ``devices``
    devices, :func:`batch_mesh`) and ``params`` replicated. ``B`` must be divisible by
    ``devices``. Energies in eV, forces eV/Å; differentiable like
    :func:`celli_scale.potential.energy_and_derivatives`.

    ``summary`` is replicated: the total energy, the number of non-finite energies and the
    largest Qeq residual (0 for models without one; check it on the host with
    :func:`summary_check`). Its all-reduce ends the step on every device, as a training
    step's gradient all-reduce would, so the time of a step is the slowest device's.
    """
    mesh = batch_mesh(devices)

    def local(params, graphs):
        # lax.map, not vmap: a device evaluates its structures one after another. On CPU
        # vmap's batched gathers/scatters made each structure 1.2-1.8x slower (measured,
        # bench/RESULTS.md), even for a batch of one.
        def one(graph):
            energy, forces, _, out = pot.evaluate(params, graph)
            res = out.qeq_residual
            res = jnp.zeros((), energy.dtype) if res is None else res.astype(energy.dtype)
            return energy, forces, res

        e, f, res = jax.lax.map(one, graphs)
        summary = jnp.stack(
            [
                jax.lax.psum(jnp.sum(e), BATCH_AXIS),
                jax.lax.psum(jnp.sum(~jnp.isfinite(e)).astype(e.dtype), BATCH_AXIS),
                jax.lax.pmax(jnp.max(res), BATCH_AXIS),
            ]
        )
        return e, f, summary

    # check_vma=False: the models' loops (CELLI's Qeq solver) carry values that are not
    # annotated as varying over the mesh axis; every device runs them on its own shard.
    sharded = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(), P(BATCH_AXIS)),
        out_specs=(P(BATCH_AXIS), P(BATCH_AXIS), P()),
        check_vma=False,
    )
    return jax.jit(sharded), NamedSharding(mesh, P(BATCH_AXIS))


def summary_check(pot: Any, summary: Any) -> str:
    """Host check of ``fn``'s ``summary``: "ok", or one line saying what is wrong
    (non-finite energies; a Qeq residual over the model's tolerance, judged by
    :func:`celli_scale.qeq.check_residual` with :attr:`Potential.qeq_tol`)."""
    from celli_scale.qeq import QeqConvergenceError, check_residual

    _, n_bad, residual = (float(v) for v in np.asarray(summary))
    if n_bad:
        return f"non-finite energy in {n_bad:.0f} structure(s)"
    if pot.qeq_tol is not None:
        try:
            check_residual(residual, pot.qeq_tol)
        except QeqConvergenceError as e:
            return f"error: {e}"
    return "ok"


def global_array(x: Any, sharding: jax.sharding.Sharding) -> jax.Array:
    """A host array that every process holds identically, laid out with ``sharding``
    (each process materialises only its own shards; one code path for 1 or many
    processes)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def place(tree: Any, sharding: jax.sharding.Sharding) -> Any:
    """:func:`global_array` on every leaf of ``tree``."""
    return jax.tree_util.tree_map(lambda x: global_array(x, sharding), tree)


__all__ = [
    "BATCH_AXIS",
    "batch_mesh",
    "data_parallel_energy_forces",
    "global_array",
    "place",
    "summary_check",
]
