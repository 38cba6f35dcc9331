"""celli_scale: long-range machine-learned interatomic potentials at scale.

Importing the package turns on JAX's float64 support (``jax_enable_x64``): references
are compared in float64, and models choose float32 or float64 explicitly by config.
"""

from __future__ import annotations

import jax as _jax

_jax.config.update("jax_enable_x64", True)

from celli_scale import units  # noqa: E402
from celli_scale.system import Batch, System  # noqa: E402

__version__ = "0.1.0"

__all__ = ["Batch", "System", "units", "__version__"]


def __getattr__(name: str):
    # Heavier submodules load on first use, so `import celli_scale` stays fast.
    import importlib

    lazy = {
        "Potential": ("celli_scale.potential", "Potential"),
        "Calculator": ("celli_scale.calculator", "Calculator"),
        "electrostatics": ("celli_scale.electrostatics", None),
        "qeq": ("celli_scale.qeq", None),
        "models": ("celli_scale.models", None),
        "neighbors": ("celli_scale.neighbors", None),
        "io": ("celli_scale.io", None),
        "datasets": ("celli_scale.datasets", None),
        "distributed": ("celli_scale.distributed", None),
        "memory": ("celli_scale.memory", None),
        "study": ("celli_scale.study", None),
        "testing": ("celli_scale.testing", None),
        "md": ("celli_scale.md", None),
        "train": ("celli_scale.train", None),
    }
    if name not in lazy:
        raise AttributeError(f"module 'celli_scale' has no attribute {name!r}")
    mod, attr = lazy[name]
    m = importlib.import_module(mod)
    return m if attr is None else getattr(m, attr)
