"""DiffTRe and the shared reweighting machinery: Boltzmann weights and ESS against the
analytic Gaussian case, the Langevin sampler against equipartition, the DiffTRe gradient
against finite differences, recovery of a Lennard-Jones potential from its RDF and pressure,
ESS-driven re-sampling and bit-exact resumption from a checkpoint."""

from __future__ import annotations

import ase.units
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax_md import energy, space

from celli_scale.train.checkpoint import Checkpoints
from celli_scale.train.difftre import (
    DiffTRe,
    Target,
    density,
    potential_energy,
    pressure,
    rdf,
)
from celli_scale.train.reweight import (
    LangevinSampler,
    StatePoint,
    Trajectory,
    boltzmann_weights,
    effective_sample_size,
    frame_energies,
    pair_energy_fn,
    reweighted_mean,
)

# Argon-like Lennard-Jones fluid: 64 atoms at ρσ³ = 0.6 (box 16.12 Å), 150 K (kT/ε = 1.24),
# a dense supercritical fluid. Parameters are logarithms (ε in eV, σ in Å), so one
# optimizer step size fits both.
SIGMA, EPSILON, MASS = 3.4, 0.0104, 39.95
N_SIDE = 4
BOX = (N_SIDE**3 / (0.6 / SIGMA**3)) ** (1 / 3)
R_CUT, R_ONSET = 8.0, 7.0


def scaled(f_eps: float, f_sigma: float) -> dict:
    """Log parameters, float64 (not weakly typed: jax-md's float32 constants would win)."""
    return {
        "log_epsilon": jnp.asarray(np.log(EPSILON * f_eps)),
        "log_sigma": jnp.asarray(np.log(SIGMA * f_sigma)),
    }


TRUE = scaled(1.0, 1.0)


def lj(r, p):
    return energy.lennard_jones(r, jnp.exp(p["log_sigma"]), jnp.exp(p["log_epsilon"]))


ENERGY = pair_energy_fn(lj, R_CUT, R_ONSET)


def lattice() -> np.ndarray:
    g = np.arange(N_SIDE) * BOX / N_SIDE + 0.5
    return np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)


def state_point(temperature: float = 150.0, name: str = "") -> StatePoint:
    return StatePoint(lattice(), BOX, temperature, MASS, name=name)


def rel(p: dict) -> tuple[float, float]:
    """Relative errors of ε and σ."""
    return (
        float(jnp.exp(p["log_epsilon"]) / EPSILON - 1),
        float(jnp.exp(p["log_sigma"]) / SIGMA - 1),
    )


def test_boltzmann_weights_and_ess_match_gaussian_reweighting():
    # Samples of the 1-D harmonic ensemble U0 = a0 x²/2 reweighted to U1 = a1 x²/2:
    # <x²>_1 = kT/a1, and Kish's ESS fraction is sqrt(a0 (2 a1 - a0)) / a1.
    kT, a0, a1 = 0.025, 1.0, 1.25
    x = np.random.default_rng(0).normal(0.0, np.sqrt(kT / a0), 400_000)
    u0, u1 = 0.5 * a0 * x**2, 0.5 * a1 * x**2
    w = boltzmann_weights(u1, u0, kT)
    assert w.dtype == jnp.float64
    assert float(jnp.sum(w)) == pytest.approx(1.0, abs=1e-12)
    assert float(reweighted_mean(w, x**2)) == pytest.approx(kT / a1, rel=5e-3)
    expected_ess = np.sqrt(a0 * (2 * a1 - a0)) / a1
    assert float(effective_sample_size(w)) == pytest.approx(expected_ess, abs=2e-3)
    # extensive energies: a constant shift of 10⁴ eV changes nothing (log-sum-exp)
    np.testing.assert_allclose(boltzmann_weights(u1 + 1e4, u0, kT), w, rtol=1e-9)
    assert float(effective_sample_size(jnp.full(7, 1 / 7))) == pytest.approx(1.0)


