"""Training: force matching (energy per atom, forces, charges, stress) with optax,
data-parallel over local devices, orbax checkpoints (:mod:`.trainer`, :mod:`.checkpoint`),
routines composing trainers in sequence or interleaved (:mod:`.routine`), and the
``train`` / ``evaluate`` commands (:mod:`.cli`)."""

from celli_scale.train.routine import Interleave, Routine, Stage
from celli_scale.train.trainer import ForceMatching, LossWeights, TrainConfig

__all__ = ["ForceMatching", "Interleave", "LossWeights", "Routine", "Stage", "TrainConfig"]
