"""Training: loss decreases, padding contributes nothing, 4 devices = 1 device, exact
resume, damaged checkpoints fall back, the ``train`` command end to end."""

from __future__ import annotations

import dataclasses
import shutil

import jax
import numpy as np
import pytest

import celli_scale as cs
from celli_scale.datasets import rocksalt
from celli_scale.io import Frame, write
from celli_scale.testing import small_allegro_config, small_celli_config
from celli_scale.train import ForceMatching, TrainConfig
from celli_scale.train.checkpoint import BestCheckpoint, Checkpoints
from celli_scale.train.cli import parse_config

CFG = small_allegro_config(l_max=1)


def labelled(n: int, seed: int = 0, sizes=(1,)) -> list[Frame]:
    """Rattled rock-salt cells labelled by 10x a reference Allegro with other parameters
    (a target the initial model is far from)."""
    ref = cs.Potential.from_config(CFG, seed=123)
    frames = []
    for k in range(n):
        s = rocksalt(sizes[k % len(sizes)], rattle=0.12, seed=seed + k)
        o = ref(s)
        frames.append(Frame(s, energy=10 * float(o.energy), forces=10 * np.asarray(o.forces)))
    return frames


@pytest.fixture(scope="module")
def frames():
    return labelled(9)


def max_diff(a, b) -> float:
    d = jax.tree_util.tree_map(lambda x, y: float(np.max(np.abs(np.asarray(x) - y))), a, b)
    return max(jax.tree_util.tree_leaves(d))


def test_training_lowers_validation_loss_and_resume_is_exact(frames, tmp_path):
    pot = cs.Potential.from_config(CFG, seed=0)
    cfg = TrainConfig(
        max_epochs=3,
        batch_size=4,
        learning_rate=2e-2,
        schedule="cosine",
        checkpoint_every=1,
        checkpoint_keep=20,
        progress=False,
    )
    fm = ForceMatching(pot, frames, config=cfg)
    loss0, _ = fm.validate(pot.params)
    full = fm.fit(tmp_path / "a")
    loss1, _ = fm.validate(full["params"])
    assert loss1 < 0.5 * loss0
    assert (tmp_path / "a" / "metrics.csv").read_text().count("\n") == 1 + 3
    # the best parameters are kept apart from the last steps (orbax best_fn manager)
    best_step, best = BestCheckpoint(tmp_path / "a" / "best").restore(full["params"])
    losses = [r["valid_loss"] for r in fm.history]
    assert best_step == fm.history[int(np.argmin(losses))]["step"]
    assert max_diff(best, full["best_params"]) == 0.0

    # resume from step 3 (mid-epoch 2: data order from (seed, epoch)) -> same parameters
    steps = fm.steps_per_epoch * 3
    b = tmp_path / "b" / "checkpoints"
    shutil.copytree(tmp_path / "a" / "checkpoints", b)
    for d in b.iterdir():
        if d.name.isdigit() and int(d.name) > 3:
            shutil.rmtree(d)
    resumed = fm.fit(tmp_path / "b")
    assert int(resumed["step"]) == steps
    # float64: identical operations in the same order; allow round-off only
    assert max_diff(resumed["params"], full["params"]) < 1e-12
    assert max_diff(resumed["best_params"], full["best_params"]) < 1e-12

    # another trainer setting must not resume those checkpoints silently
    shutil.copy(tmp_path / "a" / "fingerprint.json", tmp_path / "b")
    other = ForceMatching(pot, frames, config=dataclasses.replace(cfg, learning_rate=1e-3))
    with pytest.raises(ValueError, match=r"another run \(train.learning_rate: 0.02 -> 0.001"):
        other.fit(tmp_path / "b")

    # a damaged latest step (a file truncated mid-write) -> the previous step, with a warning
    c = tmp_path / "c"
    shutil.copytree(tmp_path / "a" / "checkpoints", c)
    latest = c / str(steps)
    victims = [p for p in latest.rglob("*") if p.is_file() and p.stat().st_size > 0]
    for p in victims:
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])
    with pytest.warns(UserWarning, match=f"step {steps}"):
        state = Checkpoints(c).restore(fm.init_state())
    assert int(state["step"]) == steps - 1


def test_padding_with_garbage_changes_nothing():
    rng = np.random.default_rng(1)
    frames = []  # 8- and 16-atom cells -> padded atoms; any labels will do
    for k, n in enumerate((1, 2, 1)):
        s = rocksalt(n, rattle=0.12, seed=5 + k)
        frames.append(Frame(s, energy=rng.normal(), forces=rng.normal(size=(s.n_atoms, 3))))
    pot = cs.Potential.from_config(CFG, seed=0)
    fm = ForceMatching(pot, frames, frames[:1], TrainConfig(batch_size=4, devices=1))
    graphs, labels, norms = fm.device_batch(fm.train, [0, 1, 2])  # + 1 dummy structure
    loss, _, grad = fm.loss_and_grad(pot.params, graphs, labels, norms)
    rng = np.random.default_rng(0)
    node = np.asarray(graphs.node_mask)
    pos = np.asarray(graphs.positions).copy()
    pos[~node] = rng.normal(size=pos[~node].shape) * 50
    g2 = graphs.replace(positions=pos)
    lab2 = {k: np.asarray(v).copy() for k, v in labels.items()}
    lab2["forces"][~node] = 1e6
    lab2["energy"][3] = 1e9  # the dummy structure
    lab2["charges"][:] = 7.0  # no charge labels
    loss2, _, grad2 = fm.loss_and_grad(pot.params, g2, lab2, norms)
    assert float(loss2) == float(loss)
    assert max_diff(grad, grad2) == 0.0


