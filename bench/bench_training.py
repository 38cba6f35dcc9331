"""Training-step throughput: value_and_grad of an energy + force loss and an Adam update.

The loss is the plain force-matching objective
``L = mean_b[(E_b − E_b^ref)² / N²] + w_F · mean_{b,i}|F_bi − F_bi^ref|²`` over a batch of
rattled NaCl grids; labels are those of a harmonic crystal (every atom tied to its grid
site by a spring of :data:`TRAIN_SPRING` eV/Å², see :func:`harmonic_labels`), so the
gradients are those of a real fit. Forces are ``−∂E/∂r`` from
:func:`celli_scale.potential.energy_and_derivatives` (the package's one derivative path),
so a step differentiates twice (forces, then parameters). Optimiser: ``optax.adam``,
learning rate :data:`bench._common.TRAIN_LR`. Deliberately minimal; it times the step,
it is not a training module.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bench._common import (
    MODELS,
    TIMEOUT_S,
    TRAIN_BATCH,
    TRAIN_DTYPES,
    TRAIN_FORCE_WEIGHT,
    TRAIN_GRID_N,
    TRAIN_LR,
    TRAIN_SPRING,
    atoms_steps_per_s,
    build_potential,
    check_fits,
    config_for,
    nacl_grid,
)
from celli_scale.potential import energy_and_derivatives


def make_train_step(model, optimizer, force_weight: float):
    """``step(params, opt_state, graphs, e_ref, f_ref) -> (params, opt_state, loss)``."""

    def energy_forces(params, graph):
        energy, forces, _, _ = energy_and_derivatives(model, params, graph)
        return energy, forces

    def loss_fn(params, graphs, e_ref, f_ref):
        # lax.map over structures (faster than vmap on CPU, see celli_scale.potential)
        e, f = jax.lax.map(lambda graph: energy_forces(params, graph), graphs)
        mask = graphs.node_mask[..., None]
        n = jnp.sum(graphs.node_mask, axis=1)
        le = jnp.mean(((e - e_ref) / n) ** 2)
        lf = jnp.sum(jnp.where(mask, (f - f_ref) ** 2, 0.0)) / (3 * jnp.sum(n))
        return le + force_weight * lf

    @jax.jit
    def step(params, opt_state, graphs, e_ref, f_ref):
        loss, grads = jax.value_and_grad(loss_fn)(params, graphs, e_ref, f_ref)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


class TrainStep:
    """One optimisation step on a batch of ``TRAIN_BATCH`` NaCl grids of n³ atoms."""

    params = (list(MODELS), list(TRAIN_GRID_N), list(TRAIN_DTYPES))
    param_names = ("model", "grid_n", "dtype")
    timeout = TIMEOUT_S
    number = 1
    repeat = (1, 5, 60.0)
    warmup_time = 0.0

    def setup(self, model: str, grid_n: int, dtype: str) -> None:
        cfg = config_for(model, dtype)
        pot = build_potential(cfg, seed=0)
        systems = [nacl_grid(grid_n, rattle=0.1, seed=k) for k in range(TRAIN_BATCH)]
        self.graphs = pot.batch_graph(systems)
        e_ref, f_ref = harmonic_labels(systems, nacl_grid(grid_n).positions)
        self.e_ref = jnp.asarray(e_ref, dtype=cfg_dtype(dtype))
        self.f_ref = jnp.asarray(f_ref, dtype=cfg_dtype(dtype))
        self.optimizer = optax.adam(TRAIN_LR)
        self.params0 = pot.params
        self.opt_state0 = self.optimizer.init(pot.params)
        step = make_train_step(pot.model, self.optimizer, TRAIN_FORCE_WEIGHT)
        args = (self.params0, self.opt_state0, self.graphs, self.e_ref, self.f_ref)
        self.step = step.lower(*args).compile()
        check_fits(self.step)
        self.n_atoms = TRAIN_BATCH * systems[0].n_atoms
        self.state = (self.params0, self.opt_state0)
        self.loss0 = float(self._run()[2])  # warm-up
        if not np.isfinite(self.loss0):
            raise RuntimeError(f"{model} training loss is not finite")

    def _run(self):
        params, opt_state = self.state
        out = jax.block_until_ready(
            self.step(params, opt_state, self.graphs, self.e_ref, self.f_ref)
        )
        self.state = out[:2]
        return out

    def time_train_step(self, model: str, grid_n: int, dtype: str) -> None:
        self._run()

    def peakmem_train_step(self, model: str, grid_n: int, dtype: str) -> None:
        self._run()

    def track_atoms_steps_per_s(self, model: str, grid_n: int, dtype: str) -> float:
        """Training throughput: atoms in the batch · steps per second (median of 3)."""
        return atoms_steps_per_s(self._run, self.n_atoms)

    track_atoms_steps_per_s.unit = "atoms*steps/s"  # type: ignore[attr-defined]

    def track_loss_decrease(self, model: str, grid_n: int, dtype: str) -> float:
        """Relative loss decrease over 3 more steps from the initial parameters (> 0 when
        the step descends; a sanity check that the gradient is wired up)."""
        self.state = (self.params0, self.opt_state0)
        first = float(self._run()[2])
        for _ in range(2):
            last = float(self._run()[2])
        return (first - last) / first

    track_loss_decrease.unit = "fraction"  # type: ignore[attr-defined]


def harmonic_labels(systems, sites, k: float = TRAIN_SPRING):
    """Labels of a harmonic crystal: each atom tied to its grid site by a spring ``k``
    (eV/Å²): ``E = ½ k Σ|r − r_site|²``, ``F = −k (r − r_site)``. Cheap, analytic and
    learnable, so a step's gradient is that of a real fit without a second model."""
    d = np.stack([np.asarray(s.positions) - np.asarray(sites) for s in systems])
    return 0.5 * k * np.sum(d**2, axis=(1, 2)), -k * d


def cfg_dtype(dtype: str):
    return jnp.float64 if dtype == "float64" else jnp.float32
