"""Sampling and Boltzmann reweighting shared by the top-down trainers
(:class:`~celli_scale.train.difftre.DiffTRe`,
:class:`~celli_scale.train.relative_entropy.RelativeEntropy`).

A trajectory sampled in the canonical ensemble of the potential ``U_θ₀`` gives averages
for nearby parameters ``θ`` by reweighting its frames ``R_i``:

    w_i = exp(-β ΔU_i) / Σ_j exp(-β ΔU_j),   ΔU_i = U_θ(R_i) - U_θ₀(R_i),   β = 1/kT,
    ⟨O⟩_θ ≈ Σ_i w_i O_θ(R_i),

computed in float64 with a log-sum-exp (the energies are extensive, ``β ΔU`` reaches
hundreds quickly). The weights are differentiable in ``θ``: this is what DiffTRe
differentiates (Thaler & Zavadlav, Nat. Commun. 12, 6884 (2021)). The estimate degrades as
``θ`` leaves ``θ₀``; the effective sample size (Kish)

    ESS = 1 / Σ_i w_i²,   reported as the fraction ESS / n_frames ∈ (0, 1],

measures how many frames still carry the average. A trainer re-samples at the current
parameters once it drops below a threshold. The default threshold, 0.8, is Thaler &
Zavadlav's 0.9 on their entropy-based ``exp(-Σ w log w)`` translated to Kish's ESS for
log-normal weights (``ESS_Kish/n = exp(-s²)``, ``ESS_entropy/n = exp(-s²/2)``): 0.9 of
theirs is ≈ 0.81 of ours. Neither counts the correlation between frames: the frame stride
is what keeps them nearly independent.

Sampling. A *sampler* is any callable ``sampler(params, key, state_point) -> positions``
``(n_frames, N, 3)`` (Å) that samples the canonical ensemble of
``energy_fn(params, ·, **state_point.kwargs)`` starting from ``state_point.positions``.
:class:`LangevinSampler` is the default: jax-md's BAOAB Langevin integrator
(``jax_md.simulate.nvt_langevin``) in a periodic orthorhombic box
(``jax_md.space.periodic``), equilibration and production in one compiled program.
A custom sampler (e.g. :class:`celli_scale.md.MD` driving a
:class:`~celli_scale.potential.Potential`) plugs in the same way.

Energy functions are pure: ``energy_fn(params, positions, box=box, **energy_kwargs) -> eV``
with positions ``(N, 3)`` in Å and ``box`` the side length(s) of the periodic box (Å;
a scalar for a cube or ``(3,)``). :func:`pair_energy_fn` builds one from a pair potential
(all pairs, minimum image: for the small boxes of top-down training no neighbor list is
needed; bigger systems bring their own energy function and sampler).

Units: Å, eV, amu, K (``kT = ase.units.kB · T`` in eV); time in fs, converted to ASE's
internal time unit inside the integrator (``dt_internal = dt_fs · ase.units.fs``).
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import ase.units
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

EnergyFn = Callable[..., jax.Array]
"""``energy_fn(params, positions (N, 3) Å, box=..., **energy_kwargs) -> energy (eV)``."""

DEFAULT_ESS_THRESHOLD = 0.8


class Sampler(Protocol):
    """``sampler(params, key, state_point) -> positions (n_frames, N, 3)`` in Å."""

    def __call__(self, params: Any, key: jax.Array, state_point: StatePoint) -> jax.Array: ...


@dataclasses.dataclass(frozen=True, eq=False)
class StatePoint:
    """One thermodynamic state point of the canonical ensemble (N, V, T).

    Attributes:
      positions: ``(N, 3)`` starting configuration (Å).
      box: side length of the periodic cubic box, or the three side lengths of an
        orthorhombic one (Å).
      temperature: K.
      masses: amu, a scalar or one per atom ``(N,)``.
      energy_kwargs: further keyword arguments of the energy function (arrays), passed
        beside ``box``.
      name: a label for metrics (default ``"sp{k}"``, set by the trainers).
    """

    positions: Any
    box: Any
    temperature: float
    masses: Any = 1.0
    energy_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    name: str = ""

    def __post_init__(self) -> None:
        pos = np.asarray(self.positions, np.float64)
        if pos.ndim != 2 or pos.shape[1] != 3 or pos.shape[0] < 1:
            raise ValueError(f"state point positions must have shape (N, 3), got {pos.shape}")
        if not np.all(np.isfinite(pos)):
            raise ValueError("state point positions contain NaN or inf")
        box = np.asarray(self.box, np.float64)
        if box.shape not in ((), (3,)) or not np.all(np.isfinite(box)) or np.any(box <= 0):
            raise ValueError(
                f"state point box must be a positive side length or three, got {self.box!r}"
            )
        t = float(self.temperature)
        if not (math.isfinite(t) and t > 0):
            raise ValueError(f"state point temperature must be positive (K), got {t}")
        m = np.asarray(self.masses, np.float64)
        if m.shape not in ((), (pos.shape[0],)) or not np.all(m > 0):
            raise ValueError(
                f"state point masses must be positive (amu), a scalar or one per atom "
                f"({pos.shape[0]}), got shape {m.shape}"
            )
        if "box" in self.energy_kwargs:
            raise ValueError("state point energy_kwargs must not contain 'box' (use box=)")
        object.__setattr__(self, "positions", pos)
        object.__setattr__(self, "box", box)
        object.__setattr__(self, "temperature", t)
        object.__setattr__(self, "masses", m)
        object.__setattr__(self, "energy_kwargs", dict(self.energy_kwargs))

    @property
    def n_atoms(self) -> int:
        return int(self.positions.shape[0])

    @property
    def kT(self) -> float:
        """k_B T (eV)."""
        return float(ase.units.kB * self.temperature)

    @property
    def beta(self) -> float:
        """1 / k_B T (1/eV)."""
        return 1.0 / self.kT

    @property
    def box_lengths(self) -> np.ndarray:
        """The three side lengths (Å)."""
        return np.broadcast_to(self.box, (3,)).copy()

    @property
    def volume(self) -> float:
        """Å³."""
        return float(np.prod(self.box_lengths))

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the energy function at this state point."""
        return {"box": jnp.asarray(self.box), **self.energy_kwargs}

    def replace(self, **changes: Any) -> StatePoint:
        return dataclasses.replace(self, **changes)


