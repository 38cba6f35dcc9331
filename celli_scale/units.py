"""Physical constants and unit conversions.

Internal units: Å, eV, elementary charge e, fs, amu.
"""

from __future__ import annotations

#: Coulomb constant 1/(4 pi eps0) in eV·Å/e².
COULOMB: float = 14.399645

#: Bohr radius in Å (CODATA 2018).
BOHR: float = 0.529177210903
#: Hartree energy in eV (CODATA 2018).
HARTREE: float = 27.211386245988
#: Hartree/Bohr in eV/Å.
HARTREE_PER_BOHR: float = HARTREE / BOHR

#: Boltzmann constant in eV/K.
KB: float = 8.617333262e-5
