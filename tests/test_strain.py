"""The shared strain derivative against analytic forces and stress."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from celli_scale.strain import energy_forces_stress


def test_harmonic_plus_pressure_term():
    # E = k/2 Σ|r|² + p V: forces -k r; stress (1/V) dE/dε = (k/V) Σ r⊗r + p I
    k, p = 1.7, 0.3
    rng = np.random.default_rng(0)
    pos = jnp.asarray(rng.normal(size=(5, 3)))
    cell = jnp.asarray(np.diag([4.0, 5.0, 6.0]) + 0.3 * rng.normal(size=(3, 3)))

    def energy(r, h):
        return 0.5 * k * jnp.sum(r**2) + p * jnp.abs(jnp.linalg.det(h))

    e, f, s = energy_forces_stress(energy, pos, cell, stress=True)
    vol = abs(np.linalg.det(np.asarray(cell)))
    want = k / vol * np.asarray(pos).T @ np.asarray(pos) + p * np.eye(3)
    np.testing.assert_allclose(float(e), float(energy(pos, cell)), rtol=1e-14)
    np.testing.assert_allclose(np.asarray(f), -k * np.asarray(pos), rtol=1e-13)
    np.testing.assert_allclose(np.asarray(s), want, rtol=1e-12, atol=1e-14)
    e2, f2, s2 = energy_forces_stress(energy, pos, cell, stress=False)
    assert s2 is None and float(e2) == float(e)
    np.testing.assert_array_equal(np.asarray(f2), np.asarray(f))
