"""The scaling study (`celli-scale scale`, celli_scale.study): outputs, row counts, slopes,
config errors, multi-process runs on loopback."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import pytest
import yaml

from celli_scale.distributed import launch
from celli_scale.study import config, presets, report, run

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "bench" / "configs" / "scale_tiny.yaml"


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("scale")
    cfg = config.load_config(TINY)
    rows = run.run_study(cfg, out, progress=False)
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
    assert "data-parallel (batch over devices" in md and "strong scaling" in md
    section = md.split("## Fitted slope")[1]
    slopes = dict(re.findall(r"^\| (\w+) \| ([-+0-9.e]+) \|$", section, flags=re.M))
    assert set(slopes) == set(cfg.models)
    for m, s in slopes.items():
        assert math.isfinite(float(s)), (m, s)
        assert math.isclose(float(s), report.fit_slopes(rows)[m], abs_tol=1e-3)


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
    assert report.fit_slopes(rows)["a"] == pytest.approx(1.5, abs=1e-9)
    assert math.isnan(report.fit_slopes(rows[:1])["a"])


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
    assert report.time_ratios(rows, "celli", "mace") == [(64, 0.25), (1000, 0.5)]
    assert report.time_ratios(rows, "celli", "nequip") == [(64, 0.5)]


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
        config.StudyConfig.from_dict(d)


def test_missing_required_key_and_file_name(tmp_path):
    with pytest.raises(ValueError, match="sizes"):
        config.StudyConfig.from_dict({"models": ["allegro"]})
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [allegro]\nsizes: [2]\ndevise: [1]\n")
    with pytest.raises(ValueError, match=r"bad\.yaml.*devise"):
        config.load_config(bad)


def test_sizes_in_atoms_and_default_batch():
    cfg = config.StudyConfig.from_dict(
        {"models": ["allegro"], "sizes": [1000, 64], "size_unit": "atoms", "devices": [1, 2, 4]}
    )
    assert cfg.sizes == (4, 10)
    assert cfg.batch_size == 4


def _tiny_spec(**kw) -> dict:
    d = yaml.safe_load(TINY.read_text())
    hp = {**presets.FULL_HYPERPARAMS, **d["hyperparams"]}
    spec = {
        "model": "allegro",
        "config": presets.model_config("allegro", "float32", hp, d["model_extras"]),
        "sizes": [2],
        "dtype": "float32",
        "devices": 1,
        "processes": 1,
        "batch": 2,
        "repeats": 1,
        "spacing": 2.2,
        "rattle": 0.05,
        "seed": 0,
        "memory_fraction": 0.85,
    }
    spec.update(kw)
    return spec


@pytest.mark.slow
def test_two_processes_match_one_and_stay_on_loopback():
    (one,) = run.run_points(_tiny_spec(), timeout_s=600)
    (two,) = run.run_points(_tiny_spec(processes=2), timeout_s=600)
    assert one["status"] == "ok" and two["status"] == "ok", (one, two)
    assert two["processes"] == 2 and two["workers"] == 2 and one["workers"] == 1
    # the same batch, sharded over two jax.distributed processes: the same energies
    assert two["energy_sum"] == pytest.approx(one["energy_sum"], rel=1e-5)
    # the coordinator (and any collective) listens, and only on loopback
    assert two["listening"], "no listening socket reported"
    for addr in two["listening"]:
        assert launch.is_loopback(addr), two["listening"]


@pytest.mark.slow
def test_failing_processes_report_the_reason_and_do_not_hang():
    bad = _tiny_spec(processes=2)
    bad["config"] = {**bad["config"], "channels": 0}
    (row,) = run.run_points(bad, timeout_s=300)
    assert "channels" in row["status"], row


def test_weak_and_strong_batches_and_layout_validation():
    base = {"models": ["allegro"], "sizes": [2], "devices": [1, 2], "processes": [1, 2]}
    strong = config.StudyConfig.from_dict(base)
    assert strong.worker_counts == (1, 2, 4)
    assert strong.batch_size == 4 and strong.batch_for(2) == 4
    weak = config.StudyConfig.from_dict({**base, "mode": "weak", "batch": 3})
    assert [weak.batch_for(w) for w in (1, 2, 4)] == [3, 6, 12]
    with pytest.raises(ValueError, match="mode"):
        config.StudyConfig.from_dict({**base, "mode": "weakest"})
    with pytest.raises(ValueError, match="processes"):
        config.StudyConfig.from_dict({**base, "processes": [0]})
    with pytest.raises(ValueError, match="batch"):
        config.StudyConfig.from_dict({**base, "batch": 2})  # 4 workers


def test_speedups_from_throughput_strong_and_weak():
    def row(p, d, thr, n=64):
        return {
            "model": "a",
            "n_atoms": n,
            "processes": p,
            "devices": d,
            "workers": p * d,
            "seconds": 1.0,
            "atoms_steps_per_s": thr,
            "status": "ok",
        }

    rows = [row(1, 1, 100.0), row(1, 2, 180.0), row(1, 4, 300.0), row(2, 1, 150.0)]
    rows.append(row(1, 1, 1.0, n=8))  # a smaller size is ignored
    sp = report.speedups(rows)
    assert sp[("a", 64, "devices")] == [(1, 1.0), (2, 1.8), (4, 3.0)]
    assert sp[("a", 64, "processes")] == [(1, 1.0), (2, 1.5)]


@pytest.mark.parametrize(
    "change, match",
    [
        ({"hyperparams": {"r_cut": -1.0}}, "r_cut"),  # before: every point failed into the CSV
        ({"hyperparams": {"r_cut": 1e9}}, "GiB"),  # before: the run started and ran out
        ({"sizes": [10000]}, "10000"),  # 1e12 atoms
        ({"size_unit": "atoms", "sizes": [10**12]}, "GiB"),
    ],
)
def test_study_refuses_impossible_points_before_running(change, match):
    d = {"models": ["allegro"], "sizes": [2], **change}
    with pytest.raises(ValueError, match=match):
        config.StudyConfig.from_dict(d)


def test_point_memory_floor_counts_edges():
    from celli_scale.models import make_config

    mc = make_config(presets.model_config("allegro", "float32"))
    # 4/3 π (5/2.2)³ ≈ 49.2 neighbours per atom, 32 × 9 float32 per edge, 1000 atoms
    want = 1000 * 4 / 3 * math.pi * (5.0 / 2.2) ** 3 * 32 * 9 * 4
    assert config.point_memory_floor(10, 2.2, mc) == pytest.approx(want, rel=1e-12)


def test_cli_exits_nonzero_when_points_fail(monkeypatch, tmp_path, capsys):
    import celli_scale.study as study
    from celli_scale.cli import main

    cfg = tmp_path / "s.yaml"
    cfg.write_text("models: [allegro]\nsizes: [2]\n")
    bad = {"model": "allegro", "n_atoms": 8, "devices": 1, "processes": 1}
    bad["status"] = "error: RuntimeError: boom"
    monkeypatch.setattr(study, "run_study", lambda cfg, out: [bad])
    assert main(["scale", str(cfg), "--out", str(tmp_path / "o")]) == 1
    assert "boom" in capsys.readouterr().err


def test_study_yaml_refuses_aliases_and_reads_exponent_numbers(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text('a: &a ["x", "x"]\nb: &b [*a, *a]\nmodels: [allegro]\nsizes: [2]\n')
    with pytest.raises(ValueError, match="bomb.yaml.*anchor"):
        config.load_config(bomb)
    ok = tmp_path / "ok.yaml"
    ok.write_text("models: [allegro]\nsizes: [2]\ntimeout_s: 1e3\n")  # PyYAML: a string
    assert config.load_config(ok).timeout_s == 1000.0
