"""asv benchmarks of celli_scale (see bench/RESULTS.md and the README's benchmark section).

asv runs every benchmark method and parameter combination in a fresh process, so one jitted
function would be compiled again for its ``time_``, ``peakmem_`` and ``track_`` methods. A
persistent XLA compilation cache (on by default, in ``~/.cache/celli_scale/jax_bench``;
``CELLI_BENCH_JAX_CACHE=<dir>`` moves it, ``CELLI_BENCH_JAX_CACHE=`` turns it off) compiles
each program once per machine. It never changes a result, only set-up time.
:func:`bench._common.enable_compilation_cache` turns it on when a benchmark module is
imported; this package itself imports nothing (asv imports it to discover benchmarks).
"""
