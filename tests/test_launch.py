"""The worker-process harness (celli_scale.distributed.launch): loopback checks, the
listening-socket probe, and run_group's kill-on-failure, timeout, memory and lock-wait
behaviour."""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from celli_scale.distributed import launch

PY = sys.executable


def test_listening_addresses_sees_a_loopback_listener():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        found = launch.listening_addresses()
    assert f"127.0.0.1:{port}" in found
    assert launch.is_loopback("127.0.0.1:1") and launch.is_loopback("::1:1")
    assert launch.is_loopback("::ffff:127.0.0.1:1") and launch.is_loopback("localhost:1")
    assert not launch.is_loopback("0.0.0.0:1") and not launch.is_loopback("10.0.0.2:1")
    assert not launch.is_loopback("example.org:1")


def test_init_from_env_refuses_off_loopback_and_malformed(monkeypatch):
    monkeypatch.delenv(launch.DIST_ENV, raising=False)
    assert launch.init_from_env() is False
    monkeypatch.setenv(launch.DIST_ENV, launch.distributed_env("10.0.0.2:1234", 2, 0))
    with pytest.raises(ValueError, match="off loopback"):
        launch.init_from_env()
    monkeypatch.setenv(launch.DIST_ENV, "127.0.0.1:1234,2")
    with pytest.raises(ValueError, match="NUM_PROCESSES"):
        launch.init_from_env()


def test_host_device_env_replaces_the_flag():
    env = launch.host_device_env(
        3, {"XLA_FLAGS": f"--foo {launch.HOST_DEVICE_FLAG}=8", launch.DIST_ENV: "x"}
    )
    assert env["XLA_FLAGS"].split() == ["--foo", f"{launch.HOST_DEVICE_FLAG}=3"]
    assert launch.DIST_ENV not in env


def test_run_group_streams_lines_and_feeds_stdin():
    seen = []
    # process 0 stays up for a while: memory is sampled every poll_s, and a process that
    # ends before the first sample has no peak to report
    code = (
        "import sys, time; d = sys.stdin.read(); print('a', d); print('b', flush=True); "
        "time.sleep(1.0)"
    )
    r = launch.run_group(
        [[PY, "-c", code], [PY, "-c", "import sys; print('to log'); sys.exit(0)"]],
        stdin=["x", None],
        timeout_s=60,
        on_line=seen.append,
        poll_s=0.1,
    )
    assert r.ok and r.returncodes == [0, 0] and not r.failed
    assert r.stdout_lines == ["a x", "b"] == seen
    assert r.stderr_tails[1] == "to log"  # other processes' stdout goes to their log
    assert r.peak_tree_rss_bytes > 1_000_000  # a Python interpreter


def test_run_group_kills_the_others_when_one_fails():
    t0 = time.monotonic()
    r = launch.run_group(
        [
            [PY, "-c", "import time; time.sleep(60)"],
            [PY, "-c", "import sys; sys.stderr.write('boom\\n'); sys.exit(3)"],
        ],
        timeout_s=60,
    )
    assert time.monotonic() - t0 < 20
    assert not r.ok and r.failed == [1] and r.returncodes[1] == 3 and r.returncodes[0] < 0
    assert not r.timed_out
    assert r.reason() == "process 1 exited with status 3: boom"


