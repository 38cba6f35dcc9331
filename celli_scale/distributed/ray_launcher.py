"""Ray-orchestrated multi-process runs: one worker actor per node (or per GPU), one
``jax.distributed`` run across them, restarted from the last checkpoint when a worker dies.

The driver (:func:`run_on_ray`) connects to a running Ray cluster, places
``num_workers`` actors (a placement group, spread over nodes by default), asks worker 0
for its node's address and a free port there, and passes that coordinator address to
every worker; each worker joins the run
(:func:`celli_scale.distributed.multihost.initialize`) and calls the task, a function
named ``"module:function"`` that takes the payload. The task is the same code a single
process runs (training, a sharded evaluation, a scaling point): ``jax.distributed``
makes the actors one multi-controller JAX program, Ray only places, watches and
restarts them.

Fault tolerance: when an actor dies (its node lost, the process killed), the driver kills
the rest of the group (they would wait in a collective forever), and starts a new group,
up to ``max_restarts`` times. Tasks resume from their own checkpoints (training:
the orbax checkpoints under ``out/checkpoints``, which must be on a filesystem every
node sees), so no optimizer step before the last checkpoint is lost or repeated. An
exception raised by the task (a bad config, a user error) is not retried: it is raised
on the driver with the worker's message.

Safety (DESIGN.md): the driver refuses a cluster without Ray's token authentication
(``RAY_AUTH_MODE=token`` and a token: ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or
``~/.ray/auth_token``), and the coordinator binds to worker 0's node address only.

Ray is an optional dependency (the ``[cluster]`` extra); nothing here imports it until a
run starts.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from celli_scale.distributed.multihost import DistributedSetupError, split_address

log = logging.getLogger(__name__)

#: What to install when Ray is missing.
RAY_MISSING = (
    "Ray is not installed: install the cluster extra (pip install 'celli-scale[cluster]', "
    "or pip install -e '.[cluster]' in a checkout)"
)
#: The default token file of ``ray get-auth-token --generate``.
DEFAULT_TOKEN_FILE = Path("~/.ray/auth_token")


class ClusterSetupError(DistributedSetupError):
    """The Ray cluster cannot be used as asked; the message says why and what to do."""


class WorkerTaskError(RuntimeError):
    """The task raised on a worker (not retried); the message is the worker's."""


def require_ray() -> Any:
    """The ``ray`` module, or :class:`ClusterSetupError` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ClusterSetupError(RAY_MISSING) from None
    return ray


def check_token_auth(env: Mapping[str, str] | None = None) -> str:
    """Where the Ray token comes from (``"RAY_AUTH_TOKEN"``, a file path); refuses a
    driver without token authentication.

    Raises:
      ClusterSetupError: ``RAY_AUTH_MODE`` is not ``token``, or no token is found.
    """
    env = os.environ if env is None else env
    if env.get("RAY_AUTH_MODE") != "token":
        raise ClusterSetupError(
            "Ray token authentication is off (RAY_AUTH_MODE is "
            f"{env.get('RAY_AUTH_MODE', 'unset')!r}): a Ray cluster without it runs code "
            "from anyone who can reach it. Start every node and this driver with "
            "RAY_AUTH_MODE=token (see cluster/README.md)"
        )
    if env.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    path = env.get("RAY_AUTH_TOKEN_PATH")
    candidates = [Path(path)] if path else [DEFAULT_TOKEN_FILE.expanduser()]
    for p in candidates:
        try:
            if p.read_text().strip():
                return str(p)
        except OSError:
            pass
    raise ClusterSetupError(
        "RAY_AUTH_MODE=token but no token: set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH to "
        f"a file holding it, or create {DEFAULT_TOKEN_FILE} with `ray get-auth-token "
        "--generate` (the cluster's token, the same on every node)"
    )


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast when nothing listens at a Ray ``HOST:PORT`` (``ray.init`` would retry
    for a long time); ``"auto"`` is left to Ray, which fails at once when no local
    cluster runs.

    Raises:
      ClusterSetupError: no connection within ``timeout_s``.
    """
    if address in ("auto", "local") or address.startswith("ray://"):
        return
    try:
        host, port = split_address(address)
    except DistributedSetupError as e:
        raise ClusterSetupError(f"--ray-address {address!r}: {e}") from None
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return
    except OSError as e:
        raise ClusterSetupError(
            f"no Ray cluster at {address} ({e.strerror or e}): start one (ray start --head, "
            "cluster/local.sh, cluster/slurm/ray.sbatch) or give its head's HOST:PORT"
        ) from None


