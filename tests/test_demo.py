"""The demo's checks: grid size and training options refused before any work, warm timing,
thread count, and the training step (CELLI vs Allegro on charge states)."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from celli_scale import demo, demo_train
from celli_scale.cli import main

#: ``--quick``'s training step, with a wall-clock cap that a busy machine does not reach
#: (the epochs decide, so the result does not depend on the load).
TEST_PLAN = dataclasses.replace(demo.QUICK_PLAN, minutes=20.0)


@pytest.mark.parametrize("n", [1, 3, 5, 0, -2, 2.0, True])
def test_odd_or_bad_grid_refused(n, tmp_path):
    # before: --n 3 reported a Madelung error of 0.25 (n 1: 0.62) against a reference
    # that only holds for even n
    with pytest.raises(ValueError, match="even integer >= 2"):
        demo.main(argparse.Namespace(n=n, out=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_cli_demo_odd_n_is_a_user_error(tmp_path, capsys):
    assert main(["demo", "--n", "3", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: demo --n must be an even integer >= 2, got 3")


def test_time_warm_is_interleaved_minimum(monkeypatch):
    order = []
    clock = iter(range(100))
    # each call "takes" the difference between two successive perf_counter readings
    costs = {"a": [5, 1, 3], "b": [2, 4, 1]}
    now = [0.0]

    def fake_counter():
        return now[0]

    def make(name):
        def call():
            order.append(name)
            now[0] += costs[name][sum(1 for x in order if x == name) - 1]
            next(clock)

        return call

    monkeypatch.setattr(demo.time, "perf_counter", fake_counter)
    best = demo.time_warm({"a": make("a"), "b": make("b")}, repeats=3)
    assert order == ["a", "b", "a", "b", "a", "b"]
    assert best == {"a": 1.0, "b": 1.0}


def test_cpu_threads(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")
    assert demo.cpu_threads() == 1
    monkeypatch.setenv("XLA_FLAGS", "")
    assert demo.cpu_threads() >= 1


# -- step 5: CELLI vs Allegro on charge states ------------------------------------------


def _ag3_pair(seed: int, gap_per_atom: float):
    """Two frames of one Ag3 geometry, charges -1 and +1, energies 3*gap apart."""
    import numpy as np

    from celli_scale import System
    from celli_scale.io import Frame

    rng = np.random.default_rng(seed)
    pos = np.array([[0.0, 0.0, 0.0], [2.6, 0.0, 0.0], [1.3, 2.2, 0.0]]) + rng.normal(
        0, 0.05, (3, 3)
    )
    z = np.full(3, 47)
    e_plus = -300.0 + rng.normal()
    return [
        Frame(System(pos, z, total_charge=-1.0), energy=e_plus + 3 * gap_per_atom),
        Frame(System(pos, z, total_charge=1.0), energy=e_plus),
    ]


def test_charge_state_gap_and_split_keep_geometries_together():
    frames = [f for k in range(10) for f in _ag3_pair(k, -6.0)]
    assert demo_train.charge_state_gap(frames) == pytest.approx(-6.0, abs=1e-12)
    # a model that predicts the same energy for both charge states has no gap
    same = [f.energy if f.system.total_charge > 0 else frames[k + 1].energy
            for k, f in enumerate(frames)]  # fmt: skip
    assert demo_train.charge_state_gap(frames, same) == 0.0
    train, valid, test = demo_train.split(frames, 0.25, 0.1, seed=3, group=2)
    assert (len(train), len(valid), len(test)) == (14, 2, 4)
    ids = [{id(f) for f in s} for s in (train, valid, test)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    for part in (train, valid, test):  # both charge states of a geometry in one split
        demo_train.charge_state_gap(part)
    with pytest.raises(ValueError, match="not one geometry"):
        demo_train.charge_state_gap(frames[1:5])


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--train-minutes", "0"], "minutes must be > 0"),
        (["--train-minutes", "nan"], "minutes must be > 0"),
        (["--epochs", "0"], "epochs must be >= 1"),
    ],
)
def test_bad_training_options_refused_before_work(argv, match, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["demo", *argv, "--out", str(out)]) == 2
    assert match in capsys.readouterr().err
    assert not out.exists()


def test_training_plan_options():
    ns = argparse.Namespace
    assert demo.training_plan(ns(no_train=True)) is None
    assert demo.training_plan(ns()) == demo_train.Plan()
    p = demo.training_plan(ns(quick=True, train_minutes=0.5, epochs=3))
    assert (p.n_ag3, p.minutes, p.epochs) == (demo.QUICK_PLAN.n_ag3, 0.5, 3)


def test_charge_states_trained_celli_separates_ag3(tmp_path):
    """The training step at smoke-test size (GFN2-xTB labels; a few epochs): the table
    has every charge state; Allegro's Ag3 error is at least half the charge-state gap
    (it cannot see the total charge), CELLI's is well below it."""
    result, parity = demo_train.run(
        tmp_path / "out", TEST_PLAN, cache_dir=tmp_path / "cache", progress=False
    )
    gap = abs(result["ag3_gap_eV_per_atom"]) * 1e3  # meV/atom
    assert 5000 < gap < 7000  # GFN2-xTB: E(Ag3-) - E(Ag3+) ≈ -6 eV/atom
    tables = {name: demo_train.group_errors(result, name) for name in demo_train.MODELS}
    keys = [("Ag3", -1.0), ("Ag3", 1.0), ("Cl8Na8", 0.0), ("Cl8Na9", 1.0)]
    for t in tables.values():
        assert sorted(t) == keys
    for key in keys[:2]:
        allegro = tables["allegro"][key]["energy_rmse_mev_per_atom"]
        celli = tables["celli"][key]["energy_rmse_mev_per_atom"]
        assert allegro > 0.9 * gap / 2, key
        assert celli < 0.5 * allegro, key
        assert tables["celli"][key]["charge_rmse_me"] is not None
        assert tables["allegro"][key]["charge_rmse_me"] is None
    assert result["models"]["allegro"]["ag3_gap_eV_per_atom"] == pytest.approx(0.0, abs=1e-4)
    assert result["models"]["celli"]["ag3_gap_eV_per_atom"] * 1e3 < -gap / 2
    lines = demo_train.comparison_lines(result)
    assert any(line.startswith("Ag3") and "-1" in line for line in lines)
    from celli_scale.potential import Potential

    pot = Potential.load(tmp_path / "out" / "celli" / "model")  # the saved model loads
    assert pot.config.name == "celli"
    demo_train.plot(result, parity, tmp_path / "cs.png")
    assert (tmp_path / "cs.png").stat().st_size > 0
