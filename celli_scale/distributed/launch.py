"""Worker processes on one machine: ``jax.distributed`` on loopback and a subprocess-group
harness.

Two halves, both host-side:

* **Joining a multi-process JAX run on loopback.** A launcher picks a free port on
  127.0.0.1 (:func:`free_loopback_port`) and tells each worker its place through one
  environment variable (:func:`distributed_env`, read back by :func:`init_from_env`). The
  coordinator *binds* to that loopback address (``jax.distributed`` would otherwise listen
  on every interface) and the CPU collectives are gloo, bound to 127.0.0.1 too
  (:func:`pin_gloo_to`; by default gloo listens on whatever the host name resolves to).
  :func:`listening_addresses` and
  :func:`is_loopback` let a worker prove that it listens on loopback only.
* **Running a group of processes** (:func:`run_group`): start them together, stream
  process 0's stdout line by line, watch the wall clock and the resident memory of every
  process tree, and kill the whole group as soon as one process fails, the timeout passes
  or the memory limit is crossed. The scaling study (:mod:`celli_scale.study.run`) and the
  peers benchmark tool (``bench.peers.driver``) both run their subprocesses through it.

Nothing here imports JAX at module level, so a launcher stays light.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import queue
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from celli_scale.memory import process_tree, tree_rss_bytes

log = logging.getLogger(__name__)

#: The only address local runs ever bind to.
LOOPBACK = "127.0.0.1"
#: Environment variable telling a worker its place in a multi-process run:
#: ``"COORDINATOR_ADDRESS,NUM_PROCESSES,PROCESS_ID"`` (see :func:`distributed_env`).
DIST_ENV = "CELLI_SCALE_DISTRIBUTED"
#: XLA flag giving a CPU process this many host devices (read once, when JAX starts).
HOST_DEVICE_FLAG = "--xla_force_host_platform_device_count"


# --------------------------------------------------------------------------------------
# jax.distributed on loopback
# --------------------------------------------------------------------------------------
def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a coordinator)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def distributed_env(coordinator_address: str, num_processes: int, process_id: int) -> str:
    """The value of :data:`DIST_ENV` for process ``process_id`` of ``num_processes``."""
    return f"{coordinator_address},{int(num_processes)},{int(process_id)}"


def host_device_env(devices: int, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of ``base`` (default ``os.environ``) whose ``XLA_FLAGS`` give a CPU process
    ``devices`` host devices (any earlier device-count flag is replaced) and without
    :data:`DIST_ENV` (a launcher sets it per process)."""
    env = dict(os.environ if base is None else base)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(HOST_DEVICE_FLAG)]
    flags.append(f"{HOST_DEVICE_FLAG}={int(devices)}")
    env["XLA_FLAGS"] = " ".join(flags)
    env.pop(DIST_ENV, None)
    return env


def checkout_root() -> str:
    """The directory holding this ``celli_scale`` package: first on a worker's
    ``PYTHONPATH``, so that worker processes run this checkout."""
    return str(Path(__file__).resolve().parents[2])