def connect(address: str, timeout_s: float = 5.0) -> Any:
    """``ray.init(address)`` after the checks above (token, reachability); returns ray.

    Raises:
      ClusterSetupError: Ray missing, no token authentication, no cluster at ``address``.
    """
    ray = require_ray()
    check_token_auth()
    check_reachable(address, timeout_s)
    if ray.is_initialized():
        return ray
    try:
        ray.init(address=address, log_to_driver=True, logging_level=logging.WARNING)
    except ConnectionError as e:
        raise ClusterSetupError(f"cannot join the Ray cluster at {address!r}: {e}") from None
    except Exception as e:  # an auth failure is a RuntimeError/RaySystemError in Ray
        if "auth" in str(e).lower() or "token" in str(e).lower():
            raise ClusterSetupError(
                f"the Ray cluster at {address} refused this driver's token ({e!s:.200}): "
                "use the cluster's token"
            ) from None
        raise
    return ray


def resolve_task(task: str) -> Callable[..., Any]:
    """The function named ``"package.module:function"``."""
    module, _, name = task.partition(":")
    if not module or not name:
        raise ValueError(f"task {task!r} is not 'module:function'")
    return getattr(importlib.import_module(module), name)


# --------------------------------------------------------------------------------------
# the worker actor (made a Ray actor class at run time: ray stays an optional import)
# --------------------------------------------------------------------------------------
class Worker:
    """One process of the run: reports where it is, then joins and runs the task."""

    def where(self) -> dict[str, Any]:
        """Node address, process id, and a port free on that address (for the
        coordinator, when this is worker 0)."""
        import ray

        ip = ray.util.get_node_ip_address()
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((ip, 0))
            port = int(s.getsockname()[1])
        return {"ip": ip, "pid": os.getpid(), "port": port, "host": socket.gethostname()}

    def run(
        self,
        task: str,
        payload: Any,
        coordinator: str,
        num_workers: int,
        index: int,
        attempt: int,
        fault: dict | None = None,
        timeout_s: float | None = None,
    ) -> Any:
        from celli_scale.distributed import multihost

        multihost.initialize(coordinator, num_workers, index, timeout_s=timeout_s)
        multihost.quiet_unless_leader()
        if (
            fault
            and int(fault.get("worker", -1)) == index
            and int(fault.get("attempt", 0)) == (attempt)
        ):
            _arm_fault(int(fault["after_checkpoint"]))
        fn = resolve_task(task)
        try:
            return fn(payload)
        finally:
            if num_workers > 1:
                multihost.shutdown()


def _arm_fault(step: int) -> None:
    """Fault injection (for testing recovery): this process kills itself (SIGKILL, as a
    lost node would end it) right after its checkpoint of ``step`` or later is written."""
    import signal

    from celli_scale.train import checkpoint

    def hook(saved_step: int) -> None:
        if saved_step >= step:
            log.warning("fault injection: killing worker process %d", os.getpid())
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoint.AFTER_SAVE_HOOKS.append(hook)


# --------------------------------------------------------------------------------------
# the driver
# --------------------------------------------------------------------------------------
@dataclass
class RayRunResult:
    """What :func:`run_on_ray` saw.

    Attributes:
      results: the task's return value per worker (of the attempt that finished).
      attempts: groups started (1 + restarts).
      workers: per attempt, each worker's ``where()`` (ip, pid, port, host).
      startup_s: seconds from the call to every worker of the first group running the
        task (connection, placement, actor start; not the task's own JAX start-up).
      seconds: seconds of the whole call.
      failures: one line per restart saying which worker died.
    """

    results: list[Any]
    attempts: int
    workers: list[list[dict[str, Any]]] = field(default_factory=list)
    startup_s: float = 0.0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)

    @property
    def restarts(self) -> int:
        return self.attempts - 1


def _worker_env(devices_per_worker: int, env: Mapping[str, str] | None) -> dict[str, str]:
    from celli_scale.distributed.launch import worker_env

    # CPU workers: this many host devices each (read once, when JAX starts); this checkout
    full = worker_env(devices_per_worker)
    out = {k: full[k] for k in ("XLA_FLAGS", "PYTHONPATH")}
    out.update(env or {})
    return out


