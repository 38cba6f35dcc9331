"""The scaling study (`celli-scale scale`): outputs, row counts, slopes, config errors."""

from __future__ import annotations

import argparse
import csv
import math
import re
from pathlib import Path

import pytest
import yaml

from celli_scale import scaling

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "bench" / "configs" / "scale_tiny.yaml"


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("scale")
    cfg = scaling.load_config(TINY)
    rows = scaling.run_study(cfg, out, progress=False)
    return cfg, rows, out


@pytest.mark.slow
def test_tiny_study_outputs(tiny_study):
    cfg, rows, out = tiny_study
    assert len(cfg.models) == 2 and len(cfg.sizes) == 2 and cfg.devices == (1, 2)
    with open(out / "results.csv") as f:
        reader = csv.DictReader(f)
        table = list(reader)
        columns = reader.fieldnames
    for col in (
        "model",
        "n_atoms",
        "dtype",
        "devices",
        "seconds",
        "atoms_steps_per_s",
        "peak_rss_mb",
        "status",
    ):
        assert col in columns
    assert len(table) == len(cfg.models) * len(cfg.sizes) * len(cfg.devices) == len(rows)
    keys = {(r["model"], int(r["n_atoms"]), int(r["devices"])) for r in table}
    assert keys == {(m, n**3, d) for m in cfg.models for n in cfg.sizes for d in cfg.devices}
    for r in table:
        assert r["status"] == "ok", r
        assert r["dtype"] == "float32"
        t, thr = float(r["seconds"]), float(r["atoms_steps_per_s"])
        assert t > 0 and math.isclose(thr, cfg.batch_size * int(r["n_atoms"]) / t, rel_tol=1e-9)
        assert float(r["peak_rss_mb"]) > 50  # a JAX process is never this small
    for png in ("time_vs_n.png", "speedup_vs_devices.png", "ratio_celli_mpnn.png"):
        p = out / png
        assert p.is_file() and p.stat().st_size > 1000
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_tiny_study_slopes(tiny_study):
    cfg, rows, out = tiny_study
    md = (out / "results.md").read_text()
    assert "data-parallel (batch over devices)" in md
    section = md.split("## Fitted slope")[1]
    slopes = dict(re.findall(r"^\| (\w+) \| ([-+0-9.e]+) \|$", section, flags=re.M))
    assert set(slopes) == set(cfg.models)
    for m, s in slopes.items():
        assert math.isfinite(float(s)), (m, s)
        assert math.isclose(float(s), scaling.fit_slopes(rows)[m], abs_tol=1e-3)


def test_fit_slopes_recovers_power_law():
    rows = [
        {
            "model": "a",
            "n_atoms": n,
            "devices": 1,
            "seconds": 2e-6 * n**1.5,
            "seconds_per_structure": 2e-6 * n**1.5,
            "status": "ok",
        }
        for n in (64, 216, 1000)
    ]
    assert scaling.fit_slopes(rows)["a"] == pytest.approx(1.5, abs=1e-9)
    assert math.isnan(scaling.fit_slopes(rows[:1])["a"])


def test_time_ratios():
    rows = [
        {
            "model": m,
            "n_atoms": n,
            "devices": 1,
            "seconds": t,
            "seconds_per_structure": t,
            "status": "ok",
        }
        for m, n, t in [
            ("celli", 64, 1.0),
            ("mace", 64, 4.0),
            ("celli", 1000, 3.0),
            ("mace", 1000, 6.0),
            ("nequip", 64, 2.0),
        ]
    ]
    assert scaling.time_ratios(rows, "celli", "mace") == [(64, 0.25), (1000, 0.5)]
    assert scaling.time_ratios(rows, "celli", "nequip") == [(64, 0.5)]


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"n_layers": 2}, "n_layers"),  # shared hyper-parameters belong under hyperparams
        ({"devices": [1, 0]}, "devices"),
        ({"models": ["allegro", "schnet"]}, "models"),
        ({"dtype": "float16"}, "dtype"),
        ({"batch": 3}, "batch"),  # not divisible by 2 devices
        ({"sizes": [1000, 1001], "size_unit": "atoms"}, "sizes"),
        ({"hyperparams": {"chanels": 4}}, "hyperparams"),
        ({"repeats": 0}, "repeats"),
    ],
)
def test_bad_config_names_the_key(change, key):
    d = yaml.safe_load(TINY.read_text())
    d.update(change)
    with pytest.raises(ValueError, match=key):
        scaling.StudyConfig.from_dict(d)


def test_missing_required_key_and_file_name(tmp_path):
    with pytest.raises(ValueError, match="sizes"):
        scaling.StudyConfig.from_dict({"models": ["allegro"]})
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [allegro]\nsizes: [2]\ndevise: [1]\n")
    with pytest.raises(ValueError, match=r"bad\.yaml.*devise"):
        scaling.load_config(bad)


def test_sizes_in_atoms_and_default_batch():
    cfg = scaling.StudyConfig.from_dict(
        {"models": ["allegro"], "sizes": [1000, 64], "size_unit": "atoms", "devices": [1, 2, 4]}
    )
    assert cfg.sizes == (4, 10)
    assert cfg.batch_size == 4


def test_cli_parser_shape():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    scaling.add_parser(sub)
    args = parser.parse_args(["scale", str(TINY), "--out", "x"])
    assert args.command == "scale" and args.config == str(TINY) and args.out == "x"
    assert parser.parse_args(["scale", "c.yaml"]).out == "out/scale"
