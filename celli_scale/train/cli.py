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
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any

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
    """Run a training config (paths relative to ``base``); returns ``out``."""
    from celli_scale import io
    from celli_scale.potential import Potential

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


def add_parser(sub) -> None:
    """Register ``train`` and ``evaluate``."""
    p = sub.add_parser(
        "train",
        help="fit a potential to energies, forces, charges (and stress)",
        description="Force-matching training from a YAML config (see celli_scale.train.cli).",
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
