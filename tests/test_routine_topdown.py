"""Top-down stages in a training routine: force matching, then DiffTRe on the routine's
Potential (its own MD as the sampler) refines the force-matched parameters and lowers the
DiffTRe loss; a routine interrupted inside the DiffTRe stage and resumed by
``celli-scale train`` (fresh objects: the reference trajectory re-sampled from its record)
ends bit for bit where the uninterrupted one does; the relative-entropy stage built from a
config; clear errors for bad stage entries."""

from __future__ import annotations

import csv

import jax
import numpy as np
import pytest
import yaml

import celli_scale as cs
from celli_scale.datasets import nacl_grid
from celli_scale.io import Frame, read, write
from celli_scale.md import rdf as md_rdf
from celli_scale.testing import small_allegro_config
from celli_scale.train.cli import STAGE_BUILDERS, StageContext, routine_from_config
from celli_scale.train.routine import Routine

# 8 atoms in a 5.6 Å periodic cube; one narrow Allegro layer (float64, compiles in seconds)
CFG = small_allegro_config(l_max=1, n_layers=1, r_cut=4.0)
GRID = dict(n=2, spacing=2.8)
FM_EPOCHS, DT_EPOCHS, STOP_AFTER = 2, 3, 3  # interrupted after DiffTRe's first update


def max_diff(a, b) -> float:
    d = jax.tree_util.tree_map(lambda x, y: float(np.max(np.abs(np.asarray(x) - y))), a, b)
    return max(jax.tree_util.tree_leaves(d))


def labelled(n: int) -> list[Frame]:
    """Rattled grids labelled by a reference Allegro (another seed, energies x 10)."""
    ref = cs.Potential.from_config(CFG, seed=123)
    frames = []
    for k in range(n):
        s = nacl_grid(**GRID, rattle=0.15, seed=k)
        o = ref(s)
        frames.append(Frame(s, energy=10 * float(o.energy), forces=10 * np.asarray(o.forces)))
    return frames


def difftre_entry(**changes) -> dict:
    entry = {
        "type": "difftre",
        "epochs": DT_EPOCHS,
        "state_points": [
            {
                "name": "grid",
                "structure": "start.xyz",
                "temperature": 300,
                "targets": {
                    "rdf": {"file": "target_rdf.csv", "weight": 0.1},
                    "pressure": {"value": 0.0, "unit": "kbar", "weight": 0.01},
                },
            }
        ],
        "md": {"dt": 1.0, "friction": 0.02},
        "sampling": {"equilibration": 20, "frames": 5, "stride": 5},
        "optimizer": {"learning_rate": 2e-3},
        "ess_threshold": 0.995,  # re-sampled before the third update
    }
    entry.update(changes)
    return entry


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """train.xyz (4 labelled grids), start.xyz, target_rdf.csv (the unrattled grid's g(r)
    on 14 bins to half the box, as ``celli-scale md`` writes it) and run.yaml."""
    base = tmp_path_factory.mktemp("topdown")
    write(base / "train.xyz", labelled(4))
    start = nacl_grid(**GRID, rattle=0.05)
    write(base / "start.xyz", [Frame(start)])
    write(base / "open.xyz", [Frame(cs.System(start.positions, start.species))])
    r, g = md_rdf(nacl_grid(**GRID).positions, start.cell, 2.8, 14)
    table = np.column_stack([np.asarray(r), np.asarray(g)])
    np.savetxt(base / "target_rdf.csv", table, delimiter=",", header="r_A,g", comments="")
    cfg = {
        "model": {k: list(v) if isinstance(v, tuple) else v for k, v in CFG.items()},
        "data": {"train": "train.xyz", "valid_fraction": 0.25},
        "out": "out",
        "seed": 0,
        "progress": False,
        "stages": [
            {
                "type": "force_matching",
                "epochs": FM_EPOCHS,
                "batch_size": 3,
                "devices": 1,
                "optimizer": {"learning_rate": 1e-2},
            },
            difftre_entry(),
        ],
    }
    (base / "run.yaml").write_text(yaml.safe_dump(cfg))
    return base, cfg


@pytest.fixture(scope="module")
def interrupted(workdir):
    """The config's routine stopped after ``STOP_AFTER`` epochs (checkpoints in
    ``out/checkpoints``), and the same stages run uninterrupted without checkpoints."""
    base, cfg = workdir
    routine, pot, out = routine_from_config(cfg, base)
    p0 = pot.params  # after the force-matching stage set its energy shifts
    state = routine.run(p0, progress=False, stop_after=STOP_AFTER)
    assert int(state["cursor"]["epoch"]) == STOP_AFTER
    full = Routine.sequential([(t.stage, t.epochs) for t in routine.turns])
    return {
        "routine": routine,
        "pot": pot,
        "out": out,
        "p0": p0,
        "full": full,
        "state": full.run(p0, progress=False),
    }


