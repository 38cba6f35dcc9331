"""Charge equilibration: dense vs CG solve time over N, CG iterations, warm start, and
energy + forces through the implicit (CG) gradient.

System: a rock-salt-like periodic simple-cubic grid (spacing 2.82 Å, alternating
Na/Cl, n³ atoms, n even so it is neutral), rattled by 0.05 Å; per-species χ and hardness
plus a random spread in χ; Gaussian charges (σ = 1.0 / 1.2 Å). Electrostatics
``method="auto"`` (Ewald below 2000 atoms, PME above) at ``accuracy=1e-6``, real-space
neighbor list built on the host; the same electrostatics for both solvers. float64.
Solver tolerance 1e-8 (relative residual). The timed call is one jitted solve (compiled
in setup).

Quick mode (``CELLI_BENCH_QUICK=1``): 2³ and 4³ atoms only. Run ``python
bench/bench_qeq.py`` for a plain table of the full sizes.
"""

from __future__ import annotations

import os
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

import celli_scale as cs
from celli_scale import electrostatics as el
from celli_scale import qeq

QUICK = os.environ.get("CELLI_BENCH_QUICK", "") not in ("", "0")

#: Grid sites per axis (N = n³): 64, 216, 512, 1000, 4096 atoms.
GRID_N: tuple[int, ...] = (2, 4) if QUICK else (4, 6, 8, 10, 16)
#: The dense solver is timed up to this many atoms (O(N³) time, O(N² · pairs) memory to
#: assemble A by jacfwd).
DENSE_MAX = 64 if QUICK else 512
SPACING = 2.82
TOL = 1e-8
ACCURACY = 1e-6
TIMEOUT_S = 120.0 if QUICK else 1800.0


def nacl_grid(n: int, seed: int = 0):
    """``(system, chi, hardness, sigma)`` of the n³ rock-salt-like grid."""
    idx = np.stack(np.meshgrid(*(np.arange(n),) * 3, indexing="ij"), -1).reshape(-1, 3)
    rng = np.random.default_rng(seed)
    pos = idx * SPACING + rng.normal(0, 0.05, idx.shape)
    anion = idx.sum(1) % 2 == 1
    species = np.where(anion, 17, 11)
    system = cs.System(pos, species, cell=np.eye(3) * n * SPACING, pbc=True)
    chi = np.where(anion, 3.0, -3.0) + rng.normal(0, 0.2, species.size)
    hardness = np.where(anion, 9.0, 7.0)
    sigma = np.where(anion, 1.2, 1.0)
    return system, chi, hardness, sigma


class _Setup:
    def _build(self, n: int, method: str) -> None:
        system, chi, hard, sigma = nacl_grid(n)
        params = el.prepare(system, "auto", ACCURACY, sigma)
        nl = el.real_space_neighbors(system, params)
        self.system, self.params, self.nl = system, params, nl
        # params and the neighbor list are jit arguments, not closed-over constants
        # (XLA would constant-fold the pair geometry of large systems).
        self.args = (
            system.positions,
            system.cell,
            jnp.asarray(chi),
            jnp.asarray(hard),
            jnp.asarray(sigma),
            system.total_charge,
            params,
            nl,
        )
        self.solve = jax.jit(partial(qeq.solve_arrays, method=method, tol=TOL))
        self.result = self.solve(*self.args)
        jax.block_until_ready(self.result)
        qeq.check(self.result)


class QeqSolve(_Setup):
    """Wall time of one jitted Qeq solve (charges), dense vs CG."""

    params = ([n**3 for n in GRID_N], ["dense", "cg"])
    param_names = ("n_atoms", "method")
    timeout = TIMEOUT_S

    def setup(self, n_atoms: int, method: str) -> None:
        if method == "dense" and n_atoms > DENSE_MAX:
            raise NotImplementedError(f"dense solver not benchmarked above {DENSE_MAX} atoms")
        self._build(round(n_atoms ** (1 / 3)), method)

    def time_solve(self, n_atoms: int, method: str) -> None:
        jax.block_until_ready(self.solve(*self.args).charges)


class QeqCG(_Setup):
    """CG iterations to tol, and with a warm start from charges of a slightly moved
    structure (an MD step: 0.01 Å rattle)."""

    params = [n**3 for n in GRID_N]
    param_names = ("n_atoms",)
    timeout = TIMEOUT_S

    def setup(self, n_atoms: int) -> None:
        self._build(round(n_atoms ** (1 / 3)), "cg")
        moved = self.system.positions + 0.01 * jax.random.normal(
            jax.random.PRNGKey(1), self.system.positions.shape
        )
        self.warm_result = self.solve(moved, *self.args[1:], q0=self.result.charges)
        qeq.check(self.warm_result)

    def track_cg_iterations(self, n_atoms: int) -> float:
        return float(self.result.iterations)

    track_cg_iterations.unit = "iterations"

    def track_cg_iterations_warm(self, n_atoms: int) -> float:
        return float(max(int(self.warm_result.iterations), 1))

    track_cg_iterations_warm.unit = "iterations"


class QeqEnergyForces(_Setup):
    """Energy + forces (−dE*/dr, implicit differentiation of the CG solve) in one jitted
    call, vs the solve alone (QeqSolve): the gradient costs one adjoint CG solve."""

    params = [n**3 for n in GRID_N]
    param_names = ("n_atoms",)
    timeout = TIMEOUT_S

    def setup(self, n_atoms: int) -> None:
        self._build(round(n_atoms ** (1 / 3)), "cg")

        def energy(pos, *rest):
            return qeq.solve_arrays(pos, *rest, method="cg", tol=TOL).energy

        self.ef = jax.jit(jax.value_and_grad(energy))
        jax.block_until_ready(self.ef(*self.args))

    def time_energy_forces(self, n_atoms: int) -> None:
        jax.block_until_ready(self.ef(*self.args))


def _median_time(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> None:
    """Print a table of the full sizes (what bench/RESULTS.md reports)."""
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, float64, tol {TOL}")
    print("N      elec   dense_s   cg_s      cg_it  warm_it  E+F_s")
    for n in GRID_N:
        n_atoms = n**3
        row = {}
        if n_atoms <= DENSE_MAX:
            b = QeqSolve()
            b.setup(n_atoms, "dense")
            row["dense"] = _median_time(partial(b.time_solve, n_atoms, "dense"))
        c = QeqCG()
        c.setup(n_atoms)
        row["cg"] = _median_time(partial(QeqSolve.time_solve, c, n_atoms, "cg"))
        f = QeqEnergyForces()
        f.setup(n_atoms)
        row["ef"] = _median_time(partial(f.time_energy_forces, n_atoms))
        dense = f"{row['dense']:.4f}" if "dense" in row else "-"
        print(
            f"{n_atoms:<6} {c.params.method:<6} {dense:<9} {row['cg']:<9.4f} "
            f"{int(c.result.iterations):<6} {int(c.warm_result.iterations):<8} {row['ef']:.4f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
