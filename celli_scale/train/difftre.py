"""``DiffTRe``: fit a potential to experimental-style observables by differentiable
trajectory reweighting (Thaler & Zavadlav, "Learning neural network potentials from
experimental data via Differentiable Trajectory Reweighting", Nat. Commun. 12, 6884 (2021)).

At each state point ``s`` (temperature, box) a reference trajectory ``R_i`` is sampled with
parameters ``θ₀``; for the current parameters ``θ`` its frames are reweighted
(:func:`~celli_scale.train.reweight.boltzmann_weights`, float64) and the loss

    L(θ) = Σ_s Σ_k c_sk mean_bins( ⟨O_sk⟩_θ − O*_sk )²,   ⟨O⟩_θ = Σ_i w_i(θ) O_θ(R_i),

is differentiated by ``jax.grad`` through the weights and through observables that depend on
``θ`` themselves (the pressure through the virial, the energy). The trajectory is never
differentiated: once the effective sample size of a state point falls below the threshold
(:data:`~celli_scale.train.reweight.DEFAULT_ESS_THRESHOLD`, see there) it is re-sampled at
the current parameters.

Observables (per frame; the trainer averages them): :func:`rdf`, :func:`pressure`,
:func:`density`, :func:`potential_energy`; any ``obs(params, positions (N, 3), state_point)
-> array`` works.

Example::

    sp = StatePoint(positions, box=16.1, temperature=150.0, masses=39.95)
    trainer = DiffTRe(energy_fn, [sp],
                      [{"rdf": Target(rdf(8.0, 40), g_ref),
                        "pressure": Target(pressure(energy_fn, unit=ase.units.bar), p_ref,
                                           weight=1e-6)}],
                      optax.adam(1e-2))
    state = trainer.fit(params, n_epochs=50)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ase.units
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
    map_frames,
    reweighted_mean,
    strong_arrays,
)

Observable = Callable[[Any, jax.Array, StatePoint], jax.Array]
"""``obs(params, positions (N, 3) Å, state_point) -> array``: one frame's value."""

# 1 amu/Å³ in g/cm³, from ASE's CODATA amu (kg): 1 Å³ = 1e-24 cm³.
_AMU_PER_A3_IN_G_PER_CM3 = ase.units._amu * 1e3 / 1e-24


@dataclasses.dataclass(frozen=True, eq=False)
class Target:
    """One target observable of a state point.

    Attributes:
      observable: per-frame observable (see :data:`Observable`).
      value: the target ensemble average, shaped like the observable.
      weight: ``c`` in the loss, multiplying the mean squared error over the observable's
        elements (its unit is 1 / (observable unit)²).
    """

    observable: Observable
    value: Any
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not callable(self.observable):
            raise ValueError("a target's observable must be callable")
        v = np.asarray(self.value, np.float64)
        if v.size == 0 or not np.all(np.isfinite(v)):
            raise ValueError(f"a target value must be non-empty and finite, got {self.value!r}")
        w = float(self.weight)
        if not (math.isfinite(w) and w >= 0):
            raise ValueError(f"a target weight must be non-negative, got {self.weight}")
        object.__setattr__(self, "value", v)
        object.__setattr__(self, "weight", w)


def rdf_bin_centers(r_max: float, n_bins: int) -> np.ndarray:
    """Centres (Å) of the ``n_bins`` equal bins of :func:`rdf` on ``[0, r_max]``."""
    edges = np.linspace(0.0, float(r_max), int(n_bins) + 1)
    return 0.5 * (edges[1:] + edges[:-1])


def rdf(r_max: float, n_bins: int) -> Observable:
    """Radial distribution function ``g(r)`` of one frame on ``n_bins`` equal bins of
    ``[0, r_max]`` (Å; centres :func:`rdf_bin_centers`), all species together.

    A plain histogram of the minimum-image pair distances normalised by the ideal gas,
    ``g_b = 2 n_b / (N ρ V_b)`` with ``ρ = N / V`` and ``V_b`` the shell volume. It does not
    depend on the parameters (in DiffTRe its gradient comes from the weights alone), so
    it needs no smoothing. ``r_max`` must not exceed half the shortest box side.
    """
    r_max, n_bins = float(r_max), int(n_bins)
    if not (r_max > 0 and n_bins >= 1):
        raise ValueError(f"rdf needs r_max > 0 and n_bins >= 1, got {r_max}, {n_bins}")
    edges = np.linspace(0.0, r_max, n_bins + 1)
    shell = 4.0 / 3.0 * np.pi * (edges[1:] ** 3 - edges[:-1] ** 3)
    width = r_max / n_bins

    def observable(params: Any, positions: jax.Array, state_point: StatePoint) -> jax.Array:
        half = 0.5 * float(np.min(state_point.box_lengths))
        if r_max > half + 1e-12:
            raise ValueError(
                f"rdf r_max {r_max} Å exceeds half the box ({half} Å) of state point "
                f"{state_point.name!r}"
            )
        n = positions.shape[0]
        i, j = np.triu_indices(n, 1)
        from jax_md import space  # on use: importing jax_md starts a JAX backend

        displacement, _ = space.periodic(jnp.asarray(state_point.box))
        r = space.distance(jax.vmap(displacement)(positions[i], positions[j]))
        r = jax.lax.stop_gradient(r)
        b = jnp.floor(r / width).astype(jnp.int32)
        counts = jnp.zeros(n_bins, jnp.float64).at[b].add(1.0, mode="drop")
        rho = n / state_point.volume
        return 2.0 * counts / (n * rho * shell)

    return observable


