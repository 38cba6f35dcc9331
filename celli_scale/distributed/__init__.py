"""Distribution: worker processes and ``jax.distributed`` on loopback (:mod:`.launch`),
data-parallel batch evaluation (:mod:`.data_parallel`), the spatial domain decomposition
(:mod:`.domains`), its halo exchange (:mod:`.halo`) and the sharded potential
(:mod:`.sharded`: ``cs.distributed.ShardedPotential``). Submodules load on first use."""

from __future__ import annotations


def __getattr__(name: str):
    import importlib

    if name in ("ShardedPotential", "ShardStats"):
        return getattr(importlib.import_module("celli_scale.distributed.sharded"), name)
    if name in ("data_parallel", "domains", "halo", "launch", "sharded"):
        return importlib.import_module(f"celli_scale.distributed.{name}")
    raise AttributeError(f"module 'celli_scale.distributed' has no attribute {name!r}")
