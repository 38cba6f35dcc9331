"""Shared test set-up: float64, several fake CPU devices, small reference structures."""

from __future__ import annotations

import os

# Multi-device bugs should surface in ordinary tests too (jax reads this on first import).
# The suite compiles hundreds of small programs and runs each a few times, so compilation
# dominates: LLVM's backend optimisation is turned down (XLA's HLO passes still run, and
# every assertion is against a reference, not a timing). Measured: -35 % CPU time on the
# slowest model tests. Benchmarks never run with these flags.
os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0 "
    "--xla_llvm_disable_expensive_passes=true",
)
os.environ.setdefault("CELLI_BENCH_QUICK", "1")
# Tests never write the benchmarks' persistent compilation cache in the user's home.
os.environ.setdefault("CELLI_BENCH_JAX_CACHE", "")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)

import celli_scale as cs  # noqa: E402
from celli_scale.datasets import random_cluster, rocksalt  # noqa: E402, F401


@pytest.fixture
def nacl8() -> cs.System:
    return rocksalt(1, rattle=0.08, seed=1)


@pytest.fixture
def cluster() -> cs.System:
    return random_cluster()
