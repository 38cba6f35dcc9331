"""`celli-scale demo`: the main job on the default local setup (one CPU, generated data).

What it does today (each later feature extends it):
1. Builds a rock-salt NaCl crystal and checks the Ewald and PME Madelung energy against
   the exact value.
2. Equilibrates charges (Qeq) on a rattled, periodic NaCl crystal with a net charge,
   dense and CG, and reports that they agree.
3. Builds Allegro, CELLI, NequIP and MACE at matched hyper-parameters, evaluates energy,
   forces and stress on the same structure, and times them.
4. Runs a few steps of ASE Velocity-Verlet MD with the CELLI calculator and reports energy
   conservation.
Writes ``summary.json`` and ``demo.png`` into the output directory.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

import celli_scale as cs
from celli_scale.datasets import nacl_grid
from celli_scale.units import COULOMB

log = logging.getLogger(__name__)

MADELUNG_NACL = 1.747564594633


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run the main job on one CPU with generated data")
    p.add_argument("--out", default="out/demo", help="output directory (default: out/demo)")
    p.add_argument(
        "--n", type=int, default=4, help="NaCl grid sites per axis (default 4: 64 atoms)"
    )


def main(args: argparse.Namespace | None = None) -> int:
    out_dir = Path(getattr(args, "out", "out/demo"))
    n = int(getattr(args, "n", 4))
    out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict = {}
    steps = tqdm(total=4, desc="demo", unit="step")

    # 1. Madelung energy
    s = nacl_grid(n)
    q = np.where(np.asarray(s.species) == 11, 1.0, -1.0)
    exact = -(s.n_atoms / 2) * MADELUNG_NACL * COULOMB / 2.2
    madelung = {"exact_eV": exact}
    for method in ("ewald", "pme"):
        e = float(cs.electrostatics.energy(s, q, method=method, accuracy=1e-8))
        madelung[method] = {"energy_eV": e, "rel_error": abs(e - exact) / abs(exact)}
    summary["madelung"] = madelung
    steps.update()

    # 2. Charge equilibration, dense vs CG, net charge +1
    sr = nacl_grid(n, rattle=0.1, seed=1).replace(total_charge=1.0)
    rng = np.random.default_rng(0)
    chi = np.where(np.asarray(sr.species) == 11, -2.0, 2.0) + rng.normal(0, 0.1, sr.n_atoms)
    hard = np.full(sr.n_atoms, 8.0)
    sigma = np.full(sr.n_atoms, 1.0)
    rd = cs.qeq.solve(sr, chi, hard, sigma, method="dense")
    rc = cs.qeq.solve(sr, chi, hard, sigma, method="cg")
    summary["qeq"] = {
        "total_charge": float(np.sum(rc.charges)),
        "cg_iterations": int(rc.iterations),
        "max_charge_diff_dense_cg": float(
            np.max(np.abs(np.asarray(rd.charges) - np.asarray(rc.charges)))
        ),
        "energy_eV": float(rc.energy),
    }
    steps.update()

    # 3. Four models at matched hyper-parameters
    cfg = dict(r_cut=4.0, l_max=2, channels=16, n_layers=2, n_radial=8, dtype="float64")
    timings = {}
    pots = {}
    for name in tqdm(cs.models.MODEL_NAMES, desc="models", leave=False):
        pot = cs.Potential.from_config(dict(cfg, name=name), seed=0, example=sr)
        out = pot(sr)  # compile
        t0 = time.perf_counter()
        out = pot(sr)
        float(out.energy)
        timings[name] = {
            "energy_eV": float(out.energy),
            "max_force_eV_per_A": float(np.abs(np.asarray(out.forces)).max()),
            "seconds_energy_forces": time.perf_counter() - t0,
        }
        if out.charges is not None:
            timings[name]["charge_sum"] = float(np.sum(out.charges))
        pots[name] = pot
    summary["models"] = {"config": cfg, "n_atoms": sr.n_atoms, "results": timings}
    steps.update()

    # 4. NVE MD through ASE with the CELLI calculator
    from ase import units
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from ase.md.verlet import VelocityVerlet

    atoms = nacl_grid(n, rattle=0.05, seed=2).to_ase()
    atoms.calc = cs.Calculator(pots["celli"])
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(3))
    dyn = VelocityVerlet(atoms, 1.0 * units.fs)
    etot = []
    for _ in tqdm(range(20), desc="md", leave=False):
        dyn.run(1)
        etot.append(atoms.get_potential_energy() + atoms.get_kinetic_energy())
    etot = np.array(etot)
    summary["md"] = {"steps": 20, "dt_fs": 1.0, "total_energy_drift_eV": float(etot[-1] - etot[0])}
    steps.update()
    steps.close()

    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    _plot(summary, etot, out_dir / "demo.png")
    print(json.dumps(summary, indent=2))
    print(f"wrote {out_dir / 'summary.json'} and {out_dir / 'demo.png'}")
    return 0


def _plot(summary: dict, etot: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    names = list(summary["models"]["results"])
    t = [summary["models"]["results"][k]["seconds_energy_forces"] * 1e3 for k in names]
    ax[0].bar(names, t, color=["C0", "C3", "C1", "C2"])
    ax[0].set_ylabel("energy + forces (ms)")
    ax[0].set_title(f"{summary['models']['n_atoms']} atoms, float64, 1 CPU")
    ax[1].plot(np.arange(1, len(etot) + 1), etot - etot[0], marker="o")
    ax[1].set_xlabel("MD step (1 fs)")
    ax[1].set_ylabel("E_total − E_total(1) (eV)")
    ax[1].set_title("CELLI NVE energy conservation")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
