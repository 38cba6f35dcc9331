"""Training routines: a sequential routine equals its stages run by hand; an interrupted
and resumed routine ends bit for bit where an uninterrupted one does (float64); the
interleaved order and the documented flow of parameters and optimizer states; the
``train`` command on a routine config."""

from __future__ import annotations

import csv

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import celli_scale as cs
from celli_scale.datasets import rocksalt
from celli_scale.io import Frame, write
from celli_scale.testing import small_allegro_config
from celli_scale.train import ForceMatching, TrainConfig
from celli_scale.train.checkpoint import Checkpoints
from celli_scale.train.cli import STAGE_BUILDERS, routine_from_config
from celli_scale.train.routine import Interleave, Routine, Stage

CFG = small_allegro_config(l_max=1)


class Quadratic:
    """A cheap stand-in for DiffTRe: adam on ``Σ_leaves ½|p - c - ε|²`` with ``ε`` drawn
    each epoch from a PRNG key in the state (so a resume must restore the key). Each
    epoch is recorded in ``log`` as ``(name, step at entry, Σ params at entry)``."""

    def __init__(self, name: str, centre: float, seed: int = 0, log: list | None = None):
        self.name, self.centre, self.seed = name, centre, seed
        self.log = [] if log is None else log
        self.opt = optax.adam(0.05)

        def update(params, opt_state, key):
            leaves, tree = jax.tree_util.tree_flatten(params)
            keys = jax.random.split(key, len(leaves))
            noise = [
                0.01 * jax.random.normal(k, x.shape, x.dtype)
                for k, x in zip(list(keys), leaves, strict=True)
            ]
            target = jax.tree_util.tree_unflatten(tree, noise)

            def loss(p):
                sq = jax.tree_util.tree_map(lambda x, e: jnp.sum((x - centre - e) ** 2), p, target)
                return 0.5 * sum(jax.tree_util.tree_leaves(sq))

            value, g = jax.value_and_grad(loss)(params)
            upd, opt_state = self.opt.update(g, opt_state, params)
            return optax.apply_updates(params, upd), opt_state, value

        self._update = jax.jit(update)

    def init_state(self, params):
        return {
            "params": params,
            "opt_state": self.opt.init(params),
            "step": jnp.asarray(0, jnp.int32),
            "key": jax.random.PRNGKey(self.seed),
        }

    def run_epoch(self, state):
        self.log.append((self.name, int(state["step"]), total(state["params"])))
        key, sub = jax.random.split(state["key"])
        params, opt_state = state["params"], state["opt_state"]
        for _ in range(3):
            sub, k = jax.random.split(sub)
            params, opt_state, value = self._update(params, opt_state, k)
        new = {"params": params, "opt_state": opt_state, "step": state["step"] + 1, "key": key}
        return new, {"loss": float(value)}

    def params_of(self, state):
        return state["params"]


def total(params) -> float:
    return float(sum(np.sum(np.asarray(x)) for x in jax.tree_util.tree_leaves(params)))


def max_diff(a, b) -> float:
    d = jax.tree_util.tree_map(lambda x, y: float(np.max(np.abs(np.asarray(x) - y))), a, b)
    return max(jax.tree_util.tree_leaves(d))


def labelled(n: int) -> list[Frame]:
    """Rattled 8-atom rock-salt cells labelled by a reference Allegro (other seed)."""
    ref = cs.Potential.from_config(CFG, seed=123)
    frames = []
    for k in range(n):
        s = rocksalt(1, rattle=0.12, seed=k)
        o = ref(s)
        frames.append(Frame(s, energy=10 * float(o.energy), forces=10 * np.asarray(o.forces)))
    return frames


@pytest.fixture(scope="module")
def frames():
    return labelled(5)


@pytest.fixture(scope="module")
def fm(frames):
    """Force matching on 4 structures (2 steps an epoch), validated on 1."""
    pot = cs.Potential.from_config(CFG, seed=0)
    cfg = TrainConfig(max_epochs=2, batch_size=2, devices=1, learning_rate=2e-2, progress=False)
    return ForceMatching(pot, frames[:4], frames[4:], cfg)


@pytest.fixture(scope="module")
def by_hand(fm):
    """Force matching 2 epochs, then the quadratic stage 2 epochs, by hand."""
    p0 = fm.pot.params
    s = fm.init_state(p0)
    for _ in range(2):
        s, _ = fm.run_epoch(s)
    p1 = fm.params_of(s)
    quad = Quadratic("quad", 0.3)
    q = quad.init_state(p1)
    for _ in range(2):
        q, _ = quad.run_epoch(q)
    return p0, p1, quad.params_of(q)


def test_stage_protocol(fm):
    assert isinstance(fm, Stage) and isinstance(Quadratic("q", 0.0), Stage)
    assert fm.name == "force_matching"
    with pytest.raises(ValueError, match="schedule entry 1: 'fm' is not a Stage"):
        Routine([(fm, 1), ("fm", 1)])
    with pytest.raises(ValueError, match="number of epochs must be a positive integer"):
        Routine.sequential([(fm, 0)])
    with pytest.raises(ValueError, match="cycles must be a positive integer"):
        Routine.interleaved([(fm, 1)], cycles=0)


