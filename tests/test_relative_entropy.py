"""Relative-entropy minimisation: its gradient against the per-frame definition, and
recovery of a Lennard-Jones potential from a trajectory of itself."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax_md import energy

from celli_scale.train.relative_entropy import RelativeEntropy
from celli_scale.train.reweight import (
    LangevinSampler,
    StatePoint,
    Trajectory,
    boltzmann_weights,
    frame_energies,
    pair_energy_fn,
)

# Argon-like Lennard-Jones fluid (as in test_difftre.py): 64 atoms, ρσ³ = 0.6, 150 K.
SIGMA, EPSILON, MASS = 3.4, 0.0104, 39.95
N_SIDE = 4
BOX = (N_SIDE**3 / (0.6 / SIGMA**3)) ** (1 / 3)


def lj(r, p):
    return energy.lennard_jones(r, jnp.exp(p["log_sigma"]), jnp.exp(p["log_epsilon"]))


ENERGY = pair_energy_fn(lj, 8.0, 7.0)


def scaled(f_eps: float, f_sigma: float) -> dict:
    return {
        "log_epsilon": jnp.asarray(np.log(EPSILON * f_eps)),
        "log_sigma": jnp.asarray(np.log(SIGMA * f_sigma)),
    }


TRUE = scaled(1.0, 1.0)


def state_point(temperature: float = 150.0) -> StatePoint:
    g = np.arange(N_SIDE) * BOX / N_SIDE + 0.5
    sites = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    return StatePoint(sites, BOX, temperature, MASS)


@pytest.fixture(scope="module")
def reference():
    """200 frames of the true potential (4000 steps of 10 fs after 10 ps)."""
    sp = state_point()
    sampler = LangevinSampler(ENERGY, dt=10.0, n_equilibration=1000, n_production=4000, stride=20)
    return sampler(TRUE, jax.random.PRNGKey(42), sp)


def test_gradient_is_beta_times_difference_of_mean_derivatives(reference):
    # ∂S/∂θ = β(⟨∂U/∂θ⟩_ref − Σ w_i ∂U/∂θ(R_i)), evaluated here frame by frame.
    sp = state_point()
    theta0 = scaled(1.05, 1.02)
    frames = LangevinSampler(ENERGY, dt=10.0, n_equilibration=300, n_production=600, stride=20)(
        theta0, jax.random.PRNGKey(0), sp
    )
    traj = Trajectory(frames, frame_energies(ENERGY, theta0, frames, sp))
    trainer = RelativeEntropy(ENERGY, [sp], [reference], optax.sgd(1e-3), weights=[2.0])
    theta = scaled(1.03, 1.025)
    grad, aux = trainer.gradient(theta, [traj])

    kwargs = sp.kwargs()
    per_frame = jax.vmap(jax.grad(lambda p, r: ENERGY(p, r, **kwargs)), in_axes=(None, 0))
    w = boltzmann_weights(frame_energies(ENERGY, theta, frames, sp), traj.energies, sp.kT)
    assert 0.2 < float(aux["ess"][0]) < 0.999  # a real reweighting
    for name in theta:
        d_ref = jnp.mean(per_frame(theta, reference)[name])
        d_mod = jnp.sum(w * per_frame(theta, frames)[name])
        expected = 2.0 * sp.beta * (d_ref - d_mod)
        assert abs(float(expected)) > 1.0
        assert float(grad[name]) == pytest.approx(float(expected), rel=1e-10), name


def test_gradient_vanishes_when_model_frames_are_the_reference(reference):
    sp = state_point()
    traj = Trajectory(reference, frame_energies(ENERGY, TRUE, reference, sp))
    trainer = RelativeEntropy(ENERGY, [sp], [reference], optax.sgd(1e-3))
    grad, aux = trainer.gradient(TRUE, [traj])
    assert float(aux["ess"][0]) == pytest.approx(1.0, abs=1e-12)
    for name in TRUE:
        assert abs(float(grad[name])) < 1e-8


def test_relative_entropy_recovers_lennard_jones(reference):
    # Start 10 % off in ε and σ; bound: both within 3 % (measured ≈ 0.5 % over seeds, the
    # noise of 200 reference and 100 model frames).
    n_epochs = 30
    trainer = RelativeEntropy(
        ENERGY,
        [state_point()],
        [reference],
        optax.adam(optax.exponential_decay(0.02, n_epochs, 0.2), b1=0.5),
        sampler=LangevinSampler(ENERGY, dt=10.0, n_equilibration=500, n_production=2000, stride=20),
    )
    state = trainer.fit(scaled(1.1, 1.1), n_epochs, progress=False)
    p = trainer.params_of(state)
    err_eps = float(jnp.exp(p["log_epsilon"]) / EPSILON - 1)
    err_sigma = float(jnp.exp(p["log_sigma"]) / SIGMA - 1)
    print(f"relative entropy recovery: eps {err_eps:+.4f}, sigma {err_sigma:+.4f}")
    assert abs(err_eps) < 0.03 and abs(err_sigma) < 0.03, (err_eps, err_sigma)
    assert 1 < int(state["n_samplings"][0]) < n_epochs


def test_bad_references_raise():
    sp = state_point()
    with pytest.raises(ValueError, match="shape"):
        RelativeEntropy(ENERGY, [sp], [np.zeros((3, 10, 3))], optax.sgd(1e-3))
    with pytest.raises(ValueError, match="one reference trajectory per state point"):
        RelativeEntropy(ENERGY, [sp], [], optax.sgd(1e-3))
    with pytest.raises(ValueError, match="weights"):
        RelativeEntropy(ENERGY, [sp], [np.zeros((3, 64, 3))], optax.sgd(1e-3), weights=[-1.0])