def run_on_ray(
    task: str,
    payload: Any,
    *,
    address: str = "auto",
    num_workers: int = 1,
    cpus_per_worker: float = 1,
    gpus_per_worker: float = 0,
    devices_per_worker: int = 1,
    strategy: str = "SPREAD",
    max_restarts: int = 3,
    join_timeout_s: float = 120.0,
    timeout_s: float | None = None,
    env: Mapping[str, str] | None = None,
    fault: dict | None = None,
    on_start: Callable[[int, list[dict[str, Any]]], None] | None = None,
) -> RayRunResult:
    """Run ``task(payload)`` on ``num_workers`` Ray actors that form one
    ``jax.distributed`` run; restart the group when a worker dies.

    Args:
      task: ``"module:function"``; the function takes ``payload`` and returns something
        Ray can send back (a path, a dict of numbers).
      payload: the task's argument (plain data: dicts, lists, strings, numbers).
      address: the Ray cluster (``"auto"``, ``HOST:PORT``).
      num_workers: processes of the run (one per node with the default ``SPREAD``).
      cpus_per_worker, gpus_per_worker: Ray resources of each worker.
      devices_per_worker: host devices of a CPU worker (JAX's device count flag).
      strategy: the placement group strategy (``SPREAD``, ``STRICT_SPREAD``: one node
        each, ``PACK``).
      max_restarts: new groups started after a worker died; then the run fails.
      join_timeout_s: seconds the workers wait for each other to join.
      timeout_s: seconds for the whole run (None: no limit).
      env: extra environment variables of the workers.
      fault: fault injection, for testing recovery: ``{"worker": i, "attempt": a,
        "after_checkpoint": step}`` kills worker ``i`` of attempt ``a`` right after it wrote
        the training checkpoint of ``step``.
      on_start: called with ``(attempt, workers)`` when a group starts its task.

    Returns:
      A :class:`RayRunResult`.

    Raises:
      ClusterSetupError: Ray missing, no token authentication, no cluster at
        ``address``, not enough resources for the workers.
      WorkerTaskError: the task raised (not retried).
      RuntimeError: every restart failed too, or the run timed out.
    """
    t_start = time.monotonic()
    if int(num_workers) < 1:
        raise ValueError(f"num_workers must be at least 1, got {num_workers}")
    resolve_task(task)  # a typo fails here, not on every worker
    ray = connect(address)
    from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    bundle: dict[str, float] = {"CPU": float(cpus_per_worker)}
    if gpus_per_worker:
        bundle["GPU"] = float(gpus_per_worker)
    have = ray.cluster_resources()
    for k, v in bundle.items():
        if have.get(k, 0) < v * num_workers:
            raise ClusterSetupError(
                f"{num_workers} workers x {v:g} {k} do not fit the Ray cluster's "
                f"{have.get(k, 0):g} {k}: lower --num-workers or the resources per worker"
            )
    actor_cls = ray.remote(Worker)
    actor_opts = dict(
        num_cpus=float(cpus_per_worker),
        num_gpus=float(gpus_per_worker),
        max_restarts=0,  # the launcher restarts the whole group, never one actor
        runtime_env={"env_vars": _worker_env(devices_per_worker, env)},
    )
    result = RayRunResult(results=[], attempts=0)
    deadline = None if timeout_s is None else t_start + float(timeout_s)
    while True:
        attempt = result.attempts
        result.attempts += 1
        pg = placement_group([bundle] * int(num_workers), strategy=strategy)
        actors: list[Any] = []
        try:
            try:
                ray.get(pg.ready(), timeout=join_timeout_s)
            except GetTimeoutError:
                raise ClusterSetupError(
                    f"Ray could not place {num_workers} workers of {bundle} with strategy "
                    f"{strategy} within {join_timeout_s:.0f} s (nodes: "
                    f"{len([n for n in ray.nodes() if n['Alive']])})"
                ) from None
            actors = [
                actor_cls.options(
                    **actor_opts,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        placement_group=pg, placement_group_bundle_index=i
                    ),
                ).remote()
                for i in range(int(num_workers))
            ]
            where = ray.get([a.where.remote() for a in actors], timeout=join_timeout_s)
            result.workers.append(where)
            coordinator = (
                f"[{where[0]['ip']}]:{where[0]['port']}"
                if ":" in where[0]["ip"]
                else f"{where[0]['ip']}:{where[0]['port']}"
            )
            log.info(
                "attempt %d: %d workers on %s; coordinator %s",
                attempt,
                num_workers,
                sorted({w["ip"] for w in where}),
                coordinator,
            )
            refs = [
                a.run.remote(
                    task, payload, coordinator, int(num_workers), i, attempt, fault,
                    join_timeout_s,
                )
                for i, a in enumerate(actors)
            ]  # fmt: skip
            if attempt == 0:
                result.startup_s = time.monotonic() - t_start
            if on_start is not None:
                on_start(attempt, where)
            pending = list(refs)
            died = None
            while pending:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                done, pending = ray.wait(pending, num_returns=1, timeout=left)
                if not done:
                    raise RuntimeError(f"the Ray run timed out after {timeout_s:.0f} s")
                try:
                    ray.get(done[0])
                except RayActorError as e:
                    died = (refs.index(done[0]), e)
                    break
                except RayTaskError as e:
                    cause = e.cause if getattr(e, "cause", None) is not None else e
                    raise WorkerTaskError(
                        f"worker {refs.index(done[0])} failed: {type(cause).__name__}: {cause}"
                    ) from None
            if died is None:
                result.results = ray.get(refs)
                break
            i, err = died
            msg = f"attempt {attempt}: worker {i} (pid {where[i]['pid']}, {where[i]['ip']}) died"
            log.warning("%s; %s", msg, str(err).splitlines()[0][:200])
            result.failures.append(msg)
            if result.restarts >= int(max_restarts):
                raise RuntimeError(
                    f"{msg}; no restarts left (max_restarts={max_restarts}): "
                    + "; ".join(result.failures)
                )
        finally:
            for a in actors:  # the survivors wait in a collective: end them
                ray.kill(a, no_restart=True)
            remove_placement_group(pg)
    result.seconds = time.monotonic() - t_start
    return result