def test_difftre_stage_refines_the_force_matched_model(interrupted):
    routine, full, state = interrupted["routine"], interrupted["full"], interrupted["state"]
    assert full.plan() == ["force_matching"] * FM_EPOCHS + ["difftre"] * DT_EPOCHS
    fm, dt = routine.stages
    p_fm = state["stages"]["0_force_matching"]["params"]
    p_end = routine.params_of(state)
    assert max_diff(p_fm, interrupted["p0"]) > 1e-3  # force matching trained
    assert max_diff(p_end, p_fm) > 1e-4  # DiffTRe moved the parameters on
    assert max_diff(state["stages"]["1_difftre"]["refs"][0]["params"], p_fm) > 0  # re-sampled
    rows = [r for r in full.history if r["stage"] == "difftre"]
    assert len(rows) == DT_EPOCHS
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)
    assert rows[-1]["samplings"] > 1  # the ESS threshold triggered re-sampling
    # on the trajectory sampled with the force-matched parameters, the first update lowers
    # the reweighted loss; the last epoch's loss is below the first one's
    first = dt.init_state(p_fm)
    trajs = dt.trajectories(first["refs"])
    after_one, _ = dt.run_epoch(first)
    loss0 = float(dt.loss(p_fm, trajs)[0])
    loss1, aux = dt.loss(after_one["params"], trajs)
    assert float(aux["ess"][0]) > 0.5
    assert float(loss1) < loss0, (float(loss1), loss0)
    assert rows[0]["loss"] == pytest.approx(loss0, rel=1e-12)
    assert rows[-1]["loss"] < rows[0]["loss"], [r["loss"] for r in rows]
    # the energy function is the model's: pot(system) on a sampled frame
    pot, sp = interrupted["pot"], dt.state_points[0]
    frame = np.asarray(trajs[0].positions[-1])
    e = float(dt.energy_fn(p_fm, frame, **sp.kwargs()))
    s = read(interrupted["out"].parent / "start.xyz")[0].system
    pot_fm = cs.Potential(pot.model, p_fm)
    e_pot = float(pot_fm(s.replace(positions=frame, min_distance=0)).energy)
    assert e == pytest.approx(e_pot, abs=1e-9)


def test_cli_resumes_the_interrupted_routine_exactly(workdir, interrupted, monkeypatch):
    """``celli-scale train run.yaml`` (a fresh potential, fresh stages, no trajectory
    cache) continues the interrupted routine inside its DiffTRe stage and writes the same
    parameters, bit for bit, as the uninterrupted run."""
    from celli_scale.cli import main

    base, _ = workdir
    monkeypatch.chdir(base)
    assert main(["train", "run.yaml"]) == 0
    pot = cs.Potential.load(base / "out" / "model")
    assert max_diff(pot.params, interrupted["routine"].params_of(interrupted["state"])) == 0.0
    with (base / "out" / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["stage"] for r in rows] == ["force_matching"] * FM_EPOCHS + ["difftre"] * DT_EPOCHS
    assert [r["epoch"] for r in rows] == [str(k) for k in range(1, FM_EPOCHS + DT_EPOCHS + 1)]


@pytest.fixture(scope="module")
def ctx(workdir):
    """A stage builder's context: a fresh potential, the files of ``workdir``."""
    base, _ = workdir
    pot = cs.Potential.from_config(CFG, seed=0)
    return StageContext(pot, base, None, 0, 4, "stages[1]")


def sp(**changes) -> dict:
    """A DiffTRe state point entry; a change to None removes the key."""
    entry = {"structure": "start.xyz", "temperature": 300, "targets": {"energy": {"value": 0}}}
    entry.update(changes)
    return {k: v for k, v in entry.items() if v is not None}


