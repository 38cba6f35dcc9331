"""``RelativeEntropy``: fit a potential by minimising the relative entropy between a
reference ensemble and the model's canonical ensemble (Shell, J. Chem. Phys. 129, 144108
(2008); Carmichael & Shell, J. Phys. Chem. B 116, 8383 (2012); with DiffTRe-style reweighting
as in Thaler, Stupp & Zavadlav, J. Chem. Phys. 157, 244103 (2022)).

    S_rel(θ) = Σ_R p_ref(R) ln(p_ref(R) / p_θ(R)),   p_θ ∝ exp(-β U_θ),
    ∂S_rel/∂θ = β ( ⟨∂U_θ/∂θ⟩_ref − ⟨∂U_θ/∂θ⟩_θ ).

The reference average runs over given frames (a fine-grained trajectory mapped to the
model's sites, or a trajectory of a target model); the model average over a trajectory
sampled with parameters ``θ₀`` and reweighted to ``θ``
(:func:`~celli_scale.train.reweight.boltzmann_weights`, float64), re-sampled when its
effective sample size falls below the threshold, exactly as in
:class:`~celli_scale.train.difftre.DiffTRe`. Several state points add their gradients,
each with its own ``β`` and an optional weight. The gradient is formed in one backward
pass of the surrogate ``Σ_s c_s β_s (mean_ref U_θ − Σ_i stop_grad(w_i) U_θ(R_i))``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from celli_scale.train.reweight import (
    DEFAULT_ESS_THRESHOLD,
    EnergyFn,
    ReweightingTrainer,
    Sampler,
    StatePoint,
    Trajectory,
    boltzmann_weights,
    effective_sample_size,
    frame_energies,
    strong_arrays,
)


class RelativeEntropy(ReweightingTrainer):
    """Relative-entropy minimisation against reference frames at one or more state points.

    Args:
      energy_fn: ``energy_fn(params, positions, box=..., **energy_kwargs) -> eV``.
      state_points: the :class:`~celli_scale.train.reweight.StatePoint` s (temperature,
        box, masses, the model trajectory's starting positions).
      references: one array of reference frames ``(n_ref, N, 3)`` (Å) per state point,
        sampled from the target ensemble at that state point.
      optimizer: an optax transformation.
      sampler: one sampler for all state points or one each (see
        :class:`~celli_scale.train.reweight.ReweightingTrainer`).
      ess_threshold: re-sample a state point when its ESS fraction falls below this.
      seed: PRNG seed of the sampling.
      batch_size: frames evaluated together (None: all at once).
      weights: ``c_s`` per state point (default 1).
      name: the stage's name.

    Epoch metrics: ``grad_norm`` (of ∂S_rel/∂θ, dimensionless per parameter unit),
    ``gap/<state point>`` = (⟨U⟩_ref − ⟨U⟩_θ)/N (eV/atom), ``ess_min``, ``resampled``,
    ``samplings``.
    """

    def __init__(
        self,
        energy_fn: EnergyFn,
        state_points: Sequence[StatePoint],
        references: Sequence[Any],
        optimizer: optax.GradientTransformation,
        sampler: Sampler | Sequence[Sampler] | None = None,
        ess_threshold: float = DEFAULT_ESS_THRESHOLD,
        seed: int = 0,
        batch_size: int | None = None,
        weights: Sequence[float] | None = None,
        name: str = "relative_entropy",
    ) -> None:
        super().__init__(
            energy_fn, state_points, optimizer, sampler, ess_threshold, seed, batch_size
        )
        refs = list(references)
        if len(refs) != len(self.state_points):
            raise ValueError(
                f"give one reference trajectory per state point ({len(self.state_points)}), "
                f"got {len(refs)}"
            )
        self.references = []
        for sp, ref in zip(self.state_points, refs, strict=True):
            r = np.asarray(ref, np.float64)
            if r.ndim != 3 or r.shape[1:] != (sp.n_atoms, 3) or r.shape[0] < 1:
                raise ValueError(
                    f"reference frames of state point {sp.name!r} must have shape "
                    f"(n_frames, {sp.n_atoms}, 3), got {r.shape}"
                )
            if not np.all(np.isfinite(r)):
                raise ValueError(f"reference frames of state point {sp.name!r} are not finite")
            self.references.append(jnp.asarray(r))
        if weights is None:
            weights = [1.0] * len(self.state_points)
        weights = [float(c) for c in weights]
        if len(weights) != len(self.state_points) or not all(
            math.isfinite(c) and c >= 0 for c in weights
        ):
            raise ValueError(f"weights must be non-negative, one per state point, got {weights}")
        self.weights = weights
        self.name = name
        self._grad = jax.jit(jax.grad(self._surrogate, has_aux=True))

    def _surrogate(self, params: Any, trajectories: Sequence[Trajectory]) -> tuple[jax.Array, dict]:
        total = jnp.zeros((), jnp.float64)
        ess, gaps = [], []
        per_sp = zip(self.state_points, self.references, trajectories, self.weights, strict=True)
        for sp, ref, traj, c in per_sp:
            u_ref = frame_energies(self.energy_fn, params, ref, sp, self.batch_size)
            u_mod = frame_energies(self.energy_fn, params, traj.positions, sp, self.batch_size)
            w = jax.lax.stop_gradient(boltzmann_weights(u_mod, traj.energies, sp.kT))
            model_mean = jnp.sum(w * u_mod)
            total = total + c * sp.beta * (jnp.mean(u_ref) - model_mean)
            ess.append(effective_sample_size(w))
            gaps.append(jax.lax.stop_gradient(jnp.mean(u_ref) - model_mean) / sp.n_atoms)
        return total, {"ess": jnp.stack(ess), "gaps": jnp.stack(gaps)}

    def gradient(self, params: Any, trajectories: Sequence[Trajectory]) -> tuple[Any, dict]:
        """``(∂S_rel/∂params, aux)`` with the model trajectories ``trajectories`` (one per
        state point) reweighted to ``params``; aux: ``ess`` fractions and ``gaps``
        ((⟨U⟩_ref − ⟨U⟩_θ)/N, eV/atom) per state point."""
        return self._grad(strong_arrays(params), list(trajectories))

    def _compute(self, params, trajectories):
        grads, aux = self._grad(params, list(trajectories))
        metrics = {
            f"gap/{sp.name}": g for sp, g in zip(self.state_points, aux["gaps"], strict=True)
        }
        return grads, aux["ess"], metrics
