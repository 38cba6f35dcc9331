"""MD throughput: the compiled jax-md loop (:class:`celli_scale.md.MD`) against the ASE loop
(``ase.md.VelocityVerlet`` with :class:`celli_scale.Calculator`) for the same model and system.

Allegro, CELLI, NequIP and MACE at the matched hyper-parameters of
:data:`bench._common.HYPERPARAMS`, float32, NVE at 1 fs from 300 K Maxwell–Boltzmann
velocities, on the ``MD_GRID_N``³ NaCl grid (spacing 2.2 Å, rattle 0.05 Å), one device.
``time_steps`` times ``MD_STEPS`` steps (one compiled block for jax-md; ASE calls the
calculator once per step), warm (compiled and run once in ``setup``).

``python -m bench.bench_md [--grid 10] [--steps 10] [--rounds 3]`` prints both loops for every
model, interleaved, min over rounds (s/step and atom-steps/s), and CELLI's Qeq share of a
step with cold, warm-started and extended-Lagrangian (4 CG iterations) solves
(1 − Allegro step / CELLI step: the same trunk, two layers; bench/RESULTS.md) and their NVE
drift on a small float64 crystal.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bench._common import MODELS, QUICK, TIMEOUT_S, build_potential, config_for, nacl_grid

MD_GRID_N: tuple[int, ...] = (3,) if QUICK else (10,)  # 27 / 1000 atoms
MD_STEPS = 4 if QUICK else 10
LOOPS = ("jaxmd", "ase")


def make_loop(
    model: str, grid_n: int, loop: str, steps: int, *, qeq: str = "warm", dtype: str = "float32"
):
    """A warm ``run()`` that advances ``steps`` MD steps with ``loop``."""
    from celli_scale.md import MD, MDConfig

    pot = build_potential(config_for(model, dtype))
    pot.capacity_growth = 1.2  # MD: head-room so that lists survive moving atoms
    s = nacl_grid(grid_n, rattle=0.05, seed=0)
    if loop == "jaxmd":
        md = MD(pot, s, MDConfig(ensemble="nve", dt=1.0, temperature=300.0, every=steps, qeq=qeq))
        md.run(steps, progress=False)

        def run():
            return md.run(steps, progress=False)

        return run, md
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from ase.md.verlet import VelocityVerlet
    from ase.units import fs

    from celli_scale import Calculator

    atoms = s.to_ase()
    MaxwellBoltzmannDistribution(atoms, temperature_K=300.0, rng=np.random.default_rng(0))
    atoms.calc = Calculator(pot)
    dyn = VelocityVerlet(atoms, 1.0 * fs)
    dyn.run(2)

    def run():
        dyn.run(steps)
        return atoms

    return run, dyn


class MDThroughput:
    """``MD_STEPS`` NVE steps per model and loop (jax-md compiled block vs ASE), float32."""

    params = (list(MODELS), list(MD_GRID_N), list(LOOPS))
    param_names = ("model", "grid_n", "loop")
    timeout = TIMEOUT_S
    number = 1
    repeat = (1, 3, 120.0)
    warmup_time = 0.0

    def setup(self, model: str, grid_n: int, loop: str) -> None:
        self.run, _ = make_loop(model, grid_n, loop, MD_STEPS)

    def time_steps(self, model: str, grid_n: int, loop: str) -> None:
        self.run()


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def throughput(grid_n: int, steps: int, rounds: int) -> dict:
    """s/step of both loops for every model, interleaved, min over ``rounds``."""
    runs = {}
    for m in MODELS:
        for loop in LOOPS:
            runs[(m, loop)] = make_loop(m, grid_n, loop, steps)[0]
    best = dict.fromkeys(runs, np.inf)
    for _ in range(rounds):
        for k, run in runs.items():
            best[k] = min(best[k], _timed(run) / steps)
    return best


def qeq_share(grid_n: int, steps: int, rounds: int) -> dict:
    """s/step of the jax-md loop: Allegro, CELLI cold, CELLI warm (interleaved), and the
    mean CG iterations per step of each CELLI mode."""
    runs = {
        "allegro": make_loop("allegro", grid_n, "jaxmd", steps),
        "celli cold": make_loop("celli", grid_n, "jaxmd", steps, qeq="cold"),
        "celli warm": make_loop("celli", grid_n, "jaxmd", steps, qeq="warm"),
        "celli xl": make_loop("celli", grid_n, "jaxmd", steps, qeq="xl"),
    }
    best = dict.fromkeys(runs, np.inf)
    iters = {}
    for _ in range(rounds):
        for k, (run, _md) in runs.items():
            t0 = time.perf_counter()
            res = run()
            best[k] = min(best[k], (time.perf_counter() - t0) / steps)
            if res.qeq_iterations is not None:
                iters[k] = float(np.mean(res.qeq_iterations))
    return {"s_per_step": best, "cg_iterations": iters}


def drift(grid_n: int = 4, steps: int = 2000) -> dict:
    """NVE drift (eV/atom/ps) and conserved-energy fluctuation of CELLI (CG Qeq) cold,
    warm and extended-Lagrangian (4 CG iterations per step), float64, dt 0.5 fs,
    ``grid_n``³ NaCl grid."""
    from celli_scale.md import MD, MDConfig

    out = {}
    for qeq in ("cold", "warm", "xl"):
        pot = build_potential({**config_for("celli", "float64"), "qeq_method": "cg"})
        pot.capacity_growth = 1.2
        s = nacl_grid(grid_n, rattle=0.05, seed=0)
        md = MD(pot, s, MDConfig(ensemble="nve", dt=0.5, temperature=300.0, every=100, qeq=qeq))
        res = md.run(steps, progress=False)
        out[qeq] = {
            "drift_eV_atom_ps": res.drift,
            "std_conserved_over_std_kinetic": float(np.std(res.conserved) / np.std(res.kinetic)),
            "cg_iterations": float(np.mean(res.qeq_iterations)),
            "s_per_step": res.wall_warm / max(res.steps_warm, 1),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", type=int, default=MD_GRID_N[-1])
    ap.add_argument("--steps", type=int, default=MD_STEPS)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-drift", action="store_true")
    ap.add_argument("--drift-grid", type=int, default=4)
    ap.add_argument("--drift-steps", type=int, default=2000)
    args = ap.parse_args()
    n = args.grid**3
    if not args.skip_throughput:
        best = throughput(args.grid, args.steps, args.rounds)
        print(f"N = {n}, float32, NVE 1 fs, {args.steps} steps per run, min of {args.rounds}")
        print("model     jax-md s/step  ASE s/step  jax-md atom-steps/s  ASE/jax-md")
        for m in MODELS:
            a, b = best[(m, "jaxmd")], best[(m, "ase")]
            print(f"{m:8s}  {a:13.4f}  {b:10.4f}  {n / a:19.0f}  {b / a:10.2f}")
    q = qeq_share(args.grid, args.steps, args.rounds)
    t = q["s_per_step"]
    print(f"jax-md loop s/step: {t}; CG iterations/step: {q['cg_iterations']}")
    for k in ("celli cold", "celli warm", "celli xl"):
        print(f"  Qeq share ({k}): {1 - t['allegro'] / t[k]:.1%}")
    if args.skip_drift:
        return
    d = drift(args.drift_grid, args.drift_steps)
    print(f"NVE drift, CELLI float64, N = {args.drift_grid**3}, {args.drift_steps} steps: {d}")


if __name__ == "__main__":
    main()
