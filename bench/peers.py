"""Side-by-side peer comparison: our JAX models vs the reference PyTorch implementations.

The same NaCl grid (``bench/PEERS.md``: n³ atoms, spacing 2.2 Å, ±1 alternating,
periodic, every site rattled by 0.05 Å) and the same hyper-parameters (r_cut 5 Å,
l_max 2, 2 layers, 32 equivariant channels, 8 Bessel functions, radial MLP [64, 64],
avg_num_neighbors 56, polynomial envelope p = 6) go through

* ours (this repository, JAX): ``celli_scale.scaling.build_potential`` with
  ``celli_scale.scaling.model_config`` — the configs of ``bench/bench_models.py``;
* the peers (PyTorch): nequip-allegro's ``AllegroModel``, mace-torch's ``MACE`` and
  nequip's ``NequIPGNNModel``, randomly initialised, built through each package's own
  model builder and fed through its own data pipeline (neighbour list included), forces
  by autograd as in each package's calculator. Two peer modes: torch eager (mace-torch's
  calculator path) and, for nequip and nequip-allegro, the model compiled by AOTInductor
  as ``nequip-compile --mode aotinductor --target ase`` does (nequip's recommended
  inference path). :data:`MAPPING` lists every hyper-parameter and the differences
  between the implementations that no setting removes.

Each timed point is one warm energy + forces evaluation, median of ``--repeats`` calls
after warm-up; graph / neighbour-list construction, parameter initialisation and
compilation (XLA, AOTInductor) are outside the timed region on every side.

The two sides need different interpreters (the peers' virtual environment has torch, not
JAX), so every point runs in a subprocess::

    .venv/bin/python -m bench.peers          # driver: all sides, writes out/peers/
    .venv/bin/python bench/peers.py --side ours --model allegro --grid-n 10 --dtype float32
    /work/peers-venv/bin/python bench/peers.py --side peers --model allegro --grid-n 10 \
        --dtype float32 [--peer-mode aotinductor]

(The peers' interpreter must run the file, not ``-m bench.peers``: ``bench/__init__.py``
imports JAX.) A single side prints its result row as JSON (or writes it to ``--result``).

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

This module is in ``bench/`` but is not an asv benchmark: it imports nothing heavy at
module level and defines no ``time_``/``track_``/``peakmem_`` names (asv imports every
module in ``bench/`` to discover benchmarks).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

#: Interpreters of the two sides (flags and environment variables override them): ours
#: defaults to the one running the driver, the peers' to ``.venv-peers`` in the repository
#: root (README: how to make it).
DEFAULT_OURS_PYTHON = os.environ.get("CELLI_PEERS_OURS_PYTHON", sys.executable)
DEFAULT_PEERS_PYTHON = os.environ.get(
    "CELLI_PEERS_PEERS_PYTHON",
    str(Path(__file__).resolve().parent.parent / ".venv-peers" / "bin" / "python"),
)
#: Lock shared by everyone who times things on this machine.
DEFAULT_LOCK = os.environ.get("CELLI_CPU_LOCK", "/tmp/celli_cpu.lock")

#: Points of the comparison: (model, grid_n, dtype).
DEFAULT_POINTS: tuple[tuple[str, int, str], ...] = tuple(
    (model, n, dt)
    for model in ("allegro", "mace", "nequip")
    for n, dt in ((10, "float32"), (10, "float64"), (16, "float32"))
)
#: Models whose peer has an AOTInductor inference path (``nequip-compile``).
AOTI_MODELS = ("allegro", "nequip")
#: Peer library of each model.
PEER_PACKAGE = {"allegro": "nequip-allegro", "mace": "mace-torch", "nequip": "nequip"}

#: Shared geometry and hyper-parameters (they must equal celli_scale.scaling's; the ours
#: side asserts that they do).
SPACING = 2.2
RATTLE = 0.05
SEED = 0
R_CUT = 5.0
L_MAX = 2
N_LAYERS = 2
CHANNELS = 32
N_BESSEL = 8
RADIAL_MLP = (64, 64)
AVG_NUM_NEIGHBORS = 56.0
ENVELOPE_P = 6
#: Model-specific widths (ours: AllegroConfig, MACEConfig, NequIPConfig defaults).
ALLEGRO_LATENT = 64
ALLEGRO_LATENT_MLP = (64,)
ALLEGRO_EDGE_ENG_MLP = (32,)
MACE_CORRELATION = 3
READOUT_HIDDEN = 16  # MACE MLP_irreps 16x0e; NequIP readout hidden layer

#: Hyper-parameter mapping and the differences that cannot be removed, per model
#: (written into peers.md; see the module docstring).
MAPPING: dict[str, list[tuple[str, str, str]]] = {
    "allegro": [
        ("r_cut 5", "r_max 5.0", ""),
        (
            "n_radial 8, envelope_p 6",
            "TwoBodyBesselScalarEmbed(num_bessels=8, bessel_trainable=False, "
            "polynomial_cutoff_p=6)",
            "",
        ),
        (
            "l_max 2, parity True (features 0e+1o+2e, Allegro's former 'o3_restricted')",
            "l_max 2, parity False (tensor track = irreps of the SH: 0e+1o+2e)",
            "none with 2 layers: the peer's parity=True would add 1e/2o tensor features, "
            "but it prunes them (no path to the scalar output) and builds the same network",
        ),
        ("channels 32", "num_tensor_features 32", ""),
        ("n_layers 2", "num_layers 2", ""),
        (
            "latent_dim 64, latent_mlp [64]",
            "num_scalar_features 64, allegro_mlp_hidden_layers_depth 1, width 64",
            "",
        ),
        (
            "two-body MLP [64, 64] on [emb(Z_i) (16), emb(Z_j) (16), Bessel (8)]",
            "Bessel -> Linear(64) x product type embedding (32 + 32), then "
            "scalar_embed_mlp depth 1, width 64",
            "the peer embeds species multiplicatively (ProductTypeEmbedding), ours "
            "concatenates a 16-wide embedding; both have two 64-wide hidden layers",
        ),
        (
            "env_embed_mlp [] (a linear map of x_ij in each layer)",
            "env weights sliced from the previous latent MLP's output (first layer: a "
            "linear projection of the two-body latent)",
            "same linear map, fused into the latent MLP by the peer",
        ),
        (
            "latent update x <- (x + dx)/sqrt(2) (residual, Allegro paper)",
            "densenet: each latent MLP reads all previous scalar latents",
            "the peer's latent MLP inputs are 64+32, 128+32 wide and its readout reads "
            "3 x 64; ours 64+96 (3 scalar paths x 32) and 64",
        ),
        ("edge_eng_mlp [32]", "readout_mlp_hidden_layers_depth 1, width 32", ""),
        ("avg_num_neighbors 56", "avg_num_neighbors 56", ""),
        (
            "tensor product: every CG path with l_out <= 2, then a dense path x channel "
            "mixing per l_out ((paths * 32, 32) matrices: 11264 weights)",
            "tp_path_channel_coupling True (default): one weight per (path, channel), "
            "channels never mixed (448 weights)",
            "ours does ~35 x 32 x 32 extra multiply-adds per edge in the first layer (the "
            "last computes scalars only); most of the parameter difference",
        ),
        ("MLPs with biases", "no biases (bias=False everywhere)", "~600 parameters"),
        (
            "dtype float32: geometry, basis and forces in float32",
            "model_dtype float32: edge vectors, spherical harmonics and Bessel basis in "
            "float64 (nequip's global dtype), cast to float32; forces accumulate into "
            "float64 positions",
            "the peer's float32 is partly float64 (its force sums are ~1e-18, ours ~1e-8)",
        ),
    ],
    "mace": [
        ("r_cut 5", "r_max 5.0", ""),
        ("n_radial 8, envelope_p 6", "num_bessel 8, num_polynomial_cutoff 6", ""),
        ("l_max 2 (SH and A basis)", "max_ell 2", ""),
        ("channels 32, hidden_l_max 1", "hidden_irreps 32x0e+32x1o", ""),
        ("n_layers 2", "num_interactions 2", ""),
        ("correlation 3", "correlation 3", ""),
        ("radial_mlp [64, 64]", "radial_MLP [64, 64]", "mace-torch's default is [64, 64, 64]"),
        ("readout_hidden 16", "MLP_irreps 16x0e, gate silu", ""),
        ("avg_num_neighbors 56", "avg_num_neighbors 56", ""),
        (
            "first layer RealAgnostic, then RealAgnosticResidual",
            "interaction_cls_first RealAgnosticInteractionBlock, interaction_cls "
            "RealAgnosticResidualInteractionBlock",
            "",
        ),
        (
            "symmetric contraction on the reduced (linearly independent) basis: "
            "ν = 1, 2, 3 couplings 1, 3, 5 (0e) and 1, 2, 5 (1o)",
            "use_reduced_cg=True needs cuequivariance (CUDA); without it mace-torch uses "
            "its original over-complete basis: 1, 3, 11 (0e) and 1, 4, 21 (1o)",
            "same function space; 1920 redundant weights and larger U-tensors on the peer",
        ),
        ("radial MLP with biases", "radial MLP without biases", "256 parameters"),
        (
            "per-species scale/shift (1, 0)",
            "atomic_energies 0 (plain MACE, no ScaleShiftMACE)",
            "4 parameters on our side",
        ),
    ],
    "nequip": [
        ("r_cut 5", "r_max 5.0", ""),
        ("n_radial 8, envelope_p 6", "num_bessels 8, polynomial_cutoff_p 6", ""),
        (
            "l_max 2, parity True, feature_parities 'sh' (0e+1o+2e)",
            "l_max 2, parity False (0e+1o+2e)",
            "the peer's parity=True (its default) doubles the irreps",
        ),
        ("channels 32", "num_features 32, type_embed_num_features 32", ""),
        ("n_layers 2 (last layer scalars only)", "num_layers 2 (last layer scalars only)", ""),
        ("radial_mlp [64, 64]", "radial_mlp_depth 2, radial_mlp_width 64", ""),
        ("readout_hidden 16", "readout_mlp_hidden_layers_depth 1, width 16", ""),
        ("avg_num_neighbors 56", "avg_num_neighbors 56", ""),
        (
            "resnet True (never applies with 2 layers: irreps differ)",
            "convnet_resnet False (default)",
            "",
        ),
        (
            "self-connection in both layers: a per-species linear map of h "
            "(2 x 32 x 96 and 2 x 32 x 32 weights)",
            "no self-connection in layer 0; layer 1: tensor product of h with the "
            "32-wide type embedding (32 x 32 x 32 weights)",
            "the whole parameter difference; per-atom work, small next to the edges",
        ),
        ("MLPs with biases", "no biases", "~300 parameters"),
        (
            "dtype float32: geometry, basis and forces in float32",
            "model_dtype float32: edge vectors, spherical harmonics and Bessel basis in "
            "float64 (nequip's global dtype), cast to float32; forces accumulate into "
            "float64 positions",
            "the peer's float32 is partly float64 (its force sums are ~1e-18, ours ~1e-8)",
        ),
    ],
}


# --------------------------------------------------------------------------------------
# the system (plain NumPy, so the peers' environment can build it too)
# --------------------------------------------------------------------------------------
def nacl_arrays(grid_n: int, spacing: float = SPACING, rattle: float = RATTLE, seed: int = SEED):
    """``(positions (N, 3), atomic numbers (N,), cell (3, 3))`` of the PEERS.md NaCl grid.

    Same construction as ``celli_scale.demo.nacl_grid`` (the ours side checks that the
    arrays are bit-identical to its System's).
    """
    import numpy as np

    g = np.stack(np.meshgrid(*[np.arange(grid_n)] * 3, indexing="ij"), -1).reshape(-1, 3)
    pos = g * spacing
    if rattle:
        pos = pos + np.random.default_rng(seed).normal(0, rattle, pos.shape)
    z = np.where(g.sum(1) % 2 == 0, 11, 17)
    return pos, z, np.eye(3) * spacing * grid_n


def load_system(npz: str | None, grid_n: int):
    """The system's arrays from an ``.npz`` written by the ours side, else regenerated."""
    import numpy as np

    if npz and Path(npz).exists():
        d = np.load(npz)
        if int(d["grid_n"]) != grid_n:
            raise ValueError(f"{npz} holds grid_n {int(d['grid_n'])}, expected {grid_n}")
        return d["positions"], d["species"], d["cell"], "npz"
    pos, z, cell = nacl_arrays(grid_n)
    return pos, z, cell, "numpy"


# --------------------------------------------------------------------------------------
# shared measurement helpers
# --------------------------------------------------------------------------------------
def _busy_cpu_seconds() -> float:
    """CPU seconds all processes on the machine have used since boot (``/proc/stat``)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...: everything but idle and iowait
    return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _time_runs(step, repeats: int, warmup: int) -> dict[str, Any]:
    """Wall-clock seconds of ``repeats`` calls of ``step()`` (which blocks until done),
    after ``warmup`` untimed calls.

    Also records how busy the machine was during the timed calls: ``foreign_cpu_cores``
    is the CPU time of *other* processes divided by the wall time. The lock keeps other
    timed runs away, but not untimed work (tests, builds); with 2 cores and OpenMP /
    Eigen thread pools spinning at barriers, even one busy foreign core can slow a run
    several-fold, so the driver re-measures a point whose value is high.
    """
    for _ in range(warmup):
        step()
    _reset_peak_rss()
    busy0, own0, wall0, times = _busy_cpu_seconds(), _own_cpu_seconds(), time.perf_counter(), []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    wall = time.perf_counter() - wall0
    own = _own_cpu_seconds() - own0
    foreign = max(0.0, _busy_cpu_seconds() - busy0 - own)
    return {
        "times": times,
        "run_peak_rss_mb": _vm_hwm_mb(),
        "cpu_s_per_run": own / max(repeats, 1),
        "cpu_per_wall": own / max(wall, 1e-12),
        "foreign_cpu_cores": foreign / max(wall, 1e-12),
    }


def _reset_peak_rss() -> None:
    """Reset this process's peak resident set size to its current size (Linux), so that
    the peak after the timed calls excludes compilation and graph building."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _vm_hwm_mb() -> float | None:
    """Peak resident set size (MiB) since the last :func:`_reset_peak_rss` (Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _force_stats(energy: float, forces) -> dict[str, Any]:
    """Energy / force sanity numbers recorded with every point."""
    import numpy as np

    f = np.asarray(forces, dtype=np.float64)
    fmax = float(np.max(np.abs(f))) if f.size else 0.0
    fsum = float(np.max(np.abs(f.sum(axis=0))))
    return {
        "energy": float(energy),
        "energy_finite": bool(np.isfinite(energy)),
        "forces_finite": bool(np.all(np.isfinite(f))),
        "max_abs_force": fmax,
        "max_abs_force_sum": fsum,
        # |Σ F| relative to N·max|F|: ~1e-7 in float32, ~1e-15 in float64 when correct
        "force_sum_rel": fsum / max(len(f) * fmax, 1e-300),
    }


def _fd_check(energy_at, forces, atom: int = 0, h: float = 1e-4) -> dict[str, Any]:
    """Compare ``forces[atom]`` with −dE/dr by central differences (``energy_at(atom, k,
    d)`` is the energy with coordinate ``k`` of ``atom`` displaced by ``d`` Å)."""
    import numpy as np

    fd = np.array([-(energy_at(atom, k, h) - energy_at(atom, k, -h)) / (2 * h) for k in range(3)])
    f = np.asarray(forces, dtype=np.float64)[atom]
    err = float(np.max(np.abs(fd - f)))
    return {
        "fd_atom": atom,
        "fd_h": h,
        "fd_forces": fd.tolist(),
        "autograd_forces": f.tolist(),
        "fd_max_abs_err": err,
        "fd_ok": bool(err <= 1e-5 + 1e-4 * float(np.max(np.abs(f)))),
    }


# --------------------------------------------------------------------------------------
# ours (JAX)
# --------------------------------------------------------------------------------------
def _check_ours_config(mc) -> None:
    """Raise if our model's config differs from the constants the peers are built with
    (the peers' environment cannot import celli_scale, so they are restated here)."""
    want: dict[str, Any] = {
        "r_cut": R_CUT,
        "l_max": L_MAX,
        "channels": CHANNELS,
        "n_layers": N_LAYERS,
        "n_radial": N_BESSEL,
        "radial_mlp": RADIAL_MLP,
        "avg_num_neighbors": AVG_NUM_NEIGHBORS,
        "envelope_p": ENVELOPE_P,
        "parity": True,
    }
    if mc.name == "allegro":
        want.update(
            latent_dim=ALLEGRO_LATENT,
            latent_mlp=ALLEGRO_LATENT_MLP,
            edge_eng_mlp=ALLEGRO_EDGE_ENG_MLP,
            env_embed_mlp=(),
        )
    elif mc.name == "mace":
        want.update(correlation=MACE_CORRELATION, hidden_l_max=1, readout_hidden=READOUT_HIDDEN)
    elif mc.name == "nequip":
        want.update(feature_parities="sh", readout_hidden=READOUT_HIDDEN)
    have = {k: getattr(mc, k) for k in want}
    have = {k: tuple(v) if isinstance(v, list) else v for k, v in have.items()}
    diff = {k: (have[k], v) for k, v in want.items() if have[k] != v}
    if diff:
        raise RuntimeError(f"our {mc.name} config differs from the peers' (ours, peers): {diff}")


def run_ours(args: argparse.Namespace) -> dict[str, Any]:
    """Build, check and time one of our models (interpreter: the repository's venv)."""
    import jax

    jax.config.update("jax_enable_x64", True)  # float64 models need it; float32 stays 32
    import numpy as np

    from celli_scale import scaling

    cfg = scaling.model_config(args.model, args.dtype)
    pot = scaling.build_potential(cfg)
    system = scaling.nacl_system(args.grid_n, rattle=RATTLE, seed=SEED)
    pos = np.asarray(system.positions, dtype=np.float64)
    z = np.asarray(system.species)
    cell = np.asarray(system.cell, dtype=np.float64)
    ref_pos, ref_z, ref_cell = nacl_arrays(args.grid_n)
    same = bool(np.array_equal(pos, ref_pos) and np.array_equal(z, ref_z))
    same = same and bool(np.array_equal(cell, ref_cell))
    if args.npz:
        Path(args.npz).parent.mkdir(parents=True, exist_ok=True)
        np.savez(args.npz, positions=pos, species=z, cell=cell, grid_n=args.grid_n)

    mc = pot.model.config
    _check_ours_config(mc)
    row: dict[str, Any] = {
        "config": mc.to_dict(),
        "n_params": int(sum(x.size for x in jax.tree_util.tree_leaves(pot.params))),
        "positions_equal_numpy_generator": same,
        "impl": f"jax.jit (XLA {jax.devices()[0].platform})",
    }
    graph = pot.graph(system)
    row["n_edges"] = int(np.asarray(graph.edge_mask).sum())
    t0 = time.perf_counter()
    compiled = pot.evaluate.lower(pot.params, graph).compile()
    row["compile_s"] = time.perf_counter() - t0
    try:
        row["compiled_mb"] = scaling.check_fits(compiled) / 2**20
    except scaling.MemoryTooLarge as e:
        row["status"] = f"skipped: out of memory ({e})"
        return row

    def step():
        return jax.block_until_ready(compiled(pot.params, graph))

    out = step()
    row.update(_force_stats(float(out[0]), out[1]))
    if args.check:

        def energy_at(atom, k, d):
            g = graph.replace(positions=graph.positions.at[atom, k].add(d))
            return float(compiled(pot.params, g)[0])

        row.update(_fd_check(energy_at, out[1]))
    if args.repeats > 0:
        row.update(_time_runs(step, args.repeats, args.warmup))
    return row


def versions_ours() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for p in ("jax", "jaxlib", "flax", "e3nn-jax", "numpy"):
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            pass
    return out


# --------------------------------------------------------------------------------------
# peers (PyTorch)
# --------------------------------------------------------------------------------------
def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float64": torch.float64}[name]


def _ase_atoms(pos, z, cell):
    import ase

    return ase.Atoms(numbers=z, positions=pos, cell=cell, pbc=True)


def build_peer_mace(dtype: str, atoms):
    """mace-torch ``MACE`` (plain, no ScaleShift) and its input batch, as
    ``mace.calculators.MACECalculator`` prepares one (``AtomicData.from_config`` + the
    package's ``DataLoader``)."""
    import numpy as np
    import torch
    from e3nn import o3
    from mace import data, modules, tools
    from mace.tools import torch_geometric

    torch.set_default_dtype(_torch_dtype(dtype))  # mace builds in the default dtype
    torch.manual_seed(SEED)
    model = modules.MACE(
        r_max=R_CUT,
        num_bessel=N_BESSEL,
        num_polynomial_cutoff=ENVELOPE_P,
        max_ell=L_MAX,
        interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
        interaction_cls_first=modules.interaction_classes["RealAgnosticInteractionBlock"],
        num_interactions=N_LAYERS,
        num_elements=2,
        hidden_irreps=o3.Irreps(f"{CHANNELS}x0e+{CHANNELS}x1o"),
        MLP_irreps=o3.Irreps(f"{READOUT_HIDDEN}x0e"),
        atomic_energies=np.zeros(2),
        avg_num_neighbors=AVG_NUM_NEIGHBORS,
        atomic_numbers=[11, 17],
        correlation=MACE_CORRELATION,
        gate=torch.nn.functional.silu,
        radial_MLP=list(RADIAL_MLP),
    ).eval()
    z_table = tools.AtomicNumberTable([11, 17])
    ad = data.AtomicData.from_config(data.config_from_atoms(atoms), z_table=z_table, cutoff=R_CUT)
    loader = torch_geometric.dataloader.DataLoader([ad], batch_size=1, shuffle=False)
    batch = next(iter(loader)).to_dict()

    def energy_forces(positions=None):
        d = dict(batch)
        if positions is not None:
            d["positions"] = positions
        out = model(d, training=False, compute_force=True)
        return out["energy"].detach().sum(), out["forces"].detach()

    return model, energy_forces, int(batch["edge_index"].shape[1]), batch["positions"], batch


def _nequip_data(atoms, type_names):
    """nequip's calculator path: ``from_ase`` + type mapper + neighbour-list transform."""
    from nequip.data.ase import from_ase
    from nequip.data.transforms import ChemicalSpeciesToAtomTypeMapper, NeighborListTransform

    d = from_ase(atoms)
    d = ChemicalSpeciesToAtomTypeMapper(
        model_type_names=type_names,
        chemical_species_to_atom_type_map={t: t for t in type_names},
    )(d)
    return NeighborListTransform(r_max=R_CUT)(d)


def build_peer_nequip_family(model_name: str, dtype: str, atoms):
    """nequip-allegro ``AllegroModel`` or nequip ``NequIPGNNModel`` (eager) and its input."""
    from nequip.data import AtomicDataDict
    from nequip.utils.global_state import set_global_state

    set_global_state()  # required by nequip's model builder (sets float64 default dtype)
    type_names = ["Na", "Cl"]
    common = dict(
        seed=SEED,
        model_dtype=dtype,
        type_names=type_names,
        r_max=R_CUT,
        avg_num_neighbors=AVG_NUM_NEIGHBORS,
    )
    if model_name == "allegro":
        from allegro.model import AllegroModel

        model = AllegroModel(
            **common,
            l_max=L_MAX,
            parity=False,  # tensor track 0e+1o+2e = our parity=True (see MAPPING)
            radial_chemical_embed={
                "_target_": "allegro.nn.TwoBodyBesselScalarEmbed",
                "num_bessels": N_BESSEL,
                "bessel_trainable": False,
                "polynomial_cutoff_p": ENVELOPE_P,
            },
            scalar_embed_mlp_hidden_layers_depth=1,
            scalar_embed_mlp_hidden_layers_width=RADIAL_MLP[-1],
            num_layers=N_LAYERS,
            num_scalar_features=ALLEGRO_LATENT,
            num_tensor_features=CHANNELS,
            allegro_mlp_hidden_layers_depth=len(ALLEGRO_LATENT_MLP),
            allegro_mlp_hidden_layers_width=ALLEGRO_LATENT_MLP[0],
            readout_mlp_hidden_layers_depth=len(ALLEGRO_EDGE_ENG_MLP),
            readout_mlp_hidden_layers_width=ALLEGRO_EDGE_ENG_MLP[0],
        )
    else:
        from nequip.model import NequIPGNNModel

        model = NequIPGNNModel(
            **common,
            num_layers=N_LAYERS,
            l_max=L_MAX,
            parity=False,  # 0e+1o+2e = our feature_parities "sh" (see MAPPING)
            num_features=CHANNELS,
            radial_mlp_depth=len(RADIAL_MLP),
            radial_mlp_width=RADIAL_MLP[0],
            readout_mlp_hidden_layers_depth=1,
            readout_mlp_hidden_layers_width=READOUT_HIDDEN,
            num_bessels=N_BESSEL,
            polynomial_cutoff_p=ENVELOPE_P,
        )
    model = model.eval()
    data = _nequip_data(atoms, type_names)
    pos_key = AtomicDataDict.POSITIONS_KEY

    def energy_forces(positions=None):
        d = dict(data)
        if positions is not None:
            d[pos_key] = positions
        out = model(d)
        return (
            out[AtomicDataDict.TOTAL_ENERGY_KEY].detach().sum(),
            out[AtomicDataDict.FORCE_KEY].detach(),
        )

    n_edges = int(data[AtomicDataDict.EDGE_INDEX_KEY].shape[1])
    return model, energy_forces, n_edges, data[pos_key], data


def aoti_energy_forces(model, data, path: Path) -> tuple[Any, dict[str, Any]]:
    """nequip's recommended inference path: the model compiled by AOTInductor, as
    ``nequip-compile --mode aotinductor --target ase --device cpu`` would (dynamic node
    and edge counts, so one file serves every size of one model and dtype), loaded with
    nequip's own loader. ``nequip-compile`` itself only reads training checkpoints or
    packages; here the same nequip functions are called on the in-memory model.

    Returns ``(energy_forces, info)``; the compiled file is cached at ``path``.
    """
    import torch
    from nequip.data import AtomicDataDict
    from nequip.model.inference_models.compiled import load_compiled_model
    from nequip.scripts._compile_utils import COMPILE_TARGET_DICT
    from nequip.scripts._workflow_utils import set_workflow_state
    from nequip.utils.aot import aot_export_model
    from nequip.utils.aoti_metadata import (
        NEQUIP_AOTI_INPUTS_KEY,
        NEQUIP_AOTI_OUTPUTS_KEY,
        serialize_aoti_keys,
    )
    from nequip.utils.global_state import get_latest_global_state

    info: dict[str, Any] = {"aoti_file": str(path), "aoti_cached": path.exists()}
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        target = COMPILE_TARGET_DICT["ase"]  # what NequIPCalculator loads
        meta = dict(model.metadata)
        meta.update(get_latest_global_state(only_metadata_related=True))
        meta = {k: str(int(v)) if isinstance(v, bool) else str(v) for k, v in meta.items()}
        meta[NEQUIP_AOTI_INPUTS_KEY] = serialize_aoti_keys(target["input"])
        meta[NEQUIP_AOTI_OUTPUTS_KEY] = serialize_aoti_keys(target["output"])
        # nequip-compile's defaults: frames static (one structure), nodes/edges in [2, inf)
        dims = {k: torch.export.Dim(f"num_{k}s", min=2) for k in ("graph", "node", "edge")}
        set_workflow_state("compile")  # as nequip-compile does while exporting
        t0 = time.perf_counter()
        aot_export_model(
            model=model,
            device="cpu",
            input_fields=target["input"],
            output_fields=target["output"],
            data=target["data_settings"](dict(data)),
            batch_map=target["batch_map_settings"](dims),
            output_path=str(path),
            inductor_configs={"aot_inductor.metadata": meta},
            seed=1,  # nequip-compile's fixed seed
        )
        set_workflow_state(None)
        info["aoti_compile_s"] = time.perf_counter() - t0
    compiled, _ = load_compiled_model(str(path), "cpu")

    def energy_forces(positions=None):
        d = dict(data)
        if positions is not None:
            d[AtomicDataDict.POSITIONS_KEY] = positions
        out = compiled(d)
        return (
            out[AtomicDataDict.TOTAL_ENERGY_KEY].detach().sum(),
            out[AtomicDataDict.FORCE_KEY].detach(),
        )

    return energy_forces, info


def run_peers(args: argparse.Namespace) -> dict[str, Any]:
    """Build, check and time one peer model (interpreter: the peers' venv)."""
    import torch

    torch.set_num_threads(args.threads)
    pos, z, cell, source = load_system(args.npz, args.grid_n)
    atoms = _ase_atoms(pos, z, cell)
    if args.model == "mace":
        model, energy_forces, n_edges, pos0, data = build_peer_mace(args.dtype, atoms)
    else:
        model, energy_forces, n_edges, pos0, data = build_peer_nequip_family(
            args.model, args.dtype, atoms
        )
    row: dict[str, Any] = {
        "n_params": int(sum(p.numel() for p in model.parameters())),
        "n_params_trainable": int(sum(p.numel() for p in model.parameters() if p.requires_grad)),
        "n_edges": n_edges,
        "system_source": source,
        "impl": f"torch eager, {torch.get_num_threads()} threads",
    }
    if args.peer_mode == "aotinductor":
        if args.model == "mace":
            raise ValueError("aotinductor is nequip's compile path; mace-torch has none")
        path = Path(args.aot_dir).resolve() / f"{args.model}_{args.dtype}.nequip.pt2"
        eager_energy_forces = energy_forces
        energy_forces, info = aoti_energy_forces(model, data, path)
        row.update(info)
        row["impl"] = f"nequip AOTInductor (CPU), {torch.get_num_threads()} threads"
        if args.check:  # the compiled model must be the eager one
            e_eager, f_eager = eager_energy_forces()
            row["aoti_minus_eager_energy"] = float(energy_forces()[0] - e_eager)
            row["aoti_minus_eager_max_abs_force"] = float(
                (energy_forces()[1] - f_eager).abs().max()
            )
    e, f = energy_forces()
    row.update(_force_stats(float(e), f.numpy()))
    if args.check:

        def energy_at(atom, k, d):
            p = pos0.detach().clone()
            p[atom, k] += d
            return float(energy_forces(p)[0])

        row.update(_fd_check(energy_at, f.numpy()))
    if args.repeats > 0:
        row.update(_time_runs(energy_forces, args.repeats, args.warmup))
    return row


def versions_peers() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for p in ("torch", "mace-torch", "nequip", "nequip-allegro", "e3nn", "numpy"):
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            pass
    return out


# --------------------------------------------------------------------------------------
# one side, one point (subprocess body)
# --------------------------------------------------------------------------------------
def run_side(args: argparse.Namespace) -> dict[str, Any]:
    """Run one point on one side; never raises (errors become the row's status)."""
    row: dict[str, Any] = {
        "side": args.side,
        "model": args.model,
        "grid_n": args.grid_n,
        "n_atoms": args.grid_n**3,
        "dtype": args.dtype,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "status": "ok",
    }
    try:
        if args.side == "ours":
            row["versions"] = versions_ours()
            row.update(run_ours(args))
        else:
            row["versions"] = versions_peers()
            row.update(run_peers(args))
    except MemoryError as e:
        row["status"] = f"out of memory ({type(e).__name__})"
    except RuntimeError as e:
        msg = str(e)
        oom = "out of memory" in msg.lower() or "can't allocate" in msg.lower()
        row["status"] = f"out of memory ({msg[:200]})" if oom else f"error: {msg[:500]}"
    except Exception as e:  # recorded, so that one broken point does not stop the study
        row["status"] = f"error: {type(e).__name__}: {str(e)[:500]}"
    if "times" in row:
        row["seconds"] = statistics.median(row["times"])
    if row["status"] == "ok" and not (row.get("energy_finite") and row.get("forces_finite")):
        row["status"] = "error: non-finite energy or forces"
    if row["status"] == "ok" and args.check and not row.get("fd_ok", False):
        row["status"] = "error: finite-difference check failed"
    if row["status"] == "ok" and abs(row.get("aoti_minus_eager_max_abs_force", 0.0)) > 1e-6:
        row["status"] = "error: AOTInductor forces differ from eager"
    row["peak_rss_mb"] = _peak_rss_mb()
    return row


# --------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------
def _tree_pids(root: int) -> list[int]:
    """``root`` and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
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


def _rss_bytes(pids: list[int]) -> int:
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            pass
    return total


def _mem_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def run_subprocess(
    python: str,
    side_args: list[str],
    *,
    lock: str | None,
    timeout_s: float,
    mem_limit_bytes: int,
    log,
) -> dict[str, Any]:
    """Run ``python bench/peers.py <side_args>`` (under ``flock lock`` when given) and
    return its result row. The timeout counts from the moment the interpreter starts
    (i.e. once the lock is held); the process tree is killed when its resident memory
    exceeds ``mem_limit_bytes``."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "row.json"
        cmd = [python, str(Path(__file__).resolve()), *side_args, "--result", str(result)]
        if lock:
            cmd = ["flock", lock, *cmd]
        log(" ".join(cmd))
        proc = subprocess.Popen(
            cmd,
            cwd=str(Path(__file__).resolve().parents[1]),
            start_new_session=True,  # its own process group: we can stop all of it
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        started = None  # when the interpreter (not just flock) is running
        peak, why = 0, None
        output: list[str] = []
        import threading

        reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
        reader.start()
        while proc.poll() is None:
            pids = _tree_pids(proc.pid)
            if started is None and (len(pids) > 1 or not lock):
                started = time.monotonic()
            rss = _rss_bytes(pids)
            peak = max(peak, rss)
            if rss > mem_limit_bytes:
                why = (
                    f"out of memory: stopped at {rss / 2**30:.1f} GiB resident "
                    f"(limit {mem_limit_bytes / 2**30:.1f} GiB)"
                )
            elif started is not None and time.monotonic() - started > timeout_s:
                why = f"skipped: timed out after {timeout_s:.0f} s"
            if why:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.5)
        proc.wait()
        reader.join(timeout=5)
        if why is None and result.exists():
            row = json.loads(result.read_text())
        else:
            row = {"status": why or f"error: exit code {proc.returncode}"}
            row["log_tail"] = "".join(output)[-2000:]
        row["tree_peak_rss_mb"] = peak / 2**20
        return row


def _fmt_s(row: dict[str, Any] | None) -> str:
    """Median seconds of a row, or the short form of why there is none."""
    if not row:
        return "–"
    if row.get("status") != "ok" or "seconds" not in row:
        return str(row.get("status", "–")).split(" (")[0].split(":")[0]
    return f"{row['seconds']:.3f}"


def _run_rss(row: dict[str, Any] | None) -> float | None:
    """Peak resident MiB during the timed calls (else over the whole process)."""
    if not row:
        return None
    return row.get("run_peak_rss_mb") or row.get("peak_rss_mb")


def _fmt_g(x: Any, spec: str) -> str:
    """``x`` formatted with ``spec``, or "–" when absent."""
    return "–" if x is None else format(x, spec)


#: Result keys of a point, as written in peers.md.
SIDE_LABELS = {"ours": "ours", "peer": "peer eager", "peer_aoti": "peer AOTInductor"}


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> str:
    """``b`` seconds / ``a`` seconds, when both were measured."""
    if not (a and b and a.get("status") == b.get("status") == "ok"):
        return "–"
    if "seconds" not in a or "seconds" not in b:
        return "–"
    return f"{b['seconds'] / a['seconds']:.2f}"


def write_markdown(doc: dict[str, Any], path: Path) -> None:
    """``peers.md``: the timing table, versions, checks and the hyper-parameter mapping."""
    keys = ("ours", "peer", "peer_aoti")
    lines = [
        "# Peer comparison: our JAX models vs the reference PyTorch implementations",
        "",
        f"Machine: {doc['machine']}. Written by `python -m bench.peers` on {doc['date']}.",
        "",
        "Warm energy + forces of one NaCl grid (PEERS.md, spacing 2.2 Å, rattle 0.05 Å, "
        f"periodic), median of {doc['repeats']} runs after {doc['warmup']} warm-up "
        "call(s), seconds; every run under `flock /tmp/celli_cpu.lock`, the sides "
        "interleaved point by point. Ours: `jax.jit` (XLA CPU, 2 cores). Peer eager: "
        "torch eager mode, `torch.set_num_threads(2)` (mace-torch's calculator path; no "
        "torch.compile). Peer AOTInductor: nequip / nequip-allegro compiled as "
        "`nequip-compile --mode aotinductor --target ase` does (nequip's recommended "
        "inference path; compilation not timed). *Others' CPU*: cores used by other "
        "processes during the timed calls (the lock does not stop untimed work); a point "
        f"above {doc.get('max_foreign', 0.15)} was re-measured up to "
        f"{doc.get('retries', 3)} times and the least disturbed attempt kept (marked † "
        "if still above).",
        "",
        "| model | N | edges | dtype | ours s | peer eager s | eager/ours | peer AOTI s | "
        "AOTI/ours | params ours / peer | peak RSS while timing, MiB, ours / eager / AOTI | "
        "others' CPU ours / eager / AOTI |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in doc["points"]:
        o, q, a = (p.get(k) for k in keys)
        edges = {r.get("n_edges") for r in (o, q, a) if r and r.get("n_edges") is not None}
        e_str = "/".join(str(e) for e in sorted(edges)) if edges else "–"
        rss = " / ".join(_fmt_g(_run_rss(r), ".0f") for r in (o, q, a))
        busy = " / ".join(
            f"{r['foreign_cpu_cores']:.2f}{'†' if r.get('contended') else ''}"
            if r and "foreign_cpu_cores" in r
            else "–"
            for r in (o, q, a)
        )
        params = f"{(o or {}).get('n_params', '–')} / {(q or a or {}).get('n_params', '–')}"
        lines.append(
            f"| {p['model']} ({PEER_PACKAGE[p['model']]}) | {p['n_atoms']} | {e_str} | "
            f"{p['dtype']} | {_fmt_s(o)} | {_fmt_s(q)} | {_ratio(o, q)} | {_fmt_s(a)} | "
            f"{_ratio(o, a)} | {params} | {rss} | {busy} |"
        )
    notes = [
        f"- {p['model']} N={p['n_atoms']} {p['dtype']} {SIDE_LABELS[k]}: {p[k]['status']}"
        for p in doc["points"]
        for k in keys
        if p.get(k) and p[k].get("status") != "ok"
    ]
    if notes:
        lines += ["", "Points not measured:", *notes]
    v = {**doc["versions"].get("peers", {}), **doc["versions"].get("ours", {})}
    lines += ["", "Versions: " + ", ".join(f"{k} {v[k]}" for k in sorted(v)) + "."]
    if doc.get("checks"):
        lines += [
            "",
            f"## Correctness checks (untimed, N = {doc.get('check_grid_n', 4) ** 3}, float64)",
            "",
            "Random weights differ between the sides, so energies are not comparable; each "
            "side is checked on its own. Edges: directed pairs within r_cut (must agree).",
            "",
            "| model | side | edges | energy (eV) | max abs F | abs sum F / (N max abs F) | "
            "FD − autograd, atom 0 (eV/Å) | AOTI − eager, max abs F | status |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for c in doc["checks"]:
            lines.append(
                f"| {c.get('model')} | {SIDE_LABELS[_check_key(c)]} | {c.get('n_edges')} | "
                f"{_fmt_g(c.get('energy'), '.6g')} | {_fmt_g(c.get('max_abs_force'), '.3g')} | "
                f"{_fmt_g(c.get('force_sum_rel'), '.1e')} | "
                f"{_fmt_g(c.get('fd_max_abs_err'), '.1e')} | "
                f"{_fmt_g(c.get('aoti_minus_eager_max_abs_force'), '.1e')} | {c.get('status')} |"
            )
    lines += ["", "## Hyper-parameter mapping", ""]
    for model, rows in MAPPING.items():
        lines += [
            f"### {model} vs {PEER_PACKAGE[model]}",
            "",
            "| ours | peer | difference |",
            "|---|---|---|",
        ]
        lines += [f"| {a} | {b} | {c or '–'} |" for a, b, c in rows]
        lines.append("")
    path.write_text("\n".join(lines).rstrip() + "\n")


def _machine() -> str:
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except OSError:
        pass
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, {mem / 2**30:.0f} GiB RAM, no GPU"


def parse_points(spec: str | None) -> list[tuple[str, int, str]]:
    """``"allegro:10:float32,mace:16:float32"`` → points (default: :data:`DEFAULT_POINTS`)."""
    if not spec:
        return list(DEFAULT_POINTS)
    out = []
    for item in spec.split(","):
        model, n, dt = item.split(":")
        out.append((model, int(n), dt))
    return out


def wait_quiet(max_busy: float, max_wait_s: float, log) -> float:
    """Wait until the whole machine uses at most ``max_busy`` cores (averaged over 2 s)
    or ``max_wait_s`` has passed; return the last busy figure."""
    t0 = last_log = time.monotonic()
    while True:
        b0 = _busy_cpu_seconds()
        time.sleep(2.0)
        busy = (_busy_cpu_seconds() - b0) / 2.0
        now = time.monotonic()
        if busy <= max_busy or now - t0 > max_wait_s:
            return busy
        if now - last_log > 60:
            log(f"waiting for a quiet machine ({busy:.2f} cores busy)")
            last_log = now


def measure(run, *, retries: int, max_foreign: float, quiet_wait_s: float, log):
    """``run()`` (one timed subprocess) once the machine is quiet; again, up to ``retries``
    times, while other processes used more than ``max_foreign`` cores during the timed
    calls. Returns the least disturbed row, with every attempt listed under "attempts"."""
    best, attempts = None, []
    for _ in range(retries + 1):
        wait_quiet(max_foreign, quiet_wait_s, log)
        row = run()
        foreign = row.get("foreign_cpu_cores")
        attempts.append(
            {"status": row.get("status"), "seconds": row.get("seconds"), "foreign": foreign}
        )
        ok = row.get("status") == "ok" and foreign is not None
        if best is None or (ok and best.get("foreign_cpu_cores", 1e9) > foreign):
            best = row
        if not ok or foreign <= max_foreign:
            break
        log(f"others used {foreign:.2f} cores during the timed calls: measuring again")
    best["attempts"] = attempts
    best["contended"] = best.get("foreign_cpu_cores", 0.0) > max_foreign
    return best


def run_both(args: argparse.Namespace) -> int:
    """Driver: correctness checks, then every point on every side; writes JSON + Markdown.

    Sides, in this order for each point: ``ours``, ``peer`` (torch eager) and, for the
    nequip-family models when ``--peer-modes`` includes it, ``peer_aoti`` (AOTInductor).
    """
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "peers.json"
    aot_dir = out_dir / "aot"

    def log(msg: str) -> None:
        print(f"[peers {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    points = parse_points(args.points)
    models = sorted({m for m, _, _ in points})
    modes = [m for m in args.peer_modes.split(",") if m]
    mem_limit = int(args.mem_fraction * _mem_available_bytes())
    doc: dict[str, Any] = {
        "machine": _machine(),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "lock": args.lock,
        "check_grid_n": args.check_grid_n,
        "max_foreign": args.max_foreign,
        "retries": args.retries,
        "interpreters": {"ours": args.ours_python, "peers": args.peers_python},
        "versions": {},
        "checks": [],
        "points": [],
    }
    if args.resume and json_path.exists():  # keep what is already measured
        old = json.loads(json_path.read_text())
        for key in ("checks", "versions", "points", "date"):
            doc[key] = old.get(key, doc[key])
    elif aot_dir.exists():  # compiled files of an earlier run may hold other weights
        for f in aot_dir.glob("*.nequip.pt2"):
            f.unlink()

    def save() -> None:
        json_path.write_text(json.dumps(doc, indent=1))
        write_markdown(doc, out_dir / "peers.md")

    #: (result key, interpreter side, peer mode) of every side of a point
    sides = [("ours", "ours", "eager"), ("peer", "peers", "eager")]
    if "aotinductor" in modes:
        sides.append(("peer_aoti", "peers", "aotinductor"))
    pythons = {"ours": args.ours_python, "peers": args.peers_python}

    def wanted(key: str, model: str) -> bool:
        return key != "peer_aoti" or model in AOTI_MODELS

    def run(key, side, mode, model, n, dt, repeats, check, lock):
        npz = out_dir / "systems" / f"nacl_{n}.npz"
        a = ["--side", side, "--model", model, "--grid-n", str(n), "--dtype", dt]
        a += ["--repeats", str(repeats), "--warmup", str(args.warmup), "--npz", str(npz)]
        a += ["--threads", str(args.threads), "--peer-mode", mode, "--aot-dir", str(aot_dir)]
        return run_subprocess(
            pythons[side],
            a + (["--check"] if check else []),
            lock=lock,
            timeout_s=args.timeout,
            mem_limit_bytes=mem_limit,
            log=log,
        )

    if not args.skip_checks:
        done = {(c.get("model"), _check_key(c)) for c in doc["checks"]}
        for model in models:
            for key, side, mode in sides:
                if not wanted(key, model) or (model, key) in done:
                    continue
                # untimed, so no lock, except for the AOTInductor compilation: minutes of
                # both cores, which would disturb someone else's timed run
                lock = args.lock if mode == "aotinductor" else None
                row = run(key, side, mode, model, args.check_grid_n, "float64", 0, True, lock)
                row["side_key"] = key
                log(
                    f"check {model} {key}: {row.get('status')} "
                    f"fd_err={row.get('fd_max_abs_err')} sum_rel={row.get('force_sum_rel')}"
                )
                doc["checks"].append(row)
                save()

    by_key = {(p["model"], p["grid_n"], p["dtype"]): p for p in doc["points"]}
    for model, n, dt in points:
        point = by_key.get((model, n, dt))
        if point is None:
            point = {"model": model, "grid_n": n, "n_atoms": n**3, "dtype": dt}
            doc["points"].append(point)
        for key, side, mode in sides:
            if key in point or not wanted(key, model):
                continue
            est = _estimated_rss(doc["points"], key, model, dt, n**3)
            if est is not None and est > mem_limit:
                row = {
                    "status": f"skipped: out of memory (needs ~{est / 2**30:.0f} GiB, "
                    f"scaled from the smaller size's peak; limit {mem_limit / 2**30:.1f} GiB)"
                }
            else:
                row = measure(
                    functools.partial(
                        run, key, side, mode, model, n, dt, args.repeats, False, args.lock
                    ),
                    retries=args.retries,
                    max_foreign=args.max_foreign,
                    quiet_wait_s=args.quiet_wait,
                    log=log,
                )
            point[key] = row
            if "versions" in row:
                doc["versions"][side] = row["versions"]
            log(f"{model} N={n**3} {dt} {key}: {row.get('status')} {row.get('seconds')}")
            save()
    save()
    log(f"wrote {json_path} and {out_dir / 'peers.md'}")
    return 0


def _check_key(row: dict[str, Any]) -> str:
    """Side key ("ours", "peer", "peer_aoti") of a check row."""
    return row.get("side_key") or ("ours" if row.get("side") == "ours" else "peer")


def _estimated_rss(points, key: str, model: str, dtype: str, n_atoms: int) -> float | None:
    """Peak resident bytes of side ``key`` at ``n_atoms`` while timing, scaled linearly
    from the largest smaller size measured (memory grows with the edge count, ∝ N here),
    or from the memory at which a smaller size was stopped; None if nothing is known."""
    best = None
    for p in points:
        r = p.get(key) or {}
        if p["model"] != model or p["dtype"] != dtype or p["n_atoms"] >= n_atoms:
            continue
        if r.get("status") == "ok":
            peak = r.get("run_peak_rss_mb") or 0.0  # excludes compilation, graph building
        else:  # stopped by the watchdog: what it had reached
            peak = r.get("tree_peak_rss_mb", 0.0) if "out of memory" in r.get("status", "") else 0
        if peak and (best is None or p["n_atoms"] > best[0]):
            best = (p["n_atoms"], peak)
    if best is None:
        return None
    return best[1] * 2**20 * n_atoms / best[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__.split("\n")[0])
    p.add_argument("--side", choices=("both", "ours", "peers"), default="both")
    p.add_argument("--model", choices=("allegro", "mace", "nequip"), default="allegro")
    p.add_argument("--grid-n", type=int, default=10, help="NaCl grid sites per axis (N = n³)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--repeats", type=int, default=5, help="timed warm runs (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up calls")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (peers)")
    p.add_argument("--check", action="store_true", help="add the finite-difference check")
    p.add_argument(
        "--peer-mode",
        choices=("eager", "aotinductor"),
        default="eager",
        help="peers: torch eager, or (nequip, nequip-allegro) compiled by AOTInductor",
    )
    p.add_argument("--aot-dir", default="out/peers/aot", help="cache of AOTInductor files")
    p.add_argument(
        "--peer-modes",
        default="eager,aotinductor",
        help="driver: peer modes to time (aotinductor: allegro and nequip only)",
    )
    p.add_argument("--npz", default=None, help="system arrays (written by ours, read by peers)")
    p.add_argument("--result", default=None, help="write the row as JSON here (else stdout)")
    # driver options
    p.add_argument("--out", default="out/peers", help="driver output directory")
    p.add_argument("--points", default=None, help="model:grid_n:dtype,... (default: all)")
    p.add_argument("--ours-python", default=DEFAULT_OURS_PYTHON)
    p.add_argument("--peers-python", default=DEFAULT_PEERS_PYTHON)
    p.add_argument("--lock", default=DEFAULT_LOCK, help="flock file ('' = no lock)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per subprocess")
    p.add_argument(
        "--mem-fraction",
        type=float,
        default=0.85,
        help="stop a subprocess above this fraction of MemAvailable",
    )
    p.add_argument(
        "--max-foreign",
        type=float,
        default=0.15,
        help="re-measure when other processes used more cores than this while timing",
    )
    p.add_argument("--retries", type=int, default=3, help="re-measurements per point")
    p.add_argument(
        "--quiet-wait", type=float, default=900.0, help="max seconds to wait for a quiet machine"
    )
    p.add_argument("--check-grid-n", type=int, default=4)
    p.add_argument("--skip-checks", action="store_true")
    p.add_argument("--resume", action="store_true", help="keep points in an existing peers.json")
    args = p.parse_args(argv)
    if args.side == "both":
        args.lock = args.lock or None
        return run_both(args)
    row = run_side(args)
    text = json.dumps(row, indent=1)
    if args.result:
        Path(args.result).write_text(text)
    else:
        print(text)
    return 0 if row["status"] == "ok" else 1


if __name__ == "__main__":
    if __package__ in (None, ""):  # run as a file: make `celli_scale` importable
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