def pair_energy_fn(
    pair_fn: Callable[[jax.Array, Any], jax.Array],
    r_cutoff: float,
    r_onset: float | None = None,
) -> EnergyFn:
    """``energy_fn(params, positions, box)`` = Σ_{i<j} S(r_ij) φ(r_ij; params) (eV).

    All pairs with the minimum-image convention in a periodic orthorhombic box
    (``jax_md.space.periodic``); ``S`` is jax-md's C¹ switch
    (``jax_md.energy.multiplicative_isotropic_cutoff``) from 1 at ``r_onset`` to 0 at
    ``r_cutoff`` (Å; ``r_onset`` defaults to ``0.9 r_cutoff``). The cut-off must not exceed
    half the shortest box side (checked whenever the box is concrete). Differentiable in
    params, positions and box (the box derivative gives the virial).

    Args:
      pair_fn: ``φ(r (n_pairs,) Å, params) -> (n_pairs,) eV``, e.g.
        ``lambda r, p: jax_md.energy.lennard_jones(r, p["sigma"], p["epsilon"])``.
      r_cutoff, r_onset: switching range (Å).
    """
    r_cutoff = float(r_cutoff)
    r_onset = 0.9 * r_cutoff if r_onset is None else float(r_onset)
    if not 0 < r_onset < r_cutoff:
        raise ValueError(f"need 0 < r_onset < r_cutoff, got {r_onset} and {r_cutoff}")
    from jax_md import energy as jmd_energy
    from jax_md import space

    switched = jmd_energy.multiplicative_isotropic_cutoff(pair_fn, r_onset, r_cutoff)

    def energy_fn(params: Any, positions: jax.Array, box: Any, **unused: Any) -> jax.Array:
        if not isinstance(box, jax.core.Tracer) and r_cutoff > 0.5 * float(np.min(box)):
            raise ValueError(
                f"pair cut-off {r_cutoff} Å exceeds half the box ({np.min(box) / 2} Å): "
                "the minimum-image convention would miss pairs"
            )
        n = positions.shape[0]
        i, j = np.triu_indices(n, 1)
        displacement, _ = space.periodic(box)
        dr = space.distance(jax.vmap(displacement)(positions[i], positions[j]))
        return jnp.sum(switched(dr, params))

    return energy_fn


class Trajectory(NamedTuple):
    """Frames sampled at one parameter set and their energies there.

    Attributes:
      positions: ``(n_frames, N, 3)`` (Å).
      energies: ``(n_frames,)`` ``U_θ₀(R_i)`` at the sampling parameters (eV, float64).
    """

    positions: jax.Array
    energies: jax.Array


