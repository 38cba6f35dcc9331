"""asv benchmarks: electrostatics (Ewald, PME) on the NaCl grid (the shared PEERS.md), float64.

NaCl grid: n³ sites of a simple cubic grid, spacing 2.2 Å, charges ±1 alternating, periodic
cubic cell of side 2.2·n Å; exact energy −(N/2)·M·COULOMB/2.2 with the rock-salt Madelung
constant M. Timed work: energy + forces (``jax.value_and_grad``, jit-compiled and warmed up
in ``setup``; neighbor lists and parameters prepared in ``setup``).

jax-pme (PEERS.md) co-installs with jax 0.10.2 but is not a dependency; its figures are
quoted from PEERS.md rather than re-run here.

``PublicVsPrepared`` / ``PublicOverPrepared``: the public call a new user writes,
``electrostatics.energy_and_forces(system, q)`` (parameters and Verlet list cached between
calls, one compiled kernel), against the prepared jitted kernel above, N = 1,000, warm.

Set ``CELLI_BENCH_QUICK=1`` for tiny sizes (every benchmark runs once, fast).
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np

import celli_scale as cs
from celli_scale import electrostatics as el
from celli_scale.units import COULOMB

QUICK = os.environ.get("CELLI_BENCH_QUICK", "0") not in ("", "0")
MADELUNG_NACL = 1.747564594633
SPACING = 2.2
ACCURACY = 1e-6

#: grid sides n (N = n³) per family; quick mode uses tiny systems
PME_SIDES = [4] if QUICK else [10, 16, 20, 40]
EWALD_SIDES = [4] if QUICK else [6, 10, 16, 20]
PEER_SIDE = 4 if QUICK else 10
PUBLIC_SIDE = 4 if QUICK else 10


def nacl_grid(n: int):
    """``(System, charges)`` of the NaCl grid with n³ sites."""
    idx = np.stack(np.meshgrid(*[np.arange(n)] * 3, indexing="ij"), -1).reshape(-1, 3)
    q = np.where(idx.sum(axis=1) % 2 == 0, 1.0, -1.0)
    z = np.where(q > 0, 11, 17)
    s = cs.System(idx * SPACING, z, cell=np.eye(3) * SPACING * n, pbc=True, validate=False)
    return s, q


def exact_energy(n_atoms: int) -> float:
    return -(n_atoms / 2) * MADELUNG_NACL * COULOMB / SPACING


class _Ours:
    method = "pme"
    timeout = 600
    param_names = ["n_atoms"]

    def setup(self, n_atoms):
        n = round(n_atoms ** (1 / 3))
        s, q = nacl_grid(n)
        self.params = el.prepare(s, self.method, ACCURACY)
        self.nl = el.real_space_neighbors(s, self.params)
        self.q = jax.numpy.asarray(q)
        self.pos, self.cell = s.positions, s.cell
        self.fn = jax.jit(
            jax.value_and_grad(lambda p, c, qq, prm, nl: el.energy_arrays(p, c, qq, None, prm, nl))
        )
        self.run()  # compile + warm up

    def run(self):
        e, g = self.fn(self.pos, self.cell, self.q, self.params, self.nl)
        return jax.block_until_ready((e, g))

    def time_energy_forces(self, n_atoms):
        self.run()

    def peakmem_energy_forces(self, n_atoms):
        self.run()

    def track_energy_rel_error(self, n_atoms):
        e, _ = self.run()
        return abs(float(e) / exact_energy(n_atoms) - 1)

    track_energy_rel_error.unit = "relative"

    def track_max_force(self, n_atoms):
        """Exactly zero by symmetry; the value is the force error (eV/Å)."""
        _, g = self.run()
        return float(np.max(np.abs(np.asarray(g))))

    track_max_force.unit = "eV/Å"


class PME(_Ours):
    """Our smooth PME (order 6), accuracy 1e-6, energy + forces."""

    method = "pme"
    params = [n**3 for n in PME_SIDES]


class Ewald(_Ours):
    """Our Ewald, accuracy 1e-6, energy + forces (for the Ewald/PME crossover)."""

    method = "ewald"
    params = [n**3 for n in EWALD_SIDES]


class EwaldVsPymatgen:
    """Ewald energy + forces at N = 1000: ours vs pymatgen ``EwaldSummation`` (default
    ``acc_factor=12``, the PEERS.md setting)."""

    timeout = 600
    params = ["celli_scale", "pymatgen"]
    param_names = ["code"]

    def setup(self, code):
        s, q = nacl_grid(PEER_SIDE)
        self.n_atoms = s.n_atoms
        if code == "celli_scale":
            self.ours = Ewald()
            self.ours.setup(s.n_atoms)
            self.run = self.ours.run
        else:
            from pymatgen.analysis.ewald import EwaldSummation
            from pymatgen.core import Lattice, Structure

            st = Structure(
                Lattice(np.asarray(s.cell)),
                ["Na" if c > 0 else "Cl" for c in q],
                np.asarray(s.positions),
                coords_are_cartesian=True,
                site_properties={"charge": list(q)},
            )

            def run():
                ew = EwaldSummation(st, compute_forces=True)
                return ew.total_energy, ew.forces

            self.run = run

    def time_energy_forces(self, code):
        self.run()

    def track_energy_rel_error(self, code):
        e, _ = self.run()
        return abs(float(e) / exact_energy(self.n_atoms) - 1)

    track_energy_rel_error.unit = "relative"


class _PublicAndPrepared:
    """Both ways of getting energy + forces on the same NaCl grid (float64, accuracy 1e-6)."""

    def _setup_both(self, method):
        s, q = nacl_grid(PUBLIC_SIDE)
        self.system, self.q_np, self.method = s, q, method
        self.prepared = _Ours()
        self.prepared.method = method
        self.prepared.setup(s.n_atoms)  # prepare + exact list outside the timing, jit warm
        self.rng = np.random.default_rng(0)
        self.pos0 = np.asarray(s.positions)
        self.public()  # compile + warm up (parameters and Verlet list cached)
        self.public()

    def public(self):
        out = el.energy_and_forces(self.system, self.q_np, method=self.method)
        return jax.block_until_ready(out)

    def public_moving(self):
        """As an MD step: new positions each call (within the Verlet skin: no rebuild)."""
        pos = self.pos0 + self.rng.uniform(-0.01, 0.01, self.pos0.shape)
        moved = self.system.replace(positions=pos)
        out = el.energy_and_forces(moved, self.q_np, method=self.method)
        return jax.block_until_ready(out)


class PublicVsPrepared(_PublicAndPrepared):
    """N = 1,000 (quick: 64), warm: public ``energy_and_forces(system, q)`` at fixed and at
    moving positions vs the prepared jitted kernel (``prepare`` + exact
    ``real_space_neighbors`` + jitted ``value_and_grad(energy_arrays)``, host work outside
    the timing)."""

    timeout = 600
    params = (["ewald", "pme"], ["public", "public_moving", "prepared"])
    param_names = ["method", "call"]

    def setup(self, method, call):
        self._setup_both(method)
        self.call = {
            "public": self.public,
            "public_moving": self.public_moving,
            "prepared": self.prepared.run,
        }[call]

    def time_energy_forces(self, method, call):
        self.call()


class PublicOverPrepared(_PublicAndPrepared):
    """min(public) / min(prepared) over interleaved warm calls, N = 1,000 (quick: 64).
    The goal is ≤ 1.5."""

    timeout = 900
    params = ["ewald", "pme"]
    param_names = ["method"]
    rounds = 1
    repeat = 1
    number = 1

    def setup(self, method):
        self._setup_both(method)

    def _ratio(self, public, rounds=3 if QUICK else 7):
        t_pub, t_prep = [], []
        for _ in range(rounds):
            t0 = time.perf_counter()
            public()
            t_pub.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            self.prepared.run()
            t_prep.append(time.perf_counter() - t0)
        return min(t_pub) / min(t_prep)

    def track_public_over_prepared(self, method):
        return self._ratio(self.public)

    track_public_over_prepared.unit = "ratio"

    def track_public_moving_over_prepared(self, method):
        return self._ratio(self.public_moving)

    track_public_moving_over_prepared.unit = "ratio"
