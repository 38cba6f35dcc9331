"""``ForceMatching``: fit a :class:`~celli_scale.potential.Potential` to reference
energies (eV), forces (eV/Å), charges (e) and stresses (eV/Å³).

Batches are padded (common atom and edge capacity over the data set; the last batch and
the device split padded with masked dummy structures that contribute exactly nothing).
A batch is a stacked graph, sharded over the local devices (``jax.shard_map`` on the
1-D mesh of :mod:`celli_scale.distributed.data_parallel`; parameters replicated,
gradients all-reduced) and evaluated by one compiled step, CELLI included: its
electrostatics shapes are made common over the data set
(:meth:`~celli_scale.potential.Potential.batch_graphs`: one Ewald split, padded
k-vectors, the largest PME grid). Data order is a permutation drawn from
``(seed, epoch)``, so resuming from a checkpoint at any step continues exactly as an
uninterrupted run.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from celli_scale.distributed import multihost
from celli_scale.distributed.data_parallel import BATCH_AXIS, batch_mesh
from celli_scale.train.loss import TARGETS, predict, squared_errors

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LossWeights:
    """Weights of the loss terms: energy per atom (eV/atom)², forces (eV/Å)²,
    charges e², stress (eV/Å³)²."""

    energy: float = 1.0
    forces: float = 1.0
    charges: float = 1.0
    stress: float = 0.0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Trainer settings (every field defaulted).

    Attributes:
      loss: loss weights.
      optimizer: optax optimizer name (``adam``, ``adamw``, ``sgd``).
      learning_rate: peak learning rate.
      schedule: ``constant``, ``cosine`` (decay to ``final_lr_fraction`` over all steps)
        or ``exponential`` (factor ``final_lr_fraction`` over all steps).
      final_lr_fraction: see ``schedule``.
      batch_size: structures per step (rounded up to a multiple of the devices).
      max_epochs, max_minutes: stopping limits (the first reached ends training).
      patience: epochs without a better validation loss before stopping (0: never).
      valid_fraction: validation share drawn by ``seed`` when no validation set is given.
      seed: data split, data order and parameter initialisation.
      devices: devices for the data-parallel step (None: all local).
      checkpoint_keep: checkpoints kept; checkpoint_every: steps between checkpoints
        (0: at the end of every epoch).
      progress: show a tqdm progress bar.
      fit_energy_shift: start the per-species energy shifts (``scale_shift/shift``) at
        the least-squares atomic reference energies of the training set (energy ≈ Σ_Z
        n_Z E_Z; QM total energies are hundreds of eV per atom away from a fresh model's).
    """

    loss: LossWeights = LossWeights()
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    schedule: str = "constant"
    final_lr_fraction: float = 0.1
    batch_size: int = 4
    max_epochs: int = 100
    max_minutes: float = math.inf
    patience: int = 0
    valid_fraction: float = 0.1
    seed: int = 0
    devices: int | None = None
    checkpoint_keep: int = 3
    checkpoint_every: int = 0
    progress: bool = True
    fit_energy_shift: bool = True


def make_optimizer(cfg: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """The optax optimizer with its learning-rate schedule."""
    lr, steps = cfg.learning_rate, max(int(total_steps), 1)
    if cfg.schedule == "constant":
        sched: Any = lr
    elif cfg.schedule == "cosine":
        sched = optax.cosine_decay_schedule(lr, steps, alpha=cfg.final_lr_fraction)
    elif cfg.schedule == "exponential":
        sched = optax.exponential_decay(lr, steps, cfg.final_lr_fraction)
    else:
        raise ValueError(f"unknown schedule {cfg.schedule!r} (constant, cosine, exponential)")
    makers = {"adam": optax.adam, "adamw": optax.adamw, "sgd": optax.sgd}
    if cfg.optimizer not in makers:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r} ({', '.join(makers)})")
    return makers[cfg.optimizer](sched)


