"""Model throughput: one jitted energy + forces evaluation (no stress), warm.

Allegro, CELLI, NequIP and MACE at the matched hyper-parameters of
:data:`bench._common.HYPERPARAMS` (r_cut 5 Å, l_max 2, 32 channels, 2 layers, 8 radial
functions; CELLI 1 + 1 layers around the Qeq layer, electrostatics "auto" at accuracy
1e-6, Qeq tolerance 1e-5 in float32), on the PEERS.md NaCl grid of n³ atoms (spacing
2.2 Å, periodic, 56 neighbours per atom), float32 and float64, one device.

Graph and neighbor-list building, parameter initialisation and compilation happen in
``setup``; the timed call is the compiled evaluation plus ``block_until_ready``. A size
whose compiled program needs more memory than is available is skipped in ``setup``
(NotImplementedError, asv's skip) with the estimate in the message.
"""

from __future__ import annotations

import jax
import numpy as np

from bench._common import (
    DTYPES,
    GRID_N,
    MODELS,
    TIMEOUT_S,
    atoms_steps_per_s,
    build_potential,
    check_fits,
    config_for,
    nacl_grid,
)


class ModelEnergyForces:
    """Energy + forces of one NaCl grid (n³ atoms) for each model and precision."""

    params = (list(MODELS), list(GRID_N), list(DTYPES))
    param_names = ("model", "grid_n", "dtype")
    timeout = TIMEOUT_S
    number = 1
    repeat = (1, 5, 60.0)
    warmup_time = 0.0

    def setup(self, model: str, grid_n: int, dtype: str) -> None:
        self.pot = build_potential(config_for(model, dtype))
        self.system = nacl_grid(grid_n, rattle=0.05, seed=0)
        self.graph = self.pot.graph(self.system)
        self.compiled = self.pot.evaluate.lower(self.pot.params, self.graph).compile()
        check_fits(self.compiled)  # MemoryTooLarge is asv's skip (NotImplementedError)
        self.n_atoms = self.system.n_atoms
        out = jax.block_until_ready(self.compiled(self.pot.params, self.graph))  # warm-up
        if not np.isfinite(float(out[0])):
            raise RuntimeError(f"{model} energy is not finite for N={self.n_atoms}")

    def _step(self):
        return jax.block_until_ready(self.compiled(self.pot.params, self.graph))

    def time_energy_forces(self, model: str, grid_n: int, dtype: str) -> None:
        self._step()

    def peakmem_energy_forces(self, model: str, grid_n: int, dtype: str) -> None:
        self._step()

    def track_atoms_steps_per_s(self, model: str, grid_n: int, dtype: str) -> float:
        """Atoms · steps per second (median of 3 warm evaluations)."""
        return atoms_steps_per_s(self._step, self.n_atoms)

    track_atoms_steps_per_s.unit = "atoms*steps/s"  # type: ignore[attr-defined]
