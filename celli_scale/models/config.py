"""Model configuration: frozen dataclasses built once, at the boundary, from dicts/YAML.

Keys shared by all four models have the same meaning everywhere, so comparisons are fair.
Each model module subclasses :class:`ModelConfig` with its own extra fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import jax.numpy as jnp


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters shared by every model.

    Attributes:
      name: "allegro" | "celli" | "nequip" | "mace".
      r_cut: cut-off radius of the local graph (Å).
      l_max: largest rotation order of equivariant features.
      channels: equivariant feature width (multiplicity per irrep).
      n_layers: number of interaction / tensor-product layers.
      n_radial: size of the Bessel radial basis.
      species: atomic numbers the model knows (set from an example system if None).
      dtype: "float32" or "float64" for parameters and computation.
      parity: use O(3) (True) or SO(3) (False) irreps.
      envelope_p: polynomial envelope exponent.
      radial_mlp: hidden widths of radial MLPs.
      avg_num_neighbors: normalisation of neighbour sums.
      energy_scale, energy_shift: initial per-species atomic-energy scale and shift (eV).
    """

    name: str = ""
    r_cut: float = 5.0
    l_max: int = 2
    channels: int = 32
    n_layers: int = 2
    n_radial: int = 8
    species: tuple[int, ...] | None = None
    dtype: str = "float64"
    parity: bool = True
    envelope_p: int = 6
    radial_mlp: tuple[int, ...] = (64, 64)
    avg_num_neighbors: float = 20.0
    energy_scale: float = 1.0
    energy_shift: float = 0.0

    def __post_init__(self) -> None:
        if self.r_cut <= 0:
            raise ValueError(f"config r_cut must be positive, got {self.r_cut}")
        for key in ("l_max", "channels", "n_layers", "n_radial"):
            v = getattr(self, key)
            if not isinstance(v, int) or v < (0 if key == "l_max" else 1):
                raise ValueError(f"config {key} must be a positive integer, got {v!r}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"config dtype must be 'float32' or 'float64', got {self.dtype!r}")
        if self.species is not None:
            sp = tuple(int(z) for z in self.species)
            if len(set(sp)) != len(sp) or any(z < 1 or z > 118 for z in sp):
                raise ValueError(f"config species must be distinct atomic numbers, got {sp}")
            object.__setattr__(self, "species", tuple(sorted(sp)))
        for key in ("radial_mlp",):
            object.__setattr__(self, key, tuple(int(x) for x in getattr(self, key)))

    #: True when every atom's energy depends only on atoms within one ``r_cut`` (edge-centred
    #: models: Allegro, and CELLI's local trunk, whose long range goes through the Qeq
    #: layer); message passing sets False.
    strictly_local: ClassVar[bool] = True

    @property
    def receptive_field(self) -> float:
        """How far (Å) an atom's local energy sees: ``r_cut`` for strictly local models,
        ``n_layers × r_cut`` for message passing. Every halo width (domain decomposition,
        benchmarks) comes from here. CELLI's charges are global: they go through the
        (distributed) Qeq solve, not through the halo."""
        return self.r_cut if self.strictly_local else self.n_layers * self.r_cut

    @property
    def jnp_dtype(self) -> Any:
        return jnp.float64 if self.dtype == "float64" else jnp.float32

    @property
    def n_species(self) -> int:
        if self.species is None:
            raise ValueError("config species is not set: pass species or an example system")
        return len(self.species)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(
                f"unknown config key(s) {unknown} for model {d.get('name', cls.__name__)!r}; "
                f"known keys: {sorted(names)}"
            )
        kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
        return cls(**kwargs)