def sps(**changes) -> dict:
    return {"state_points": [sp(**changes)]}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"bogus": 1}, r"unknown key\(s\) in stages\[1\] \(difftre\): bogus \(known: batch_size"),
        ({"md": {"temperature": 400}}, r"md.temperature is set by each state point's"),
        ({"md": {"bogus": 1}}, r"unknown key\(s\) in stages\[1\] \(difftre\).md: bogus"),
        ({"md": {"ensemble": "nve"}}, "sampling needs a thermostat"),
        ({"sampling": {"frames": 1}}, "sampling.frames must be at least 2"),
        ({"optimizer": {"lr": 1}}, r"unknown key\(s\) in .*optimizer: lr"),
        ({"ess_threshold": 1.5}, r"ess_threshold must lie in \(0, 1\]"),
        ({"state_points": []}, "needs 'state_points'"),
        (sps(targets=None), r"state_points\[0\] needs 'targets'"),
        (sps(pressure=1), r"unknown key\(s\) in stages\[1\].state_points\[0\]: pressure"),
        (sps(temperature=None), r"state_points\[0\] needs 'temperature'"),
        (sps(structure="open.xyz"), r"\[0\]: top-down training needs a structure periodic"),
        (sps(targets={}), "must name at least one target"),
        (sps(targets={"density": {"value": 2.0}}), "density is fixed by the state point's box"),
        (sps(targets={"energy": {"weight": 1}}), r"targets.energy needs 'value'"),
        (
            sps(targets={"pressure": {"value": 1, "unit": "psi"}}),
            r"targets.pressure.unit 'psi' unknown \(known: eV/A\^3, bar",
        ),
        (
            sps(targets={"rdf": {"values": [1.0, 1.0], "r_max": 4.0}}),
            r"targets.rdf: r_max 4.0 Å exceeds half the box \(2.8 Å\)",
        ),
        (
            sps(targets={"rdf": {"file": "target_rdf.csv", "r_max": 3.5}}),
            r"r_max 3.5 Å lies beyond the file's last bin \(2.8 Å\)",
        ),
        (sps(targets={"rdf": {"values": [1.0]}}), r"rdf with 'values' needs 'r_max'"),
    ],
)
def test_difftre_entry_errors(ctx, change, message):
    with pytest.raises(ValueError, match=message):
        STAGE_BUILDERS["difftre"](difftre_entry(**change), ctx)


def test_rdf_target_from_file_and_values(ctx, workdir):
    """The file's bins are used as they are; other bins interpolate it; ``values`` give
    the target directly."""
    base, _ = workdir
    table = np.loadtxt(base / "target_rdf.csv", delimiter=",", skiprows=1)

    def target(rdf_spec):
        sp = {"structure": "start.xyz", "temperature": 300, "targets": {"rdf": rdf_spec}}
        stage = STAGE_BUILDERS["difftre"](difftre_entry(state_points=[sp]), ctx)
        return stage.targets[0]["rdf"]

    np.testing.assert_array_equal(target({"file": "target_rdf.csv"}).value, table[:, 1])
    coarse = target({"file": "target_rdf.csv", "n_bins": 7})
    centres = (np.arange(7) + 0.5) * 0.4
    np.testing.assert_allclose(coarse.value, np.interp(centres, table[:, 0], table[:, 1]))
    t = target({"values": [0.0, 0.5, 2.0], "r_max": 2.4, "weight": 3.0})
    np.testing.assert_array_equal(t.value, [0.0, 0.5, 2.0])
    assert t.weight == 3.0


def test_relative_entropy_stage_from_config(ctx, workdir):
    """A relative-entropy stage on a reference trajectory: its state point (box, masses,
    start = the reference's first frame), its references, and one epoch that moves the
    parameters; a reference frame of other atoms is refused."""
    from ase.data import atomic_masses

    base, _ = workdir
    ref_frames = [Frame(nacl_grid(**GRID, rattle=0.1, seed=10 + k)) for k in range(4)]
    write(base / "ref.xyz", ref_frames)
    entry = {
        "type": "relative_entropy",
        "name": "re",
        "epochs": 2,
        "state_points": [{"reference": "ref.xyz", "temperature": 500, "weight": 2.0}],
        "md": {"dt": 1.0},
        "sampling": {"equilibration": 10, "frames": 3, "stride": 5},
        "optimizer": {"learning_rate": 1e-3},
    }
    stage = STAGE_BUILDERS["relative_entropy"](entry, ctx)
    assert stage.name == "re" and stage.weights == [2.0]
    sp = stage.state_points[0]
    assert sp.temperature == 500.0 and np.allclose(sp.box, 5.6)
    written = read(base / "ref.xyz")
    s0 = written[0].system
    np.testing.assert_array_equal(sp.positions, s0.positions)
    np.testing.assert_array_equal(sp.masses, atomic_masses[np.asarray(s0.species)])
    want = np.stack([f.system.positions for f in written])
    np.testing.assert_array_equal(np.asarray(stage.references[0]), want)
    params = ctx.pot.params
    state, metrics = stage.run_epoch(stage.init_state(params))
    assert np.isfinite(metrics["gap/sp0"]) and metrics["grad_norm"] > 0
    assert max_diff(state["params"], params) > 1e-5

    write(base / "bad_ref.xyz", [*ref_frames, Frame(nacl_grid(2, spacing=3.0))])
    bad = dict(entry, state_points=[{"reference": "bad_ref.xyz", "temperature": 500}])
    with pytest.raises(ValueError, match=r"reference: frame 4 differs from the structure"):
        STAGE_BUILDERS["relative_entropy"](bad, ctx)
    with pytest.raises(ValueError, match=r"state_points\[0\] needs 'reference'"):
        STAGE_BUILDERS["relative_entropy"](dict(entry, state_points=[{"temperature": 5}]), ctx)