def labels_of(frame: Any, n_pad: int, dtype: Any) -> dict[str, np.ndarray]:
    """Padded host label arrays and masks of one :class:`celli_scale.io.Frame`."""
    n = frame.system.n_atoms
    node = np.zeros(n_pad, bool)
    node[:n] = True
    f = np.zeros((n_pad, 3))
    q = np.zeros(n_pad)
    if frame.forces is not None:
        f[:n] = frame.forces
    if frame.charges is not None:
        q[:n] = frame.charges
    periodic = frame.system.cell is not None and all(frame.system.pbc)
    s = np.zeros((3, 3)) if frame.stress is None else np.asarray(frame.stress, float)
    return {
        "node_mask": node,
        "energy": np.asarray(0.0 if frame.energy is None else frame.energy, dtype),
        "energy_mask": np.asarray(frame.energy is not None),
        "forces": f.astype(dtype),
        "forces_mask": np.asarray(frame.forces is not None),
        "charges": q.astype(dtype),
        "charges_mask": np.asarray(frame.charges is not None),
        "stress": s.astype(dtype),
        "stress_mask": np.asarray(frame.stress is not None and periodic),
    }


def _no_labels(lab: dict) -> dict:
    out = dict(lab)
    for k in ("node_mask", "energy_mask", "forces_mask", "charges_mask", "stress_mask"):
        out[k] = np.zeros_like(lab[k])
    return out


class Dataset:
    """Padded, stacked graphs and labels of a list of frames (host arrays)."""

    def __init__(self, frames: Sequence[Any], graphs: Sequence[Any], dtype: Any):
        self.frames = list(frames)
        if len({g.periodic for g in graphs}) > 1:
            raise ValueError("a data set mixes periodic and open structures")
        self.graphs = jax.tree_util.tree_map(lambda *x: np.stack(x), *graphs)
        n_pad = graphs[0].positions.shape[0]
        self.labels = [labels_of(f, n_pad, np.dtype(dtype)) for f in self.frames]
        self.periodic = all(g.periodic for g in graphs)

    def __len__(self) -> int:
        return len(self.frames)

    def batch(self, idx: Sequence[int], size: int) -> tuple[Any, dict]:
        """Structures ``idx`` padded to ``size`` with masked copies of the first."""
        idx = list(idx)
        pad = [idx[0]] * (size - len(idx))
        labels = [self.labels[i] for i in idx] + [_no_labels(self.labels[i]) for i in pad]
        labels = {k: np.stack([lab[k] for lab in labels]) for k in labels[0]}
        allidx = np.asarray(idx + pad)
        return jax.tree_util.tree_map(lambda x: x[allidx], self.graphs), labels


def atomic_reference_energies(frames: Sequence[Any], species: Sequence[int]) -> np.ndarray:
    """Least-squares ``E_Z`` (eV, one per model species) with ``E ≈ Σ_Z n_Z E_Z`` over the
    frames that have an energy; species absent from the data get the mean. A tiny ridge
    keeps the fit defined when compositions are collinear (e.g. one composition only)."""
    zs = list(species)
    rows, e = [], []
    for f in frames:
        if f.energy is None:
            continue
        z = np.asarray(f.system.species)
        rows.append([np.sum(z == s) for s in zs])
        e.append(float(f.energy))
    if not rows:
        return np.zeros(len(zs))
    a, e = np.asarray(rows, float), np.asarray(e)
    present = a.sum(0) > 0
    mean = e.sum() / a.sum()  # eV per atom
    ap = a[:, present]
    lam = 1e-8 * max(float(np.trace(ap.T @ ap)), 1.0)
    sol = np.linalg.solve(ap.T @ ap + lam * np.eye(ap.shape[1]), ap.T @ (e - ap.sum(1) * mean))
    out = np.full(len(zs), mean)
    out[present] += sol
    return out


def set_energy_shift(params: Any, shift: np.ndarray) -> tuple[Any, int]:
    """``params`` with every ``.../scale_shift/shift`` leaf set to ``shift``; returns the
    new tree and how many leaves were set."""
    count = 0

    def visit(path, leaf):
        nonlocal count
        keys = [getattr(k, "key", None) for k in path]
        if keys[-2:] == ["scale_shift", "shift"] and leaf.shape == shift.shape:
            count += 1
            return jnp.asarray(shift, leaf.dtype)
        return leaf

    return jax.tree_util.tree_map_with_path(visit, params), count


def normalisers(labels: dict) -> dict[str, float]:
    """Counts the loss terms are divided by (host; at least 1)."""
    node = labels["node_mask"]
    n_e = np.sum(labels["energy_mask"])
    n_f = 3 * np.sum(node & labels["forces_mask"][:, None])
    n_q = np.sum(node & labels["charges_mask"][:, None])
    n_s = 9 * np.sum(labels["stress_mask"])
    return {k: float(max(v, 1)) for k, v in zip(TARGETS, (n_e, n_f, n_q, n_s), strict=True)}


