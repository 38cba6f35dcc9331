"""Shared test set-up: float64, several fake CPU devices, small reference structures."""

from __future__ import annotations

import os

# Multi-device bugs should surface in ordinary tests too (jax reads this on first import).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("CELLI_BENCH_QUICK", "1")
# Tests never write the benchmarks' persistent compilation cache in the user's home.
os.environ.setdefault("CELLI_BENCH_JAX_CACHE", "")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)

import celli_scale as cs  # noqa: E402


def rocksalt(n: int = 2, a: float = 5.64, rattle: float = 0.0, seed: int = 0) -> cs.System:
    """Conventional rock-salt cells (8 atoms each), ``n`` along x, neutral Na/Cl."""
    base = np.array([[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]], dtype=float)
    na = base
    cl = base + np.array([0.5, 0, 0])
    frac = np.concatenate([na, cl])
    z = np.array([11] * 4 + [17] * 4)
    frac = np.concatenate([frac + [i, 0, 0] for i in range(n)]) / [n, 1, 1]
    z = np.tile(z, n)
    cell = np.diag([a * n, a, a])
    pos = frac @ cell
    if rattle:
        pos = pos + np.random.default_rng(seed).normal(0, rattle, pos.shape)
    return cs.System(pos, z, cell=cell, pbc=True)


def random_cluster(n: int = 6, seed: int = 0, species=(1, 8), box: float = 4.0) -> cs.System:
    """A random open cluster with atoms at least 0.9 Å apart."""
    rng = np.random.default_rng(seed)
    pos: list[np.ndarray] = []
    while len(pos) < n:
        p = rng.uniform(0, box, 3)
        if all(np.linalg.norm(p - q) > 0.9 for q in pos):
            pos.append(p)
    z = np.resize(np.asarray(species), n)
    return cs.System(np.array(pos), z)


@pytest.fixture
def nacl8() -> cs.System:
    return rocksalt(1, rattle=0.08, seed=1)


@pytest.fixture
def cluster() -> cs.System:
    return random_cluster()
