"""Matched hyper-parameters of the model comparison (the scaling study and the asv
benchmarks share them) and the one way both build a potential to time.

The shared keys are identical for all four models, as the project's shared PEERS.md states them
(2 layers, l_max 2, 32 features, 8 radial functions, r_cut 5 Å; 56 neighbours per atom
on the NaCl grid); model-specific keys are in :data:`MODEL_EXTRAS`. Quick mode (tests,
CI) keeps the same keys at tiny widths (:data:`QUICK_HYPERPARAMS`,
:data:`QUICK_MODEL_EXTRAS`).
"""

from __future__ import annotations

from typing import Any

from celli_scale.datasets.synthetic import NACL_SPECIES, nacl_grid

#: Shared keys, identical for all four models.
FULL_HYPERPARAMS: dict[str, Any] = {
    "r_cut": 5.0,
    "l_max": 2,
    "channels": 32,
    "n_layers": 2,
    "n_radial": 8,
    "radial_mlp": [64, 64],
    "avg_num_neighbors": 56.0,
    "parity": True,
}
#: Model-specific keys (each model's own defaults otherwise). CELLI: one Allegro layer
#: before and one after the charge-equilibration layer; electrostatics chosen by "auto"
#: to accuracy 1e-6. MACE: correlation order 3, as mace-torch in PEERS.md.
MODEL_EXTRAS: dict[str, dict[str, Any]] = {
    "allegro": {},
    "celli": {"n_pre": 1, "n_post": 1, "elec_method": "auto", "elec_accuracy": 1e-6},
    "nequip": {},
    "mace": {"correlation": 3},
}
#: float32 CELLI cannot reach the float64 Qeq tolerance: its CG stops at this one.
CELLI_FLOAT32_QEQ_TOL = 1e-5

#: Quick mode (tests, CI): the same keys, tiny widths.
QUICK_HYPERPARAMS: dict[str, Any] = {
    "r_cut": 5.0,
    "l_max": 2,
    "channels": 4,
    "n_layers": 2,
    "n_radial": 4,
    "radial_mlp": [8],
    "avg_num_neighbors": 56.0,
    "parity": True,
}
QUICK_MODEL_EXTRAS: dict[str, dict[str, Any]] = {
    "allegro": {"latent_dim": 8, "latent_mlp": [8], "edge_eng_mlp": [8]},
    "celli": {
        "n_pre": 1,
        "n_post": 1,
        "elec_method": "auto",
        "elec_accuracy": 1e-6,
        "latent_dim": 8,
        "latent_mlp": [8],
        "edge_eng_mlp": [8],
    },
    "nequip": {"readout_hidden": 4},
    "mace": {"correlation": 3},
}


def model_config(
    model: str,
    dtype: str,
    hyperparams: dict[str, Any] | None = None,
    extras: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Full config dict of ``model`` at matched hyper-parameters (``species`` = Na, Cl).

    Args:
      model: registry name ("allegro" | "celli" | "nequip" | "mace").
      dtype: "float32" | "float64".
      hyperparams: shared keys (default :data:`FULL_HYPERPARAMS`).
      extras: per-model keys (default :data:`MODEL_EXTRAS`).
    """
    hp = dict(FULL_HYPERPARAMS if hyperparams is None else hyperparams)
    ex = MODEL_EXTRAS if extras is None else extras
    cfg = {"name": model, **hp, **ex.get(model, {}), "dtype": dtype, "species": list(NACL_SPECIES)}
    if model == "celli" and dtype == "float32":
        cfg.setdefault("qeq_tol", CELLI_FLOAT32_QEQ_TOL)
    return cfg


def build_potential(config: dict[str, Any], seed: int = 0):
    """A freshly initialised :class:`~celli_scale.potential.Potential` to time.

    Parameters come from a jitted ``model.init`` on a 2×2×2 NaCl grid (they do not depend
    on the system size); ``capacity_growth=1`` and reset capacities, so that the next
    graph is sized exactly (no spare edges).
    """
    from celli_scale.potential import Potential

    pot = Potential.from_config(config, seed=seed, example=nacl_grid(2), capacity_growth=1.0)
    pot.reset_capacities()
    return pot
