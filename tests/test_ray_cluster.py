"""Ray orchestration (celli_scale.distributed.ray_launcher) on a simulated 2-node cluster on
127.0.0.1 with token authentication: a data-parallel training over 2 Ray workers whose
worker 1 is killed mid-run resumes from the last orbax checkpoint and ends with the
parameters of an uninterrupted run; bad set-ups (no token, no cluster at the address,
--num-workers without --ray-address) fail at once with a message; nothing listens off
loopback."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import celli_scale as cs
from celli_scale.distributed import launch, ray_launcher
from celli_scale.distributed.ray_launcher import ClusterSetupError
from celli_scale.io import write
from tests.test_multihost import labelled, train_config

pytest.importorskip("ray", reason="the [cluster] extra (ray) is not installed")

PY = sys.executable

_DRIVER = """
import json, sys
from celli_scale.config_io import load_yaml
from celli_scale.distributed import ray_launcher
a = json.loads(sys.argv[1])
payload = {"config": load_yaml(a["config"]), "base": a["base"]}
res = ray_launcher.run_on_ray("celli_scale.train.cli:ray_train_task", payload,
    address=a["address"], num_workers=2, strategy="STRICT_SPREAD", join_timeout_s=60,
    timeout_s=400, fault=a["fault"])
print("RESULT " + json.dumps({"results": res.results, "workers": res.workers,
    "attempts": res.attempts, "failures": res.failures, "startup_s": res.startup_s}), flush=True)
"""


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes (1 CPU each) on 127.0.0.1 with token authentication, in a process of
    their own (Ray reads RAY_AUTH_MODE when it is imported: the cluster and the drivers
    run with their own environment); yields ``(address, env)``; afterwards checks that
    nothing started while it ran listened off loopback."""
    before = set(launch.all_listening_addresses())
    with ray_launcher.local_cluster(nodes=2, cpus_per_node=1) as (address, env):
        yield address, env
        new = set(launch.all_listening_addresses()) - before
    off = [a for a in new if not launch.is_loopback(a)]
    assert not off, f"listening off loopback: {off}"


