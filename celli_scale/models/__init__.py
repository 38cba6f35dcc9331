"""Models: Allegro (strictly local), CELLI (Allegro + charge equilibration), and the
message-passing baselines NequIP and MACE. All are flax modules, pure functions of
``(params, graph)``: ``model.apply(params, graph) -> ModelOutput``.
"""

from __future__ import annotations

import importlib
from typing import Any

from celli_scale.models.config import ModelConfig, PriorConfig
from celli_scale.models.layers import Graph, ModelOutput

# name -> (module, config class, model class)
_REGISTRY: dict[str, tuple[str, str, str]] = {
    "allegro": ("celli_scale.models.allegro", "AllegroConfig", "Allegro"),
    "celli": ("celli_scale.models.celli", "CELLIConfig", "CELLI"),
    "nequip": ("celli_scale.models.nequip", "NequIPConfig", "NequIP"),
    "mace": ("celli_scale.models.mace", "MACEConfig", "MACE"),
}

MODEL_NAMES = tuple(_REGISTRY)


def _lookup(name: str) -> tuple[type[ModelConfig], Any]:
    """``(config class, model class)`` of a model name. Private: callers use
    :func:`build` / :func:`make_config`. Model modules load on first use, so that
    ``import celli_scale.models`` does not pull in the Qeq and electrostatics code."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model name {name!r}; choose one of {list(_REGISTRY)}")
    mod, cfg, cls = _REGISTRY[name]
    m = importlib.import_module(mod)
    return getattr(m, cfg), getattr(m, cls)


def make_config(config: dict[str, Any] | ModelConfig) -> ModelConfig:
    """Resolve a dict (or config dataclass) into the model's frozen config dataclass."""
    if isinstance(config, ModelConfig):
        return config
    if not isinstance(config, dict) or "name" not in config:
        raise ValueError(
            "model config must be a dict with a 'name' key (allegro|celli|nequip|mace)"
        )
    cfg_cls, _ = _lookup(config["name"])
    return cfg_cls.from_dict(dict(config))


def build(config: dict[str, Any] | ModelConfig):
    """Build a flax model from a config dict or dataclass (``species`` must be set).

    With ``prior`` in the config the model is wrapped by
    :class:`celli_scale.models.prior.WithPrior` (same parameters; the prior's pair
    energies are added to ``node_energies`` and ``energy``)."""
    cfg = make_config(config)
    _, model_cls = _lookup(cfg.name)
    if cfg.species is None:
        raise ValueError("config species is not set: pass species or an example system")
    from celli_scale.models.prior import with_prior

    return with_prior(model_cls(cfg))


__all__ = [
    "Graph",
    "MODEL_NAMES",
    "ModelConfig",
    "ModelOutput",
    "PriorConfig",
    "build",
    "make_config",
]
