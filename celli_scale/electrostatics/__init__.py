"""Electrostatics of point and Gaussian charges: direct (open), Ewald and smooth PME.

Usage::

    from celli_scale import electrostatics as el
    params = el.prepare(system, method="auto", accuracy=1e-6, sigma=None)   # host side
    nl = el.real_space_neighbors(system, params)                            # host side
    phi = el.potential_arrays(positions, cell, charges, sigma, params, nl)  # jit-able, V
    e = el.energy(system, charges, sigma)                                   # eV

Units: Å, e, eV, V = eV/e. ``accuracy`` is the target relative RMS force error (see
:mod:`celli_scale.electrostatics.params`). ``method="auto"``: open → direct; periodic →
Ewald below :data:`AUTO_PME_MIN_ATOMS` atoms, PME from it on. Partly periodic systems raise
``NotImplementedError``.
"""

from celli_scale.electrostatics.api import (
    energy,
    energy_arrays,
    potential,
    potential_arrays,
    real_space_neighbors,
)
from celli_scale.electrostatics.params import (
    AUTO_PME_MIN_ATOMS,
    DEFAULT_PME_ORDER,
    METHODS,
    ElectrostaticsParams,
    prepare,
)

__all__ = [
    "AUTO_PME_MIN_ATOMS",
    "DEFAULT_PME_ORDER",
    "METHODS",
    "ElectrostaticsParams",
    "energy",
    "energy_arrays",
    "potential",
    "potential_arrays",
    "prepare",
    "real_space_neighbors",
]
