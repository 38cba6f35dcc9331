"""`celli-scale demo`: the main job on the local CPU with generated data.

1. Builds a rock-salt NaCl crystal (``n`` sites per axis, ``n`` even) and checks the Ewald
   and PME Madelung energy against the exact value.
2. Equilibrates charges (Qeq) on a rattled, periodic NaCl crystal with a net charge,
   dense and CG, and reports that they agree.
3. Builds Allegro, CELLI, NequIP and MACE at matched hyper-parameters, evaluates energy,
   forces and stress on the same structure, and times warm calls (after compilation; the
   minimum of several, models interleaved) with the number of CPU threads XLA used.
4. Runs a few steps of ASE Velocity-Verlet MD with the CELLI calculator and reports energy
   conservation.
5. Generates (or loads from the cache) GFN2-xTB data of Ag3± (same geometries) and
   Na8Cl8 / Na9Cl8+, trains CELLI and Allegro on it for a few minutes each and prints
   their test errors side by side by charge state (:mod:`celli_scale.demo_train`):
   Allegro's Ag3± energy error stays near half the charge-state gap, CELLI's does not.
Writes ``summary.json``, ``demo.png``, ``charge_states.png`` and the trained models
(``celli/model``, ``allegro/model``, loadable with ``Potential.load``) into the output
directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

import celli_scale as cs
from celli_scale import demo_train
from celli_scale.datasets import nacl_grid
from celli_scale.units import COULOMB

log = logging.getLogger(__name__)

MADELUNG_NACL = 1.747564594633
#: Na-Cl nearest-neighbour distance of the demo's grid (Å).
SPACING = 2.2
#: Warm calls timed per model (the minimum is reported).
TIMING_REPEATS = 5
#: ``--quick``: the training step at smoke-test size (narrow models, a thousand steps of
#: batch 1 at a higher learning rate: CELLI already separates Ag3±); tests run it.
QUICK_PLAN = demo_train.Plan(
    n_ag3=40, n_nacl=12, epochs=30, minutes=2.0, width=4, learning_rate=1e-2
)


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run the main job on this machine's CPU with generated data")
    p.add_argument("--out", default="out/demo", help="output directory (default: out/demo)")
    p.add_argument(
        "--n",
        type=int,
        default=4,
        help="NaCl grid sites per axis, even (default 4: 64 atoms)",
    )
    p.add_argument(
        "--train-minutes",
        type=float,
        default=None,
        help="wall-clock cap on each model's training in minutes, compilation included "
        f"(default {demo_train.Plan.minutes:g}; quick: {QUICK_PLAN.minutes:g}); the best "
        "model so far is kept",
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"training epochs per model (default {demo_train.Plan.epochs}; quick: "
        f"{QUICK_PLAN.epochs})",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="small data, small models, short training (a smoke test of the whole job)",
    )
    p.add_argument("--no-train", action="store_true", help="skip the training step")


def check_grid_size(n: object) -> int:
    """``n`` as the demo's grid size: an even integer >= 2. With odd ``n`` the periodic
    grid is not rock salt (a site meets its own species across the boundary), so the
    Madelung reference would not apply."""
    if isinstance(n, bool) or not isinstance(n, int | np.integer):
        raise ValueError(f"demo --n must be an even integer >= 2, got {n!r}")
    if n < 2 or n % 2:
        raise ValueError(
            f"demo --n must be an even integer >= 2, got {n}: with odd n the periodic "
            "NaCl grid is not rock salt (like ions meet across the cell boundary), so the "
            "Madelung reference does not apply"
        )
    return int(n)


def cpu_threads() -> int:
    """CPU threads XLA's CPU backend runs on: the cores this process may use, or 1 when
    ``XLA_FLAGS`` turns Eigen's multi-threading off."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_cpu_multi_thread_eigen=false" in flags:
        return 1
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def time_warm(
    calls: Mapping[str, Callable[[], object]], repeats: int = TIMING_REPEATS
) -> dict[str, float]:
    """Seconds per call of each already-compiled ``calls[name]()``, the minimum over
    ``repeats`` rounds; in each round every call runs once, in turn (interleaved, so a
    slow moment of the machine does not favour one model). Each call must block until
    its result is ready."""
    best = {name: float("inf") for name in calls}
    for _ in range(int(repeats)):
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def training_plan(args: argparse.Namespace | None) -> demo_train.Plan | None:
    """The training step's :class:`~celli_scale.demo_train.Plan` from the options
    (``None`` with ``--no-train``); ``ValueError`` for a bad value."""
    if getattr(args, "no_train", False):
        return None
    base = QUICK_PLAN if getattr(args, "quick", False) else demo_train.Plan()
    minutes = getattr(args, "train_minutes", None)
    epochs = getattr(args, "epochs", None)
    changes = {}
    if minutes is not None:
        changes["minutes"] = float(minutes)
    if epochs is not None:
        changes["epochs"] = int(epochs)
    return dataclasses.replace(base, **changes)


