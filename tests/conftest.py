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


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs(request):
    """After each test file, drop JAX's caches of compiled programs. Every XLA CPU
    executable keeps ~3 memory mappings per compiled kernel, and jit caches (module-level
    jitted functions keyed on static arguments, a file's potentials) keep them alive: a
    test worker that runs half the suite reached ~24,000 mappings and one died inside
    XLA's compiler (segfault, or abort) at the kernel's limit of 65,530
    (``vm.max_map_count``), after which pytest-xdist's loadfile scheduler hung."""
    yield
    import gc

    for obj in list(vars(request.module).values()):  # a file's functools caches of potentials
        if callable(getattr(obj, "cache_clear", None)):
            obj.cache_clear()
    jax.clear_caches()
    gc.collect()


@pytest.fixture
def nacl8() -> cs.System:
    return rocksalt(1, rattle=0.08, seed=1)


@pytest.fixture
def cluster() -> cs.System:
    return random_cluster()