def test_langevin_sampler_samples_canonical_harmonic_wells():
    # Atoms tethered to lattice sites by springs: <U> = (3/2) N kT (equipartition), which
    # checks kT (eV from K), time units and masses of the jax-md integrator.
    k_spring, temperature = 0.5, 150.0
    sites = jnp.asarray(lattice())

    def tethers(params, positions, box):
        disp, _ = space.periodic(box)
        return 0.5 * params["k"] * jnp.sum(jax.vmap(disp)(positions, sites) ** 2)

    sp = state_point(temperature)
    sampler = LangevinSampler(
        tethers, dt=10.0, friction=0.01, n_equilibration=200, n_production=4000, stride=20
    )
    params = {"k": jnp.asarray(k_spring)}
    frames, final = sampler.run(params, jax.random.PRNGKey(0), sp)
    assert frames.shape == (200, 64, 3)
    expected = 1.5 * sp.n_atoms * ase.units.kB * temperature
    u = frame_energies(tethers, params, frames, sp)
    assert float(jnp.mean(u)) == pytest.approx(expected, rel=0.04)
    # continuing from the final state keeps sampling the same ensemble
    more, _ = sampler.run(params, jax.random.PRNGKey(1), sp, initial=final)
    assert float(jnp.mean(frame_energies(tethers, params, more, sp))) == pytest.approx(
        expected, rel=0.04
    )


def test_rdf_of_an_ideal_gas_is_one():
    # Uniform random positions: g(r) = (N - 1) / N on every bin (finite-N pair count).
    sp = state_point()
    frames = np.random.default_rng(1).uniform(0.0, BOX, (400, sp.n_atoms, 3))
    g = jax.vmap(lambda r: rdf(R_CUT, 16)(TRUE, r, sp))(jnp.asarray(frames)).mean(0)
    expected = (sp.n_atoms - 1) / sp.n_atoms
    np.testing.assert_allclose(g[4:], expected, rtol=0.05)  # bins from 2 Å: enough pairs
    assert float(jnp.mean(g[4:])) == pytest.approx(expected, rel=0.01)


def test_pressure_matches_the_pair_virial():
    # P = (N kT − (1/3) Σ_{i<j} r φ'(r)) / V with the switched pair potential φ = S·φ_LJ,
    # on rattled lattice frames; φ' by autodiff of the pair function alone.
    sp = state_point(120.0)
    rng = np.random.default_rng(2)
    frames = jnp.asarray(lattice()[None] + rng.normal(0.0, 0.3, (3, sp.n_atoms, 3)))
    phi = energy.multiplicative_isotropic_cutoff(lj, R_ONSET, R_CUT)
    dphi = jax.vmap(jax.grad(lambda r: phi(r, TRUE)))
    i, j = np.triu_indices(sp.n_atoms, 1)
    disp, _ = space.periodic(BOX)
    obs = pressure(ENERGY)
    for r in frames:
        d = space.distance(jax.vmap(disp)(r[i], r[j]))
        expected = (sp.n_atoms * sp.kT - jnp.sum(d * dphi(d)) / 3) / sp.volume
        assert float(obs(TRUE, r, sp)) == pytest.approx(float(expected), rel=1e-10)
    bar = pressure(ENERGY, unit=ase.units.bar)(TRUE, frames[0], sp)
    assert float(bar) == pytest.approx(float(obs(TRUE, frames[0], sp)) / ase.units.bar)


def _fd_targets(sps, trajs):
    obs_rdf = rdf(R_CUT, 32)
    obs_p = pressure(ENERGY, unit=ase.units.bar)
    obs_e = potential_energy(ENERGY)
    targets = []
    for sp, t in zip(sps, trajs, strict=True):
        g = jax.vmap(lambda r, sp=sp: obs_rdf(TRUE, r, sp))(t.positions).mean(0)
        targets.append(
            {
                "rdf": Target(obs_rdf, 0.9 * g + 0.05),
                "pressure": Target(obs_p, 150.0, weight=1e-5),
                "energy": Target(obs_e, -0.04, weight=100.0),
                "density": Target(density(), 1.0),
            }
        )
    return targets


