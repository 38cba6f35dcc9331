"""Orbax checkpoints of the training state, with fallback past damaged steps.

The state is a plain pytree (``params``, ``opt_state``, ``step``, early-stopping counters,
the best parameters so far); :class:`Checkpoints` keeps the last ``keep`` steps
(``orbax.checkpoint.CheckpointManager``). Restoring tries the newest step first; a step
that cannot be read (a file truncated or removed mid-write) is skipped with a warning and
the previous one is used. :class:`BestCheckpoint` keeps, beside them, the parameters with
the lowest validation loss (a second manager, ``best_fn`` on the loss, one kept).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from celli_scale.distributed.multihost import host_arrays

log = logging.getLogger(__name__)


#: Functions called with the step after every completed :meth:`Checkpoints.save` (the
#: Ray launcher's fault injection uses it to kill a worker right after a checkpoint).
AFTER_SAVE_HOOKS: list = []


class Checkpoints:
    """``save(step, state)`` / ``restore(target) -> state | None`` under ``directory``."""

    def __init__(self, directory: str | Path, keep: int = 3) -> None:
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=int(keep), create=True),
        )

    def save(self, step: int, state: Any) -> None:
        """Save ``state`` as ``step`` (a step already saved is kept as it is)."""
        if int(step) in self.manager.all_steps():
            return
        self.manager.save(int(step), args=ocp.args.StandardSave(host_arrays(state)), force=True)
        self.manager.wait_until_finished()
        for hook in AFTER_SAVE_HOOKS:
            hook(int(step))

    def restore(self, target: Any) -> Any | None:
        """The newest readable state shaped like ``target``, or None when there is none."""
        self.manager.reload()
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, host_arrays(target))
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
            except Exception as e:  # noqa: BLE001 - any unreadable step falls back
                msg = (
                    f"checkpoint step {step} in {self.directory} is unreadable "
                    f"({e!s:.200}); trying the previous one"
                )
                warnings.warn(msg, UserWarning, stacklevel=2)
                log.warning(msg)
        return None

    def close(self) -> None:
        self.manager.close()


class BestCheckpoint:
    """The parameters with the lowest validation loss so far, under ``directory``
    (orbax ``CheckpointManager`` with ``best_fn``; only the best step is kept).
    ``save(step, params, valid_loss)``, ``restore(target) -> (step, params) | None``."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1,
                best_fn=lambda m: m["valid_loss"],
                best_mode="min",
                keep_checkpoints_without_metrics=False,
                create=True,
            ),
        )

    def save(self, step: int, params: Any, valid_loss: float) -> None:
        if int(step) in self.manager.all_steps():
            return
        self.manager.save(
            int(step),
            args=ocp.args.StandardSave(host_arrays(params)),
            metrics={"valid_loss": float(valid_loss)},
            force=True,
        )
        self.manager.wait_until_finished()

    def restore(self, target: Any) -> tuple[int, Any] | None:
        self.manager.reload()
        step = self.manager.best_step()
        if step is None:
            return None
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, host_arrays(target))
        return step, self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def close(self) -> None:
        self.manager.close()