def map_frames(fn: Callable[[jax.Array], Any], frames: jax.Array, batch_size: int | None) -> Any:
    """``fn`` over the leading axis of ``frames``: ``vmap`` (``batch_size=None``) or
    ``lax.map`` in vmapped chunks of ``batch_size`` frames (bounded memory)."""
    if batch_size is None:
        return jax.vmap(fn)(frames)
    return jax.lax.map(fn, frames, batch_size=int(batch_size))


def frame_energies(
    energy_fn: EnergyFn,
    params: Any,
    positions: jax.Array,
    state_point: StatePoint,
    batch_size: int | None = None,
) -> jax.Array:
    """``U_θ(R_i)`` of every frame ``(n_frames,)`` in eV, float64; differentiable in params."""
    kwargs = state_point.kwargs()
    return map_frames(
        lambda r: jnp.asarray(energy_fn(params, r, **kwargs), jnp.float64), positions, batch_size
    )


def boltzmann_weights(energies: jax.Array, reference_energies: jax.Array, kT: float) -> jax.Array:
    """Normalised weights ``w_i ∝ exp(-(U_θ(R_i) - U_θ₀(R_i)) / kT)`` (float64).

    Args:
      energies: ``(n_frames,)`` ``U_θ`` (eV) at the parameters reweighted to.
      reference_energies: ``(n_frames,)`` ``U_θ₀`` (eV) at the sampling parameters.
      kT: eV.

    Returns:
      ``(n_frames,)`` float64, summing to 1; differentiable in ``energies``.
    """
    du = jnp.asarray(energies, jnp.float64) - jnp.asarray(reference_energies, jnp.float64)
    log_w = -du / kT
    return jnp.exp(log_w - jax.nn.logsumexp(log_w))


def effective_sample_size(weights: jax.Array) -> jax.Array:
    """Kish's effective sample size ``1 / Σ w_i²`` as a fraction of the frames (0, 1]."""
    w = jnp.asarray(weights, jnp.float64)
    return 1.0 / (jnp.sum(w * w) * w.shape[0])


def reweighted_mean(weights: jax.Array, values: jax.Array) -> jax.Array:
    """``Σ_i w_i O_i`` over the leading (frame) axis of ``values``."""
    return jnp.tensordot(weights, values, axes=1)


@dataclasses.dataclass(frozen=True)
class LangevinConfig:
    """Settings of :class:`LangevinSampler`.

    Attributes:
      dt: time step (fs).
      friction: Langevin friction γ (1/fs).
      n_equilibration: steps discarded before the first frame.
      n_production: steps after equilibration; a frame every ``stride`` steps, so
        ``n_production // stride`` frames.
      stride: steps between frames.
    """

    dt: float = 2.0
    friction: float = 0.01
    n_equilibration: int = 1000
    n_production: int = 10000
    stride: int = 100

    def __post_init__(self) -> None:
        if not (self.dt > 0 and self.friction > 0):
            raise ValueError(f"dt and friction must be positive, got {self.dt}, {self.friction}")
        if self.n_equilibration < 0 or self.stride < 1 or self.n_production < self.stride:
            raise ValueError(
                "need n_equilibration >= 0, stride >= 1 and n_production >= stride, got "
                f"{self.n_equilibration}, {self.stride}, {self.n_production}"
            )

    @property
    def n_frames(self) -> int:
        return self.n_production // self.stride


