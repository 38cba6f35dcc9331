"""Training routines: trainers composed in sequence and interleaved, on one set of
parameters, checkpointed after every epoch and resumable exactly.

A trainer that takes part is a :class:`Stage`: a name, a training state (a pytree of
arrays) made by ``init_state(params)``, one epoch ``run_epoch(state) -> (state, metrics)``
and ``params_of(state)``. :class:`~celli_scale.train.trainer.ForceMatching`, DiffTRe and
relative-entropy training are stages. A :class:`Routine` runs a schedule of stages::

    Routine.sequential([(force_matching, 50), (difftre, 20)])         # FM, then DiffTRe
    Routine.interleaved([(force_matching, 2), (difftre, 1)], cycles=10)  # (FM FM DiffTRe) x 10
    Routine([(fm, 10), Interleave([(fm, 2), (difftre, 1)], cycles=5)])   # both, in order

How the parameters flow:

* One shared set of parameters. When a stage's turn begins it trains from the current
  parameters; after each of its epochs its parameters (``params_of``) are the current ones.
* A stage's first turn starts from ``stage.init_state(current parameters)`` (fresh
  optimizer state, step 0, and whatever else the stage builds from the parameters, e.g.
  DiffTRe's reference trajectories). Each later turn of the same stage object (an
  interleaved schedule, or a stage listed twice) continues its own state with only
  ``state["params"]`` replaced by the current parameters: the optimizer moments, step
  counter (so the learning-rate schedule and the data order), PRNG keys and best-so-far
  records persist across its turns. This is the usual choice for alternating optimisers
  (each keeps its own moment estimates of its own loss); a stage that should start afresh
  each turn is listed as another stage object.
* A stage runs all the epochs the schedule gives it: ``ForceMatching``'s early stopping
  and time limit belong to :meth:`~celli_scale.train.trainer.ForceMatching.fit` only.

Checkpoints: with ``checkpoint_dir`` the routine state — the shared parameters, every
stage's state and the cursor (epochs done, the turn and the epoch in it) — is saved with
orbax after every epoch (:class:`~celli_scale.train.checkpoint.Checkpoints`: atomic, the
newest readable step is restored). :meth:`Routine.run` resumes from it and continues
exactly: an interrupted and resumed routine ends with the same parameters, bit for bit, as
an uninterrupted one (stages are deterministic given their state). ``routine.json`` beside
the checkpoints records the schedule and the stages' fingerprints; resuming checkpoints of
another schedule is refused. One row per epoch goes to ``metrics.csv``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import numbers
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import jax.numpy as jnp
import numpy as np

from celli_scale.distributed import multihost

log = logging.getLogger(__name__)

__all__ = ["Interleave", "Routine", "Stage", "Turn"]


@runtime_checkable
class Stage(Protocol):
    """A trainer that a :class:`Routine` can run.

    Attributes:
      name: shown in the progress bar and the ``stage`` column of ``metrics.csv``.
    """

    name: str

    def init_state(self, params: Any) -> dict:
        """The training state at ``params``: a pytree of arrays only (orbax saves it), at
        least ``{"params", "opt_state", "step"}`` (``step`` an int32 scalar) plus whatever
        else resuming deterministically needs (e.g. a PRNG key)."""
        ...

    def run_epoch(self, state: dict) -> tuple[dict, dict[str, float]]:
        """One epoch (force matching: one pass over the training batches); returns the new
        state (the tree structure, shapes and dtypes of ``init_state``'s) and scalar
        metrics. Deterministic given ``state``."""
        ...

    def params_of(self, state: dict) -> Any:
        """The parameters of ``state`` (``state["params"]``)."""
        ...


def _check_epochs(n: Any, what: str) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or int(n) < 1:
        raise ValueError(f"{what} must be a positive integer, got {n!r}")
    return int(n)


def _check_entry(entry: Any, where: str) -> tuple[Stage, int]:
    if not (isinstance(entry, tuple | list) and len(entry) == 2):
        raise ValueError(f"{where} must be a (stage, n_epochs) pair, got {entry!r}")
    stage, n = entry
    if not isinstance(stage, Stage):
        raise ValueError(
            f"{where}: {stage!r} is not a Stage (needs name, init_state, run_epoch, params_of)"
        )
    return stage, _check_epochs(n, f"{where}: the number of epochs")


@dataclasses.dataclass(frozen=True)
class Interleave:
    """``cycles`` repetitions of the ``(stage, n_epochs)`` entries in order: with
    ``[(a, 2), (b, 1)]`` and ``cycles=3`` the epochs are ``a a b a a b a a b``.

    Raises:
      ValueError: no entries, a non-stage, or a number of epochs or cycles below 1.
    """

    entries: Sequence[tuple[Stage, int]]
    cycles: int = 1

    def __post_init__(self) -> None:
        entries = tuple(
            _check_entry(e, f"Interleave entry {i}") for i, e in enumerate(self.entries)
        )
        if not entries:
            raise ValueError("Interleave needs at least one (stage, n_epochs) entry")
        object.__setattr__(self, "entries", entries)
        object.__setattr__(self, "cycles", _check_epochs(self.cycles, "Interleave cycles"))


@dataclasses.dataclass(frozen=True)
class Turn:
    """Consecutive epochs of one stage in a flattened schedule.

    Attributes:
      stage: the stage; key: its key in the routine state (``"<i>_<name>"``).
      epochs: epochs in this turn; entry: index of the schedule entry it comes from;
      cycle: the interleave cycle (0 outside an :class:`Interleave`).
    """

    stage: Stage
    key: str
    epochs: int
    entry: int
    cycle: int


class Routine:
    """Run :class:`Stage` s in sequence and interleaved on one set of parameters.

    Args:
      schedule: entries run in order, each a ``(stage, n_epochs)`` pair or an
        :class:`Interleave` block.
      checkpoint_dir: orbax checkpoints of the routine state after every epoch (and
        ``routine.json``); None: no checkpoints, no resume.
      metrics_csv: one row per epoch (default ``checkpoint_dir/metrics.csv``; None
        without ``checkpoint_dir``: none written). Columns: ``epoch`` (1-based over the
        routine), ``stage``, ``entry``, ``cycle``, ``minutes`` (since this run started),
        then the stage's metrics (a metric named like one of those is written as
        ``stage_<name>``, e.g. ForceMatching's own ``stage_epoch``). A stage with new
        metric names widens the file.
      keep: checkpoints kept.

    Example:
      >>> r = Routine.interleaved([(fm, 2), (difftre, 1)], cycles=5, checkpoint_dir="ck")
      >>> state = r.run(pot.params)  # doctest: +SKIP
      >>> pot.params = state["params"]  # doctest: +SKIP

    Raises:
      ValueError: an empty schedule or a bad entry (named).
    """

    COLUMNS = ("epoch", "stage", "entry", "cycle", "minutes")

    def __init__(
        self,
        schedule: Sequence[tuple[Stage, int] | Interleave],
        checkpoint_dir: str | os.PathLike | None = None,
        *,
        metrics_csv: str | os.PathLike | None = None,
        keep: int = 3,
    ) -> None:
        schedule = list(schedule)
        if not schedule:
            raise ValueError("a routine needs at least one (stage, n_epochs) entry")
        self.stages: list[Stage] = []  # distinct stage objects, in order of appearance
        self.keys: list[str] = []
        turns: list[Turn] = []
        for i, entry in enumerate(schedule):
            if isinstance(entry, Interleave):
                for c in range(entry.cycles):
                    turns += [self._turn(s, n, i, c) for s, n in entry.entries]
            else:
                turns.append(self._turn(*_check_entry(entry, f"schedule entry {i}"), i, 0))
        self.schedule = schedule
        self.turns: tuple[Turn, ...] = tuple(turns)
        self.total_epochs = sum(t.epochs for t in turns)
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        if metrics_csv is None and self.checkpoint_dir is not None:
            metrics_csv = self.checkpoint_dir / "metrics.csv"
        self.metrics_csv = None if metrics_csv is None else Path(metrics_csv)
        self.keep = int(keep)
        #: the metric rows of the epochs run by :meth:`run` in this process
        self.history: list[dict[str, Any]] = []

    @classmethod
    def sequential(
        cls,
        entries: Sequence[tuple[Stage, int]],
        checkpoint_dir: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> Routine:
        """``entries`` one after the other: ``[(fm, 50), (difftre, 20)]``; ``kwargs`` as
        :class:`Routine`."""
        return cls(list(entries), checkpoint_dir, **kwargs)

    @classmethod
    def interleaved(
        cls,
        entries: Sequence[tuple[Stage, int]],
        cycles: int,
        checkpoint_dir: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> Routine:
        """``cycles`` repetitions of ``entries`` (:class:`Interleave`); ``kwargs`` as
        :class:`Routine`."""
        return cls([Interleave(entries, cycles)], checkpoint_dir, **kwargs)

    def _turn(self, stage: Stage, n: int, entry: int, cycle: int) -> Turn:
        for s, k in zip(self.stages, self.keys, strict=True):
            if s is stage:
                return Turn(stage, k, n, entry, cycle)
        key = f"{len(self.stages)}_{re.sub(r'[^0-9A-Za-z_]', '_', str(stage.name))}"
        self.stages.append(stage)
        self.keys.append(key)
        return Turn(stage, key, n, entry, cycle)

    def plan(self) -> list[str]:
        """The stage name of every epoch, in order."""
        return [t.stage.name for t in self.turns for _ in range(t.epochs)]

    def locate(self, done: int) -> tuple[int, int]:
        """``(turn, epoch within the turn)`` of the epoch after ``done`` epochs
        (``(len(turns), 0)`` at the end)."""
        for t, turn in enumerate(self.turns):
            if done < turn.epochs:
                return t, done
            done -= turn.epochs
        return len(self.turns), 0

    @staticmethod
    def params_of(state: dict) -> Any:
        """The current parameters of a routine state."""
        return state["params"]

    def _cursor(self, done: int) -> dict:
        turn, epoch = self.locate(done)
        return {
            "epoch": jnp.asarray(done, jnp.int32),
            "turn": jnp.asarray(turn, jnp.int32),
            "turn_epoch": jnp.asarray(epoch, jnp.int32),
        }

    def init_state(self, params: Any) -> dict:
        """The routine state before its first epoch: ``{"params", "stages": {key:
        stage.init_state(params)}, "cursor"}``. A stage's entry is replaced by
        ``init_state`` of the current parameters when its first turn begins."""
        stages = {k: s.init_state(params) for s, k in zip(self.stages, self.keys, strict=True)}
        return {"params": params, "stages": stages, "cursor": self._cursor(0)}

    def fingerprint(self) -> dict[str, Any]:
        """The schedule and each stage's ``fingerprint()`` (when it has one): what a
        resumed run must share with the run that wrote the checkpoints."""
        fp: dict[str, Any] = {
            "turns": [[t.key, t.epochs, t.entry, t.cycle] for t in self.turns],
            "stages": {},
        }
        for s, k in zip(self.stages, self.keys, strict=True):
            fn = getattr(s, "fingerprint", None)
            fp["stages"][k] = fn() if callable(fn) else None
        return json.loads(json.dumps(fp))

    def run(self, params: Any, progress: bool = True, stop_after: int | None = None) -> dict:
        """Run the schedule from ``params``, or resume it from the newest checkpoint in
        ``checkpoint_dir`` (``params`` then only gives the shapes).

        Args:
          params: the starting parameters (a pytree shared by all stages).
          progress: show a tqdm progress bar over the routine's epochs.
          stop_after: return once this many epochs of the routine are done (counted from
            its start, resumed epochs included); None: run to the end.

        Returns:
          The routine state: ``params`` (the current parameters), ``stages`` (each
          stage's state by key, see :attr:`keys`) and ``cursor`` (``epoch``: epochs
          done; ``turn``, ``turn_epoch``: where the next epoch is).

        Raises:
          ValueError: ``checkpoint_dir`` holds checkpoints of another schedule or other
            stages.
        """
        from tqdm.auto import tqdm

        from celli_scale.train.checkpoint import Checkpoints

        state = self.init_state(params)
        ckpt = None
        if self.checkpoint_dir is not None:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            self._check_fingerprint(self.checkpoint_dir)
            ckpt = Checkpoints(self.checkpoint_dir, keep=self.keep)
            restored = ckpt.restore(state)
            if restored is not None:
                state = restored
                log.info("routine resumed after epoch %d", int(state["cursor"]["epoch"]))
        done = int(state["cursor"]["epoch"])
        leader = multihost.is_leader()  # process 0 shows progress and writes metrics
        if self.metrics_csv is not None and leader:
            _trim_csv(self.metrics_csv, done)
        end = self.total_epochs if stop_after is None else min(int(stop_after), self.total_epochs)
        t0 = time.monotonic()
        bar = tqdm(
            total=self.total_epochs, initial=done, disable=not (progress and leader), desc="routine"
        )
        try:
            while done < end:
                t, e = self.locate(done)
                turn = self.turns[t]
                stages = dict(state["stages"])
                st = stages[turn.key]
                if e == 0:  # a turn begins: the stage takes the current parameters
                    started = any(u.key == turn.key for u in self.turns[:t])
                    if started:
                        st = dict(st, params=state["params"])
                    else:
                        st = turn.stage.init_state(state["params"])
                st, metrics = turn.stage.run_epoch(st)
                stages[turn.key] = st
                done += 1
                state = {
                    "params": turn.stage.params_of(st),
                    "stages": stages,
                    "cursor": self._cursor(done),
                }
                row = self._row(done, turn, metrics, t0)
                self.history.append(row)
                if self.metrics_csv is not None and leader:
                    _append_csv(self.metrics_csv, row)
                if ckpt is not None:
                    ckpt.save(done, state)
                bar.update(1)
                shown = next((k for k in ("loss", "valid_loss") if k in metrics), None)
                post = {"stage": turn.stage.name}
                if shown is not None:
                    post[shown] = f"{float(metrics[shown]):.4g}"
                bar.set_postfix(post)
        finally:
            bar.close()
            if ckpt is not None:
                ckpt.close()
        return state

    def _row(self, done: int, turn: Turn, metrics: dict, t0: float) -> dict[str, Any]:
        row: dict[str, Any] = {
            "epoch": done,
            "stage": turn.stage.name,
            "entry": turn.entry,
            "cycle": turn.cycle,
            "minutes": (time.monotonic() - t0) / 60,
        }
        for k, v in metrics.items():
            a = np.asarray(v)  # scalars: integers stay integers (steps, epochs)
            row[f"stage_{k}" if k in self.COLUMNS else k] = (
                int(a) if np.issubdtype(a.dtype, np.integer) else float(a)
            )
        return row

    def _check_fingerprint(self, directory: Path) -> None:
        """Refuse checkpoints in ``directory`` of another schedule or other stages; first
        run: write ``directory/routine.json``."""
        path = directory / "routine.json"
        now = self.fingerprint()
        has_steps = any(d.name.isdigit() for d in directory.iterdir())
        if path.is_file() and has_steps:
            old = json.loads(path.read_text())
            diff = []
            if old.get("turns") != now["turns"]:
                diff.append(
                    f"schedule {_turns_text(old.get('turns'))} -> {_turns_text(now['turns'])}"
                )
            for k in sorted(set(old.get("stages", {})) | set(now["stages"])):
                if old.get("stages", {}).get(k) != now["stages"].get(k):
                    diff.append(f"stage {k}")
            if diff:
                raise ValueError(
                    f"{directory} holds checkpoints of another routine "
                    f"({'; '.join(diff)} differ): resuming would continue that routine. Use "
                    "another checkpoint directory or remove it"
                )
        if multihost.is_leader():  # one writer; atomic, as others may be reading it
            multihost.write_text_atomic(path, json.dumps(now, indent=2))


def _turns_text(turns: Any) -> str:
    if not isinstance(turns, list):
        return repr(turns)
    return " ".join(f"{t[0]}x{t[1]}" for t in turns)


def _trim_csv(path: Path, done: int) -> None:
    """Drop rows of epochs after ``done`` (written before an interruption that lost their
    checkpoint), so a resumed routine's ``metrics.csv`` has each epoch once."""
    if not path.is_file():
        return
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    keep = [r for r in rows if int(r["epoch"]) <= done]
    if len(keep) != len(rows):
        _write_csv(path, keep, _header(path))


def _header(path: Path) -> list[str]:
    with path.open(newline="") as fh:
        return next(csv.reader(fh), [])


def _write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as fh:
        wr = csv.DictWriter(fh, fieldnames=fields, restval="")
        wr.writeheader()
        wr.writerows(rows)
    os.replace(tmp, path)


def _append_csv(path: Path, row: dict) -> None:
    """Append ``row``; a row with new columns rewrites the file with the wider header."""
    if not path.is_file():
        _write_csv(path, [row], list(row))
        return
    fields = _header(path)
    if set(row) <= set(fields):
        with path.open("a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=fields, restval="").writerow(row)
        return
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    _write_csv(path, [*rows, row], fields + [k for k in row if k not in fields])
