"""Electrostatics of point and Gaussian charges: direct (open), Ewald and smooth PME.

Usage::

    from celli_scale import electrostatics as el
    params = el.prepare(system, method="auto", accuracy=1e-6, sigma=None)   # host side
    nl = el.real_space_neighbors(system, params)                            # host side
    phi = el.potential_arrays(positions, cell, charges, sigma, params, nl)  # jit-able, V
    e = el.energy(system, charges, sigma)                                   # eV
    e, f = el.energy_and_forces(system, charges, sigma)                     # eV, eV/Å

The System-level calls (``energy``, ``potential``, ``energy_and_forces``) keep their
parameters and a Verlet neighbor list between calls (:mod:`.cache`) and compile once per
(method, shapes): call them in a loop over moving atoms.

Units: Å, e, eV, V = eV/e. ``accuracy`` is the target relative RMS force error (see
:mod:`celli_scale.electrostatics.params`). ``method="auto"``: open → direct; periodic →
Ewald below :data:`AUTO_PME_MIN_ATOMS` atoms, PME from it on. Partly periodic systems raise
``NotImplementedError``.
"""

from celli_scale.electrostatics import cache, limits
from celli_scale.electrostatics.api import (
    energy,
    energy_and_forces,
    energy_arrays,
    potential,
    potential_arrays,
    potential_operator,
    real_space_neighbors,
)
from celli_scale.electrostatics.limits import (
    MAX_SIGMA_CELL_RATIO,
    ResourceEstimate,
    check_resources,
    check_sigma_max,
    estimate_resources,
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
    "MAX_SIGMA_CELL_RATIO",
    "METHODS",
    "ElectrostaticsParams",
    "ResourceEstimate",
    "cache",
    "limits",
    "check_resources",
    "check_sigma_max",
    "energy",
    "energy_and_forces",
    "energy_arrays",
    "estimate_resources",
    "potential",
    "potential_arrays",
    "potential_operator",
    "prepare",
    "real_space_neighbors",
]
