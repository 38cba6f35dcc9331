"""Data sets: generated structures (:mod:`celli_scale.datasets.synthetic`) used by the demo,
the scaling study, the benchmarks and the tests."""

from celli_scale.datasets.synthetic import nacl_grid, random_cluster, rocksalt

__all__ = ["nacl_grid", "random_cluster", "rocksalt"]
