"""Where a model's compiled energy + forces spends its time: per-XLA-kernel time of one warm
call, from a ``jax.profiler`` trace (perfetto JSON), summed by kernel name.

``python -m bench.profile_kernel [GRID_N] [MODEL,MODEL,...]`` (default 16, celli): the
benchmark's NaCl grid of GRID_N³ atoms, float32, matched hyper-parameters; prints the
kernel's min time of 5 calls and, per trace process (the host, each device), the 18 most
expensive kernels. On a GPU the device process lists CUDA kernels and XLA fusions; on a
CPU the host process lists XLA's thunks. How bench/RESULTS.md found CELLI's sorted
scatter on the H200.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import sys
import tempfile
import time

import jax

from bench._common import build_potential, config_for
from bench.bench_user_path import structures


def kernel_profile(model: str, grid_n: int, top: int = 18) -> str:
    """The report for one model (text)."""
    pot = build_potential(config_for(model, "float32"))
    graph = pot.graph(structures(grid_n, "md", 1)[0])

    def call():
        jax.block_until_ready(pot.evaluate(pot.params, graph))

    call()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    lines = [f"{model} N={grid_n**3} kernel min {min(times) * 1e3:.2f} ms"]
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            call()
        (path,) = glob.glob(f"{d}/**/*perfetto_trace.json.gz", recursive=True)
        with gzip.open(path) as fh:
            trace = json.load(fh)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = {
        e["pid"]: e["args"]["name"]
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    per = collections.defaultdict(lambda: collections.defaultdict(lambda: [0, 0.0]))
    for e in events:
        if e.get("ph") == "X":
            slot = per[names.get(e["pid"], str(e["pid"]))][e["name"][:90]]
            slot[0] += 1
            slot[1] += e.get("dur", 0.0)  # µs
    for proc, kernels in per.items():
        count = sum(c for c, _ in kernels.values())
        total = sum(t for _, t in kernels.values())
        lines.append(f"-- {proc}: {count} events, {total / 1e3:.1f} ms")
        for name, (c, t) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:top]:
            lines.append(f"   {t / 1e3:9.2f} ms {c:6d}x  {name}")
    return "\n".join(lines)


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 16
    for m in sys.argv[2].split(",") if len(sys.argv) > 2 else ["celli"]:
        print(kernel_profile(m, n), flush=True)
