"""``celli-scale run STRUCTURE --model DIR``: one structure through a saved potential over a
spatial domain decomposition (:class:`celli_scale.distributed.sharded.ShardedPotential`).

Reads one frame (``--frame``, default 0: the first; negative counts from the end) of any
file :func:`celli_scale.io.read` reads, loads the potential directory written by
:meth:`celli_scale.Potential.save`, cuts space over ``--devices`` devices (or a fixed
``--mesh a,b,c``) with ``--chunks`` sub-bricks per device, and prints energy (eV), energy per
atom, the largest force (eV/Å), the stress (eV/Å³ and GPa, ASE's sign convention) when the
cell is periodic on every axis, the timings (decomposition, first call including the
compilation, a second warm call) and the decomposition's statistics. ``--out FILE`` writes
the structure with the results (extended XYZ for ``.xyz``: ``energy`` and ``stress`` in the
comment line, ``forces`` as a column, as ASE writes them). ``--md STEPS`` then runs NVE
molecular dynamics over the same decomposition (:class:`celli_scale.md.MD` on the
``ShardedPotential``; ``--dt``, ``--temperature`` for the initial velocities, seed 0;
``--trajectory FILE`` for the frames) and reports the energies, the final temperature, the
drift and the time per step.

Devices: on CPU, JAX sees one device unless ``XLA_FLAGS`` holds
``--xla_force_host_platform_device_count``; the command sets that flag itself (replacing a
smaller count already there) before JAX starts its backend, so ``--devices 8`` works on a laptop.
The flag only concerns JAX's CPU backend: on a GPU (or another platform) the devices present
are used, and too few is an error. When JAX's backend already started with too few CPU
devices (something initialised it before the command ran), a ``celli-scale`` process
re-executes itself with the flag set; called in-process from other code it is an error.

Several processes (``jax.distributed``: a launcher's ``CELLI_SCALE_DISTRIBUTED``, SLURM;
see :mod:`celli_scale.distributed.multihost`): every process runs the same command; the
command joins the run before JAX's backend starts, ``--devices``/``--mesh`` count the
devices of all processes (each CPU process gets its share of host devices), the bricks
are spread over the processes' devices, and only process 0 prints and writes ``--out``.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from celli_scale.distributed import ray_launcher

log = logging.getLogger(__name__)

#: Set in the environment of a re-executed process, so it never re-executes again.
REEXEC_ENV = "CELLI_SCALE_RUN_REEXEC"
_COUNT_FLAG = "--xla_force_host_platform_device_count"


def add_parser(sub) -> None:
    """Register ``run STRUCTURE --model DIR [...]`` on an argparse sub-parser set."""
    p = sub.add_parser(
        "run",
        help="evaluate a saved potential on a structure over a domain decomposition",
        description="Energy, forces and stress of one structure with a saved potential "
        "(Allegro, NequIP, MACE), space cut over several devices (on CPU the command makes "
        "JAX show --devices host devices). Prints the results, timings and the "
        "decomposition's statistics.",
    )
    p.add_argument("structure", help="structure file (.xyz/.extxyz, input.data, .npz, any ASE)")
    p.add_argument("--model", required=True, help="directory written by Potential.save")
    p.add_argument(
        "--devices", type=int, default=None, help="devices to cut space over (default 1)"
    )
    p.add_argument(
        "--mesh",
        default=None,
        metavar="A[,B[,C]]",
        help="bricks per cell axis, e.g. 2,2,2 (default: chosen for --devices); "
        "implies --devices A*B*C",
    )
    p.add_argument("--chunks", type=int, default=1, help="sub-bricks per device (default 1)")
    p.add_argument(
        "--skin", type=float, default=0.5, help="halo and pair-list skin, Å (default 0.5)"
    )
    p.add_argument(
        "--frame", type=int, default=0, help="frame index, negative from the end (default 0)"
    )
    p.add_argument(
        "--format",
        choices=("extxyz", "runner", "npz", "ase"),
        default=None,
        help="structure file format (default: from the file name)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="write the structure with energy, forces (and stress) here "
        "(.xyz: extended XYZ; .npz, input.data also work)",
    )
    p.add_argument(
        "--stress",
        action="store_true",
        help="require the stress: an error unless the cell is periodic on every axis "
        "(without it the stress is still reported whenever it exists)",
    )
    g = p.add_argument_group("molecular dynamics over the same decomposition (NVE, jax-md)")
    g.add_argument(
        "--md", type=int, default=0, metavar="STEPS", help="then run STEPS MD steps (default 0)"
    )
    g.add_argument("--dt", type=float, default=1.0, help="MD time step, fs (default 1)")
    g.add_argument(
        "--temperature",
        type=float,
        default=300.0,
        help="initial Maxwell-Boltzmann velocities, K (default 300; seed 0)",
    )
    g.add_argument("--trajectory", default=None, help="MD frames to this extended-XYZ file")
    # the processes of the run as Ray workers (--devices counts all of theirs)
    ray_launcher.add_cluster_arguments(p)


def parse_mesh(text: str | None, devices: int | None) -> tuple[tuple[int, ...] | None, int]:
    """``--mesh`` and ``--devices`` as (mesh shape or None, number of devices).

    Raises:
      ValueError: the mesh is not 1 to 3 positive integers separated by commas, its
        product differs from ``devices``, or ``devices`` is not positive.
    """
    if devices is not None and devices < 1:
        raise ValueError(f"--devices must be a positive integer, got {devices}")
    if text is None:
        return None, 1 if devices is None else int(devices)
    parts = [p.strip() for p in text.replace("x", ",").split(",")]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not 1 <= len(shape) <= 3 or min(shape) < 1:
        raise ValueError(f"--mesh must be 1 to 3 positive integers like 2,2,2, got {text!r}")
    n = int(np.prod(shape))
    if devices is not None and devices != n:
        raise ValueError(
            f"--mesh {text} has {n} bricks but --devices is {devices}; give one of them, "
            "or make them agree"
        )
    return shape, n


def with_device_count(flags: str, n: int) -> str:
    """``flags`` (an ``XLA_FLAGS`` value) asking for at least ``n`` host devices: a count
    already there of ``n`` or more is kept, a smaller or malformed one replaced, the other
    flags kept."""
    found = re.findall(rf"{_COUNT_FLAG}=(\S*)", flags)
    if found and found[-1].isdigit() and int(found[-1]) >= n:
        return flags
    kept = re.sub(rf"{_COUNT_FLAG}=\S*", "", flags).split()
    return " ".join([*kept, f"{_COUNT_FLAG}={n}"])


def _launched_as_command() -> bool:
    """Whether this process is the ``celli-scale`` command (console script or
    ``python -m celli_scale.cli``) running ``run``: only then may it re-execute itself."""
    name = Path(sys.argv[0]).name if sys.argv else ""
    return name in ("celli-scale", "cli.py") and "run" in sys.argv[1:]


def ensure_devices(n: int, processes: int = 1) -> list[Any]:
    """Make JAX show at least ``n`` devices and return the first ``n``.

    Before JAX's backend starts, sets the host device count in ``XLA_FLAGS`` (CPU only;
    other platforms ignore it). If the backend already runs on CPU with fewer devices,
    a single ``celli-scale`` process re-executes itself with the flag (never returns);
    otherwise raises ValueError.

    With ``processes > 1`` the process joins its multi-process run
    (:func:`celli_scale.distributed.multihost.initialize`) after setting the flag, ``n``
    counts the devices of all processes (``jax.devices()``, ordered by process) and each
    CPU process asks for ``ceil(n / processes)`` of them.
    """
    import jax
    from jax._src import xla_bridge

    local = -(-int(n) // max(int(processes), 1))
    started = xla_bridge.backends_are_initialized()
    if not started and local > 1:
        os.environ["XLA_FLAGS"] = with_device_count(os.environ.get("XLA_FLAGS", ""), local)
    if processes > 1:
        from celli_scale.distributed import multihost

        multihost.initialize()  # before the backend starts (gloo collectives, bindings)
    have = jax.devices()
    if len(have) >= n:
        return have[:n]
    platform = have[0].platform
    if processes > 1:
        raise ValueError(
            f"{n} devices asked for, but the {processes} processes of this run have "
            f"{len(have)} ({platform}) together"
        )
    if platform == "cpu" and started:
        if _launched_as_command() and not os.environ.get(REEXEC_ENV):
            env = dict(os.environ, **{REEXEC_ENV: "1"})
            env["XLA_FLAGS"] = with_device_count(env.get("XLA_FLAGS", ""), n)
            log.info("JAX already started with %d CPU devices; re-executing", len(have))
            sys.stdout.flush()
            sys.stderr.flush()
            argv = [sys.executable, "-m", "celli_scale.cli", *sys.argv[1:]]
            os.execve(sys.executable, argv, env)
        raise ValueError(
            f"{n} devices asked for, but JAX already started with {len(have)} CPU "
            f"device(s) in this process; set XLA_FLAGS={_COUNT_FLAG}={n} before JAX "
            "starts, or run `celli-scale run` as its own process"
        )
    raise ValueError(f"{n} devices asked for, but JAX sees {len(have)} ({platform})")


def _has_volume(system: Any) -> bool:
    if system.cell is None or not all(system.pbc):
        return False
    return abs(float(np.linalg.det(np.asarray(system.cell, dtype=float)))) > 0


def _timed(fn, *args):
    import jax

    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - t0


def report_lines(out: Any, n_atoms: int, stress: np.ndarray | None) -> list[str]:
    """The results as lines for humans (eV, eV/Å, eV/Å³ and GPa)."""
    from ase.units import GPa

    e = float(out.energy)
    f = np.asarray(out.forces, dtype=float)
    fmax = float(np.max(np.linalg.norm(f, axis=1), initial=0.0))
    lines = [
        f"atoms: {n_atoms}",
        f"energy: {e:.10f} eV ({e / max(n_atoms, 1):.10f} eV/atom)",
        f"max |F|: {fmax:.6f} eV/Å",
    ]
    if stress is None:
        lines.append("stress: none (the cell is not periodic on every axis)")
    else:
        lines.append("stress (eV/Å³, rows xyz; GPa in brackets, ASE's sign):")
        lines.extend(
            "  "
            + " ".join(f"{v: .8e}" for v in row)
            + "   ["
            + " ".join(f"{v / GPa: .5f}" for v in row)
            + "]"
            for row in stress
        )
        p = -np.trace(stress) / 3.0
        lines.append(f"pressure: {p:.8e} eV/Å³ ({p / GPa:.5f} GPa)")
    charges = getattr(out, "charges", None)
    if charges is not None:
        q = np.asarray(charges, dtype=float)
        lines.append(
            f"charges (e): total {q.sum():.10f}, min {q.min(initial=0.0):.6f}, "
            f"max {q.max(initial=0.0):.6f}; electrostatic energy {float(out.elec_energy):.10f} eV"
        )
    return lines


def main(args: argparse.Namespace) -> int:
    """Run ``celli-scale run``: see the module docstring. Returns 0."""
    if args.chunks < 1:
        raise ValueError(f"--chunks must be a positive integer, got {args.chunks}")
    if args.md < 0:
        raise ValueError(f"--md must be a number of steps >= 0, got {args.md}")
    if not (np.isfinite(args.dt) and args.dt > 0):
        raise ValueError(f"--dt must be a finite number of fs > 0, got {args.dt}")
    if not (np.isfinite(args.temperature) and args.temperature >= 0):
        raise ValueError(f"--temperature must be a finite number of K >= 0, got {args.temperature}")
    if not (np.isfinite(args.skin) and args.skin >= 0):
        raise ValueError(f"--skin must be a finite number of Å >= 0, got {args.skin}")
    mesh_shape, n_devices = parse_mesh(args.mesh, args.devices)
    model_dir = Path(args.model)
    if not model_dir.is_dir():
        raise ValueError(f"{model_dir}: no such model directory")
    structure = Path(args.structure)
    if not structure.is_file():
        raise ValueError(f"{structure}: no such structure file")
    from celli_scale.distributed import multihost, ray_launcher

    ray_opts = ray_launcher.cluster_options(args)
    if ray_opts is not None:
        return _main_on_ray(args, n_devices, ray_opts)
    placement = multihost.resolve()  # several processes: each runs this same command
    ensure_devices(n_devices, placement.num_processes)  # before anything starts JAX's backend
    lines = _evaluate(args, structure, model_dir, mesh_shape, n_devices, placement)
    if lines:
        print("\n".join(lines))
    return 0


def _main_on_ray(args: argparse.Namespace, n_devices: int, ray_opts: dict[str, Any]) -> int:
    """``celli-scale run --ray-address``: the evaluation on ``--num-workers`` Ray workers
    (one ``jax.distributed`` run, ``ceil(devices / workers)`` devices each); worker 0's
    report is printed here."""
    from celli_scale.distributed import ray_launcher

    opts = {k: getattr(args, k) for k in RAY_TASK_ARGS}
    for k in ("structure", "model", "out", "trajectory"):  # the workers' cwd is not ours
        if opts[k] is not None:
            opts[k] = str(Path(opts[k]).absolute())
    workers = ray_opts["num_workers"]
    res = ray_launcher.run_on_ray(
        "celli_scale.run:ray_task",
        opts,
        devices_per_worker=-(-n_devices // workers),
        **ray_opts,
    )
    print("\n".join(res.results[0]))
    print(f"ray: {workers} worker(s), start-up {res.startup_s:.1f} s, {res.seconds:.1f} s in all")
    return 0


#: The ``run`` options a Ray worker needs.
RAY_TASK_ARGS = (
    "structure", "model", "devices", "mesh", "chunks", "skin", "frame", "format", "out", "stress",
    "md", "dt", "temperature", "trajectory",
)  # fmt: skip


def ray_task(opts: dict[str, Any]) -> list[str]:
    """A Ray worker's body (the run joined by the launcher): the evaluation of ``opts``
    (:data:`RAY_TASK_ARGS`); returns the report's lines (process 0; others: none)."""
    from celli_scale.distributed import multihost

    args = argparse.Namespace(**opts)
    mesh_shape, n_devices = parse_mesh(args.mesh, args.devices)
    placement = multihost.initialize()  # joined already: the launcher's run
    ensure_devices(n_devices, placement.num_processes)
    return _evaluate(args, Path(args.structure), Path(args.model), mesh_shape, n_devices, placement)


