"""Static checks of the cluster recipes in cluster/, their SLURM scripts run against stub
commands, and (slow) a real 2-node loopback Ray cluster from cluster/local.sh --check."""

import importlib.util
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parent.parent / "cluster"
SHELL_RECIPES = sorted([*CLUSTER.rglob("*.sh"), *CLUSTER.rglob("*.sbatch")])
RAY_YAML = CLUSTER / "ray-cluster.yaml"
RECIPES = [*SHELL_RECIPES, RAY_YAML]
# A `ray start` command line.
RAY_START = re.compile(r"\bray\s+start\b")


def _name(path):
    return str(path.relative_to(CLUSTER))


def _shell_commands(path):
    """Logical command lines: comment lines dropped, backslash continuations joined."""
    lines = [ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#")]
    lines = [re.sub(r"\s+#\s.*$", "", ln) for ln in lines]  # trailing comments
    return re.sub(r"\\\n\s*", " ", "\n".join(lines)).splitlines()


def _yaml_commands(section):
    return yaml.safe_load(RAY_YAML.read_text())[section]


def _ray_starts(path):
    if path == RAY_YAML:
        cmds = _yaml_commands("head_start_ray_commands") + _yaml_commands(
            "worker_start_ray_commands"
        )
    else:
        cmds = _shell_commands(path)
    return [c for c in cmds if RAY_START.search(c)]


RAY_RECIPES = [p for p in RECIPES if _ray_starts(p)]


def test_recipes_present():
    assert {_name(p) for p in RAY_RECIPES} == {"slurm/ray.sbatch", "ray-cluster.yaml"}
    assert (CLUSTER / "local.sh").is_file()
    assert (CLUSTER / "slurm" / "jax.sbatch").is_file()
    assert (CLUSTER / "README.md").is_file()


@pytest.mark.parametrize("path", RAY_RECIPES, ids=_name)
def test_token_auth_before_ray_starts(path):
    starts = _ray_starts(path)
    if path == RAY_YAML:
        # Each launcher command runs in its own SSH session: each sets the mode itself.
        for cmd in starts:
            assert "RAY_AUTH_MODE=token" in cmd, cmd
            assert "RAY_AUTH_TOKEN_PATH=" in cmd, cmd
        mounts = yaml.safe_load(RAY_YAML.read_text())["file_mounts"]
        assert any("auth_token" in remote for remote in mounts)
        return
    cmds = _shell_commands(path)
    first_start = next(i for i, c in enumerate(cmds) if RAY_START.search(c))
    exported = [
        i for i, c in enumerate(cmds) if re.search(r"^\s*export\b.*\bRAY_AUTH_MODE=token\b", c)
    ]
    assert exported and exported[0] < first_start
    assert any(re.search(r"\bRAY_AUTH_TOKEN_PATH=", c) for c in cmds[:first_start])
    # A fresh token, readable by the owner only.
    assert "secrets.token_hex" in path.read_text()
    assert re.search(r"chmod 600|umask 077", path.read_text())


@pytest.mark.parametrize("path", RECIPES, ids=_name)
def test_never_binds_all_interfaces(path):
    text = path.read_text()
    assert not re.search(r"(?<![\d.])0\.0\.0\.0(?![\d.])", text)
    assert not re.search(r"--(dashboard-host|node-ip-address)[= ]\[?::\]?(\s|$)", text)


@pytest.mark.parametrize("path", RAY_RECIPES, ids=_name)
def test_ray_start_flags(path):
    for cmd in _ray_starts(path):
        assert "--node-ip-address" in cmd, cmd
        assert not re.search(r"--node-ip-address[= ]\S*(localhost)", cmd), cmd
        if "--head" in cmd:
            assert re.search(
                r"--dashboard-host[= ]127\.0\.0\.1\b|--include-dashboard[= ]false\b", cmd
            ), cmd


@pytest.mark.parametrize("path", SHELL_RECIPES, ids=_name)
def test_shell_syntax(path):
    subprocess.run(["bash", "-n", str(path)], check=True)
    assert "set -euo pipefail" in path.read_text()


def test_ray_cluster_yaml():
    cfg = yaml.safe_load(RAY_YAML.read_text())
    for key in ("cluster_name", "provider", "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in cfg
    assert cfg["provider"]["type"] == "local"
    assert cfg["provider"]["head_ip"] and cfg["provider"]["worker_ips"]
    assert any("[cluster]" in cmd for cmd in cfg["setup_commands"])
    if importlib.util.find_spec("ray") is None:
        return
    try:  # Ray's own schema check, where this Ray version still has it
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError:
        return
    validate_config(prepare_config(cfg))


def test_local_sh_loopback_setup():
    """local.sh runs Ray's own multi-node simulator through ray_launcher.local_main, whose
    environment turns token authentication on with a fresh token and keeps the nodes on
    127.0.0.1; it never runs `ray stop` (that would stop the user's other Ray instances)."""
    from celli_scale.distributed import ray_launcher

    path = CLUSTER / "local.sh"
    assert path.stat().st_mode & stat.S_IXUSR
    cmds = _shell_commands(path)
    assert any("-m celli_scale.distributed.ray_launcher" in c for c in cmds)
    assert not any(re.search(r"\bray\s+stop\b", c) for c in cmds)
    a, b = ray_launcher.local_cluster_env(), ray_launcher.local_cluster_env()
    assert a["RAY_AUTH_MODE"] == "token" and a["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    assert len(a["RAY_AUTH_TOKEN"]) >= 32 and a["RAY_AUTH_TOKEN"] != b["RAY_AUTH_TOKEN"]
    assert "--num-workers" in (ray_launcher.local_main.__doc__ or "")


# --- the SLURM scripts against stub commands ----------------------------------------------
STUBS = {
    # srun: run the command after srun's own options, logging the line; forwards a
    # SIGTERM to everything the command started, as srun does to its tasks
    "srun": """#!/usr/bin/env bash
echo "srun $*" >>"$STUB_LOG"
while [[ $# -gt 0 && $1 != bash && $1 != ray && $1 != celli-scale ]]; do shift; done
setsid "$@" &
child=$!
trap 'kill -TERM -- -$child 2>/dev/null; exit 143' TERM
wait $child
""",
    "scontrol": """#!/usr/bin/env bash
printf 'n1\nn2\n'
""",
    "hostname": """#!/usr/bin/env bash
echo "$STUB_IP"
""",
    # ray start --block: stays up until the script stops it; ray status: one active node per
    # `ray start` logged so far (the script must wait for the workers' steps, which start
    # late on a loaded machine)
    "ray": """#!/usr/bin/env bash
if [[ $1 == status ]]; then
    echo Active:; grep '^ray start' "$STUB_LOG" | awk '{print " 1 node_" NR}'; echo Pending:
    exit 0
fi
echo "ray $* AUTH=$RAY_AUTH_MODE" >>"$STUB_LOG"
if [[ $1 == start ]]; then exec sleep 60; fi
""",
    "celli-scale": """#!/usr/bin/env bash
token=missing; [[ -s ${RAY_AUTH_TOKEN_PATH:-/nonexistent} ]] && token=present
port=${CELLI_SCALE_COORDINATOR_PORT:-}
echo "celli-scale $* AUTH=${RAY_AUTH_MODE:-} TOKEN=$token PORT=$port" >>"$STUB_LOG"
""",
}


def _run_stubbed(script: str, tmp_path, ip: str = "10.0.0.7"):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in STUBS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "log"
    log.write_text("")
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "STUB_LOG": str(log),
        "STUB_IP": ip,
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_JOB_NODELIST": "n[1-2]",
        "SLURM_CPUS_PER_TASK": "4",
        "SLURM_SUBMIT_DIR": str(tmp_path),
    }
    proc = subprocess.run(
        ["bash", str(CLUSTER / "slurm" / script), "run.yaml", "--extra"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return proc, log.read_text().splitlines()


def test_ray_sbatch_flow(tmp_path):
    proc, log = _run_stubbed("ray.sbatch", tmp_path)
    assert proc.returncode == 0, proc.stderr
    starts = [x for x in log if x.startswith("ray start")]
    head = next(x for x in starts if "--head" in x)
    port = 20000 + 4242 % 2500 * 4
    assert f"--node-ip-address=10.0.0.7 --port={port}" in head and "AUTH=token" in head
    assert any(f"--address=10.0.0.7:{port}" in x for x in starts if "--head" not in x)
    (driver,) = [x for x in log if x.startswith("celli-scale")]
    assert f"train run.yaml --ray-address 10.0.0.7:{port} --num-workers 2" in driver
    assert "--cpus-per-worker 4" in driver and "--extra" in driver
    assert "AUTH=token TOKEN=present" in driver
    assert not list(tmp_path.glob(".celli-ray-*"))  # the job's token is removed at exit


def test_ray_sbatch_refuses_loopback(tmp_path):
    proc, log = _run_stubbed("ray.sbatch", tmp_path, ip="127.0.1.1")
    assert proc.returncode != 0
    assert "set CELLI_SCALE_IFACE" in proc.stderr
    assert not [x for x in log if x.startswith(("ray start", "celli-scale"))]


def test_jax_sbatch_flow(tmp_path):
    proc, log = _run_stubbed("jax.sbatch", tmp_path)
    assert proc.returncode == 0, proc.stderr
    (driver,) = [x for x in log if x.startswith("celli-scale")]
    assert "train run.yaml --extra" in driver and f"PORT={30000 + 4242 % 2000}" in driver
    assert any("--ntasks-per-node=1" in x and "--kill-on-bad-exit=1" in x for x in log)


# --- a real cluster on this machine ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray not installed")
def test_local_sh_check():
    env = dict(os.environ)
    ray_bin = Path(sys.executable).parent  # the ray CLI of this interpreter's environment
    if (ray_bin / "ray").exists():
        env["PATH"] = f"{ray_bin}:{env['PATH']}"
    proc = subprocess.run(
        [str(CLUSTER / "local.sh"), "--check"],
        env=env,
        capture_output=True,
        text=True,
        timeout=150,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert re.search(r"nodes alive: 2/2 at 127\.0\.0\.1:\d+", out), out
    listeners = re.search(r"listeners: (\d+) on this cluster, (\d+) off loopback", out)
    assert listeners, out
    assert int(listeners[1]) > 0 and int(listeners[2]) == 0, out
    assert "cluster stopped" in out
