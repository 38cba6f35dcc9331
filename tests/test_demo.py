"""The demo's checks: grid size refused before any work, warm timing, thread count."""

from __future__ import annotations

import argparse

import pytest

from celli_scale import demo
from celli_scale.cli import main


@pytest.mark.parametrize("n", [1, 3, 5, 0, -2, 2.0, True])
def test_odd_or_bad_grid_refused(n, tmp_path):
    # before: --n 3 reported a Madelung error of 0.25 (n 1: 0.62) against a reference
    # that only holds for even n
    with pytest.raises(ValueError, match="even integer >= 2"):
        demo.main(argparse.Namespace(n=n, out=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_cli_demo_odd_n_is_a_user_error(tmp_path, capsys):
    assert main(["demo", "--n", "3", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: demo --n must be an even integer >= 2, got 3")


def test_time_warm_is_interleaved_minimum(monkeypatch):
    order = []
    clock = iter(range(100))
    # each call "takes" the difference between two successive perf_counter readings
    costs = {"a": [5, 1, 3], "b": [2, 4, 1]}
    now = [0.0]

    def fake_counter():
        return now[0]

    def make(name):
        def call():
            order.append(name)
            now[0] += costs[name][sum(1 for x in order if x == name) - 1]
            next(clock)

        return call

    monkeypatch.setattr(demo.time, "perf_counter", fake_counter)
    best = demo.time_warm({"a": make("a"), "b": make("b")}, repeats=3)
    assert order == ["a", "b", "a", "b", "a", "b"]
    assert best == {"a": 1.0, "b": 1.0}


def test_cpu_threads(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")
    assert demo.cpu_threads() == 1
    monkeypatch.setenv("XLA_FLAGS", "")
    assert demo.cpu_threads() >= 1