def test_token_auth_is_required():
    with pytest.raises(ClusterSetupError, match="token authentication is off"):
        ray_launcher.check_token_auth({})
    with pytest.raises(ClusterSetupError, match="no token"):
        ray_launcher.check_token_auth(
            {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": "/nonexistent/token"}
        )
    assert ray_launcher.check_token_auth({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "x"})


def test_no_cluster_at_the_address_fails_fast(monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "x")
    port = launch.free_loopback_port()
    t0 = time.monotonic()
    with pytest.raises(ClusterSetupError, match=f"no Ray cluster at 127.0.0.1:{port}"):
        ray_launcher.check_reachable(f"127.0.0.1:{port}", timeout_s=2)
    assert time.monotonic() - t0 < 10


def test_cli_cluster_errors_are_one_line(tmp_path, capsys, monkeypatch):
    from celli_scale.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {name: allegro}\ndata: {train: x.xyz}\nout: o\n")
    assert main(["train", str(cfg), "--num-workers", "2"]) == 2
    assert "--num-workers needs --ray-address" in capsys.readouterr().err
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    assert main(["train", str(cfg), "--ray-address", "127.0.0.1:1"]) == 2
    assert "token authentication is off" in capsys.readouterr().err
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "x")
    port = launch.free_loopback_port()
    assert main(["train", str(cfg), "--ray-address", f"127.0.0.1:{port}"]) == 2
    assert f"no Ray cluster at 127.0.0.1:{port}" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the [cluster] extra were missing
    assert main(["train", str(cfg), "--ray-address", f"127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {ray_launcher.RAY_MISSING}\n", err


@pytest.mark.slow
def test_more_workers_than_the_cluster_holds_fails_fast(cluster, tmp_path):
    """``--num-workers 3`` on the 2-node, 2-CPU cluster: a one-line error naming the
    resources, before any worker starts (no hang waiting for a placement)."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {name: allegro}\ndata: {train: x.xyz}\nout: o\n")
    cmd = [PY, "-m", "celli_scale.cli", "train", str(cfg), "--ray-address", cluster[0]]
    t0 = time.monotonic()
    r = subprocess.run(
        [*cmd, "--num-workers", "3"], capture_output=True, text=True, env=cluster[1], timeout=120
    )
    assert r.returncode == 2, r.stderr[-3000:]
    assert "3 workers x 1 CPU do not fit the Ray cluster's 2 CPU" in r.stderr, r.stderr[-3000:]
    assert time.monotonic() - t0 < 60


def _params(out: Path):
    return jax.tree_util.tree_leaves(cs.Potential.load(out / "model").params)


def _drive(cluster, cfg: Path, base: Path, fault: dict | None) -> dict:
    address, env = cluster
    arg = json.dumps({"address": address, "config": str(cfg), "base": str(base), "fault": fault})
    r = subprocess.run(
        [PY, "-c", _DRIVER, arg], capture_output=True, text=True, env=env, timeout=600
    )
    lines = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    assert r.returncode == 0 and lines, r.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


@pytest.mark.slow
def test_killed_worker_resumes_to_the_uninterrupted_result(cluster, tmp_path):
    write(tmp_path / "train.xyz", labelled(9))
    runs = {}
    for name, fault in (
        ("plain", None),
        # worker 1 of the first group dies (SIGKILL) right after checkpoint 3 of 6 steps
        ("killed", {"worker": 1, "attempt": 0, "after_checkpoint": 3}),
    ):
        out = tmp_path / name
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(train_config(tmp_path / "train.xyz", out, epochs=3))
        runs[name] = (out, _drive(cluster, cfg, tmp_path, fault))
    plain, killed = runs["plain"][1], runs["killed"][1]
    # one node each (STRICT_SPREAD over the 2 nodes), all on loopback
    assert all(w["ip"] == "127.0.0.1" for w in plain["workers"][0])
    assert plain["attempts"] == 1 and plain["results"][0]["resumed_from"] is None
    assert killed["attempts"] == 2 and "worker 1" in killed["failures"][0]
    # the second group started from the checkpoint written just before the kill: no
    # optimizer step lost or repeated beyond the checkpoint interval (1 step here)
    assert killed["results"][0]["resumed_from"] == 3
    assert sorted(r["process"] for r in killed["results"]) == [0, 1]
    a, b = _params(runs["plain"][0]), _params(runs["killed"][0])
    # float64, the same steps from an exact checkpoint: the same parameters
    assert (
        max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(a, b, strict=True))
        < 1e-12
    )
    # ... and the same metrics, one row per epoch
    rows_a = (runs["plain"][0] / "metrics.csv").read_text().splitlines()
    rows_b = (runs["killed"][0] / "metrics.csv").read_text().splitlines()
    assert len(rows_a) == len(rows_b) == 1 + 3
    steps = sorted(
        int(d.name) for d in (runs["killed"][0] / "checkpoints").iterdir() if d.name.isdigit()
    )
    assert steps[-1] == 6


@pytest.mark.slow
def test_scaling_study_on_ray_workers_matches_local(cluster, tmp_path):
    """``celli-scale scale --ray-address``: a 2-process point as a Ray worker group gives
    the energies of the same point run by the local launcher."""
    import csv

    import yaml

    from celli_scale.study import run
    from tests.test_study import TINY, _tiny_spec

    d = yaml.safe_load(TINY.read_text())
    cfg = {**d, "models": ["allegro"], "sizes": [2], "devices": [1], "processes": [2]}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [PY, "-m", "celli_scale.cli", "scale", str(tmp_path / "s.yaml")]
    cmd += ["--out", str(tmp_path / "out"), "--ray-address", cluster[0]]
    r = subprocess.run(cmd, capture_output=True, text=True, env=cluster[1], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(tmp_path / "out" / "results.csv") as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["status"] == "ok" and int(row["processes"]) == 2 and int(row["workers"]) == 2
    (local,) = run.run_points(_tiny_spec(processes=2), timeout_s=600)
    assert float(row["energy_sum"]) == pytest.approx(local["energy_sum"], rel=1e-6)


@pytest.mark.slow
def test_sharded_run_on_ray_workers(cluster, tmp_path):
    """``celli-scale run --ray-address --num-workers 2 --devices 2 --md 2``: the structure
    cut over two Ray workers (one device each) gives the unsharded potential's energy and
    forces, and the NVE steps of the same run the trajectory of ``MD`` on it."""
    from celli_scale import io
    from tests.test_multihost_sharded import saved_model_and_structure

    ref = saved_model_and_structure(tmp_path)
    out = tmp_path / "out.xyz"
    cmd = [PY, "-m", "celli_scale.cli", "run", str(tmp_path / "nacl.xyz")]
    cmd += ["--model", str(tmp_path / "model"), "--devices", "2", "--out", str(out)]
    cmd += ["--ray-address", cluster[0], "--num-workers", "2"]
    cmd += ["--md", "2", "--trajectory", "traj.xyz"]  # relative: the driver's directory
    r = subprocess.run(
        cmd, capture_output=True, text=True, env=cluster[1], timeout=600, cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "processes: 2" in r.stdout and "ray: 2 worker(s)" in r.stdout, r.stdout
    (got,) = io.read(out)
    assert abs(got.energy - float(ref.energy)) < 1e-8
    np.testing.assert_allclose(got.forces, np.asarray(ref.forces), rtol=0, atol=1e-8)
    from celli_scale.md import MD, MDConfig

    cfg = MDConfig(ensemble="nve", dt=1.0, temperature=300.0, every=2)
    pot = cs.Potential.load(tmp_path / "model")
    want = MD(pot, io.read(tmp_path / "nacl.xyz")[0].system, cfg).run(2, progress=False)
    (last,) = io.read(tmp_path / "traj.xyz")
    np.testing.assert_allclose(last.system.positions, want.frames[-1].positions, atol=1e-7)