def test_run_group_timeout_kills_the_process_tree(tmp_path):
    # the child of the child must die too (its own session, killed as a group)
    pidfile = tmp_path / "pid"
    code = (
        "import subprocess, sys, time; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(pidfile)!r}, 'w').write(str(p.pid)); time.sleep(60)"
    )
    r = launch.run_group([[PY, "-c", code]], timeout_s=2)
    assert r.timed_out and not r.ok and r.returncodes[0] < 0
    assert r.reason(2) == "timeout after 2 s"
    grandchild = int(pidfile.read_text())
    time.sleep(0.5)
    try:  # gone, or a zombie awaiting its reaper
        with open(f"/proc/{grandchild}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        state = "gone"
    assert state in ("Z", "gone")


def test_run_group_memory_limit():
    code = "import time; x = bytearray(300 * 2**20); time.sleep(30)"
    r = launch.run_group([[PY, "-c", code]], timeout_s=60, memory_limit_bytes=200 * 2**20)
    assert r.killed_for_memory and not r.ok and "out of memory" in r.reason()


def test_timeout_starts_when_child_exists():
    # a wrapper that waits 2 s before it starts its child (like flock waiting for a lock):
    # the wait does not count against the 1.5 s timeout, the child's run does
    child = "import time; time.sleep(0.5)"
    wrapper = (
        "import subprocess, sys, time; time.sleep(2); "
        f"sys.exit(subprocess.call([sys.executable, '-c', {child!r}]))"
    )
    r = launch.run_group(
        [[PY, "-c", wrapper]], timeout_s=1.5, timeout_starts_when_child_exists=True
    )
    assert r.ok, r
    assert r.seconds < 1.5
    r = launch.run_group([[PY, "-c", wrapper]], timeout_s=1.5)
    assert r.timed_out


_GLOO_PROBE = """
import json, socket
from celli_scale.distributed import launch
launch.init_from_env()
import jax, jax.numpy as jnp
from jax.experimental import multihost_utils
seen = multihost_utils.process_allgather(jnp.asarray([jax.process_index()]))
print(json.dumps({"host": socket.gethostbyname(socket.gethostname()),
                  "gathered": [int(v) for v in jnp.ravel(seen)],
                  "listening": launch.listening_addresses()}), flush=True)
jax.distributed.shutdown()
"""


def _can_remap_hosts(hosts) -> bool:
    probe = ["unshare", "-m", "sh", "-c", f"mount --bind {hosts} /etc/hosts"]
    try:
        return subprocess.run(probe, capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.mark.slow
def test_gloo_listens_on_loopback_even_when_the_host_name_does_not(tmp_path):
    """gloo listens on whatever the host name resolves to unless told otherwise. With the
    host name mapped to an address that is not on this machine (TEST-NET-2, in a private
    mount namespace), a two-process run must still work, entirely on loopback."""
    name = socket.gethostname()
    outward = "198.51.100.7"  # documentation range: never this machine's address
    hosts = tmp_path / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n{outward} {name}\n")
    if os.geteuid() != 0 or not _can_remap_hosts(hosts):
        pytest.skip("needs root and unshare -m to remap the host name")
    address = f"{launch.LOOPBACK}:{launch.free_loopback_port()}"
    root = str(Path(__file__).resolve().parent.parent)
    envs = []
    for i in range(2):
        env = launch.host_device_env(1)
        env["PYTHONPATH"] = root
        env[launch.DIST_ENV] = launch.distributed_env(address, 2, i)
        envs.append(env)
    inner = f"mount --bind {hosts} /etc/hosts && exec {PY} -c {shlex.quote(_GLOO_PROBE)}"
    r = launch.run_group(
        [["unshare", "-m", "sh", "-c", inner]] * 2, env=envs, timeout_s=300, cwd=root
    )
    assert r.ok, r.reason(300)
    got = json.loads(r.stdout_lines[-1])
    assert got["host"] == outward  # the remap took effect inside the namespace
    assert got["gathered"] == [0, 1]  # the collective ran
    # the coordinator and gloo both listen, and only on loopback
    assert len(got["listening"]) >= 2, got
    assert all(launch.is_loopback(a) for a in got["listening"]), got


def test_worker_env_puts_the_checkout_first_and_the_place():
    env = launch.worker_env(2, launch.distributed_env("127.0.0.1:5", 2, 1))
    root = str(Path(__file__).resolve().parents[1])
    assert env["PYTHONPATH"].split(os.pathsep)[0] == root == launch.checkout_root()
    assert f"{launch.HOST_DEVICE_FLAG}=2" in env["XLA_FLAGS"].split()
    assert env[launch.DIST_ENV] == "127.0.0.1:5,2,1"
    assert launch.DIST_ENV not in launch.worker_env(1)
    again = launch.with_checkout_on_path(env)
    assert again["PYTHONPATH"].split(os.pathsep)[:2] == [root, root]  # prepends, keeps the rest