def batch_errors(model, params, graphs, labels, stress: bool) -> dict:
    """``{target: (sum_sq, sum_abs)}`` over the structures of a stacked batch (one after
    another, ``lax.map``, as :meth:`Potential.evaluate_batch`)."""

    def one(g, lab):  # stress only of periodic structures (else masked zeros)
        return squared_errors(predict(model, params, g, stress and g.periodic), lab)

    per = jax.lax.map(lambda a: one(*a), (graphs, labels))
    return jax.tree_util.tree_map(jnp.sum, per)


def weighted_loss(errs: dict, norms: dict, w: LossWeights) -> jax.Array:
    return sum(getattr(w, k) * errs[k][0] / norms[k] for k in TARGETS)


class ForceMatching:
    """Force-matching trainer for a :class:`~celli_scale.potential.Potential`.

    A :class:`~celli_scale.train.routine.Stage` (``name``, :meth:`init_state`,
    :meth:`run_epoch`, :meth:`params_of`), so it composes with other trainers in a
    :class:`~celli_scale.train.routine.Routine`; :meth:`fit` runs it alone (checkpoints,
    best parameters, early stopping, ``metrics.csv``). Inside a routine its learning-rate
    schedule spans ``config.max_epochs`` epochs: set it to the epochs the routine gives it.

    Example:
      >>> fm = ForceMatching(pot, train_frames, valid_frames, TrainConfig(max_epochs=5))
      >>> state = fm.fit(out_dir)  # doctest: +SKIP
      >>> pot.params = state["best_params"]  # doctest: +SKIP
    """

    def __init__(
        self,
        pot: Any,
        train: Sequence[Any],
        valid: Sequence[Any] | None = None,
        config: TrainConfig = TrainConfig(),
        name: str = "force_matching",
    ) -> None:
        self.pot, self.cfg, self.name = pot, config, name
        train = list(train)
        if valid is None:
            rng = np.random.default_rng(config.seed)
            perm = rng.permutation(len(train))
            n_v = max(1, round(config.valid_fraction * len(train))) if len(train) > 1 else 0
            valid = [train[i] for i in perm[:n_v]]
            train = [train[i] for i in perm[n_v:]]
        if not train:
            raise ValueError("no training structures")
        valid = list(valid)
        # one set of shapes for training and validation (one compiled step each)
        graphs = pot.batch_graphs([f.system for f in train + valid])
        dtype = pot.config.jnp_dtype
        self.train = Dataset(train, graphs[: len(train)], dtype)
        self.valid = Dataset(valid, graphs[len(train) :], dtype) if valid else None
        # every process's devices (jax.distributed): one data-parallel step for the run
        self.devices = config.devices or jax.device_count()
        self.batch_size = -(-config.batch_size // self.devices) * self.devices
        self.steps_per_epoch = -(-len(self.train) // config.batch_size)
        self.stress = (
            config.loss.stress > 0
            and self.train.periodic
            and any(bool(lab["stress_mask"]) for lab in self.train.labels)
        )
        self.optimizer = make_optimizer(config, config.max_epochs * self.steps_per_epoch)
        if config.fit_energy_shift and pot.params is not None:
            e0 = atomic_reference_energies(train, pot.config.species)
            pot.params, n_set = set_energy_shift(pot.params, e0)
            if n_set:
                log.info("atomic reference energies (eV): %s", np.round(e0, 4).tolist())
        self._build_steps()

    # -- compiled steps -----------------------------------------------------------------
    def _build_steps(self) -> None:
        model, w, stress = self.pot.model, self.cfg.loss, self.stress
        opt = self.optimizer

        def loss_and_errs(params, graphs, labels, norms):
            errs = batch_errors(model, params, graphs, labels, stress)
            return weighted_loss(errs, norms, w), errs

        mesh = batch_mesh(self.devices)
        self.sharding = NamedSharding(mesh, P(BATCH_AXIS))
        self.replicated = NamedSharding(mesh, P())

        def local_grad(params, graphs, labels, norms):
            (loss, errs), g = jax.value_and_grad(loss_and_errs, has_aux=True)(
                params, graphs, labels, norms
            )
            return jax.lax.psum((loss, errs, g), BATCH_AXIS)

        def local_eval(params, graphs, labels, norms):
            return jax.lax.psum(loss_and_errs(params, graphs, labels, norms), BATCH_AXIS)

        spec = (P(), P(BATCH_AXIS), P(BATCH_AXIS), P())
        kw = dict(mesh=mesh, in_specs=spec, out_specs=P(), check_vma=False)
        grad_fn = jax.shard_map(local_grad, **kw)
        eval_fn = jax.shard_map(local_eval, **kw)

        def step(params, opt_state, graphs, labels, norms):
            loss, errs, g = grad_fn(params, graphs, labels, norms)
            updates, opt_state = opt.update(g, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss, errs

        #: ``step(params, opt_state, graphs, labels, norms) -> (params, opt_state, loss, errs)``
        self.step = jax.jit(step)
        #: ``evaluate(params, graphs, labels, norms) -> (loss, errs)``
        self.evaluate = jax.jit(eval_fn)
        #: ``loss_and_grad(params, graphs, labels, norms) -> (loss, errs, grad)``
        self.loss_and_grad = jax.jit(grad_fn)

    def device_batch(self, ds: Dataset, idx: Sequence[int]) -> tuple[Any, dict, dict]:
        """The batch of structures ``idx`` on the devices: each process stacks only the
        rows its devices hold (:func:`~celli_scale.distributed.multihost.process_rows`);
        the loss normalisers come from the labels of the whole batch."""
        graphs, labels = ds.batch(idx, self.batch_size)
        norms = normalisers(labels)
        if jax.process_count() == 1:
            return (
                jax.device_put(graphs, self.sharding),
                jax.device_put(labels, self.sharding),
                norms,
            )
        rows = multihost.process_rows(self.batch_size, self.sharding)
        mine = jax.tree_util.tree_map(lambda x: x[rows], (graphs, labels))
        graphs, labels = multihost.from_process_rows(mine, self.batch_size, self.sharding)
        return graphs, labels, norms

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The permutation of training structures in ``epoch`` (from ``(seed, epoch)``)."""
        return np.random.default_rng([self.cfg.seed, epoch]).permutation(len(self.train))

    def batches(self, epoch: int) -> list[np.ndarray]:
        order = self.epoch_order(epoch)
        bs = self.cfg.batch_size
        return [order[i : i + bs] for i in range(0, len(order), bs)]

    # -- state --------------------------------------------------------------------------
    def init_state(self, params: Any | None = None) -> dict:
        """``{params, opt_state, step, best_loss, bad_epochs, best_params}`` at ``params``
        (default ``pot.params``), step 0."""
        params = self.pot.params if params is None else params
        dtype = self.pot.config.jnp_dtype
        return {
            "params": params,
            "opt_state": self.optimizer.init(params),
            "step": jnp.asarray(0, jnp.int32),
            "best_loss": jnp.asarray(jnp.inf, dtype),
            "bad_epochs": jnp.asarray(0, jnp.int32),
            "best_params": params,
        }

    def validate(self, params: Any) -> tuple[float, dict]:
        """Validation loss and ``{target: (sum_sq, sum_abs, count)}``."""
        ds = self.valid or self.train
        tot = None
        loss = 0.0
        for i in range(0, len(ds), self.batch_size):
            idx = list(range(i, min(i + self.batch_size, len(ds))))
            graphs, labels, norms = self.device_batch(ds, idx)
            lo, errs = self.evaluate(params, graphs, labels, norms)
            errs = _with_counts(errs, norms)
            loss += float(lo) * len(idx)
            tot = errs if tot is None else _add(tot, errs)
        return loss / len(ds), tot

    # -- training -----------------------------------------------------------------------
    def params_of(self, state: dict) -> Any:
        """The parameters of a training state (:class:`~celli_scale.train.routine.Stage`)."""
        return state["params"]

    def run_epoch(self, state: dict) -> tuple[dict, dict[str, float]]:
        """One epoch (:class:`~celli_scale.train.routine.Stage`): the optimizer steps over
        the training batches of epoch ``state["step"] // steps_per_epoch`` (data order from
        ``(seed, epoch)``; only the remaining batches when ``state`` stopped mid-epoch),
        then the validation loss, which updates ``best_loss``, ``best_params`` and
        ``bad_epochs``. Deterministic given ``state``.

        Returns:
          ``(state, metrics)``; metrics: ``epoch`` (1-based), ``step``, ``valid_loss`` and
          the ``{train,valid}_{energy,forces,charges,stress}_{mae,rmse}`` errors (eV per
          atom, eV/Å, e, eV/Å³; NaN where a target has no labels).
        """
        state, row = self._epoch(state)
        assert row is not None  # no on_step: the epoch always finishes
        return state, row

    def _epoch(
        self,
        state: dict,
        on_step: Callable[[dict, float], bool] | None = None,
        t0: float | None = None,
    ) -> tuple[dict, dict[str, float] | None]:
        """:meth:`run_epoch`, with ``on_step(state, batch_loss) -> stop`` called after each
        optimizer step (True ends the epoch there, unfinished, unless it was its last step:
        the metrics are then None) and, with ``t0``, ``minutes`` since ``t0`` in the
        metrics."""
        state = jax.device_put(state, self.replicated)  # parameters, optimizer replicated
        spe = self.steps_per_epoch
        step = int(state["step"])
        epoch = step // spe
        params, opt_state = state["params"], state["opt_state"]
        acc = None
        for b, idx in enumerate(self.batches(epoch)):
            if b < step - epoch * spe:
                continue  # resumed mid-epoch: these batches are done
            graphs, labels, norms = self.device_batch(self.train, idx)
            params, opt_state, loss, errs = self.step(params, opt_state, graphs, labels, norms)
            step += 1
            errs = _with_counts(errs, norms)
            acc = errs if acc is None else _add(acc, errs)
            state = dict(state, params=params, opt_state=opt_state)
            state["step"] = jnp.asarray(step, jnp.int32)
            if on_step is not None and on_step(state, float(loss)) and step % spe:
                return state, None
        return self._end_epoch(state, epoch, acc, t0)

    def fit(self, out: str | Path | None = None, state: dict | None = None) -> dict:
        """Train until ``max_epochs``, ``max_minutes`` or early stopping; returns the final
        state (``state["best_params"]``: the parameters with the best validation loss).
        With ``out``: checkpoints of the last steps in ``out/checkpoints`` (resumed from
        when present), the best parameters in ``out/best`` (:class:`BestCheckpoint`) and
        ``out/metrics.csv``."""
        from tqdm.auto import tqdm

        from celli_scale.train.checkpoint import BestCheckpoint, Checkpoints

        cfg = self.cfg
        state = self.init_state() if state is None else state
        ckpt = best_ckpt = None
        if out is not None:
            out = Path(out)
            out.mkdir(parents=True, exist_ok=True)
            self._check_fingerprint(out)
            ckpt = Checkpoints(out / "checkpoints", keep=cfg.checkpoint_keep)
            best_ckpt = BestCheckpoint(out / "best")
            restored = ckpt.restore(state)
            if restored is not None:
                state = restored
                log.info("resumed from step %d", int(state["step"]))
        spe = self.steps_per_epoch
        every = cfg.checkpoint_every or spe
        t0 = time.monotonic()
        leader = multihost.is_leader()  # process 0 shows progress and writes metrics
        bar = tqdm(
            total=cfg.max_epochs * spe,
            initial=int(state["step"]),
            disable=not (cfg.progress and leader),
        )

        def timed_out() -> bool:
            # process 0's clock decides for every process: they must stop at one step
            return multihost.agree((time.monotonic() - t0) / 60 > cfg.max_minutes)

        def on_step(st: dict, loss: float) -> bool:
            step = int(st["step"])
            bar.update(1)
            bar.set_postfix(epoch=(step - 1) // spe, loss=f"{loss:.4g}")
            if ckpt is not None and step % every == 0 and step % spe:  # epoch ends: below
                ckpt.save(step, st)
            return timed_out()

        stop = False
        while int(state["step"]) // spe < cfg.max_epochs and not stop:
            best_before = float(state["best_loss"])
            state, row = self._epoch(state, on_step, t0)
            if row is None:
                break  # out of time mid-epoch
            step = int(state["step"])
            if out is not None:
                if float(state["best_loss"]) < best_before:
                    best_ckpt.save(step, state["params"], row["valid_loss"])
                if leader:
                    _append_csv(out / "metrics.csv", row)
            if ckpt is not None and step % every == 0:
                ckpt.save(step, state)
            p = cfg.patience
            stop = bool(p and int(state["bad_epochs"]) >= p) or timed_out()
        bar.close()
        if ckpt is not None:
            ckpt.save(int(state["step"]), state)
            ckpt.close()
            best_ckpt.close()
        if not np.isfinite(float(state["best_loss"])):
            state["best_params"] = state["params"]
        return state

    def fingerprint(self) -> dict[str, Any]:
        """What a resumed run must share with the run that wrote the checkpoints: the
        model config, the trainer settings that change the trajectory (not ``progress``,
        ``max_minutes`` or the checkpoint cadence) and a hash of the data."""
        import hashlib

        h = hashlib.sha256()
        for ds in (self.train, self.valid):
            for f in [] if ds is None else ds.frames:
                h.update(np.asarray(f.system.positions, float).tobytes())
                h.update(np.asarray(f.system.species).tobytes())
                h.update(np.asarray(0.0 if f.energy is None else f.energy, float).tobytes())
        tc = dataclasses.asdict(self.cfg)
        for k in ("progress", "max_minutes", "checkpoint_keep", "checkpoint_every"):
            tc.pop(k)
        return {"model": self.pot.config.to_dict(), "train": tc, "data_sha256": h.hexdigest()}

    def _check_fingerprint(self, out: Path) -> None:
        """Refuse to resume checkpoints in ``out`` written for another model, trainer
        setting or data set (a silent resume would return the old run); first run: write
        ``out/fingerprint.json``."""
        import json

        path = out / "fingerprint.json"
        now = json.loads(json.dumps(self.fingerprint()))
        ckpts = out / "checkpoints"
        has_steps = ckpts.is_dir() and any(d.name.isdigit() for d in ckpts.iterdir())
        if path.is_file() and has_steps:
            old = json.loads(path.read_text())
            diff = [
                f"{part}.{k}: {old.get(part, {}).get(k)!r} -> {now[part].get(k)!r}"
                for part in ("model", "train")
                for k in sorted(set(old.get(part, {})) | set(now[part]))
                if old.get(part, {}).get(k) != now[part].get(k)
            ]
            if old.get("data_sha256") != now["data_sha256"]:
                diff.append("the training/validation data")
            if diff:
                raise ValueError(
                    f"{out} holds checkpoints of another run ({'; '.join(diff)}): resuming "
                    "would continue that run. Use another output directory or remove "
                    f"{ckpts}"
                )
        if multihost.is_leader():  # one writer; atomic, as others may be reading it
            multihost.write_text_atomic(path, json.dumps(now, indent=2))

    def _end_epoch(self, state, epoch, acc, t0=None) -> tuple[dict, dict[str, float]]:
        vloss, verrs = self.validate(state["params"])
        better = vloss < float(state["best_loss"])
        state = dict(state)
        if better:
            state["best_loss"] = jnp.asarray(vloss, state["best_loss"].dtype)
            state["best_params"] = state["params"]
            state["bad_epochs"] = jnp.asarray(0, jnp.int32)
        else:
            state["bad_epochs"] = state["bad_epochs"] + 1
        row: dict[str, float] = {"epoch": epoch + 1, "step": int(state["step"])}
        row["valid_loss"] = vloss
        if t0 is not None:
            row["minutes"] = (time.monotonic() - t0) / 60
        for split, e in (("train", acc), ("valid", verrs)):
            for k in TARGETS:
                sq, ab, n = e[k]
                row[f"{split}_{k}_mae"] = ab / n if n else float("nan")
                row[f"{split}_{k}_rmse"] = math.sqrt(sq / n) if n else float("nan")
        self.history = [*getattr(self, "history", []), row]
        return state, row


def _append_csv(path: Path, row: dict) -> None:
    new = not path.exists()
    with path.open("a", newline="") as fh:
        wr = csv.DictWriter(fh, fieldnames=list(row))
        if new:
            wr.writeheader()
        wr.writerow(row)


def _with_counts(errs: dict, norms: dict) -> dict:
    """``{target: (sum_sq, sum_abs, entries)}`` on the host."""
    return {k: (float(errs[k][0]), float(errs[k][1]), norms[k]) for k in TARGETS}


def _add(a: dict, b: dict) -> dict:
    return {k: tuple(x + y for x, y in zip(a[k], b[k], strict=True)) for k in a}