def test_difftre_gradient_matches_finite_differences():
    sps = [state_point(150.0, "cold"), state_point(200.0, "warm")]
    sampler = LangevinSampler(ENERGY, dt=10.0, n_equilibration=300, n_production=600, stride=20)
    trajs = []
    for k, sp in enumerate(sps):
        frames = sampler(TRUE, jax.random.PRNGKey(k), sp)
        trajs.append(Trajectory(frames, frame_energies(ENERGY, TRUE, frames, sp)))
    trainer = DiffTRe(ENERGY, sps, _fd_targets(sps, trajs), optax.adam(1e-2), sampler=sampler)
    params = scaled(1.02, 0.995)  # reweighted away from the sampling parameters
    (loss, aux), grad = trainer.value_and_grad(params, trajs)
    ess = np.asarray(aux["ess"])
    assert np.all(ess < 0.999) and np.all(ess > 0.3), ess  # non-trivial weights
    assert float(aux["predictions"][0]["density"]) == pytest.approx(
        64 * MASS / BOX**3 * 1.66053906660, rel=1e-6
    )
    h = 1e-6  # truncation ≈ 1e-8 relative (σ¹² makes third derivatives large)
    for name in params:
        plus = {**params, name: params[name] + h}
        minus = {**params, name: params[name] - h}
        fd = (float(trainer.loss(plus, trajs)[0]) - float(trainer.loss(minus, trajs)[0])) / (2 * h)
        assert abs(fd) > 1e-3  # the check is not vacuous
        assert float(grad[name]) == pytest.approx(fd, rel=1e-7), name


def test_difftre_recovers_lennard_jones_from_rdf_and_pressure():
    # Targets: g(r) and pressure of the true potential from a 400-frame trajectory. Start
    # 10 % off in both ε and σ. Bound: both within 5 % (measured ≈ 1-2.5 % in ε, ≤ 1 % in σ
    # over seeds; the pressure of a 150-frame trajectory is known to ≈ 20 bar, which is
    # ≈ 2 % in ε).
    sp = state_point(150.0)
    obs_rdf, obs_p = rdf(R_CUT, 40), pressure(ENERGY, unit=ase.units.bar)
    reference = LangevinSampler(
        ENERGY, dt=10.0, n_equilibration=1000, n_production=8000, stride=20
    )(TRUE, jax.random.PRNGKey(42), sp)
    g_ref = jax.vmap(lambda r: obs_rdf(TRUE, r, sp))(reference).mean(0)
    p_ref = jax.vmap(lambda r: obs_p(TRUE, r, sp))(reference).mean()
    n_epochs = 50
    trainer = DiffTRe(
        ENERGY,
        [sp],
        [{"rdf": Target(obs_rdf, g_ref), "pressure": Target(obs_p, p_ref, weight=1e-6)}],
        optax.adam(optax.exponential_decay(0.02, n_epochs, 0.2), b1=0.9, b2=0.99),
        sampler=LangevinSampler(ENERGY, dt=10.0, n_equilibration=500, n_production=3000, stride=20),
    )
    state = trainer.fit(scaled(1.1, 1.1), n_epochs, progress=False)
    err_eps, err_sigma = rel(trainer.params_of(state))
    print(f"DiffTRe recovery: eps {err_eps:+.4f}, sigma {err_sigma:+.4f}")
    assert abs(err_eps) < 0.05 and abs(err_sigma) < 0.05, (err_eps, err_sigma)
    assert int(state["step"]) == n_epochs
    assert 1 < int(state["n_samplings"][0]) < n_epochs  # re-sampled, but not every step


def _constant_step(step: float) -> optax.GradientTransformation:
    """Moves log ε by ``step`` every update, whatever the gradient."""
    return optax.stateless(
        lambda g, p: {
            "log_epsilon": jnp.full_like(g["log_epsilon"], step),
            "log_sigma": jnp.zeros_like(g["log_sigma"]),
        }
    )


@pytest.fixture(scope="module")
def short_sampler():
    return LangevinSampler(ENERGY, dt=10.0, n_equilibration=300, n_production=600, stride=20)


def _small_difftre(optimizer, sampler, seed=0):
    sp = state_point(150.0)
    return DiffTRe(
        ENERGY,
        [sp],
        [{"pressure": Target(pressure(ENERGY, unit=ase.units.bar), 180.0, weight=1e-6)}],
        optimizer,
        sampler=sampler,
        seed=seed,
    )