def _evaluate(
    args: argparse.Namespace,
    structure: Path,
    model_dir: Path,
    mesh_shape: tuple[int, ...] | None,
    n_devices: int,
    placement: Any,
) -> list[str]:
    """Load, decompose, evaluate (first and warm call); process 0 writes ``--out`` and
    returns the report's lines, other processes return none."""
    from celli_scale.distributed import multihost

    leader = multihost.quiet_unless_leader()  # process 0 prints and writes
    from celli_scale import io
    from celli_scale.distributed.sharded import ShardedPotential
    from celli_scale.potential import Potential

    frames = io.read(structure, index=args.frame, format=args.format)
    if len(frames) != 1:
        raise ValueError(f"{structure}: frame {args.frame} gives {len(frames)} frames")
    system = frames[0].system
    if args.stress and not _has_volume(system):
        raise ValueError(f"{structure}: --stress needs a cell periodic on every axis with a volume")
    pot = Potential.load(model_dir)
    kw: dict[str, Any] = (
        {"mesh_shape": mesh_shape} if mesh_shape is not None else {"devices": n_devices}
    )
    sp = ShardedPotential(pot, chunks=args.chunks, skin=args.skin, progress=leader, **kw)

    t0 = time.perf_counter()
    sp.decompose(system)
    t_decomp = time.perf_counter() - t0
    out, t_first = _timed(sp, system)
    out, t_warm = _timed(sp, system)
    stress = None if out.stress is None else np.asarray(out.stress, dtype=float)
    # every process steps the MD (each force call is collective); process 0 reports
    md_lines = _md_lines(args, sp, system, leader) if args.md else []
    if not leader:
        return []

    lines = [f"structure: {structure} (frame {args.frame}); model: {model_dir} ({pot.config.name})"]
    if placement.multi:
        lines.append(
            f"processes: {placement.num_processes} (jax.distributed), devices: {n_devices}"
        )
    lines += report_lines(out, system.n_atoms, stress)
    lines.append(
        f"time: decomposition {t_decomp:.3f} s, first call (incl. compilation) "
        f"{t_first:.3f} s, warm call {t_warm:.3f} s"
    )
    lines.append(sp.stats.summary())
    if args.out is not None:
        result = io.Frame(
            system,
            energy=float(out.energy),
            forces=np.asarray(out.forces, dtype=float),
            charges=None if out.charges is None else np.asarray(out.charges, dtype=float),
            stress=stress,
        )
        io.write(args.out, result)
        lines.append(f"wrote {args.out}")
    return lines + md_lines


