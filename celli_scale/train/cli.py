"""``celli-scale train CONFIG.yaml`` and ``celli-scale evaluate MODEL DATA``.

The training config (YAML, ``yaml.safe_load`` semantics via
:func:`celli_scale.config_io.load_yaml`; unknown keys are an error naming them)::

    model: {name: allegro, r_cut: 4.0, ...}   # as Potential.from_config takes
    data: {train: train.xyz, valid: valid.xyz}  # or valid_fraction: 0.1
    out: run1
    loss: {energy: 1.0, forces: 1.0, charges: 1.0, stress: 0.0}
    optimizer: {name: adam, learning_rate: 1e-3, schedule: cosine, final_lr_fraction: 0.1}
    batch_size: 4
    max_epochs: 100
    max_minutes: 30
    patience: 10
    seed: 0
    checkpoint: {keep: 3, every: 0}
    fit_energy_shift: true   # per-species shifts start at least-squares atomic energies

It writes ``out/model/`` (:meth:`Potential.save` of the best parameters),
``out/checkpoints/`` and ``out/metrics.csv``.

A config with ``stages`` is a training *routine*
(:class:`~celli_scale.train.routine.Routine`): stages run one after the other, or, with
``interleave``, in turns repeated ``cycles`` times, on one set of parameters::

    model: {name: allegro, ...}
    data: {train: train.xyz, valid_fraction: 0.1}  # default data of the stages
    out: run2
    seed: 0                      # model initialisation; the stages' default seed
    progress: true
    checkpoint: {keep: 3}        # routine checkpoints, saved after every epoch
    stages:
      - {type: force_matching, epochs: 20, optimizer: {learning_rate: 1e-3}}
      - type: force_matching     # each entry is its own stage (own optimizer state)
        name: fm_forces          # shown in metrics.csv; default: the type
        epochs: 5
        loss: {energy: 0.1, forces: 1.0}
        data: {train: other.xyz, valid: other_valid.xyz}
    interleave: {cycles: 3}      # optional: (20 epochs, 5 epochs) x 3

A ``force_matching`` stage takes the single-stage keys ``data``, ``loss``, ``optimizer``,
``batch_size``, ``seed``, ``devices``, ``fit_energy_shift``; its learning-rate schedule
spans its epochs over the whole routine (``epochs`` x ``cycles``). Other stage types are
added to :data:`STAGE_BUILDERS`. It writes ``out/model/`` (the final parameters),
``out/checkpoints/`` (resumed from when present) and ``out/metrics.csv`` (one row per
epoch, with the stage's name).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from celli_scale.train.routine import Routine, Stage
from celli_scale.train.trainer import ForceMatching, LossWeights, TrainConfig

log = logging.getLogger(__name__)

TOP_KEYS = {
    "model", "data", "out", "loss", "optimizer", "batch_size", "max_epochs",
    "max_minutes", "patience", "seed", "checkpoint", "devices", "progress",
    "fit_energy_shift",
}  # fmt: skip
DATA_KEYS = {"train", "valid", "valid_fraction"}
OPT_KEYS = {"name", "learning_rate", "schedule", "final_lr_fraction"}
CKPT_KEYS = {"keep", "every"}


def _check_keys(d: Any, allowed: set[str], where: str) -> dict:
    if not isinstance(d, dict):
        raise ValueError(f"{where} must be a mapping, got {type(d).__name__}")
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise ValueError(
            f"unknown key(s) in {where}: {', '.join(map(str, unknown))} "
            f"(known: {', '.join(sorted(allowed))})"
        )
    return d


def parse_config(cfg: Any) -> tuple[dict, dict, Path, TrainConfig]:
    """``(model, data, out, TrainConfig)`` from a training config dict.

    Raises:
      ValueError: an unknown or missing key (named), a value of the wrong type.
    """
    cfg = _check_keys(cfg, TOP_KEYS, "the training config")
    for k in ("model", "data", "out"):
        if k not in cfg:
            raise ValueError(f"the training config needs '{k}'")
    data = _check_keys(cfg["data"], DATA_KEYS, "data")
    if "train" not in data:
        raise ValueError("the training config needs 'data.train'")
    if "valid" in data and "valid_fraction" in data:
        raise ValueError("give data.valid or data.valid_fraction, not both")
    loss = _check_keys(
        cfg.get("loss", {}), {f.name for f in dataclasses.fields(LossWeights)}, "loss"
    )
    opt = _check_keys(cfg.get("optimizer", {}), OPT_KEYS, "optimizer")
    ck = _check_keys(cfg.get("checkpoint", {}), CKPT_KEYS, "checkpoint")
    kw: dict[str, Any] = {
        "loss": LossWeights(**{k: float(v) for k, v in loss.items()}),
        "optimizer": str(opt.get("name", "adam")),
        "learning_rate": float(opt.get("learning_rate", 1e-3)),
        "schedule": str(opt.get("schedule", "constant")),
        "final_lr_fraction": float(opt.get("final_lr_fraction", 0.1)),
        "checkpoint_keep": int(ck.get("keep", 3)),
        "checkpoint_every": int(ck.get("every", 0)),
    }
    for k, typ in (("batch_size", int), ("max_epochs", int), ("patience", int), ("seed", int)):
        if k in cfg:
            kw[k] = typ(cfg[k])
    if "max_minutes" in cfg:
        kw["max_minutes"] = math.inf if cfg["max_minutes"] is None else float(cfg["max_minutes"])
    if "devices" in cfg:
        kw["devices"] = None if cfg["devices"] is None else int(cfg["devices"])
    for k in ("progress", "fit_energy_shift"):
        if k in cfg:
            if not isinstance(cfg[k], bool):
                raise ValueError(f"'{k}' must be true or false, got {cfg[k]!r}")
            kw[k] = cfg[k]
    if "valid_fraction" in data:
        kw["valid_fraction"] = float(data["valid_fraction"])
    if not isinstance(cfg["model"], dict):
        raise ValueError("'model' must be a mapping (a model config)")
    return cfg["model"], data, Path(cfg["out"]), TrainConfig(**kw)


def train_from_config(cfg: dict, base: Path | None = None) -> Path:
    """Run a training config, or a routine config (with ``stages``); paths relative to
    ``base``; returns ``out``."""
    from celli_scale import io
    from celli_scale.potential import Potential

    if isinstance(cfg, dict) and "stages" in cfg:
        return train_routine_from_config(cfg, base)
    model_cfg, data, out, tc = parse_config(cfg)
    base = Path(".") if base is None else base
    out = out if out.is_absolute() else base / out
    train = io.read(base / data["train"])
    valid = io.read(base / data["valid"]) if "valid" in data else None
    pot = Potential.from_config(model_cfg, seed=tc.seed, example=train[0].system)
    fm = ForceMatching(pot, train, valid, tc)
    state = fm.fit(out)
    pot.params = state["best_params"]
    pot.save(out / "model")
    log.info("best validation loss %.6g; model in %s", float(state["best_loss"]), out / "model")
    return out


# -- routines ---------------------------------------------------------------------------
ROUTINE_KEYS = {
    "model", "data", "out", "seed", "progress", "checkpoint", "stages", "interleave",
}  # fmt: skip
STAGE_KEYS = {"type", "name", "epochs"}  # every stage; its builder checks the rest
FM_STAGE_KEYS = STAGE_KEYS | {
    "data", "loss", "optimizer", "batch_size", "seed", "devices", "fit_energy_shift",
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class StageContext:
    """What a stage builder gets besides its own entry of the routine config.

    Attributes:
      pot: the :class:`~celli_scale.potential.Potential` being trained; its ``params``
        when all stages are built start the routine.
      base: directory that relative paths in the config are relative to.
      data: the top-level ``data`` mapping (None when absent).
      seed: the top-level seed (a stage's default seed).
      epochs: the epochs this stage runs over the whole routine (``epochs`` x ``cycles``).
      where: the entry's place in the config (``stages[1]``), for error messages.
    """

    pot: Any
    base: Path
    data: Mapping[str, Any] | None
    seed: int
    epochs: int
    where: str


#: ``builder(entry, context) -> Stage``: the entry is the stage's mapping in the config
#: (``type``, ``epochs``, ``name`` included; the builder refuses keys it does not know and
#: names the stage ``entry.get("name", <type>)``, which the config keeps distinct).
StageBuilder = Callable[[Mapping[str, Any], StageContext], Stage]


def build_force_matching(entry: Mapping[str, Any], ctx: StageContext) -> ForceMatching:
    """A :class:`ForceMatching` stage from a routine config entry (keys: see the module
    docstring); ``max_epochs`` is the stage's epochs over the routine."""
    from celli_scale import io

    entry = _check_keys(dict(entry), FM_STAGE_KEYS, f"{ctx.where} (force_matching)")
    data = entry.get("data", ctx.data)
    if data is None:
        raise ValueError(f"{ctx.where} needs 'data' (or give a top-level 'data')")
    sub = {k: v for k, v in entry.items() if k not in STAGE_KEYS | {"data"}}
    sub.setdefault("seed", ctx.seed)
    single = {"model": {}, "data": data, "out": ".", "max_epochs": ctx.epochs, **sub}
    try:
        _, data, _, tc = parse_config(dict(single, progress=False))
    except ValueError as e:
        raise ValueError(f"{ctx.where}: {e}") from e
    train = io.read(ctx.base / data["train"])
    valid = io.read(ctx.base / data["valid"]) if "valid" in data else None
    return ForceMatching(ctx.pot, train, valid, tc, name=str(entry.get("name", "force_matching")))


#: stage type -> builder; other trainers register here (``STAGE_BUILDERS["difftre"] = ...``).
STAGE_BUILDERS: dict[str, StageBuilder] = {"force_matching": build_force_matching}


def _positive_int(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{what} must be a positive integer, got {v!r}")
    return v


def routine_from_config(cfg: Any, base: Path | None = None) -> tuple[Routine, Any, Path]:
    """``(routine, potential, out)`` from a routine config (paths relative to ``base``).
    The top-level keys and the schedule (types, epochs, names, cycles) are checked before
    the model is built or data read; each stage's builder then checks its own keys.

    Raises:
      ValueError: an unknown or missing key (named), an unknown stage type (naming the
        registered ones), epochs or cycles below 1, two stages with one name.
    """
    from celli_scale import io
    from celli_scale.potential import Potential

    cfg = _check_keys(cfg, ROUTINE_KEYS, "the routine config")
    for k in ("model", "out", "stages"):
        if k not in cfg:
            raise ValueError(f"the routine config needs '{k}'")
    if not isinstance(cfg["model"], dict):
        raise ValueError("'model' must be a mapping (a model config)")
    entries = cfg["stages"]
    if not isinstance(entries, list) or not entries:
        raise ValueError("'stages' must be a non-empty list of stage mappings")
    cycles = 1
    if "interleave" in cfg:
        inter = _check_keys(cfg["interleave"], {"cycles"}, "interleave")
        cycles = _positive_int(inter.get("cycles", 1), "interleave.cycles")
    names: dict[str, int] = {}
    for i, e in enumerate(entries):
        where = f"stages[{i}]"
        if not isinstance(e, dict):
            raise ValueError(f"{where} must be a mapping, got {type(e).__name__}")
        for k in ("type", "epochs"):
            if k not in e:
                raise ValueError(f"{where} needs '{k}'")
        if e["type"] not in STAGE_BUILDERS:
            raise ValueError(
                f"{where}: unknown stage type {e['type']!r} "
                f"(known: {', '.join(sorted(STAGE_BUILDERS))})"
            )
        _positive_int(e["epochs"], f"{where}.epochs")
        name = str(e.get("name", e["type"]))
        if name in names:
            raise ValueError(
                f"{where}: the name {name!r} is taken by stages[{names[name]}]; give each "
                "stage its own 'name'"
            )
        names[name] = i
    data = cfg.get("data")
    if data is not None:
        data = _check_keys(data, DATA_KEYS, "data")
    seed = int(cfg.get("seed", 0))
    keep = int(_check_keys(cfg.get("checkpoint", {}), {"keep"}, "checkpoint").get("keep", 3))

    base = Path(".") if base is None else base
    out = Path(cfg["out"])
    out = out if out.is_absolute() else base / out
    first = next((d for d in [data, *(e.get("data") for e in entries)] if d), None)
    example = None
    if isinstance(first, dict) and "train" in first:
        example = io.read(base / first["train"])[0].system
    pot = Potential.from_config(cfg["model"], seed=seed, example=example)
    schedule = []
    for i, e in enumerate(entries):
        ctx = StageContext(pot, base, data, seed, e["epochs"] * cycles, f"stages[{i}]")
        schedule.append((STAGE_BUILDERS[e["type"]](e, ctx), e["epochs"]))
    kw = dict(checkpoint_dir=out / "checkpoints", metrics_csv=out / "metrics.csv", keep=keep)
    if "interleave" in cfg:
        return Routine.interleaved(schedule, cycles, **kw), pot, out
    return Routine.sequential(schedule, **kw), pot, out


def train_routine_from_config(cfg: dict, base: Path | None = None) -> Path:
    """Run a routine config (see the module docstring); returns ``out``."""
    progress = cfg.get("progress", True) if isinstance(cfg, dict) else True
    if not isinstance(progress, bool):
        raise ValueError(f"'progress' must be true or false, got {progress!r}")
    routine, pot, out = routine_from_config(cfg, base)
    out.mkdir(parents=True, exist_ok=True)
    state = routine.run(pot.params, progress=progress)
    pot.params = routine.params_of(state)
    pot.save(out / "model")
    log.info("routine of %d epochs done; model in %s", routine.total_epochs, out / "model")
    return out


def add_parser(sub) -> None:
    """Register ``train`` and ``evaluate``."""
    p = sub.add_parser(
        "train",
        help="fit a potential to energies, forces, charges (and stress)",
        description=(
            "Force-matching training, or a routine of training stages, from a YAML "
            "config (see celli_scale.train.cli)."
        ),
    )
    p.add_argument("config", help="YAML training config")
    p.set_defaults(command="train")
    q = sub.add_parser(
        "evaluate",
        help="errors of a saved potential on labelled data, by formula and total charge",
    )
    q.add_argument("model", help="directory written by Potential.save")
    q.add_argument("data", help="labelled data file (.xyz/.extxyz, input.data, .npz)")
    q.add_argument("--json", default=None, help="write the table as JSON to FILE")
    q.add_argument("--plot", default=None, help="write parity plots to FILE.png")


def main(args: argparse.Namespace) -> int:
    from celli_scale.config_io import load_yaml

    if args.command == "train":
        cfg = load_yaml(args.config)
        out = train_from_config(cfg)
        print(f"model written to {out / 'model'}")
        return 0
    return evaluate_main(args)


def evaluate_main(args: argparse.Namespace) -> int:
    from celli_scale import io
    from celli_scale.potential import Potential
    from celli_scale.train.evaluate import error_table, parity_plot, predictions, table_lines

    pot = Potential.load(args.model)
    frames = io.read(args.data)
    preds = predictions(pot, frames)
    table = error_table(frames, preds)
    print("\n".join(table_lines(table)))
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=2))
    if args.plot:
        parity_plot(frames, preds, args.plot)
    return 0
