"""The peers tool (``bench/peers/``) without torch: the config check, the points, the
report's ratios, the subprocess watchdog, import hygiene, and our side end to end."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import bench.peers
from bench.peers import driver, ours, report, spec
from bench.peers.side import run_side

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("model", ["allegro", "mace", "nequip"])
def test_check_ours_config_accepts_matched_and_rejects_mismatched(model):
    from celli_scale.models import make_config

    mc = make_config(ours.matched_config(model, "float64"))
    spec.check_ours_config(mc)  # our matched config is the peers' one
    with pytest.raises(RuntimeError, match=r"channels.*\(16, 32\)"):
        spec.check_ours_config(dataclasses.replace(mc, channels=16))
    with pytest.raises(RuntimeError, match="radial_mlp"):
        spec.check_ours_config(dataclasses.replace(mc, radial_mlp=(64, 64, 64)))


def test_parse_points():
    assert spec.parse_points(None) == list(spec.DEFAULT_POINTS)
    assert spec.parse_points("") == list(spec.DEFAULT_POINTS)
    assert len(spec.DEFAULT_POINTS) == 9
    assert spec.parse_points("allegro:10:float32,mace:16:float64") == [
        ("allegro", 10, "float32"),
        ("mace", 16, "float64"),
    ]
    for bad in ("allegro:10", "allegro:ten:float32", "allegro:10:float32:x"):
        with pytest.raises(ValueError, match="model:grid_n:dtype"):
            spec.parse_points(bad)


def _row(seconds, **kw):
    return {"status": "ok", "seconds": seconds, "n_edges": 56000, "foreign_cpu_cores": 0.01, **kw}


def test_markdown_report_ratios_and_notes(tmp_path):
    doc = {
        "machine": "test machine",
        "date": "2026-01-01 00:00 UTC",
        "repeats": 5,
        "warmup": 2,
        "max_foreign": 0.15,
        "retries": 3,
        "versions": {"ours": {"jax": "0.10.2"}, "peers": {"torch": "2.13.0"}},
        "checks": [],
        "points": [
            {
                "model": "nequip",
                "grid_n": 10,
                "n_atoms": 1000,
                "dtype": "float32",
                "ours": _row(0.5, n_params=42900, run_peak_rss_mb=300.0),
                "peer": _row(1.0, n_params=67200),
                "peer_aoti": _row(0.375, foreign_cpu_cores=0.4, contended=True),
            },
            {
                "model": "allegro",
                "grid_n": 16,
                "n_atoms": 4096,
                "dtype": "float32",
                "ours": _row(2.45),
                "peer": {"status": "out of memory: stopped at 20.1 GiB resident"},
                "peer_aoti": _row(18.62),
            },
            {
                "model": "mace",
                "grid_n": 10,
                "n_atoms": 1000,
                "dtype": "float64",
                "ours": _row(1.43),
                "peer": _row(1.86),
            },
        ],
    }
    path = tmp_path / "peers.md"
    report.write_markdown(doc, path)
    text = path.read_text()
    lines = text.splitlines()
    nequip = next(ln for ln in lines if ln.startswith("| nequip (nequip) | 1000 |"))
    cells = [c.strip() for c in nequip.split("|")[1:-1]]
    # ours, peer eager, eager/ours, peer AOTI, AOTI/ours, params, RSS, others' CPU
    assert cells[4:9] == ["0.500", "1.000", "2.00", "0.375", "0.75"]
    assert cells[9:11] == ["42900 / 67200", "300 / – / –"]
    assert cells[11] == "0.01 / 0.01 / 0.40†"
    allegro = next(ln for ln in lines if ln.startswith("| allegro (nequip-allegro) | 4096 |"))
    assert "| 2.450 | out of memory | – | 18.620 | 7.60 |" in allegro
    mace = next(ln for ln in lines if ln.startswith("| mace (mace-torch) | 1000 |"))
    assert "| float64 | 1.430 | 1.860 | 1.30 | – | – |" in mace
    assert "- allegro N=4096 float32 peer eager: out of memory: stopped at 20.1 GiB" in text
    assert "Versions: jax 0.10.2, torch 2.13.0." in text
    for model, peer in spec.PEER_PACKAGE.items():
        assert f"### {model} vs {peer}" in text
    assert "| n_layers 2 | num_interactions 2 | – |" in text  # a mapping row


def test_measure_keeps_the_least_disturbed_attempt(monkeypatch):
    monkeypatch.setattr(driver, "wait_quiet", lambda *a, **k: 0.0)
    rows = iter([_row(2.0, foreign_cpu_cores=1.0), _row(1.0, foreign_cpu_cores=0.05)])
    best = driver.measure(
        lambda: next(rows), retries=3, max_foreign=0.15, quiet_wait_s=0, log=lambda m: None
    )
    assert best["seconds"] == 1.0 and not best["contended"]
    assert [a["foreign"] for a in best["attempts"]] == [1.0, 0.05]


def test_side_process_stopped_for_memory_and_time():
    args = ["--side", "ours", "--grid-n", "2", "--repeats", "0"]
    row = driver.run_side_process(
        sys.executable, args, lock=None, timeout_s=600, mem_limit_bytes=1, log=lambda m: None
    )
    assert row["status"].startswith("out of memory: stopped at")
    assert row["tree_peak_rss_mb"] > 0
    row = driver.run_side_process(
        sys.executable, args, lock=None, timeout_s=0.1, mem_limit_bytes=2**40, log=lambda m: None
    )
    assert row["status"] == "skipped: timed out after 0 s"


def _modules():
    names = ["bench.peers"]
    names += [m.name for m in pkgutil.iter_modules(bench.peers.__path__, "bench.peers.")]
    return [importlib.import_module(n) for n in names]


def test_no_asv_benchmark_names():
    """asv imports every module under bench/ and takes these names as benchmarks."""
    asv = re.compile(r"^((time|timeraw|track|mem|peakmem)_|(Time|Timeraw|Track|Mem|PeakMem)[A-Z_])")
    mods = _modules()
    assert {m.__name__.rsplit(".", 1)[-1] for m in mods} >= {"driver", "side", "torch_side"}
    for mod in mods:
        for name, obj in vars(mod).items():
            if name.startswith("_"):
                continue
            assert not (callable(obj) and asv.match(name)), f"{mod.__name__}.{name}"
            if isinstance(obj, type):
                hits = [m for m in dir(obj) if asv.match(m)]
                assert not hits, f"{mod.__name__}.{name}: {hits}"


def test_imports_without_jax_or_torch():
    """The peers' interpreter has neither JAX nor celli_scale's dependencies: every module
    imports there, and the memory probes load from celli_scale/memory.py's file."""
    code = """
import importlib.abc, pkgutil, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("jax", "jaxlib", "torch", "flax", "e3nn_jax"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
import bench.peers
for m in pkgutil.iter_modules(bench.peers.__path__, "bench.peers."):
    importlib.import_module(m.name)
from bench.peers.measure import library_memory
mem = library_memory()
assert mem.__name__ == "_celli_scale_memory" and mem.busy_cpu_seconds() > 0
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_our_side_end_to_end(tmp_path):
    """N = 8, float64: energy finite, forces sum to ~0, finite differences = autograd,
    the system equal to the NumPy one the peers build, written to the npz they read."""
    npz = tmp_path / "nacl_2.npz"
    args = argparse.Namespace(
        side="ours", model="allegro", grid_n=2, dtype="float64", repeats=2, warmup=1,
        check=True, npz=str(npz), threads=2, peer_mode="eager", aot_dir=str(tmp_path),
    )  # fmt: skip
    row = run_side(args)
    assert row["status"] == "ok", row["status"]
    assert row["energy_finite"] and row["forces_finite"]
    assert row["fd_ok"] and row["fd_max_abs_err"] < 1e-6
    assert row["force_sum_rel"] < 1e-12
    assert row["positions_equal_numpy_generator"]
    assert row["n_edges"] > 0 and len(row["times"]) == 2 and row["seconds"] > 0
    assert row["config"]["channels"] == spec.CHANNELS
    pos, z, cell, source = spec.load_system(str(npz), 2)
    ref = spec.nacl_arrays(2)
    assert source == "npz" and np.array_equal(pos, ref[0]) and np.array_equal(z, ref[1])
    json.dumps(row)  # the row travels as JSON