def _md_lines(args: argparse.Namespace, sp: Any, system: Any, leader: bool) -> list[str]:
    """``--md``: NVE from ``--temperature`` over the decomposition (every process steps
    the same replicated state; the forces come from all of them); process 0 writes
    ``--trajectory``. The report's MD lines."""
    from ase.units import kB

    from celli_scale.md import MD, MDConfig

    cfg = MDConfig(ensemble="nve", dt=args.dt, temperature=args.temperature, every=min(args.md, 10))
    traj = args.trajectory if leader else None
    res = MD(sp, system, cfg).run(args.md, trajectory=traj, progress=leader)
    n = system.n_atoms
    kelvin = 2.0 * float(res.kinetic[-1]) / (3.0 * n * kB)
    drift = res.drift
    lines = [
        f"md: {res.energy.size} steps NVE, dt {args.dt:g} fs, from {args.temperature:g} K: "
        f"E_pot {float(res.energy[0]):.8f} -> {float(res.energy[-1]):.8f} eV, "
        f"T {kelvin:.1f} K at the end, drift "
        + ("-" if drift is None else f"{drift:.3g} eV/atom/ps")
        + f", {res.wall / max(res.energy.size, 1):.4f} s/step"
    ]
    if traj is not None:
        lines.append(f"wrote {traj}")
    return lines
