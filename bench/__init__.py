"""asv benchmarks of celli_scale (see bench/RESULTS.md and the README's benchmark section).

asv runs every benchmark method and parameter combination in a fresh process, so one jitted
function would be compiled again for its ``time_``, ``peakmem_`` and ``track_`` methods. A
persistent XLA compilation cache (on by default, in ``~/.cache/celli_scale/jax_bench``;
``CELLI_BENCH_JAX_CACHE=<dir>`` moves it, ``CELLI_BENCH_JAX_CACHE=`` turns it off) compiles
each program once per machine. It never changes a result, only set-up time. The settings go
into the environment too, so the scaling benchmarks' worker subprocesses share the cache.
"""

from __future__ import annotations

import os


def _enable_compilation_cache() -> None:
    where = os.environ.get("CELLI_BENCH_JAX_CACHE")
    if where == "":
        return
    where = where or os.path.expanduser("~/.cache/celli_scale/jax_bench")
    settings = {
        "jax_compilation_cache_dir": where,
        "jax_persistent_cache_min_compile_time_secs": 0.0,
        "jax_persistent_cache_min_entry_size_bytes": 0,
    }
    for key, value in settings.items():
        os.environ.setdefault(key.upper(), str(value))
    import jax

    for key, value in settings.items():
        jax.config.update(key, value)


_enable_compilation_cache()