def main(args: argparse.Namespace | None = None) -> int:
    out_dir = Path(getattr(args, "out", "out/demo"))
    n = check_grid_size(getattr(args, "n", 4))
    plan = training_plan(args)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict = {}
    steps = tqdm(total=4 if plan is None else 5, desc="demo", unit="step")
    t_start = time.perf_counter()

    # 1. Madelung energy
    s = nacl_grid(n, spacing=SPACING)
    q = np.where(np.asarray(s.species) == 11, 1.0, -1.0)
    exact = -(s.n_atoms / 2) * MADELUNG_NACL * COULOMB / SPACING
    madelung = {"exact_eV": exact}
    for method in ("ewald", "pme"):
        e = float(cs.electrostatics.energy(s, q, method=method, accuracy=1e-8))
        madelung[method] = {"energy_eV": e, "rel_error": abs(e - exact) / abs(exact)}
    summary["madelung"] = madelung
    steps.update()

    # 2. Charge equilibration, dense vs CG, net charge +1
    sr = nacl_grid(n, spacing=SPACING, rattle=0.1, seed=1).replace(total_charge=1.0)
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
        out = pot(sr)  # compiles
        timings[name] = {
            "energy_eV": float(out.energy),
            "max_force_eV_per_A": float(np.abs(np.asarray(out.forces)).max()),
        }
        if out.charges is not None:
            timings[name]["charge_sum"] = float(np.sum(out.charges))
        pots[name] = pot

    def call(pot):
        def run():
            out = pot(sr)  # the public call: graph on the host, then the compiled kernel
            np.asarray(out.energy), np.asarray(out.forces)  # wait for the result

        return run

    warm = time_warm({name: call(pot) for name, pot in pots.items()})
    for name, seconds in warm.items():
        timings[name]["seconds_energy_forces"] = seconds
    threads = cpu_threads()
    summary["models"] = {
        "config": cfg,
        "n_atoms": sr.n_atoms,
        "results": timings,
        "timing": {
            "statistic": f"minimum of {TIMING_REPEATS} warm calls (after compiling), "
            "models interleaved",
            "device": str(jax.devices()[0].device_kind),
            "cpu_threads": threads,
        },
    }
    steps.update()

    # 4. NVE MD through ASE with the CELLI calculator
    from ase import units
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from ase.md.verlet import VelocityVerlet

    atoms = nacl_grid(n, spacing=SPACING, rattle=0.05, seed=2).to_ase()
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

    # 5. CELLI vs Allegro trained on charge states
    written = [out_dir / "summary.json", out_dir / "demo.png"]
    table: list[str] = []
    if plan is not None:
        result, parity = demo_train.run(out_dir, plan)
        summary["charge_states"] = result
        demo_train.plot(result, parity, out_dir / "charge_states.png")
        table = demo_train.comparison_lines(result)
        written += [out_dir / "charge_states.png", out_dir / "celli" / "model",
                    out_dir / "allegro" / "model"]  # fmt: skip
        steps.update()
    steps.close()
    summary["seconds"] = time.perf_counter() - t_start

    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    _plot(summary, etot, out_dir / "demo.png")
    shown = {k: v for k, v in summary.items() if k != "charge_states"}
    print(json.dumps(shown, indent=2))
    print("\n".join(["", *timing_lines(summary), "", *table]))
    print(f"\nfinished in {summary['seconds'] / 60:.1f} min; wrote "
          + ", ".join(str(p) for p in written))  # fmt: skip
    return 0


def timing_lines(summary: dict) -> list[str]:
    """The model timings of step 3 as a short table (ms per warm energy + forces call)."""
    m = summary["models"]
    lines = [
        f"energy + forces, {m['n_atoms']} atoms, {m['config']['dtype']}, "
        f"{m['timing']['cpu_threads']} CPU threads ({m['timing']['statistic']}):"
    ]
    for name, r in m["results"].items():
        lines.append(f"  {name:<8}{r['seconds_energy_forces'] * 1e3:9.1f} ms")
    return lines


def _plot(summary: dict, etot: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    names = list(summary["models"]["results"])
    t = [summary["models"]["results"][k]["seconds_energy_forces"] * 1e3 for k in names]
    ax[0].bar(names, t, color=["C0", "C3", "C1", "C2"])
    ax[0].set_ylabel("energy + forces, warm call (ms)")
    threads = summary["models"]["timing"]["cpu_threads"]
    ax[0].set_title(
        f"{summary['models']['n_atoms']} atoms, float64, CPU ({threads} "
        f"thread{'s' if threads != 1 else ''})"
    )
    ax[1].plot(np.arange(1, len(etot) + 1), etot - etot[0], marker="o")
    ax[1].set_xlabel("MD step (1 fs)")
    ax[1].set_ylabel("E_total − E_total(1) (eV)")
    ax[1].set_title("CELLI NVE energy conservation")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