def test_sequential_equals_stages_by_hand(fm, by_hand, tmp_path):
    p0, p1, p2 = by_hand
    assert max_diff(p0, p1) > 1e-3 and max_diff(p1, p2) > 1e-3  # both stages move them
    routine = Routine.sequential([(fm, 2), (Quadratic("quad", 0.3), 2)], tmp_path)
    state = routine.run(p0, progress=False)
    assert max_diff(routine.params_of(state), p2) == 0.0
    fm_state = state["stages"]["0_force_matching"]
    assert int(fm_state["step"]) == 2 * fm.steps_per_epoch
    assert max_diff(fm_state["params"], p1) == 0.0
    assert int(state["stages"]["1_quad"]["step"]) == 2
    assert [int(state["cursor"][k]) for k in ("epoch", "turn", "turn_epoch")] == [4, 2, 0]
    with (tmp_path / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["epoch"], r["stage"]) for r in rows] == [
        ("1", "force_matching"),
        ("2", "force_matching"),
        ("3", "quad"),
        ("4", "quad"),
    ]
    assert rows[1]["stage_epoch"] == "2" and float(rows[1]["valid_loss"]) > 0
    assert rows[0]["loss"] == "" and float(rows[3]["loss"]) > 0  # columns of both stages


def test_interrupted_routine_resumes_exactly(fm, by_hand, tmp_path):
    """Stopped mid-way through the force-matching turn, then mid-way through the
    quadratic one, each time resumed by a fresh routine (fresh quadratic stage): the
    same parameters, bit for bit, as the stages run by hand."""
    p0, _, p2 = by_hand
    for stop_after in (1, 3, None):
        routine = Routine.sequential([(fm, 2), (Quadratic("quad", 0.3), 2)], tmp_path)
        state = routine.run(p0, progress=False, stop_after=stop_after)
        assert int(state["cursor"]["epoch"]) == (stop_after or 4)
    assert max_diff(routine.params_of(state), p2) == 0.0
    assert [r["epoch"] for r in routine.history] == [4]  # the last run did one epoch
    with (tmp_path / "metrics.csv").open() as fh:
        assert [r["epoch"] for r in csv.DictReader(fh)] == ["1", "2", "3", "4"]
    # another schedule must not resume these checkpoints
    other = Routine.sequential([(fm, 3), (Quadratic("quad", 0.3), 2)], tmp_path)
    with pytest.raises(ValueError, match=r"another routine \(schedule 0_force_matchingx2"):
        other.run(p0, progress=False)


def quad_params():
    return {"w": jnp.linspace(-1.0, 1.0, 3), "b": jnp.ones((2, 2))}


def interleaved_by_hand(p0):
    """(a a b) x 2 then c, by the documented rules: a stage's first turn starts from
    ``init_state(current params)``, a later turn continues its state with the current
    params."""
    a, b, c = Quadratic("a", 1.0, seed=1), Quadratic("b", -1.0, seed=2), Quadratic("c", 0, 3)
    sa = a.init_state(p0)
    sb = None
    for _ in range(2):
        for _ in range(2):
            sa, _ = a.run_epoch(sa)
        sb = b.init_state(sa["params"]) if sb is None else dict(sb, params=sa["params"])
        sb, _ = b.run_epoch(sb)
        sa = dict(sa, params=sb["params"])
    sc = c.init_state(sb["params"])
    sc, _ = c.run_epoch(sc)
    return sc["params"]


def test_interleaved_order_state_flow_and_resume(tmp_path):
    p0 = quad_params()
    expected = interleaved_by_hand(p0)
    for stop_after in (1, 3, None):  # stop mid-way through a's turn, then after b's
        log: list = []
        a, b = Quadratic("a", 1.0, seed=1, log=log), Quadratic("b", -1.0, seed=2, log=log)
        c = Quadratic("c", 0, 3, log=log)
        routine = Routine([Interleave([(a, 2), (b, 1)], cycles=2), (c, 1)], tmp_path, keep=1)
        state = routine.run(p0, progress=False, stop_after=stop_after)
        if stop_after == 3:  # a crash after epoch 4's metrics row, before its checkpoint
            with (tmp_path / "metrics.csv").open("a") as fh:
                fh.write("4,a,0,1,0.0\n")
    assert routine.plan() == ["a", "a", "b", "a", "a", "b", "c"]
    # the last run: epochs 4-7 (a and b continue their steps: their states persisted)
    assert [(name, step) for name, step, _ in log] == [("a", 2), ("a", 3), ("b", 1), ("c", 0)]
    assert max_diff(state["params"], expected) == 0.0
    assert int(state["stages"]["0_a"]["step"]) == 4  # a's state continued over its turns
    with (tmp_path / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["stage"] for r in rows] == routine.plan()  # each epoch once
    assert [r["cycle"] for r in rows] == ["0", "0", "0", "1", "1", "1", "0"]
    assert [r["entry"] for r in rows] == ["0"] * 6 + ["1"]

    # uninterrupted: each turn starts from the parameters the previous epoch left
    log = []
    a, b = Quadratic("a", 1.0, seed=1, log=log), Quadratic("b", -1.0, seed=2, log=log)
    routine = Routine.interleaved([(a, 2), (b, 1)], cycles=2)
    state = routine.run(p0, progress=False)
    assert [(name, step) for name, step, _ in log] == [
        ("a", 0), ("a", 1), ("b", 0), ("a", 2), ("a", 3), ("b", 1),
    ]  # fmt: skip
    assert len(routine.history) == 6 and routine.history[-1]["stage"] == "b"


