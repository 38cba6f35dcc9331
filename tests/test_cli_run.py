"""``celli-scale run``: sharded evaluation of a saved potential from the command line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import celli_scale as cs
from celli_scale import io, run
from celli_scale.cli import main
from celli_scale.datasets import nacl_grid
from celli_scale.testing import small_allegro_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved small Allegro potential, a periodic NaCl file, and the potential."""
    d = tmp_path_factory.mktemp("run")
    system = nacl_grid(4, 2.2, 0.1, 0)
    pot = cs.Potential.from_config(small_allegro_config(dtype="float64"), example=system)
    pot.save(d / "model")
    io.write(d / "nacl.xyz", io.Frame(system))
    return d / "nacl.xyz", d / "model", pot


def test_run_matches_potential(saved, tmp_path, capsys):
    structure, model, pot = saved
    out = tmp_path / "out.xyz"
    argv = ["run", str(structure), "--model", str(model), "--devices", "2"]
    assert main([*argv, "--out", str(out), "--stress"]) == 0
    report = capsys.readouterr().out
    assert "(2 shards)" in report
    assert "first call (incl. compilation)" in report and "GPa" in report
    # the reference evaluates the structure as read back (the file rounds positions)
    ref = pot(io.read(structure)[0].system)
    (got,) = io.read(out)
    assert abs(got.energy - float(ref.energy)) < 1e-8
    np.testing.assert_allclose(got.forces, np.asarray(ref.forces), rtol=0, atol=1e-8)
    np.testing.assert_allclose(got.stress, np.asarray(ref.stress), rtol=0, atol=1e-8)
    assert abs(_reported_energy(report) - float(ref.energy)) < 1e-8

    # a fixed 2x2 mesh with two sub-bricks per device gives the same numbers
    argv = ["run", str(structure), "--model", str(model), "--mesh", "2,2", "--chunks", "2"]
    assert main(argv) == 0
    report = capsys.readouterr().out
    assert "mesh 2x2x1 (4 shards), sub-bricks per shard" in report
    assert abs(_reported_energy(report) - float(ref.energy)) < 1e-8