def pressure(energy_fn: EnergyFn, unit: float = 1.0) -> Observable:
    """Instantaneous pressure ``P = (N k_B T − (1/3) ∂U/∂ε) / V`` of one frame, divided by
    ``unit`` (default eV/Å³; ``unit=ase.units.bar`` gives bar).

    The kinetic part is its canonical average ``N k_B T`` (frames carry no momenta); the
    virial ``−∂U/∂ε`` is the derivative of the energy under the uniform strain
    ``R → (1+ε) R``, ``box → (1+ε) box`` at ``ε = 0`` (``jax.grad``), valid for any
    periodic energy function that takes ``box``. Differentiable in params.
    """
    unit = float(unit)
    if not (math.isfinite(unit) and unit > 0):
        raise ValueError(f"pressure unit must be positive, got {unit}")

    def observable(params: Any, positions: jax.Array, state_point: StatePoint) -> jax.Array:
        kwargs = state_point.kwargs()
        box = kwargs.pop("box")

        def strained(eps):
            s = 1.0 + eps
            return energy_fn(params, positions * s, box=box * s, **kwargs)

        du_deps = jax.grad(strained)(jnp.asarray(0.0, positions.dtype))
        kinetic = state_point.n_atoms * state_point.kT
        return (kinetic - du_deps / 3.0) / state_point.volume / unit

    return observable


def density() -> Observable:
    """Mass density ``Σ m / V`` in g/cm³ (constant in a fixed box; for completeness and for
    samplers whose state points differ in box)."""

    def observable(params: Any, positions: jax.Array, state_point: StatePoint) -> jax.Array:
        m = np.broadcast_to(state_point.masses, (state_point.n_atoms,)).sum()
        return jnp.asarray(m / state_point.volume * _AMU_PER_A3_IN_G_PER_CM3, jnp.float64)

    return observable


def potential_energy(energy_fn: EnergyFn, per_atom: bool = True) -> Observable:
    """Potential energy of one frame (eV, per atom by default); differentiable in params."""

    def observable(params: Any, positions: jax.Array, state_point: StatePoint) -> jax.Array:
        e = energy_fn(params, positions, **state_point.kwargs())
        return e / state_point.n_atoms if per_atom else e

    return observable


