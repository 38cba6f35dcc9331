"""Multi-host JAX: one way into ``jax.distributed`` for the scaling study, training and
sharded runs, and the few helpers a multi-controller program needs.

Where a process learns its place (:func:`resolve`, first match wins):

1. explicit arguments (``coordinator_address``, ``num_processes``, ``process_id``), as the
   Ray launcher (:mod:`celli_scale.distributed.ray_launcher`) passes them to its workers;
2. the environment variable :data:`~celli_scale.distributed.launch.DIST_ENV`
   (``"HOST:PORT,NUM_PROCESSES,PROCESS_ID"``), set by the local subprocess launcher;
3. SLURM (``SLURM_NTASKS`` > 1): process ``SLURM_PROCID`` of ``SLURM_NTASKS``, the
   coordinator on the first host of the step's node list, port
   :data:`PORT_ENV` (default: from the job id), or all of it from :data:`COORDINATOR_ENV`;
4. otherwise a single process (nothing to join).

:func:`initialize` then joins the run with the safety rules of DESIGN.md: the
coordinator *binds* to its own address only (``jax.distributed`` would listen on every
interface), gloo's CPU collectives bind to the interface that reaches the coordinator
(127.0.0.1 for a loopback coordinator), and a bad set-up fails within ``timeout_s`` with a
message naming the cause instead of hanging: a coordinator nobody listens on, a process
count that does not match the processes started, a coordinator address that is not this
machine's.

After joining: ``jax.devices()`` lists every process's devices, so the meshes of
:mod:`~celli_scale.distributed.data_parallel` and :mod:`~celli_scale.distributed.sharded`
span the run; :func:`process_rows` / :func:`from_process_rows` (per-process data: each
process builds only its rows of a sharded batch), :func:`to_host` (a global array as one
host array on every process), :func:`host_arrays` (replicated values on their way to orbax
or to a mesh), :func:`is_leader` and :func:`quiet_unless_leader` (process 0 logs and
writes files; orbax coordinates checkpoint writes of every process itself).

Nothing here imports JAX at module level.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

#: ``HOST:PORT`` of the coordinator, overriding what SLURM's environment gives.
COORDINATOR_ENV = "CELLI_SCALE_COORDINATOR"
#: Port of the coordinator under SLURM (default: :func:`slurm_default_port`).
PORT_ENV = "CELLI_SCALE_COORDINATOR_PORT"
#: Seconds a process waits for the others (default of :func:`initialize`).
TIMEOUT_ENV = "CELLI_SCALE_DIST_TIMEOUT"
#: Exit status of a process whose join timed out (the others never came).
EXIT_JOIN_TIMEOUT = 3


class DistributedSetupError(RuntimeError):
    """A multi-process run could not be joined; the message says why and what to check."""


@dataclass(frozen=True)
class Placement:
    """A process's place in a run.

    Attributes:
      coordinator: ``HOST:PORT`` of process 0's coordinator (None for a single process).
      num_processes: processes in the run.
      process_id: this process's index (0 is the coordinator and the leader).
      source: where it came from: ``"args"``, ``"env"``, ``"slurm"`` or ``"single"``.
    """

    coordinator: str | None
    num_processes: int
    process_id: int
    source: str

    @property
    def multi(self) -> bool:
        return self.num_processes > 1


# --------------------------------------------------------------------------------------
# where am I
# --------------------------------------------------------------------------------------
def resolve(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    env: Mapping[str, str] | None = None,
) -> Placement:
    """The :class:`Placement` from explicit arguments, the launcher's variable, SLURM or
    none (see the module docstring).

    Raises:
      DistributedSetupError: incomplete or inconsistent arguments, a malformed variable.
    """
    from celli_scale.distributed.launch import DIST_ENV

    env = os.environ if env is None else env
    given = [coordinator_address, num_processes, process_id]
    if any(v is not None for v in given):
        if num_processes is not None and int(num_processes) == 1 and process_id in (None, 0):
            return Placement(None, 1, 0, "args")
        if any(v is None for v in given):
            raise DistributedSetupError(
                "a multi-process run needs coordinator_address, num_processes and "
                f"process_id together (got {coordinator_address!r}, {num_processes!r}, "
                f"{process_id!r})"
            )
        return _checked(str(coordinator_address), int(num_processes), int(process_id), "args")
    value = env.get(DIST_ENV)
    if value:
        try:
            address, n, i = value.split(",")
            return _checked(address, int(n), int(i), "env")
        except ValueError:
            raise DistributedSetupError(
                f"{DIST_ENV}={value!r}: expected 'HOST:PORT,NUM_PROCESSES,PROCESS_ID'"
            ) from None
    if int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")) or 1) > 1:
        return _slurm(env)
    return Placement(None, 1, 0, "single")


def _checked(address: str, n: int, i: int, source: str) -> Placement:
    split_address(address)
    if n < 1:
        raise DistributedSetupError(f"num_processes must be at least 1, got {n}")
    if not 0 <= i < n:
        raise DistributedSetupError(f"process_id {i} is outside 0..{n - 1} ({n} processes)")
    return Placement(address if n > 1 else None, n, i, source)


def split_address(address: str) -> tuple[str, int]:
    """``(host, port)`` of ``"HOST:PORT"`` (``[v6]:PORT`` too).

    Raises:
      DistributedSetupError: no port, or a port outside 1..65535.
    """
    host, sep, port = str(address).rpartition(":")
    host = host.strip("[]")
    try:
        p = int(port)
    except ValueError:
        p = -1
    if not sep or not host or not 0 < p < 65536:
        raise DistributedSetupError(f"coordinator address {address!r} is not HOST:PORT")
    return host, p


def slurm_default_port(job_id: str | int | None) -> int:
    """A coordinator port from SLURM's job id (30000 + id mod 2000: below Linux's
    ephemeral ports, and two jobs sharing a node do not collide); :data:`PORT_ENV`
    overrides it (``cluster/slurm/jax.sbatch`` sets it the same way)."""
    try:
        return 30000 + int(job_id) % 2000
    except (TypeError, ValueError):
        return 30000


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list (``"gpu[003-005,9],cpu1"`` -> ``"gpu003"``);
    only the first is needed: the coordinator. Written here because SLURM's own
    ``scontrol show hostnames`` is not on every compute node's path."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise DistributedSetupError(f"cannot read SLURM's node list {nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def _slurm(env: Mapping[str, str]) -> Placement:
    n = int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")))
    try:
        i = int(env["SLURM_PROCID"])
    except (KeyError, ValueError):
        raise DistributedSetupError(
            f"SLURM_NTASKS={n} but SLURM_PROCID is not set: start the tasks with srun"
        ) from None
    address = env.get(COORDINATOR_ENV)
    if not address:
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if not nodes:
            raise DistributedSetupError(
                f"SLURM_NTASKS={n} but no SLURM_STEP_NODELIST/SLURM_JOB_NODELIST: set "
                f"{COORDINATOR_ENV}=HOST:PORT"
            )
        port = int(env.get(PORT_ENV) or slurm_default_port(env.get("SLURM_JOB_ID")))
        address = f"{first_slurm_host(nodes)}:{port}"
    return _checked(address, n, i, "slurm")


# --------------------------------------------------------------------------------------
# joining
# --------------------------------------------------------------------------------------
def local_address_towards(host: str) -> str:
    """The address of this machine's interface that reaches ``host`` (127.0.0.1 for a
    loopback coordinator): what gloo binds to. A UDP "connect" sends nothing."""
    from celli_scale.distributed.launch import LOOPBACK, is_loopback

    if is_loopback(f"{host}:0"):
        return LOOPBACK
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))
            return str(s.getsockname()[0])
    except OSError as e:
        raise DistributedSetupError(f"no route from this machine to {host} ({e})") from None


def _check_coordinator_here(host: str, port: int) -> None:
    """Process 0 runs the coordinator: its address must be one of this machine's and the
    port free."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise DistributedSetupError(
                f"process 0 cannot serve the coordinator at {host}:{port} ({e.strerror}): "
                "the address must be this machine's (its private interface) and the port "
                "free"
            ) from None


def wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Return once something accepts TCP connections at ``address``; poll until then.

    Raises:
      DistributedSetupError: nothing listened within ``timeout_s`` seconds.
    """
    host, port = split_address(address)
    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(2.0, timeout_s)):
                return
        except OSError as e:
            last = e
        if time.monotonic() >= deadline:
            raise DistributedSetupError(
                f"the coordinator {address} was unreachable for {timeout_s:.0f} s ({last}): "
                "is process 0 running, and are the address and port right?"
            )
        time.sleep(0.2)


def _watchdog(placement: Placement, timeout_s: float) -> threading.Event:
    """A thread that ends the process with a clear message if the join has not finished
    within ``timeout_s``: jax's own timeout aborts the process with a C++ stack trace
    that does not say which processes are missing."""
    done = threading.Event()

    def watch() -> None:
        if done.wait(timeout_s):
            return
        sys.stderr.write(
            f"error: process {placement.process_id} of {placement.num_processes}: not all "
            f"{placement.num_processes} processes joined the coordinator "
            f"{placement.coordinator} within {timeout_s:.0f} s. Check that as many "
            "processes were started as num_processes says (--num-workers, SLURM_NTASKS) "
            "and that none failed before joining.\n"
        )
        sys.stderr.flush()
        os._exit(EXIT_JOIN_TIMEOUT)

    threading.Thread(target=watch, daemon=True, name="celli-join-watchdog").start()
    return done


_JOINED: Placement | None = None


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    timeout_s: float | None = None,
    require_loopback: bool = False,
) -> Placement:
    """Join the run this process belongs to (:func:`resolve`); a no-op for a single
    process and when already joined. Call it before anything touches a JAX backend.

    Args:
      coordinator_address, num_processes, process_id: explicit placement (all or none).
      timeout_s: seconds to wait for the coordinator and for every process to join
        (default :data:`TIMEOUT_ENV` or 120).
      require_loopback: refuse a coordinator off 127.0.0.1 (local runs and tests).

    Returns:
      The :class:`Placement` joined.

    Raises:
      DistributedSetupError: see the module docstring. A join that times out (processes
        missing) ends the process with status :data:`EXIT_JOIN_TIMEOUT` and a message
        on stderr, since JAX cannot be un-initialised.
    """
    global _JOINED
    from celli_scale.distributed.launch import is_loopback, pin_gloo_to

    explicit = any(v is not None for v in (coordinator_address, num_processes, process_id))
    if _JOINED is not None and not explicit:
        return _JOINED  # joined already (e.g. by the Ray launcher): that is the run
    placement = resolve(coordinator_address, num_processes, process_id)
    if _JOINED is not None:
        if (_JOINED.coordinator, _JOINED.num_processes, _JOINED.process_id) != (
            placement.coordinator,
            placement.num_processes,
            placement.process_id,
        ):
            raise DistributedSetupError(f"already joined {_JOINED}; cannot join {placement}")
        return _JOINED
    if not placement.multi:
        return placement
    address = placement.coordinator
    assert address is not None
    if require_loopback and not is_loopback(address):
        raise DistributedSetupError(f"refusing a coordinator off loopback: {address}")
    host, port = split_address(address)
    if host in ("0.0.0.0", "::"):
        raise DistributedSetupError(
            f"coordinator {address}: give the address of the coordinator's interface, not "
            "all interfaces"
        )
    if timeout_s is None:
        timeout_s = float(os.environ.get(TIMEOUT_ENV, 120))
    if placement.process_id == 0:
        _check_coordinator_here(host, port)
    else:
        wait_for_coordinator(address, timeout_s)
    local = local_address_towards(host)

    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    done = _watchdog(placement, timeout_s)
    jax.distributed.initialize(
        coordinator_address=address,
        num_processes=placement.num_processes,
        process_id=placement.process_id,
        coordinator_bind_address=address,
        # beyond the watchdog's: it reports first, with the reason
        initialization_timeout=int(timeout_s) + 30,
    )
    done.set()
    pin_gloo_to(local)
    _JOINED = placement
    log.info(
        "joined as process %d of %d (coordinator %s, from %s)",
        placement.process_id,
        placement.num_processes,
        address,
        placement.source,
    )
    return placement


def shutdown() -> None:
    """Leave the run (``jax.distributed.shutdown``) if this process joined one."""
    global _JOINED
    if _JOINED is not None:
        import jax

        jax.distributed.shutdown()
        _JOINED = None


# --------------------------------------------------------------------------------------
# after joining
# --------------------------------------------------------------------------------------
def is_leader() -> bool:
    """Process 0: the one that logs, shows progress and writes result files."""
    import jax

    return jax.process_index() == 0


def quiet_unless_leader() -> bool:
    """On processes other than 0, raise the root logger to WARNING (their INFO lines would
    repeat process 0's); returns :func:`is_leader` (use it to disable progress bars)."""
    leader = is_leader()
    if not leader:
        logging.getLogger().setLevel(max(logging.getLogger().level, logging.WARNING))
    return leader


def agree(flag: bool) -> bool:
    """Process 0's ``flag`` on every process (a decision that must be the same everywhere,
    such as stopping on process 0's clock); ``flag`` itself for a single process."""
    import jax

    if jax.process_count() == 1:
        return bool(flag)
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.asarray(bool(flag))))


