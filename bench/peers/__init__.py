"""Side-by-side peer comparison: our JAX models vs the reference PyTorch implementations.

The same NaCl grid (the project's shared PEERS.md: n³ atoms, spacing 2.2 Å, ±1
alternating, periodic, every site rattled by 0.05 Å) and the same hyper-parameters
(r_cut 5 Å, l_max 2, 2 layers, 32 equivariant channels, 8 Bessel functions, radial MLP
[64, 64], avg_num_neighbors 56, polynomial envelope p = 6) go through

* ours (this repository, JAX): ``celli_scale.study.presets.build_potential`` with
  ``celli_scale.study.presets.model_config`` — the configs of the scaling study and of
  ``bench/bench_models.py``;
* the peers (PyTorch): nequip-allegro's ``AllegroModel``, mace-torch's ``MACE`` and
  nequip's ``NequIPGNNModel``, randomly initialised, built through each package's own
  model builder and fed through its own data pipeline (neighbour list included), forces
  by autograd as in each package's calculator. Two peer modes: torch eager (mace-torch's
  calculator path) and, for nequip and nequip-allegro, the model compiled by AOTInductor
  as ``nequip-compile --mode aotinductor --target ase`` does (nequip's recommended
  inference path). :data:`bench.peers.spec.MAPPING` lists every hyper-parameter and the
  differences between the implementations that no setting removes.

Each timed point is one warm energy + forces evaluation, median of ``--repeats`` calls
after warm-up; graph / neighbour-list construction, parameter initialisation and
compilation (XLA, AOTInductor) are outside the timed region on every side.

The two sides need different interpreters (the peers' virtual environment has torch, not
JAX), so every point runs in a subprocess::

    .venv/bin/python -m bench.peers          # driver: all sides, writes out/peers/
    .venv/bin/python -m bench.peers.side --side ours --model allegro --grid-n 10 --dtype float32
    .venv-peers/bin/python -m bench.peers.side --side peers --model allegro --grid-n 10 \\
        --dtype float32 [--peer-mode aotinductor]

(from the repository root). A single side prints its result row as JSON (or writes it to
``--result``).

The driver

* first checks every model on every side, untimed, on a small grid in float64: energy
  finite, forces summing to ~0 and equal to −dE/dr by central finite differences on one
  atom, the same edge count on both sides, the AOTInductor model equal to the eager one;
* wraps every timed subprocess (and the AOTInductor compilation) in
  ``flock /tmp/celli_cpu.lock``: the machine is shared and timings must never overlap;
* waits for a quiet machine before each timed run and re-measures a run during which
  other processes used more than ``--max-foreign`` cores (the lock keeps other timed
  runs away, not untimed work; with 2 cores, thread pools that spin at barriers slow
  down several-fold when one core is taken);
* interleaves the sides point by point, so that drift in the machine's speed affects
  all of them;
* watches the resident memory of each subprocess, stops it at ``--mem-fraction`` of the
  available memory (status "out of memory"), and skips a point whose memory, scaled
  from the smaller size, would not fit.

Modules, one concern each: :mod:`~bench.peers.spec` (system, matched hyper-parameters,
points, mapping to each peer's keys), :mod:`~bench.peers.ours` (our side, JAX),
:mod:`~bench.peers.torch_side` (the peers' side, PyTorch), :mod:`~bench.peers.measure`
(timings with machine-busy accounting, finite-difference check, force statistics),
:mod:`~bench.peers.side` (one side, one point: the subprocess body),
:mod:`~bench.peers.driver` (subprocesses, quiet machine, re-measuring, command line) and
:mod:`~bench.peers.report` (``peers.md``).

This package is in ``bench/`` but is not an asv benchmark: it imports nothing heavy at
import time (JAX, torch only inside functions) and defines no
``time_``/``track_``/``mem_``/``peakmem_`` names (asv imports every module in ``bench/``
to discover benchmarks).
"""