class LangevinSampler:
    """The default sampler: NVT Langevin dynamics (BAOAB, ``jax_md.simulate.nvt_langevin``)
    of ``energy_fn`` in the periodic box of a :class:`StatePoint`
    (``jax_md.space.periodic``: positions are wrapped into the box).

    Initial momenta are Maxwell–Boltzmann at the state point's temperature (centre of mass
    at rest). Equilibration (``fori_loop``) and production (a ``lax.scan`` over frames, each
    ``stride`` steps) run as one compiled program; it is compiled once per shape (atoms,
    box rank) and reused across parameters, temperatures and boxes.

    ``sampler(params, key, state_point) -> positions (n_frames, N, 3)``;
    :meth:`run` also returns the final jax-md state so a run can continue from it.
    """

    def __init__(self, energy_fn: EnergyFn, config: LangevinConfig | None = None, **overrides):
        cfg = config or LangevinConfig()
        self.config = dataclasses.replace(cfg, **overrides) if overrides else cfg
        self.energy_fn = energy_fn
        self._run = jax.jit(self._simulate)

    @property
    def n_frames(self) -> int:
        return self.config.n_frames

    def _simulate(self, params, key, positions, box, kT, masses, energy_kwargs, initial):
        from jax_md import simulate, space

        cfg = self.config
        _, shift_fn = space.periodic(box)

        def u(r, **unused):
            return self.energy_fn(params, r, box=box, **energy_kwargs)

        dt = cfg.dt * ase.units.fs
        gamma = cfg.friction / ase.units.fs
        init_fn, step_fn = simulate.nvt_langevin(u, shift_fn, dt, kT, gamma=gamma)
        if initial is None:
            state = init_fn(key, positions, mass=masses)
        else:
            state = initial.set(rng=key, force=jax.grad(lambda r: -u(r))(initial.position))

        def steps(state, n):
            return jax.lax.fori_loop(0, n, lambda _, s: step_fn(s), state)

        if initial is None:  # a continued run is equilibrated already
            state = steps(state, cfg.n_equilibration)

        def frame(state, _):
            state = steps(state, cfg.stride)
            return state, state.position

        state, frames = jax.lax.scan(frame, state, None, length=cfg.n_frames)
        return frames, state

    def run(
        self,
        params: Any,
        key: jax.Array,
        state_point: StatePoint,
        initial: Any | None = None,
    ) -> tuple[jax.Array, Any]:
        """Sample ``state_point``; returns frames ``(n_frames, N, 3)`` (Å) and the final
        jax-md ``NVTLangevinState``.

        Args:
          params: parameters of the energy function.
          key: PRNG key (initial momenta and Langevin noise).
          state_point: temperature, box, masses and (without ``initial``) the start.
          initial: continue from a previous run's final state (positions and momenta;
            forces are recomputed with ``params``): no equilibration steps then.
        """
        sp = state_point
        return self._run(
            strong_arrays(params),
            jnp.asarray(key),
            jnp.asarray(sp.positions),
            jnp.asarray(sp.box),
            jnp.asarray(sp.kT),
            jnp.asarray(sp.masses),
            dict(sp.energy_kwargs),
            initial,
        )

    def __call__(self, params: Any, key: jax.Array, state_point: StatePoint) -> jax.Array:
        return self.run(params, key, state_point)[0]


def _fingerprint(tree: Any) -> str:
    h = hashlib.sha1(str(jax.tree_util.tree_structure(tree)).encode())
    for leaf in jax.tree_util.tree_leaves(tree):
        a = np.asarray(leaf)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def strong_arrays(tree: Any) -> Any:
    """``tree`` with every leaf an array of a definite (not weak) dtype.

    A weakly typed float64 parameter (``jnp.log(3.4)`` of a Python float) loses to a
    float32 constant inside an energy function (jax-md's ``f32(4) * epsilon``) and the
    whole energy silently becomes float32; every public entry point here passes the
    parameters through this first."""

    def strong(x):
        x = jnp.asarray(x)
        return jnp.asarray(x, dtype=x.dtype)

    return jax.tree_util.tree_map(strong, tree)