def write_text_atomic(path: Any, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: a reader (another
    process) sees the old file or the new one, never half of it."""
    from pathlib import Path

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def process_rows(n_rows: int, sharding: Any) -> slice:
    """The rows of a batch of ``n_rows`` (sharded on its first axis by ``sharding``)
    that this process's devices hold: the only rows it needs to build.

    Raises:
      ValueError: this process's rows are not one contiguous block (a mesh whose device
        order interleaves processes).
    """
    idx = sharding.addressable_devices_indices_map((n_rows,))
    starts = sorted(
        {(s[0].start or 0, s[0].stop if s[0].stop is not None else n_rows) for s in idx.values()}
    )
    lo, hi = starts[0][0], starts[-1][1]
    covered = sum(b - a for a, b in starts)
    if covered != hi - lo:
        raise ValueError(f"this process's rows of the batch are not contiguous: {starts}")
    return slice(lo, hi)


def from_process_rows(tree: Any, n_rows: int, sharding: Any) -> Any:
    """A global array per leaf of ``tree``, whose leaves hold only this process's rows
    (:func:`process_rows`) of a batch of ``n_rows``; one code path for 1 or many
    processes."""
    import jax

    def one(x):
        shape = (n_rows, *x.shape[1:])
        return jax.make_array_from_process_local_data(sharding, x, shape)

    return jax.tree_util.tree_map(one, tree)


def to_host(x: Any) -> Any:
    """``x`` as a NumPy array on every process: directly when this process holds all of it
    (one process, or replicated), else gathered from every process (a collective: call it
    on every process)."""
    import jax
    import numpy as np

    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def host_arrays(tree: Any) -> Any:
    """``tree`` unchanged for one process; with several, every ``jax.Array`` leaf as a
    NumPy array (:func:`to_host`). For values every process holds alike (parameters, a
    training state, a decomposition) on their way to orbax or to a mesh over all
    processes: both refuse an array committed to one process's device."""
    import jax

    if jax.process_count() == 1:
        return tree
    return jax.tree_util.tree_map(lambda x: to_host(x) if isinstance(x, jax.Array) else x, tree)


__all__ = [
    "agree",
    "write_text_atomic",
    "COORDINATOR_ENV",
    "EXIT_JOIN_TIMEOUT",
    "PORT_ENV",
    "TIMEOUT_ENV",
    "DistributedSetupError",
    "Placement",
    "first_slurm_host",
    "from_process_rows",
    "host_arrays",
    "initialize",
    "is_leader",
    "local_address_towards",
    "process_rows",
    "quiet_unless_leader",
    "resolve",
    "shutdown",
    "slurm_default_port",
    "split_address",
    "to_host",
    "wait_for_coordinator",
]