# --------------------------------------------------------------------------------------
# the command line
# --------------------------------------------------------------------------------------
def add_cluster_arguments(p: Any) -> None:
    """``--ray-address``, ``--num-workers``, ``--cpus-per-worker``, ``--max-restarts`` on an
    argparse (sub)parser."""
    g = p.add_argument_group("cluster (Ray; needs the [cluster] extra)")
    g.add_argument(
        "--ray-address",
        default=None,
        metavar="auto|HOST:PORT",
        help="run on this Ray cluster's workers as one jax.distributed run",
    )
    g.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help="worker processes (default 1; placed one per node while nodes are free)",
    )
    g.add_argument("--cpus-per-worker", type=float, default=1.0, help="Ray CPUs per worker")
    g.add_argument(
        "--gpus-per-worker", type=float, default=0.0, help="Ray GPUs per worker (1: one per GPU)"
    )
    g.add_argument(
        "--max-restarts",
        type=int,
        default=3,
        help="restarts of the worker group after a worker dies (resumes from the checkpoint)",
    )


def cluster_options(args: Any) -> dict[str, Any] | None:
    """``run_on_ray`` keyword arguments from :func:`add_cluster_arguments`' options; None
    without ``--ray-address``.

    Raises:
      ClusterSetupError: ``--num-workers`` without ``--ray-address``, or below 1.
    """
    address = getattr(args, "ray_address", None)
    n = getattr(args, "num_workers", None)
    if address is None:
        if n is not None:
            raise ClusterSetupError(
                "--num-workers needs --ray-address (without Ray, start the processes with "
                "srun or mpirun: every process joins through SLURM's environment)"
            )
        return None
    if n is not None and n < 1:
        raise ClusterSetupError(f"--num-workers must be at least 1, got {n}")
    return {
        "address": address,
        "num_workers": 1 if n is None else int(n),
        "cpus_per_worker": float(args.cpus_per_worker),
        "gpus_per_worker": float(args.gpus_per_worker),
        "max_restarts": int(args.max_restarts),
    }


# --------------------------------------------------------------------------------------
# a simulated cluster on this machine
# --------------------------------------------------------------------------------------
_LOCAL_CLUSTER = """
import json, sys
from ray.cluster_utils import Cluster
nodes, cpus = int(sys.argv[1]), float(sys.argv[2])
c = Cluster(initialize_head=True, head_node_args={
    "num_cpus": cpus, "node_ip_address": "127.0.0.1", "include_dashboard": False})
for _ in range(nodes - 1):
    c.add_node(num_cpus=cpus, node_ip_address="127.0.0.1")
c.wait_for_nodes()
print(json.dumps({"address": c.address}), flush=True)
sys.stdin.read()  # until the owner closes it
c.shutdown()
"""


def local_cluster_env(token: str | None = None) -> dict[str, str]:
    """The environment of a Ray cluster on 127.0.0.1 and of its drivers: token
    authentication with ``token`` (default: a new random one), nodes kept on loopback
    (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, see DESIGN.md, Safety), and this checkout
    on ``PYTHONPATH``."""
    import secrets

    from celli_scale.distributed.launch import with_checkout_on_path

    env = with_checkout_on_path(os.environ)
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN"] = token or secrets.token_hex(16)
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    return env