def test_ess_triggers_resampling_only_when_parameters_move_far(short_sampler):
    # Small steps (1e-4 in log ε): the first trajectory serves all three updates.
    trainer = _small_difftre(_constant_step(1e-4), short_sampler)
    state = trainer.init_state(TRUE)
    for _ in range(3):
        state, metrics = trainer.run_epoch(state)
        assert metrics["resampled"] == 0 and metrics["ess_min"] > 0.99
    assert np.asarray(state["n_samplings"]).tolist() == [1]
    # ε × e^0.25 per update: the ESS fraction drops to ≈ 0.2 < 0.8, so every update after
    # the first re-samples, at the parameters of that update.
    trainer = _small_difftre(_constant_step(0.25), short_sampler)
    state = trainer.init_state(TRUE)
    resampled = []
    for _ in range(3):
        before = state["params"]
        state, metrics = trainer.run_epoch(state)
        resampled.append(metrics["resampled"])
        assert metrics["ess_min"] >= trainer.ess_threshold
    assert resampled == [0, 1, 1]
    assert np.asarray(state["n_samplings"]).tolist() == [3]
    assert float(state["refs"][0]["params"]["log_epsilon"]) == float(before["log_epsilon"])


def test_run_epoch_resumes_bit_for_bit_from_a_checkpoint(tmp_path, short_sampler):
    # Adam on a pressure target, re-sampling every step or two: an uninterrupted run of four
    # epochs equals one epoch, an orbax save/restore, and three epochs on a fresh trainer
    # (whose trajectory cache is empty and is re-created from the state).
    opt = optax.adam(0.1)
    start = scaled(1.05, 1.0)
    a = _small_difftre(opt, short_sampler, seed=3)
    state = a.init_state(start)
    for _ in range(4):
        state, _ = a.run_epoch(state)
    assert int(np.asarray(state["n_samplings"])[0]) > 1

    b = _small_difftre(opt, short_sampler, seed=3)
    s1, _ = b.run_epoch(b.init_state(start))
    ckpt = Checkpoints(tmp_path / "ckpt")
    ckpt.save(1, s1)
    target = _small_difftre(opt, short_sampler, seed=3).init_state(start)
    restored = ckpt.restore(target)
    ckpt.close()
    c = _small_difftre(opt, short_sampler, seed=3)
    for _ in range(3):
        restored, _ = c.run_epoch(restored)
    for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_bad_input_raises():
    with pytest.raises(ValueError, match="temperature"):
        StatePoint(lattice(), BOX, 0.0, MASS)
    with pytest.raises(ValueError, match="temperature"):
        StatePoint(lattice(), BOX, -5.0, MASS)
    with pytest.raises(ValueError, match="box"):
        StatePoint(lattice(), -1.0, 100.0, MASS)
    with pytest.raises(ValueError, match="shape"):
        StatePoint(np.zeros((5, 2)), BOX, 100.0, MASS)
    sp = state_point()
    with pytest.raises(ValueError, match="no targets"):
        DiffTRe(ENERGY, [sp], [{}], optax.adam(1e-2))
    with pytest.raises(ValueError, match="one mapping of targets per state point"):
        DiffTRe(
            ENERGY, [sp, sp.replace(name="b")], [{"p": Target(density(), 1.0)}], optax.adam(1e-2)
        )
    with pytest.raises(ValueError, match="at least one state point"):
        DiffTRe(ENERGY, [], [], optax.adam(1e-2))
    with pytest.raises(ValueError, match="ess_threshold"):
        DiffTRe(ENERGY, [sp], [{"d": Target(density(), 1.0)}], optax.adam(1e-2), ess_threshold=0)
    with pytest.raises(ValueError, match="non-empty and finite"):
        Target(density(), [])
    bad_shape = DiffTRe(ENERGY, [sp], [{"g": Target(rdf(R_CUT, 10), np.ones(11))}], optax.sgd(1))
    with pytest.raises(ValueError, match="shape"):
        bad_shape.init_state(TRUE)
    too_long = DiffTRe(ENERGY, [sp], [{"g": Target(rdf(9.0, 10), np.ones(10))}], optax.sgd(1))
    with pytest.raises(ValueError, match="half the box"):
        too_long.init_state(TRUE)
    with pytest.raises(ValueError, match="half the box"):
        pair_energy_fn(lj, 9.0)(TRUE, jnp.asarray(lattice()), box=BOX)