class ReweightingTrainer(abc.ABC):
    """Shared machinery of the reweighting trainers: state points with their samplers,
    reference trajectories, ESS-driven re-sampling, the optax update and the
    :class:`Stage` interface (``init_state``, ``run_epoch``, ``params_of``, ``fit``).

    Training state (a pytree of arrays, orbax-savable)::

      params, opt_state, step (int32), key (uint32 PRNG key),
      refs: one record per state point of its current reference trajectory:
        {"params": the parameters it was sampled with, "key": its PRNG key,
         "positions": the configuration it started from (Å)},
      n_samplings: (n_state_points,) int32, reference trajectories sampled so far
        (the first one included).

    The trajectories themselves are a cache on the object, keyed by a fingerprint of
    their record, and re-sampled from the record when missing (after a restore from a
    checkpoint, or in a fresh object): a resumed run reproduces the uninterrupted one bit
    for bit. A new reference trajectory starts from the last frame of the previous one.

    Subclasses implement ``_compute(params, trajectories) -> (grads, ess, metrics)``.
    """

    name: str

    def __init__(
        self,
        energy_fn: EnergyFn,
        state_points: Sequence[StatePoint],
        optimizer: optax.GradientTransformation,
        sampler: Sampler | Sequence[Sampler] | None = None,
        ess_threshold: float = DEFAULT_ESS_THRESHOLD,
        seed: int = 0,
        batch_size: int | None = None,
    ) -> None:
        sps = list(state_points)
        if not sps:
            raise ValueError("at least one state point is needed")
        for k, sp in enumerate(sps):
            if not isinstance(sp, StatePoint):
                raise ValueError(f"state point {k} is a {type(sp).__name__}, not a StatePoint")
        self.state_points = [
            sp if sp.name else sp.replace(name=f"sp{k}") for k, sp in enumerate(sps)
        ]
        names = [sp.name for sp in self.state_points]
        if len(set(names)) != len(names):
            raise ValueError(f"state point names must be unique, got {names}")
        if sampler is None:
            sampler = LangevinSampler(energy_fn)
        if callable(sampler):
            samplers = [sampler] * len(sps)
        else:
            samplers = list(sampler)
            if len(samplers) != len(sps) or not all(callable(s) for s in samplers):
                raise ValueError(
                    f"give one sampler or one per state point ({len(sps)}), got {len(samplers)}"
                )
        if not 0 < float(ess_threshold) <= 1:
            raise ValueError(f"ess_threshold must lie in (0, 1], got {ess_threshold}")
        if batch_size is not None and int(batch_size) < 1:
            raise ValueError(f"batch_size must be positive or None, got {batch_size}")
        self.energy_fn = energy_fn
        self.samplers = samplers
        self.optimizer = optimizer
        self.ess_threshold = float(ess_threshold)
        self.seed = int(seed)
        self.batch_size = batch_size
        self._cache: dict[int, tuple[str, Trajectory]] = {}
        self._energies = jax.jit(
            lambda p, r, k: frame_energies(energy_fn, p, r, self.state_points[k], batch_size),
            static_argnums=2,
        )
        self._update = jax.jit(self._apply_update)

    def fingerprint(self) -> dict[str, Any]:
        """What a resumed routine must share with the run that wrote its checkpoints: the
        stage type and name, the state points (atoms, box, temperature, a hash of the
        starting positions), the sampling threshold and seed, and (subclasses) the
        targets. :class:`~celli_scale.train.routine.Routine` refuses checkpoints of another."""
        import hashlib

        sps = []
        for sp in self.state_points:
            h = hashlib.sha256(np.ascontiguousarray(sp.positions, np.float64).tobytes())
            sps.append(
                {
                    "name": sp.name,
                    "n_atoms": sp.n_atoms,
                    "box": np.round(sp.box_lengths, 10).tolist(),
                    "temperature": round(float(sp.temperature), 10),
                    "positions_sha256": h.hexdigest()[:16],
                }
            )
        return {
            "type": type(self).__name__,
            "name": getattr(self, "name", ""),
            "state_points": sps,
            "ess_threshold": self.ess_threshold,
            "seed": self.seed,
            **self._extra_fingerprint(),
        }

    def _extra_fingerprint(self) -> dict[str, Any]:
        return {}

    # --- subclass hook -------------------------------------------------------------------
    @abc.abstractmethod
    def _compute(
        self, params: Any, trajectories: Sequence[Trajectory]
    ) -> tuple[Any, jax.Array, dict[str, jax.Array]]:
        """Gradient, ESS fractions ``(n_state_points,)`` and scalar metrics at ``params``."""

    # --- sampling --------------------------------------------------------------------------
    def sample(self, params: Any, key: jax.Array, k: int, start: Any | None = None) -> Trajectory:
        """A reference trajectory of state point ``k`` at ``params`` (PRNG ``key``), from
        ``start`` positions (Å; default the state point's own)."""
        sp = self.state_points[k]
        params = strong_arrays(params)
        if start is not None:
            sp = sp.replace(positions=np.asarray(start))
        frames = jnp.asarray(self.samplers[k](params, key, sp))
        want = (sp.n_atoms, 3)
        if frames.ndim != 3 or frames.shape[1:] != want or frames.shape[0] < 2:
            raise ValueError(
                f"sampler of state point {sp.name!r} returned shape {frames.shape}; "
                f"expected (n_frames >= 2, {want[0]}, 3)"
            )
        if not bool(jnp.all(jnp.isfinite(frames))):
            raise FloatingPointError(
                f"sampling state point {sp.name!r} produced non-finite positions "
                "(time step too large or overlapping atoms?)"
            )
        return Trajectory(frames, self._energies(params, frames, k))

    def trajectories(self, refs: Sequence[Mapping[str, Any]]) -> list[Trajectory]:
        """The reference trajectories of the records ``refs`` (cached, else sampled)."""
        out = []
        for k, ref in enumerate(refs):
            fp = _fingerprint(ref)
            hit = self._cache.get(k)
            if hit is None or hit[0] != fp:
                log.debug("sampling state point %s", self.state_points[k].name)
                traj = self.sample(ref["params"], ref["key"], k, ref["positions"])
                self._cache[k] = (fp, traj)
            out.append(self._cache[k][1])
        return out

    # --- Stage interface -------------------------------------------------------------------
    def init_state(self, params: Any) -> dict[str, Any]:
        """The training state at ``params``: see the class docstring. Checks that the
        energy is finite at every state point's starting configuration."""
        params = strong_arrays(params)
        for sp in self.state_points:
            e = float(self.energy_fn(params, jnp.asarray(sp.positions), **sp.kwargs()))
            if not math.isfinite(e):
                raise ValueError(f"energy at the start of state point {sp.name!r} is {e}")
        keys = jax.random.split(jax.random.PRNGKey(self.seed), len(self.state_points) + 1)
        refs = [
            {"params": params, "key": keys[k + 1], "positions": jnp.asarray(sp.positions)}
            for k, sp in enumerate(self.state_points)
        ]
        return {
            "params": params,
            "opt_state": self.optimizer.init(params),
            "step": jnp.asarray(0, jnp.int32),
            "key": keys[0],
            "refs": refs,
            "n_samplings": jnp.ones(len(self.state_points), jnp.int32),
        }

    def params_of(self, state: Mapping[str, Any]) -> Any:
        return state["params"]

    def _apply_update(self, grads, opt_state, params):
        updates, opt_state = self.optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, optax.tree.norm(grads)

    def run_epoch(self, state: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, float]]:
        """One optimizer update. The gradient is taken on the reference trajectories
        reweighted to the current parameters; a state point whose ESS fraction is below
        ``ess_threshold`` is first re-sampled at the current parameters (starting from the
        last frame of its previous trajectory). Deterministic given ``state``."""
        params = state["params"]
        refs = list(state["refs"])
        n_samplings = np.asarray(state["n_samplings"]).copy()
        key = state["key"]
        trajs = self.trajectories(refs)
        grads, ess, metrics = self._compute(params, trajs)
        low = [k for k, e in enumerate(np.asarray(ess)) if e < self.ess_threshold]
        if low:
            for k in low:
                key, sub = jax.random.split(key)
                refs[k] = {"params": params, "key": sub, "positions": trajs[k].positions[-1]}
                n_samplings[k] += 1
            trajs = self.trajectories(refs)
            grads, ess, metrics = self._compute(params, trajs)
        new_params, opt_state, gnorm = self._update(grads, state["opt_state"], params)
        host = {k: float(v) for k, v in metrics.items()}
        if not all(math.isfinite(v) for v in host.values()) or not math.isfinite(float(gnorm)):
            raise FloatingPointError(
                f"{self.name}: non-finite loss or gradient ({host}); a NaN frame energy comes "
                "from the energy function (for a Potential: a neighbor list overflow or a Qeq "
                "solve that missed its tolerance, see celli_scale.md.potential_energy_fn)"
            )
        new_state = {
            "params": new_params,
            "opt_state": opt_state,
            "step": jnp.asarray(state["step"], jnp.int32) + 1,
            "key": key,
            "refs": refs,
            "n_samplings": jnp.asarray(n_samplings, jnp.int32),
        }
        host.update(
            {
                "grad_norm": float(gnorm),
                "ess_min": float(np.min(np.asarray(ess))),
                "resampled": float(len(low)),
                "samplings": float(n_samplings.sum()),
            }
        )
        return new_state, host

    def fit(self, params: Any, n_epochs: int, progress: bool = True) -> dict[str, Any]:
        """``n_epochs`` calls of :meth:`run_epoch` from ``init_state(params)``, with a
        progress bar; returns the final state (``params_of(state)`` the fitted parameters)."""
        if int(n_epochs) < 0:
            raise ValueError(f"n_epochs must be non-negative, got {n_epochs}")
        state = self.init_state(params)
        bar = tqdm(range(int(n_epochs)), desc=self.name, disable=not progress)
        for _ in bar:
            state, metrics = self.run_epoch(state)
            bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if "/" not in k})
            log.info("%s step %d: %s", self.name, int(state["step"]), metrics)
        return state