def _reported_energy(report: str) -> float:
    match = re.search(r"^energy: (\S+) eV", report, re.MULTILINE)
    assert match, report
    return float(match.group(1))


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", run.REEXEC_ENV)}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def test_run_sets_device_count_itself(saved):
    """A fresh process without XLA_FLAGS: the command makes JAX show 8 CPU devices."""
    structure, model, _ = saved
    cmd = [sys.executable, "-m", "celli_scale.cli", "run", str(structure), "--model", str(model)]
    r = subprocess.run(
        [*cmd, "--devices", "8"], env=_env(), capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert "mesh 2x2x2 (8 shards)" in r.stdout


def test_run_reexecutes_when_jax_started(saved):
    """JAX started with one CPU device before the command ran: the command re-executes
    itself with the device count raised (other XLA flags kept)."""
    structure, model, _ = saved
    script = textwrap.dedent(
        f"""
        import sys, jax
        assert len(jax.devices()) == 1
        from celli_scale.cli import main
        sys.argv = ["celli-scale", "run", {str(structure)!r}, "--model", {str(model)!r},
                    "--devices", "2"]
        sys.exit(main())
        """
    )
    flags = "--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0"
    r = subprocess.run(
        [sys.executable, "-c", script],
        env=_env(XLA_FLAGS=flags),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "(2 shards)" in r.stdout


def test_device_count_flag():
    f = run.with_device_count
    assert f("", 8) == "--xla_force_host_platform_device_count=8"
    assert f("--a=1 --xla_force_host_platform_device_count=2 --b", 8) == (
        "--a=1 --b --xla_force_host_platform_device_count=8"
    )
    keep = "--xla_force_host_platform_device_count=16 --a"
    assert f(keep, 8) == keep


def test_too_few_devices_in_process(saved, capsys):
    """In-process (not the celli-scale process) JAX already runs with 4 devices: a clear
    error, never a re-execution of the caller's process."""
    structure, model, _ = saved
    assert main(["run", str(structure), "--model", str(model), "--devices", "16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 16 devices asked for, but JAX already started")
    assert "--xla_force_host_platform_device_count=16" in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--mesh", "2,x"], "--mesh must be 1 to 3 positive integers"),
        (["--mesh", "0,2"], "--mesh must be 1 to 3 positive integers"),
        (["--mesh", "1,1,1,2"], "--mesh must be 1 to 3 positive integers"),
        (["--mesh", "2,2", "--devices", "2"], "--mesh 2,2 has 4 bricks but --devices is 2"),
        (["--devices", "0"], "--devices must be a positive integer"),
        (["--chunks", "0"], "--chunks must be a positive integer"),
        (["--skin", "-1"], "--skin must be a finite number"),
        (["--frame", "3"], "out of range"),
        (["--md", "-1"], "--md must be a number of steps >= 0"),
        (["--md", "2", "--dt", "0"], "--dt must be a finite number of fs > 0"),
        (["--md", "2", "--temperature", "nan"], "--temperature must be a finite number of K"),
    ],
)
def test_run_argument_errors(saved, capsys, extra, message):
    structure, model, _ = saved
    assert main(["run", str(structure), "--model", str(model), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_run_file_errors(saved, tmp_path, capsys):
    structure, model, _ = saved
    assert main(["run", str(structure), "--model", str(tmp_path / "none")]) == 2
    assert "none: no such model directory" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "none.xyz"), "--model", str(model)]) == 2
    assert "none.xyz: no such structure file" in capsys.readouterr().err
    bad = tmp_path / "bad.xyz"
    bad.write_text("not a structure\n")
    assert main(["run", str(bad), "--model", str(model)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {bad}")
    (tmp_path / "empty").mkdir()
    assert main(["run", str(structure), "--model", str(tmp_path / "empty")]) == 2
    assert "not a saved potential" in capsys.readouterr().err
    open_ = tmp_path / "open.xyz"
    io.write(open_, io.Frame(cs.System([[0, 0, 0], [2.5, 0, 0]], [11, 17])))
    assert main(["run", str(open_), "--model", str(model), "--stress"]) == 2
    assert "--stress needs a cell periodic on every axis" in capsys.readouterr().err


def test_run_celli_prints_and_writes_charges(tmp_path, capsys):
    """CELLI through the CLI: the distributed Qeq's charges equal the single-device ones,
    are printed (total) and written as the extended-XYZ charges column."""
    from celli_scale.testing import random_params

    system = nacl_grid(2, 2.2, 0.1, 3).replace(total_charge=1.0)
    cfg = small_allegro_config(name="celli", dtype="float64", species=(11, 17), l_max=1)
    pot = cs.Potential.from_config(dict(cfg, elec_method="ewald"), seed=0, example=system)
    pot = cs.Potential(pot.model, random_params(pot.params, 1, 0.3))
    pot.save(tmp_path / "celli")
    io.write(tmp_path / "s.xyz", io.Frame(system))
    out_file = tmp_path / "out.xyz"
    args = ["run", str(tmp_path / "s.xyz"), "--model", str(tmp_path / "celli"), "--devices", "2"]
    assert main([*args, "--out", str(out_file)]) == 0
    text = capsys.readouterr().out
    assert "charges (e): total 1.0000000000" in text
    assert "distributed Qeq: ewald" in text
    frame = io.read(out_file)[0]
    ref = pot(io.read(tmp_path / "s.xyz")[0].system)  # positions as the command read them
    np.testing.assert_allclose(frame.charges, np.asarray(ref.charges), atol=1e-7)
    np.testing.assert_allclose(frame.energy, float(ref.energy), rtol=1e-10)
