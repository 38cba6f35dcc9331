"""ASE calculator around a :class:`~celli_scale.potential.Potential`."""

from __future__ import annotations

from typing import Any

import numpy as np
from ase.calculators.calculator import Calculator as _AseCalculator
from ase.calculators.calculator import all_changes

from celli_scale.potential import Potential
from celli_scale.system import System


class Calculator(_AseCalculator):
    """ASE calculator: energy (eV), free_energy, forces (eV/Å), stress (eV/Å³, periodic
    cells, Voigt order as ASE expects) and charges (e, charge-aware models).

    The total charge comes from ``atoms.info['charge']`` (default: sum of initial charges).

    Example:
      >>> atoms.calc = Calculator(pot)      # doctest: +SKIP
      >>> atoms.get_potential_energy()
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress", "charges"]

    def __init__(self, potential: Potential, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.potential = potential

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        system = System.from_ase(self.atoms)
        out = self.potential(system)
        energy = float(out.energy)
        self.results = {
            "energy": energy,
            "free_energy": energy,
            "forces": np.asarray(out.forces, dtype=float),
        }
        if out.stress is not None and system.periodic:
            s = np.asarray(out.stress, dtype=float)
            self.results["stress"] = np.array(
                [s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]]
            )
        elif "stress" in properties:
            from ase.calculators.calculator import PropertyNotImplementedError

            raise PropertyNotImplementedError("stress needs a periodic cell")
        if out.charges is not None:
            self.results["charges"] = np.asarray(out.charges, dtype=float)