@contextlib.contextmanager
def local_cluster(nodes: int = 2, cpus_per_node: float = 1, timeout_s: float = 120):
    """A Ray cluster of ``nodes`` nodes on 127.0.0.1 (``ray.cluster_utils.Cluster`` in a
    process of its own: Ray reads its configuration when imported, so the cluster and its
    drivers get :func:`local_cluster_env` from the start). Yields ``(address, env)``: run
    drivers with ``env``. The cluster is shut down on exit.

    Raises:
      ClusterSetupError: Ray missing, or the cluster did not start within ``timeout_s``.
    """
    import select
    import signal
    import subprocess
    import sys

    require_ray()
    env = local_cluster_env()
    host = subprocess.Popen(
        [sys.executable, "-c", _LOCAL_CLUSTER, str(int(nodes)), str(float(cpus_per_node))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        ready, _, _ = select.select([host.stdout], [], [], timeout_s)
        line = host.stdout.readline() if ready else ""
        if not line:
            raise ClusterSetupError(
                f"the local Ray cluster did not start within {timeout_s:.0f} s "
                f"(status {host.poll()})"
            )
        yield json.loads(line)["address"], env
    finally:
        with contextlib.suppress(OSError):
            host.stdin.close()
        try:
            host.wait(timeout=60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(host.pid, signal.SIGKILL)
            host.wait()


def _nodes_alive(address: str, env: Mapping[str, str]) -> int:
    """Alive nodes of the cluster at ``address``, asked by a short driver process (Ray
    reads its authentication settings from ``env`` when imported)."""
    import subprocess
    import sys

    code = (
        "import sys, ray; ray.init(address=sys.argv[1], logging_level='ERROR'); "
        "print(sum(n['Alive'] for n in ray.nodes()))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, address],
        capture_output=True,
        text=True,
        env=dict(env),
        timeout=120,
    )
    try:
        return int(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return 0


def local_main(argv: list[str] | None = None) -> int:
    """``cluster/local.sh``: a Ray cluster of ``--nodes`` nodes on 127.0.0.1 (token
    authentication, :func:`local_cluster`), then ``--check`` (report the nodes) or a
    command run as its driver with ``--ray-address ADDRESS --num-workers NODES`` appended;
    the TCP listeners opened meanwhile are sampled every second and any off loopback fails
    the run. Returns the exit status."""
    import argparse
    import subprocess

    from celli_scale.distributed.launch import all_listening_addresses, is_loopback

    p = argparse.ArgumentParser(
        prog="cluster/local.sh",
        description="A simulated multi-node Ray cluster on 127.0.0.1 (token auth), then a "
        "command run on it with --ray-address/--num-workers appended.",
    )
    p.add_argument("--nodes", type=int, default=2, help="Ray nodes (default 2)")
    p.add_argument("--cpus", type=float, default=1, help="CPUs per node (default 1)")
    p.add_argument("--check", action="store_true", help="start, report the nodes, stop")
    p.add_argument("command", nargs=argparse.REMAINDER, help="e.g. celli-scale train run.yaml")
    a = p.parse_args(argv)
    if not a.check and not a.command:
        p.error("give --check or a command")
    before = set(all_listening_addresses())
    seen: set[str] = set()
    rc = 0
    with local_cluster(nodes=a.nodes, cpus_per_node=a.cpus) as (address, env):
        alive = _nodes_alive(address, env)
        print(f"local.sh: nodes alive: {alive}/{a.nodes} at {address} (token auth, loopback only)")
        seen |= set(all_listening_addresses()) - before
        if alive < a.nodes:
            rc = 1
        elif not a.check:
            cmd = [*a.command, "--ray-address", address, "--num-workers", str(a.nodes)]
            proc = subprocess.Popen(cmd, env=env)
            while True:
                try:
                    rc = proc.wait(timeout=1.0)
                    break
                except subprocess.TimeoutExpired:
                    seen |= set(all_listening_addresses()) - before
    print("local.sh: cluster stopped")
    off = sorted(x for x in seen if not is_loopback(x))
    print(f"local.sh: listeners: {len(seen)} on this cluster, {len(off)} off loopback")
    for x in off:
        print(f"  off loopback: {x}")
    return rc or (1 if off else 0)


__all__ = [
    "RAY_MISSING",
    "ClusterSetupError",
    "RayRunResult",
    "WorkerTaskError",
    "add_cluster_arguments",
    "cluster_options",
    "check_reachable",
    "check_token_auth",
    "connect",
    "local_cluster",
    "local_cluster_env",
    "local_main",
    "require_ray",
    "resolve_task",
    "run_on_ray",
]


if __name__ == "__main__":
    import sys

    sys.exit(local_main())