def with_checkout_on_path(env: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``env`` with :func:`checkout_root` first on ``PYTHONPATH``."""
    out = dict(env)
    out["PYTHONPATH"] = os.pathsep.join(
        [checkout_root()] + [p for p in [out.get("PYTHONPATH")] if p]
    )
    return out


def worker_env(devices: int, dist: str | None = None) -> dict[str, str]:
    """Environment of a worker process: ``devices`` host devices
    (:func:`host_device_env`), this checkout first on ``PYTHONPATH``, and its place in a
    multi-process run (:data:`DIST_ENV`, from :func:`distributed_env`; None: a single
    process)."""
    env = with_checkout_on_path(host_device_env(devices))
    if dist is not None:
        env[DIST_ENV] = dist
    return env


def initialize_loopback(
    coordinator_address: str,
    num_processes: int,
    process_id: int,
    timeout_s: float | None = None,
) -> None:
    """Join a multi-process run whose coordinator is on loopback: the local case of
    :func:`celli_scale.distributed.multihost.initialize` (coordinator bound to its
    address, gloo collectives to 127.0.0.1, a bad set-up reported within ``timeout_s``).
    Call it before anything touches a JAX backend.

    Raises:
      ValueError: the address is not a loopback ``host:port``.
    """
    if not is_loopback(coordinator_address):
        raise ValueError(f"refusing a coordinator off loopback: {coordinator_address}")
    from celli_scale.distributed import multihost

    multihost.initialize(
        coordinator_address,
        int(num_processes),
        int(process_id),
        timeout_s=timeout_s,
        require_loopback=True,
    )


def pin_gloo_to(hostname: str) -> None:
    """Make the CPU backend's gloo collectives listen on ``hostname`` (an address).

    jax (0.10) creates gloo's TCP transport with neither a hostname nor an interface
    (``jax._src.xla_bridge.make_cpu_client``); gloo then listens on whatever this
    machine's host name resolves to, which is an outward address on most machines, even
    when the coordinator is on loopback. ``jaxlib``'s ``make_gloo_tcp_collectives`` takes a
    ``hostname``, and jax's public ``jax.extend.backend.register_backend_factory`` replaces
    the CPU backend factory, so this builds the collectives with ``hostname`` and registers
    a CPU factory that uses them. The collectives constructor and the CPU client factory
    are jax internals (``jax._src``): if a jax version moves them, this raises rather than
    silently leaving gloo on the host name's address.

    Call it after ``jax.distributed.initialize`` and before the CPU backend exists.

    Raises:
      RuntimeError: the backends are already initialised, or jax's internals moved.
    """
    from functools import partial

    try:
        from jax._src import distributed, xla_bridge
        from jax._src.lib import _jax
        from jax.extend.backend import register_backend_factory

        if xla_bridge.backends_are_initialized():
            raise RuntimeError("pin_gloo_to must run before the JAX backends are initialised")
        collectives = _jax.make_gloo_tcp_collectives(
            distributed_client=distributed.global_state.client, hostname=hostname
        )
        factory = partial(xla_bridge.make_cpu_client, collectives=collectives)
    except (ImportError, AttributeError, TypeError) as e:
        raise RuntimeError(
            f"cannot bind gloo to {hostname} with this jax version ({type(e).__name__}: {e})"
        ) from None
    register_backend_factory("cpu", factory, priority=0, fail_quietly=False)


def init_from_env(var: str = DIST_ENV) -> bool:
    """Join the multi-process run described by the environment variable ``var``
    (``"ADDRESS,NUM_PROCESSES,PROCESS_ID"``), if it is set; True when joined.

    Raises:
      ValueError: a malformed value or a coordinator off loopback.
    """
    value = os.environ.get(var)
    if not value:
        return False
    try:
        address, n_proc, pid = value.split(",")
        n, i = int(n_proc), int(pid)
    except ValueError:
        raise ValueError(
            f"{var}={value!r}: expected 'HOST:PORT,NUM_PROCESSES,PROCESS_ID'"
        ) from None
    initialize_loopback(address, n, i)
    return True


def on_one_host(var: str = DIST_ENV) -> bool:
    """True when every JAX process of this run is on this machine: a single process, or
    a coordinator on loopback (so the processes' devices share this host's memory)."""
    address = os.environ.get(var, "").split(",")[0]
    if address and is_loopback(address):
        return True
    import jax

    return jax.process_count() == 1


def is_loopback(address: str) -> bool:
    """Whether ``"host:port"`` (IPv4, IPv6 or IPv4-mapped IPv6; ``"localhost"``) is a
    loopback address. Names other than ``localhost`` are not resolved: they are not."""
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def listening_addresses(pid: int | str = "self") -> list[str]:
    """``"ip:port"`` of every TCP socket process ``pid`` (default: this one) listens on
    (Linux ``/proc``; empty elsewhere), so that a multi-process run can prove that it
    stays on loopback."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    except OSError:
        return []
    return _listeners(pid, inodes)


def all_listening_addresses() -> list[str]:
    """``"ip:port"`` of every TCP socket anything in this network namespace listens on
    (read from ``/proc/self/net/tcp*``), so that a test can compare the listeners before
    and after it started a cluster whose processes it does not own (Ray's raylets, GCS,
    workers)."""
    return _listeners("self", None)


def _listeners(pid: int | str, inodes: set[str] | None) -> list[str]:
    found = []
    for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        try:
            with open(f"/proc/{pid}/net/{name}") as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if cols[3] != "0A" or (inodes is not None and cols[9] not in inodes):  # 0A: LISTEN
                continue
            hex_ip, hex_port = cols[1].split(":")
            raw = bytes.fromhex(hex_ip)
            # /proc prints the address as native-endian 32-bit words
            raw = b"".join(
                struct.pack("=I", int.from_bytes(raw[i : i + 4], "big"))
                for i in range(0, len(raw), 4)
            )
            found.append(f"{socket.inet_ntop(family, raw)}:{int(hex_port, 16)}")
    return sorted(found)


# --------------------------------------------------------------------------------------
# a group of subprocesses
# --------------------------------------------------------------------------------------
@dataclass
class GroupResult:
    """What :func:`run_group` saw.

    Attributes:
      returncodes: exit status per process (negative: killed by that signal, as
        :mod:`subprocess` reports it).
      failed: indices of the processes that exited non-zero *on their own* (before the
        harness killed anything), in the order they were noticed; the cause of a failed
        run, where the others' non-zero codes are only the kill.
      timed_out: the timeout passed and the group was killed.
      killed_for_memory: the resident memory of the process trees together exceeded
        ``memory_limit_bytes`` and the group was killed.
      peak_tree_rss_bytes: the largest resident memory of all process trees together
        (sampled every ``poll_s``; 0 where ``/proc`` is missing).
      stderr_tails: the last ``tail_chars`` characters of each process's stderr (and,
        for processes other than 0, their stdout), whitespace collapsed to single spaces.
      stdout_lines: every line process 0 wrote to stdout (newlines stripped).
      seconds: wall-clock seconds the timeout counted (from the clock's start to the end).
    """

    returncodes: list[int]
    failed: list[int] = field(default_factory=list)
    timed_out: bool = False
    killed_for_memory: bool = False
    peak_tree_rss_bytes: int = 0
    stderr_tails: list[str] = field(default_factory=list)
    stdout_lines: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """Every process exited with status 0 and nothing was killed."""
        return not (self.timed_out or self.killed_for_memory) and not any(self.returncodes)

    def reason(self, timeout_s: float | None = None) -> str:
        """One line saying why the group failed ("" when :attr:`ok`): the timeout, the
        memory limit, or the first failed process's status and stderr tail."""
        if self.timed_out:
            return "timeout" + (f" after {timeout_s:.0f} s" if timeout_s is not None else "")
        if self.killed_for_memory:
            return f"out of memory: process tree reached {self.peak_tree_rss_bytes / 2**30:.1f} GiB"
        bad = self.failed or [i for i, rc in enumerate(self.returncodes) if rc]
        if not bad:
            return ""
        i = bad[0]
        return f"process {i} exited with status {self.returncodes[i]}: {self.stderr_tails[i]}"


def run_group(
    commands: Sequence[Sequence[str]],
    *,
    stdin: Sequence[str | None] | None = None,
    env: Sequence[Mapping[str, str] | None] | None = None,
    cwd: str | os.PathLike | None = None,
    timeout_s: float,
    memory_limit_bytes: int | None = None,
    on_line: Callable[[str], None] | None = None,
    new_session: bool = True,
    timeout_starts_when_child_exists: bool = False,
    tail_chars: int = 2000,
    poll_s: float = 0.5,
    grace_s: float = 60.0,
) -> GroupResult:
    """Run ``commands`` as one group of processes that succeed or fail together.

    All processes start at once. Process 0's stdout is read line by line (``on_line`` is
    called with each line, without its newline, in the caller's thread, as soon as it
    arrives); every process's stderr goes to a temporary file whose tail is reported. The
    harness then watches the group until process 0's stdout closes and every process has
    exited, and kills *every* process (its whole process group with ``new_session``) as
    soon as

    * one process exits with a non-zero status (the others would otherwise wait forever,
      e.g. in a collective of a ``jax.distributed`` run),
    * ``timeout_s`` wall-clock seconds have passed, or
    * the resident memory of all process trees together (:func:`celli_scale.memory.
      tree_rss_bytes`) exceeds ``memory_limit_bytes``.

    Args:
      commands: one argv per process (process 0 first).
      stdin: per process, a string written to its stdin (then closed), or None for no
        stdin (``/dev/null``). Default: None for all.
      env: per process, its complete environment, or None for this process's. Default:
        None for all.
      cwd: working directory of every process.
      timeout_s: seconds the group may run (see ``timeout_starts_when_child_exists``).
      memory_limit_bytes: resident-memory limit of the group (None: no limit).
      on_line: called with each line of process 0's stdout.
      new_session: start each process in its own session (process group), so that a kill
        reaches its children too (a wrapper such as ``flock`` and what it runs).
      timeout_starts_when_child_exists: start the timeout clock only once some process of
        the group has a child process: for commands run through a wrapper such as
        ``flock LOCK python ...``, the wait for the lock does not count, only the run.
      tail_chars: characters of each stderr kept in :attr:`GroupResult.stderr_tails`.
      poll_s: seconds between checks of the processes, the clock and the memory (each
        check reads ``/proc``; lines of stdout are handed on at once regardless).
      grace_s: after process 0's stdout closes, how long the others may take to exit on
        their own before they are killed (within the timeout).

    Returns:
      A :class:`GroupResult`; it never raises for a failing process (look at
      :attr:`GroupResult.ok` and :meth:`GroupResult.reason`).

    Example:
      >>> r = run_group([["python", "-c", "print('hi')"]], timeout_s=30)  # doctest: +SKIP
      >>> r.ok, r.stdout_lines
      (True, ['hi'])
    """
    n = len(commands)
    if n == 0:
        raise ValueError("run_group needs at least one command")
    stdin = list(stdin) if stdin is not None else [None] * n
    envs = list(env) if env is not None else [None] * n
    if len(stdin) != n or len(envs) != n:
        raise ValueError(f"stdin and env must have one entry per command ({n})")
    result = GroupResult(returncodes=[0] * n)
    lines: queue.Queue[str | None] = queue.Queue()
    procs: list[subprocess.Popen] = []

    def kill_all() -> None:
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    if new_session:
                        os.killpg(p.pid, signal.SIGKILL)
                    else:
                        p.kill()

    with contextlib.ExitStack() as stack:
        logs = [stack.enter_context(tempfile.TemporaryFile(mode="w+")) for _ in range(n)]
        stack.callback(kill_all)  # nothing outlives the call, whatever happens
        for i, cmd in enumerate(commands):
            proc = subprocess.Popen(
                list(cmd),
                stdin=subprocess.DEVNULL if stdin[i] is None else subprocess.PIPE,
                stdout=subprocess.PIPE if i == 0 else logs[i],
                stderr=logs[i],
                text=True,
                env=None if envs[i] is None else dict(envs[i]),
                cwd=cwd,
                start_new_session=new_session,
            )
            procs.append(proc)
            if stdin[i] is not None:
                assert proc.stdin is not None
                with contextlib.suppress(BrokenPipeError):
                    proc.stdin.write(stdin[i])
                    proc.stdin.close()

        def pump() -> None:
            assert procs[0].stdout is not None
            for line in procs[0].stdout:
                lines.put(line)
            lines.put(None)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        t_start = time.monotonic()
        clock = None if timeout_starts_when_child_exists else t_start
        stdout_open = True
        stdout_closed_at = None
        next_check = 0.0
        while True:
            try:
                line = lines.get(timeout=poll_s) if stdout_open else None
                if line is None and stdout_open:
                    stdout_open = False
                    stdout_closed_at = time.monotonic()
                elif line is not None:
                    line = line.rstrip("\n")
                    result.stdout_lines.append(line)
                    if on_line is not None:
                        on_line(line)
                    if time.monotonic() < next_check:
                        continue  # drain a burst of lines before the next check
            except queue.Empty:
                pass
            if not stdout_open and not any(p.poll() is None for p in procs):
                break
            if not stdout_open:
                time.sleep(min(poll_s, 0.05))
            now = time.monotonic()
            next_check = now + poll_s
            for i, p in enumerate(procs):
                if p.poll() not in (None, 0) and i not in result.failed:
                    result.failed.append(i)
            if result.failed:
                break
            if clock is None and any(
                len(process_tree(p.pid)) > 1 for p in procs if p.poll() is None
            ):
                clock = now
            rss = sum(tree_rss_bytes(p.pid) for p in procs if p.poll() is None)
            result.peak_tree_rss_bytes = max(result.peak_tree_rss_bytes, rss)
            if memory_limit_bytes is not None and rss > memory_limit_bytes:
                result.killed_for_memory = True
                break
            if clock is not None and now - clock > timeout_s:
                result.timed_out = True
                break
            if stdout_closed_at is not None and now - stdout_closed_at > grace_s:
                log.warning("run_group: process 0 closed stdout %.0f s ago; killing", grace_s)
                break
        kill_all()
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        reader.join(timeout=5)
        while True:  # lines that arrived after the last check
            try:
                line = lines.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                line = line.rstrip("\n")
                result.stdout_lines.append(line)
                if on_line is not None:
                    on_line(line)
        result.returncodes = [int(p.returncode) for p in procs]
        for f in logs:
            f.seek(0)
            result.stderr_tails.append(" ".join(f.read()[-tail_chars:].split()))
        end = time.monotonic()
        result.seconds = end - (clock if clock is not None else end)
    return result


__all__ = [
    "DIST_ENV",
    "HOST_DEVICE_FLAG",
    "LOOPBACK",
    "GroupResult",
    "all_listening_addresses",
    "checkout_root",
    "with_checkout_on_path",
    "worker_env",
    "distributed_env",
    "free_loopback_port",
    "host_device_env",
    "init_from_env",
    "initialize_loopback",
    "is_loopback",
    "listening_addresses",
    "on_one_host",
    "pin_gloo_to",
    "run_group",
]
