"""What both sides share: the system, the matched hyper-parameters, the points, and the
mapping of our config keys to each peer's.

The peers' interpreter has torch but neither JAX nor ``celli_scale`` (whose ``__init__``
imports JAX), so the hyper-parameters are restated here as plain constants;
:func:`check_ours_config` makes our side refuse to run when its config (from
``celli_scale``'s matched presets) differs from them. Standard library only at import;
NumPy inside functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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

#: Shared geometry and hyper-parameters: they must equal the matched presets our models
#: are built from (our side checks that they do, :func:`check_ours_config`).
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
#: (written into peers.md; see the package docstring).
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
    """``(positions (N, 3) Å, atomic numbers (N,), cell (3, 3) Å)`` of the NaCl grid of the
    project's shared PEERS.md.

    Same construction as ``celli_scale.datasets.nacl_grid`` (our side checks that the
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
# checks and parsing
# --------------------------------------------------------------------------------------
def check_ours_config(mc: Any) -> None:
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


def parse_points(spec: str | None) -> list[tuple[str, int, str]]:
    """``"allegro:10:float32,mace:16:float32"`` → points (default: :data:`DEFAULT_POINTS`)."""
    if not spec:
        return list(DEFAULT_POINTS)
    out = []
    for item in spec.split(","):
        parts = item.split(":")
        if len(parts) != 3 or not parts[1].strip().isdigit():
            raise ValueError(f"--points: {item!r} is not model:grid_n:dtype")
        model, n, dt = parts
        out.append((model, int(n), dt))
    return out
