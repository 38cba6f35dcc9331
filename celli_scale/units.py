"""Physical constants and unit conversions.

Internal units: Å, eV, elementary charge e, fs, amu.
"""

from __future__ import annotations

import math

from scipy import constants as _si

#: Coulomb constant e²/(4π ε₀) in eV·Å/e², derived from the CODATA constants that
#: ``scipy.constants`` ships (CODATA 2022 from scipy 1.15 on, 14.3996454687; CODATA 2018
#: in scipy 1.13–1.14, 7e-10 relative higher): e²/(4π ε₀ · 1 Å) in J is
#: ``e/(4π ε₀ · 1e-10 m)`` in eV. pymatgen's Ewald uses the same scipy constants; ASE's
#: ``create_units("2022")`` agrees to 1.2e-12 relative (ASE derives ε₀ from μ₀).
COULOMB: float = _si.e / (4.0 * math.pi * _si.epsilon_0 * _si.angstrom)

#: Bohr radius in Å (CODATA 2018).
BOHR: float = 0.529177210903
#: Hartree energy in eV (CODATA 2018).
HARTREE: float = 27.211386245988
#: Hartree/Bohr in eV/Å.
HARTREE_PER_BOHR: float = HARTREE / BOHR

#: Boltzmann constant in eV/K.
KB: float = 8.617333262e-5