class DiffTRe(ReweightingTrainer):
    """Differentiable trajectory reweighting against target observables at one or more
    state points (see the module docstring for the loss).

    Args:
      energy_fn: ``energy_fn(params, positions, box=..., **energy_kwargs) -> eV``.
      state_points: the :class:`~celli_scale.train.reweight.StatePoint` s.
      targets: one mapping ``name -> Target`` per state point (non-empty).
      optimizer: an optax transformation.
      sampler: one sampler for all state points or one each
        (``sampler(params, key, state_point) -> (n_frames, N, 3)``); default
        :class:`~celli_scale.train.reweight.LangevinSampler` with its default settings.
      ess_threshold: re-sample a state point when its ESS fraction falls below this.
      seed: PRNG seed of the sampling.
      batch_size: frames evaluated together (None: all at once, ``vmap``).
      name: the stage's name.

    A training state and its epochs are described in
    :class:`~celli_scale.train.reweight.ReweightingTrainer`; the metrics of an epoch are
    ``loss``, ``loss/<state point>``, ``<state point>/<target>`` (scalar predictions),
    ``ess_min``, ``grad_norm``, ``resampled``, ``samplings``.
    """

    def __init__(
        self,
        energy_fn: EnergyFn,
        state_points: Sequence[StatePoint],
        targets: Sequence[Mapping[str, Target]],
        optimizer: optax.GradientTransformation,
        sampler: Sampler | Sequence[Sampler] | None = None,
        ess_threshold: float = DEFAULT_ESS_THRESHOLD,
        seed: int = 0,
        batch_size: int | None = None,
        name: str = "difftre",
    ) -> None:
        super().__init__(
            energy_fn, state_points, optimizer, sampler, ess_threshold, seed, batch_size
        )
        targets = list(targets)
        if len(targets) != len(self.state_points):
            raise ValueError(
                f"give one mapping of targets per state point ({len(self.state_points)}), "
                f"got {len(targets)}"
            )
        for sp, tg in zip(self.state_points, targets, strict=True):
            if not tg:
                raise ValueError(f"state point {sp.name!r} has no targets")
            for key, t in tg.items():
                if not isinstance(t, Target):
                    raise ValueError(f"target {key!r} of {sp.name!r} is not a Target")
        self.name = name
        self.targets = [dict(t) for t in targets]
        self._value_and_grad = jax.jit(jax.value_and_grad(self._loss, has_aux=True))

    def _extra_fingerprint(self) -> dict[str, Any]:
        out = []
        for tg in self.targets:
            out.append(
                {
                    k: {
                        "value": np.round(np.asarray(t.value, np.float64), 12).ravel().tolist(),
                        "weight": float(t.weight),
                    }
                    for k, t in sorted(tg.items())
                }
            )
        return {"targets": out}

    def _loss(self, params: Any, trajectories: Sequence[Trajectory]) -> tuple[jax.Array, dict]:
        total = jnp.zeros((), jnp.float64)
        ess, losses, predictions = [], [], []
        for sp, tg, traj in zip(self.state_points, self.targets, trajectories, strict=True):
            u = frame_energies(self.energy_fn, params, traj.positions, sp, self.batch_size)
            w = boltzmann_weights(u, traj.energies, sp.kT)
            ess.append(effective_sample_size(w))
            loss_sp = jnp.zeros((), jnp.float64)
            pred = {}
            for key, t in tg.items():
                values = map_frames(
                    lambda r, obs=t.observable, sp=sp: obs(params, r, sp),
                    traj.positions,
                    self.batch_size,
                )
                avg = reweighted_mean(w, jnp.asarray(values, jnp.float64))
                pred[key] = avg
                loss_sp = loss_sp + t.weight * jnp.mean((avg - t.value) ** 2)
            losses.append(loss_sp)
            predictions.append(pred)
            total = total + loss_sp
        return total, {
            "ess": jnp.stack(ess),
            "losses": jnp.stack(losses),
            "predictions": predictions,
        }

    def loss(self, params: Any, trajectories: Sequence[Trajectory]) -> tuple[jax.Array, dict]:
        """``(loss, aux)`` on fixed reference ``trajectories`` (one per state point) reweighted
        to ``params``; aux: ``ess`` (n_state_points,) fractions, ``losses`` per state
        point, ``predictions`` (one ``{target: ⟨O⟩_θ}`` per state point)."""
        return self._value_and_grad(strong_arrays(params), list(trajectories))[0]

    def value_and_grad(
        self, params: Any, trajectories: Sequence[Trajectory]
    ) -> tuple[tuple[jax.Array, dict], Any]:
        """``((loss, aux), ∂loss/∂params)`` on fixed trajectories (see :meth:`loss`)."""
        return self._value_and_grad(strong_arrays(params), list(trajectories))

    def init_state(self, params: Any) -> dict[str, Any]:
        state = super().init_state(params)
        for sp, tg in zip(self.state_points, self.targets, strict=True):
            for key, t in tg.items():
                shape = jax.eval_shape(
                    lambda p, r, obs=t.observable, sp=sp: obs(p, r, sp),
                    state["params"],
                    jnp.asarray(sp.positions),
                ).shape
                if tuple(shape) != t.value.shape:
                    raise ValueError(
                        f"target {key!r} of state point {sp.name!r} has shape {t.value.shape}, "
                        f"its observable {tuple(shape)}"
                    )
        return state

    def _compute(self, params, trajectories):
        (loss, aux), grads = self._value_and_grad(params, list(trajectories))
        metrics = {"loss": loss}
        per_sp = zip(self.state_points, aux["losses"], aux["predictions"], strict=True)
        for sp, l_sp, pred in per_sp:
            metrics[f"loss/{sp.name}"] = l_sp
            for key, v in pred.items():
                if v.ndim == 0:
                    metrics[f"{sp.name}/{key}"] = v
        return grads, aux["ess"], metrics
