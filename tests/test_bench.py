"""Every asv benchmark runs in quick mode: setup, then each time_/peakmem_/track_ method
once, for the first parameter combination; track values must be finite and positive.

Benchmark modules are discovered (``bench/bench_*.py``), so a new benchmark file is
covered as soon as it exists. ``tests/conftest.py`` sets ``CELLI_BENCH_QUICK=1``.
Multi-device benchmarks (``bench_scaling``, ``bench_sharded``, ``bench_halo``) start worker
subprocesses with their own fake device count; their ``setup_cache`` runs every quick point
(``bench_sharded``: one worker for 1 and 2 devices, ``bench_halo``: one 8-device worker).
"""

from __future__ import annotations

import importlib
import inspect
import itertools
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PREFIXES = ("time_", "track_", "peakmem_", "mem_", "timeraw_")

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # asv imports the benchmarks as the package "bench"


def _modules() -> list[str]:
    return sorted(p.stem for p in (ROOT / "bench").glob("bench_*.py"))


def _benchmarks() -> list[tuple[str, str]]:
    found = []
    for name in _modules():
        mod = importlib.import_module(f"bench.{name}")
        for attr, obj in vars(mod).items():
            if attr.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue  # asv skips private names (base classes) too
            if inspect.isclass(obj) and any(a.startswith(PREFIXES) for a in dir(obj)):
                found.append((name, attr))
            elif inspect.isfunction(obj) and attr.startswith(PREFIXES):
                found.append((name, attr))
    return found


def _first_params(obj) -> tuple:
    params = getattr(obj, "params", None)
    if not params:
        return ()
    if all(isinstance(p, list | tuple) for p in params):
        return tuple(next(itertools.product(*params)))
    return (params[0],)


def test_discovers_every_bench_module():
    mods = _modules()
    assert {
        "bench_models",
        "bench_training",
        "bench_scaling",
        "bench_sharded",
        "bench_halo",
        "bench_million",
    } <= set(mods)
    covered = {m for m, _ in _benchmarks()}
    assert covered == set(mods), f"bench modules without benchmarks: {set(mods) - covered}"


def _check_track(name: str, value) -> None:
    assert isinstance(value, int | float), f"{name} returned {value!r}"
    assert math.isfinite(value) and value > 0, f"{name} returned {value!r}"


@pytest.mark.slow
@pytest.mark.parametrize(("module", "name"), _benchmarks())
def test_benchmark_runs(module: str, name: str):
    mod = importlib.import_module(f"bench.{module}")
    obj = getattr(mod, name)
    if inspect.isfunction(obj):
        args = _first_params(obj)
        value = obj(*args)
        if name.startswith("track_"):
            _check_track(name, value)
        return
    args = _first_params(obj)
    bench = obj()
    extra = ()
    if hasattr(bench, "setup_cache"):
        extra = (bench.setup_cache(),)
    if hasattr(bench, "setup"):
        try:
            bench.setup(*extra, *args)
        except NotImplementedError as e:  # asv's skip; say why
            pytest.skip(f"{module}.{name}{args} skipped by setup: {e}")
    methods = sorted(a for a in dir(bench) if a.startswith(PREFIXES))
    assert methods
    try:
        for meth in methods:
            value = getattr(bench, meth)(*extra, *args)
            if meth.startswith("track_"):
                _check_track(f"{module}.{name}.{meth}{args}", value)
                assert getattr(getattr(obj, meth), "unit", None), f"{meth} has no unit"
    finally:
        if hasattr(bench, "teardown"):
            bench.teardown(*extra, *args)
