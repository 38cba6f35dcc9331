"""Memory and CPU probes: what a compiled program needs, what the machine has, the peak
resident set size of a block of code, CPU seconds. Used by the scaling study, the
benchmarks and the peers tool; host-side only (no JAX tracing)."""

from __future__ import annotations

import os
import resource
import threading
from typing import Any


class InsufficientMemoryError(MemoryError):
    """A compiled program needs more memory than the device (or host) has available.
    The message gives the need and the availability in GiB."""


def available_memory_bytes() -> int:
    """Memory an evaluation may use: the accelerator's limit, or the host's
    ``MemAvailable`` on CPU (see :func:`host_available_memory_bytes`)."""
    import jax

    dev = jax.devices()[0]
    if dev.platform != "cpu":
        stats = dev.memory_stats() or {}
        if "bytes_limit" in stats:
            return int(stats["bytes_limit"])
    return host_available_memory_bytes()


def host_available_memory_bytes() -> int:
    """The host's ``MemAvailable`` (bytes; total physical memory where /proc is missing).
    Starts no JAX backend."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def compiled_bytes(compiled: Any) -> int:
    """Bytes a compiled XLA program needs (arguments + outputs + temporaries), per device;
    0 when XLA gives no memory analysis."""
    ma = compiled.memory_analysis()
    if ma is None:
        return 0
    return int(ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes)


def check_fits(compiled: Any, n_programs: int = 1, fraction: float = 0.85) -> int:
    """Bytes ``n_programs`` copies of ``compiled`` need (on CPU, host devices share RAM).

    Raises:
      InsufficientMemoryError: the need exceeds ``fraction`` of the available memory.
    """
    import jax

    need = compiled_bytes(compiled)
    if jax.devices()[0].platform == "cpu":
        need *= n_programs
    avail = available_memory_bytes()
    if need > fraction * avail:
        raise InsufficientMemoryError(
            f"needs {need / 2**30:.1f} GiB (XLA memory analysis), "
            f"{fraction:.0%} of available {avail / 2**30:.1f} GiB exceeded"
        )
    return need


def cpu_seconds() -> float:
    """User + system CPU seconds of this process (all threads): on a shared machine it
    moves less with other people's load than wall-clock time does."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def rss_mb() -> float:
    """This process's resident set size now (MiB); the peak so far where /proc is missing."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PeakRSS:
    """Context manager sampling this process's resident set size (MiB) every ``dt``
    seconds; ``.peak_mb`` after exit."""

    def __init__(self, dt: float = 0.002) -> None:
        self.dt = dt
        self.peak_mb = 0.0
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, rss_mb())
            self._stop.wait(self.dt)

    def __enter__(self) -> PeakRSS:
        self.peak_mb = rss_mb()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, rss_mb())


def reset_peak_rss() -> None:
    """Reset this process's peak resident set size to its current size (Linux), so that
    :func:`peak_rss_since_reset_mb` after a timed block excludes compilation and set-up."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_since_reset_mb() -> float | None:
    """Peak resident set size (MiB, ``VmHWM``) since the last :func:`reset_peak_rss`
    (Linux; None elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def busy_cpu_seconds() -> float:
    """CPU seconds every process on the machine has used since boot (``/proc/stat``:
    everything but idle and iowait), to tell how busy the machine was during a timing."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants' pids (Linux ``/proc``; ``[root]`` elsewhere)."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return [root]
    for d in entries:
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def tree_rss_bytes(root: int) -> int:
    """Resident bytes of ``root`` and its descendants together (Linux; 0 elsewhere)."""
    total = 0
    for p in process_tree(root):
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            pass
    return total
