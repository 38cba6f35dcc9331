"""``evaluate``: zero errors on self-labelled data, an energy shift of δ per atom reported
as δ, grouping by (formula, total charge), the command's JSON and plot."""

from __future__ import annotations

import json

import numpy as np
import pytest

import celli_scale as cs
from celli_scale.datasets import rocksalt
from celli_scale.io import Frame, write
from celli_scale.testing import small_allegro_config
from celli_scale.train.evaluate import error_table, predictions

CFG = small_allegro_config(l_max=1)


@pytest.fixture(scope="module")
def pot_frames():
    pot = cs.Potential.from_config(CFG, seed=3)
    frames = []
    for k, n in enumerate((1, 1, 2)):
        s = rocksalt(n, rattle=0.1, seed=k)
        o = pot(s)
        frames.append(Frame(s, energy=float(o.energy), forces=np.asarray(o.forces)))
    return pot, frames


def test_self_labelled_zero_and_shift_reported(pot_frames):
    pot, frames = pot_frames
    preds = predictions(pot, frames)
    t = error_table(frames, preds)
    assert [(g["formula"], g["n_structures"]) for g in t["groups"]] == [
        ("Cl4Na4", 2),
        ("Cl8Na8", 1),
    ]
    assert t["overall"]["energy_rmse_mev_per_atom"] < 1e-9
    assert t["overall"]["force_rmse_mev_per_a"] < 1e-9
    assert t["overall"]["charge_rmse_me"] is None  # no charge labels
    delta = 0.0123  # eV/atom
    shifted = [
        Frame(f.system, energy=f.energy + delta * f.system.n_atoms, forces=f.forces) for f in frames
    ]
    t2 = error_table(shifted, preds)
    for row in [*t2["groups"], t2["overall"]]:
        assert row["energy_rmse_mev_per_atom"] == pytest.approx(delta * 1e3, rel=1e-9)


def test_evaluate_command_json_and_plot(pot_frames, tmp_path):
    from celli_scale.cli import main

    pot, frames = pot_frames
    pot.save(tmp_path / "model")
    write(tmp_path / "data.xyz", frames)
    js, png = tmp_path / "e.json", tmp_path / "p.png"
    assert main(["evaluate", str(tmp_path / "model"), str(tmp_path / "data.xyz"),
                 "--json", str(js), "--plot", str(png)]) == 0  # fmt: skip
    t = json.loads(js.read_text())
    assert set(t["overall"]) == {
        "n_structures", "energy_rmse_mev_per_atom", "force_rmse_mev_per_a", "charge_rmse_me"
    }  # fmt: skip
    assert {"formula", "total_charge"} <= set(t["groups"][0])
    assert t["overall"]["n_structures"] == 3
    assert t["overall"]["energy_rmse_mev_per_atom"] < 1e-6  # extxyz round trip
    assert png.stat().st_size > 1000
