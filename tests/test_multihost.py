"""Multi-host set-up (celli_scale.distributed.multihost): where a process learns its place
(arguments, the launcher's variable, SLURM), bad set-ups failing fast with a message
naming the cause, and a data-parallel training run over 2 jax.distributed processes
ending where 1 process with 2 devices ends (float64), checkpoints written by orbax across
both processes."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import celli_scale as cs
from celli_scale.distributed import launch, multihost
from celli_scale.distributed.multihost import DistributedSetupError
from celli_scale.io import write
from tests.test_routine import CFG, labelled

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


# --------------------------------------------------------------------------------------
# placement
# --------------------------------------------------------------------------------------
def test_resolve_from_args_env_and_slurm():
    assert multihost.resolve(env={}) == multihost.Placement(None, 1, 0, "single")
    p = multihost.resolve("127.0.0.1:1234", 2, 1, env={})
    assert (p.coordinator, p.num_processes, p.process_id, p.source) == (
        "127.0.0.1:1234",
        2,
        1,
        "args",
    )
    env = {launch.DIST_ENV: launch.distributed_env("127.0.0.1:99", 3, 2)}
    assert multihost.resolve(env=env) == multihost.Placement("127.0.0.1:99", 3, 2, "env")
    slurm = {
        "SLURM_NTASKS": "4",
        "SLURM_PROCID": "3",
        "SLURM_STEP_NODELIST": "gpu[007-010],login1",
        "SLURM_JOB_ID": "123456",
    }
    p = multihost.resolve(env=slurm)
    assert p == multihost.Placement(f"gpu007:{30000 + 123456 % 2000}", 4, 3, "slurm")
    p = multihost.resolve(env={**slurm, multihost.PORT_ENV: "4321"})
    assert p.coordinator == "gpu007:4321"
    p = multihost.resolve(env={**slurm, multihost.COORDINATOR_ENV: "10.1.2.3:555"})
    assert p.coordinator == "10.1.2.3:555"
    # one SLURM task is a single process
    assert multihost.resolve(env={"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}).source == "single"
    assert multihost.first_slurm_host("node1") == "node1"
    assert multihost.first_slurm_host("a[3,5-6]") == "a3"


@pytest.mark.parametrize(
    "args, match",
    [
        (("127.0.0.1:1234", 2, None), "together"),
        (("127.0.0.1:1234", 2, 2), "outside 0..1"),
        (("127.0.0.1", 2, 0), "HOST:PORT"),
        (("127.0.0.1:70000", 2, 0), "HOST:PORT"),
    ],
)
def test_resolve_refuses_bad_arguments(args, match):
    with pytest.raises(DistributedSetupError, match=match):
        multihost.resolve(*args, env={})


def test_slurm_without_procid_is_named():
    with pytest.raises(DistributedSetupError, match="SLURM_PROCID"):
        multihost.resolve(env={"SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n1"})


# --------------------------------------------------------------------------------------
# bad set-ups fail fast (these raise before JAX is touched, so they run in this process)
# --------------------------------------------------------------------------------------
def test_unreachable_coordinator_fails_within_the_timeout():
    port = launch.free_loopback_port()  # nobody listens there
    t0 = time.monotonic()
    with pytest.raises(DistributedSetupError, match=f"127.0.0.1:{port} was unreachable"):
        multihost.initialize(f"127.0.0.1:{port}", 2, 1, timeout_s=1.5)
    assert time.monotonic() - t0 < 10


def test_coordinator_must_be_this_machine_and_not_all_interfaces():
    # TEST-NET-1 (RFC 5737): never an address of this machine
    with pytest.raises(DistributedSetupError, match="must be this machine's"):
        multihost.initialize("192.0.2.1:4321", 2, 0, timeout_s=1)
    with pytest.raises(DistributedSetupError, match="not all interfaces"):
        multihost.initialize("0.0.0.0:4321", 2, 0, timeout_s=1)
    with pytest.raises(DistributedSetupError, match="off loopback"):
        multihost.initialize("192.0.2.1:4321", 2, 1, require_loopback=True)


_JOIN = """
from celli_scale.distributed import multihost
multihost.initialize()
print("joined", flush=True)
"""


def _env(dist: str | None, devices: int = 1, **extra: str) -> dict[str, str]:
    env = launch.worker_env(devices, dist)
    env.update(extra)
    return env


@pytest.mark.slow
def test_mismatched_process_count_fails_with_a_message():
    """2 processes started, 3 claimed: every started process ends within the timeout with
    the message (not jax's abort), none hangs."""
    address = f"127.0.0.1:{launch.free_loopback_port()}"
    envs = [
        _env(launch.distributed_env(address, 3, i), **{multihost.TIMEOUT_ENV: "4"})
        for i in range(2)
    ]
    t0 = time.monotonic()
    r = launch.run_group([[PY, "-c", _JOIN]] * 2, env=envs, timeout_s=60)
    assert time.monotonic() - t0 < 40
    assert not r.ok and not r.timed_out
    assert multihost.EXIT_JOIN_TIMEOUT in r.returncodes
    i = r.returncodes.index(multihost.EXIT_JOIN_TIMEOUT)
    assert "not all 3 processes joined" in r.stderr_tails[i], r.stderr_tails


# --------------------------------------------------------------------------------------
# data-parallel training over 2 processes
# --------------------------------------------------------------------------------------
def train_config(data: Path, out: Path, epochs: int = 2) -> str:
    model = f"{dict(CFG)!r}".replace("(", "[").replace(")", "]")
    return (
        f"model: {model}\n"
        f"data: {{train: {data}, valid_fraction: 0.25}}\n"
        f"out: {out}\nmax_epochs: {epochs}\nbatch_size: 4\nprogress: false\nseed: 0\n"
        "optimizer: {learning_rate: 1e-2, schedule: exponential}\n"
        "checkpoint: {keep: 2, every: 1}\n"
    )


def _params(out: Path):
    return jax.tree_util.tree_leaves(cs.Potential.load(out / "model").params)


@pytest.mark.slow
def test_two_process_training_equals_one_process_two_devices(tmp_path):
    write(tmp_path / "train.xyz", labelled(9))
    cmd = [PY, "-m", "celli_scale.cli", "train"]
    runs = {}
    for name, processes in (("one", 1), ("two", 2)):
        out = tmp_path / name
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(train_config(tmp_path / "train.xyz", out))
        if processes == 1:
            envs = [_env(None, devices=2)]
        else:
            address = f"127.0.0.1:{launch.free_loopback_port()}"
            envs = [_env(launch.distributed_env(address, 2, i)) for i in range(2)]
        r = launch.run_group([[*cmd, str(cfg)]] * processes, env=envs, timeout_s=300)
        assert r.ok, r.reason()
        assert any("model written" in line for line in r.stdout_lines)
        runs[name] = out
    a, b = _params(runs["one"]), _params(runs["two"])
    assert len(a) == len(b)
    # float64; one global batch over 2 devices in either layout: the same sums
    assert (
        max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(a, b, strict=True))
        < 1e-10
    )
    # both processes took part in the orbax checkpoints; process 0 alone wrote the metrics
    steps = sorted(int(d.name) for d in (runs["two"] / "checkpoints").iterdir() if d.name.isdigit())
    assert steps and steps[-1] == 2 * 2  # 6 training structures, batches of 4: 2 steps/epoch
    rows = (runs["two"] / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 2  # header + one row per epoch, not one per process


def test_importing_the_cli_starts_no_jax_backend():
    """A process of a multi-process run joins after the ``celli-scale`` command is imported
    and before any JAX backend exists (jax.distributed refuses otherwise)."""
    import subprocess

    code = (
        "import celli_scale.cli, celli_scale.train, celli_scale.md\n"
        "from jax._src import xla_bridge\n"
        "print(xla_bridge.backends_are_initialized())"
    )
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, env=_env(None))
    assert out.stdout.strip() == "False", out.stderr[-2000:]
