"""Training: force matching (energy per atom, forces, charges, stress) with optax,
data-parallel over local devices, orbax checkpoints (:mod:`.trainer`, :mod:`.checkpoint`),
top-down training by differentiable trajectory reweighting (:mod:`.difftre`) and
relative-entropy minimisation (:mod:`.relative_entropy`) on shared sampling/reweighting
machinery (:mod:`.reweight`), routines composing trainers in sequence or interleaved
(:mod:`.routine`), and the
``train`` / ``evaluate`` commands (:mod:`.cli`)."""

from celli_scale.train.difftre import DiffTRe, Target
from celli_scale.train.relative_entropy import RelativeEntropy
from celli_scale.train.reweight import LangevinConfig, LangevinSampler, StatePoint
from celli_scale.train.routine import Interleave, Routine, Stage
from celli_scale.train.trainer import ForceMatching, LossWeights, TrainConfig

__all__ = [
    "DiffTRe",
    "ForceMatching",
    "Interleave",
    "LangevinConfig",
    "LangevinSampler",
    "LossWeights",
    "RelativeEntropy",
    "Routine",
    "Stage",
    "StatePoint",
    "Target",
    "TrainConfig",
]
