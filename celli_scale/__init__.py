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
