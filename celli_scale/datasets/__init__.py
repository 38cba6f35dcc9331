"""Data sets: generated structures (:mod:`celli_scale.datasets.synthetic`) used by the demo,
the scaling study, the benchmarks and the tests, and reference data labelled by GFN2-xTB
through tblite (:mod:`celli_scale.datasets.qm`)."""

from celli_scale.datasets.qm import (
    SYSTEMS,
    LabelError,
    XTBSettings,
    default_cache_dir,
    generate,
    label,
    label_one,
    make,
    manifest_path,
    structures,
)
from celli_scale.datasets.synthetic import nacl_grid, random_cluster, rocksalt

__all__ = [
    "SYSTEMS",
    "LabelError",
    "XTBSettings",
    "default_cache_dir",
    "generate",
    "label",
    "label_one",
    "make",
    "manifest_path",
    "nacl_grid",
    "random_cluster",
    "rocksalt",
    "structures",
]
