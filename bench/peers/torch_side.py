"""The peers' side (PyTorch, the peers' interpreter): nequip-allegro's ``AllegroModel``,
mace-torch's ``MACE`` and nequip's ``NequIPGNNModel``, randomly initialised, built through
each package's own model builder and fed through its own data pipeline (neighbour list
included), forces by autograd as in each package's calculator; for nequip and
nequip-allegro also the model compiled by AOTInductor.

The only module of :mod:`bench.peers` that imports torch (or ase, e3nn, mace, nequip,
allegro), and only inside its functions: the package imports without them.
"""

from __future__ import annotations

import argparse
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from bench.peers.measure import fd_check, force_stats, timed_calls
from bench.peers.spec import (
    ALLEGRO_EDGE_ENG_MLP,
    ALLEGRO_LATENT,
    ALLEGRO_LATENT_MLP,
    AVG_NUM_NEIGHBORS,
    CHANNELS,
    ENVELOPE_P,
    L_MAX,
    MACE_CORRELATION,
    N_BESSEL,
    N_LAYERS,
    R_CUT,
    RADIAL_MLP,
    READOUT_HIDDEN,
    SEED,
    load_system,
)


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
    row.update(force_stats(float(e), f.numpy()))
    if args.check:

        def energy_at(atom, k, d):
            p = pos0.detach().clone()
            p[atom, k] += d
            return float(energy_forces(p)[0])

        row.update(fd_check(energy_at, f.numpy()))
    if args.repeats > 0:
        row.update(timed_calls(energy_forces, args.repeats, args.warmup))
    return row


def versions_peers() -> dict[str, str]:
    """Installed versions of the packages the peers' timings depend on."""
    out = {}
    for p in ("torch", "mace-torch", "nequip", "nequip-allegro", "e3nn", "numpy"):
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            pass
    return out