def write_config(tmp_path, frames, stages: str, extra: str = "") -> dict:
    from celli_scale.config_io import load_yaml

    write(tmp_path / "train.xyz", frames)
    (tmp_path / "run.yaml").write_text(
        f"model: {dict(CFG)!r}\n".replace("(", "[").replace(")", "]")
        + "data: {train: train.xyz, valid_fraction: 0.2}\n"
        + "out: out\nprogress: false\n"
        + stages
        + extra
    )
    return load_yaml(tmp_path / "run.yaml")


def test_cli_routine_config(frames, tmp_path, monkeypatch):
    from celli_scale.cli import main

    stages = (
        "stages:\n"
        "  - {type: force_matching, name: fm_a, epochs: 1, batch_size: 2, devices: 1,\n"
        "     optimizer: {learning_rate: 1e-2, schedule: cosine}}\n"
        "  - {type: force_matching, name: fm_b, epochs: 1, batch_size: 4, devices: 1,\n"
        "     loss: {energy: 0.0}}\n"
    )
    cfg = write_config(tmp_path, frames, stages, "interleave: {cycles: 2}\n")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "run.yaml"]) == 0
    out = tmp_path / "out"
    with (out / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["stage"] for r in rows] == ["fm_a", "fm_b", "fm_a", "fm_b"]
    # each stage's step counter (data order, learning-rate schedule) continues over turns
    assert [r["step"] for r in rows] == ["2", "1", "4", "2"]
    assert [r["stage_epoch"] for r in rows] == ["1", "1", "2", "2"]
    pot = cs.Potential.load(out / "model")
    routine, pot0, _ = routine_from_config(cfg, tmp_path)
    assert [s.cfg.max_epochs for s in routine.stages] == [2, 2]  # epochs x cycles
    assert routine.stages[1].cfg.loss.energy == 0.0 and routine.stages[0].cfg.batch_size == 2
    final = Checkpoints(out / "checkpoints").restore(routine.init_state(pot0.params))
    assert int(final["cursor"]["epoch"]) == 4
    assert max_diff(pot.params, final["params"]) == 0.0  # the model is the final params
    assert max_diff(pot.params, pot0.params) > 1e-3


def test_routine_config_errors(tmp_path):
    base = {"model": dict(CFG), "data": {"train": "x.xyz"}, "out": "o"}

    def stages(*entries):
        return dict(base, stages=list(entries))

    fm = {"type": "force_matching", "epochs": 1}
    with pytest.raises(
        ValueError, match=r"unknown stage type 'nonesuch' \(known: difftre, force_matching, rel"
    ):
        routine_from_config(stages(fm, {"type": "nonesuch", "epochs": 2}))
    with pytest.raises(ValueError, match=r"stages\[0\] needs 'epochs'"):
        routine_from_config(stages({"type": "force_matching"}))
    with pytest.raises(ValueError, match=r"stages\[0\].epochs must be a positive integer"):
        routine_from_config(stages(dict(fm, epochs=0)))
    with pytest.raises(ValueError, match="interleave.cycles must be a positive"):
        routine_from_config(dict(stages(fm), interleave={"cycles": 0}))
    with pytest.raises(ValueError, match=r"name 'force_matching' is taken by stages\[0\]"):
        routine_from_config(stages(fm, fm))
    with pytest.raises(ValueError, match="unknown key.*max_epochs"):
        routine_from_config(dict(stages(fm), max_epochs=3))
    with pytest.raises(ValueError, match="'stages' must be a non-empty list"):
        routine_from_config(stages())
    # a registered builder is used (difftre and relative_entropy are registered this way)
    built = []

    def toy(entry, ctx):
        built.append((dict(entry), ctx.epochs, ctx.where))
        return Quadratic(entry.get("name", "toy"), 0.0)

    STAGE_BUILDERS["toy"] = toy
    try:
        routine, _, out = routine_from_config(
            dict(base, data=None, stages=[{"type": "toy", "epochs": 2}], interleave={"cycles": 3}),
            tmp_path,
        )
    finally:
        del STAGE_BUILDERS["toy"]
    assert built == [({"type": "toy", "epochs": 2}, 6, "stages[0]")]
    assert routine.plan() == ["toy"] * 6 and out == tmp_path / "o"