def first_epoch(fm: ForceMatching):
    """The parameters after the optimiser steps of epoch 0, step by step."""
    state = jax.device_put(fm.init_state(), fm.replicated)
    params, opt_state = state["params"], state["opt_state"]
    for idx in fm.batches(epoch=0):
        graphs, labels, norms = fm.device_batch(fm.train, idx)
        params, opt_state, _, _ = fm.step(params, opt_state, graphs, labels, norms)
    return params


def test_four_devices_equal_one(frames):
    """Two optimiser steps, batch sharded over 4 devices vs 1 device."""
    assert jax.local_device_count() >= 4
    out = []
    for devices in (1, 4):
        pot = cs.Potential.from_config(CFG, seed=0)
        fm = ForceMatching(pot, frames, config=TrainConfig(batch_size=4, devices=devices))
        out.append(first_epoch(fm))
    # float64; the all-reduce sums in another order: round-off only
    assert max_diff(*out) < 1e-10


def test_periodic_celli_four_devices_equal_one():
    """CELLI batches are stacked graphs too (one Ewald split, padded k-vectors over the
    data set), so CELLI trains data-parallel: two steps on 4 devices equal 1 device."""
    celli = small_celli_config(elec_method="ewald")
    ref = cs.Potential.from_config(celli, seed=7, example=rocksalt(1))
    frames = []
    for k in range(6):
        s = rocksalt(1 + k % 2, a=5.5 + 0.1 * k, rattle=0.1, seed=k)
        s = s.replace(total_charge=float(k % 3 == 1))
        o = ref(s)
        frames.append(
            Frame(s, energy=float(o.energy), forces=np.asarray(o.forces), charges=o.charges)
        )
    out = []
    for devices in (1, 4):
        pot = cs.Potential.from_config(celli, seed=0, example=frames[0].system)
        cfg = TrainConfig(batch_size=4, devices=devices, learning_rate=1e-2, progress=False)
        fm = ForceMatching(pot, frames, frames[:1], config=cfg)
        assert fm.train.graphs.elec_params.kvecs.ndim == 3  # stacked over structures
        out.append(first_epoch(fm))
    # float64; per-structure Qeq solves are the same on any device, the all-reduce sums
    # in another order
    assert max_diff(*out) < 1e-9


def test_cli_train_end_to_end(frames, tmp_path):
    from celli_scale.cli import main

    write(tmp_path / "train.xyz", frames)
    (tmp_path / "run.yaml").write_text(
        f"model: {dict(CFG)!r}\n".replace("(", "[").replace(")", "]")
        + f"data: {{train: {tmp_path / 'train.xyz'}, valid_fraction: 0.25}}\n"
        + f"out: {tmp_path / 'out'}\nmax_epochs: 1\nbatch_size: 4\nprogress: false\n"
        + "optimizer: {learning_rate: 1e-3, schedule: exponential}\n"
    )
    assert main(["train", str(tmp_path / "run.yaml")]) == 0
    out = tmp_path / "out"
    assert (out / "metrics.csv").exists() and any((out / "checkpoints").iterdir())
    pot = cs.Potential.load(out / "model")
    assert np.isfinite(float(pot(frames[0].system).energy))


def test_unknown_config_keys_are_named():
    base = {"model": {"name": "allegro"}, "data": {"train": "x.xyz"}, "out": "o"}
    with pytest.raises(ValueError, match="learning_rat"):
        parse_config(dict(base, optimizer={"learning_rat": 1}))
    with pytest.raises(ValueError, match="epochs"):
        parse_config(dict(base, epochs=3))
    with pytest.raises(ValueError, match="data.train"):
        parse_config(dict(base, data={}))


def test_celli_learns_charges_of_open_clusters():
    """CELLI (stacked open clusters of 8 atoms): energies, forces and charges of
    charged and neutral clusters labelled by a reference CELLI; the validation loss drops."""
    from celli_scale.datasets import random_cluster

    celli = small_celli_config()
    ref = cs.Potential.from_config(celli, seed=7)
    frames = []
    for k in range(3):
        s = random_cluster(8, seed=k, species=(11, 17), box=6.0, min_distance=2.0)
        s = cs.System(s.positions, s.species, total_charge=float(k % 2))
        o = ref(s)
        q = np.asarray(o.charges)[: s.n_atoms]
        frames.append(Frame(s, energy=float(o.energy), forces=np.asarray(o.forces), charges=q))
    pot = cs.Potential.from_config(celli, seed=0)
    cfg = TrainConfig(max_epochs=3, batch_size=2, learning_rate=1e-2, progress=False)
    fm = ForceMatching(pot, frames[:2], frames[2:], cfg)
    loss0, errs0 = fm.validate(pot.params)
    assert errs0["charges"][2] == 8  # charge labels counted
    fm.fit()
    assert min(r["valid_loss"] for r in fm.history) < 0.5 * loss0
