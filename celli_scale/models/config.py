"""Model configuration: frozen dataclasses built once, at the boundary, from dicts/YAML.

Keys shared by all four models have the same meaning everywhere, so comparisons are fair.
Each model module subclasses :class:`ModelConfig` with its own extra fields.
"""

from __future__ import annotations

import dataclasses
import numbers
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

import jax.numpy as jnp
import numpy as np


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
      prior: optional physical prior added to the energy (:class:`PriorConfig`, or a dict
        of its keys such as ``{"kind": "zbl", "r_cut": 1.5}``); None: no prior.
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
    prior: PriorConfig | None = None

    def __post_init__(self) -> None:
        # Strict types from the annotations, for this class and every subclass's fields:
        # int fields take Python/numpy integers (not bools, not 2.0); float fields take any
        # real number (numpy too) but not bools or strings, and must be finite; tuple
        # fields take lists or tuples. Values are normalised to plain Python types, so a
        # config always serialises to JSON.
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "species" and value is not None:
                value = _species_numbers(value)
            object.__setattr__(self, f.name, _coerce(f.name, value, hints.get(f.name, Any)))
        if not self.r_cut > 0:
            raise ValueError(f"config r_cut must be positive (Å), got {self.r_cut}")
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
        if isinstance(self.prior, dict):
            object.__setattr__(self, "prior", PriorConfig.from_dict(self.prior))
        if self.prior is not None:
            if not isinstance(self.prior, PriorConfig):
                raise ValueError(
                    f"config prior must be a mapping of prior keys or null, got {self.prior!r}"
                )
            if self.prior.r_cut > self.r_cut:
                raise ValueError(
                    f"config prior r_cut={self.prior.r_cut} exceeds the model r_cut="
                    f"{self.r_cut}: the prior sums over the model's graph edges"
                )

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
        """Build from a mapping of field names to values (types checked strictly, see
        ``__post_init__``); ``ValueError`` names an unknown key or a badly typed field."""
        if not isinstance(d, dict):
            raise ValueError(
                f"model config must be a dict of keys and values, got {type(d).__name__}"
            )
        bad_keys = [k for k in d if not isinstance(k, str)]
        if bad_keys:
            raise ValueError(f"model config keys must be strings, got {bad_keys[:5]}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(
                f"unknown config key(s) {unknown} for model {d.get('name', cls.__name__)!r}; "
                f"known keys: {sorted(names)}"
            )
        kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
        return cls(**kwargs)


PRIOR_KINDS = ("zbl", "exp", "power")


@dataclass(frozen=True)
class PriorConfig:
    """A physical prior added to a model's energy (:mod:`celli_scale.models.prior`).

    The prior is a pair potential ``V(r) S(r)`` summed over the model's graph edges
    (pairs within the model's ``r_cut``), half of every pair to each atom. ``S`` switches
    it off smoothly between ``r_on`` and ``r_cut``.

    Attributes:
      kind: "zbl" (Ziegler–Biersack–Littmark universal screened nuclear repulsion, no
        parameters), "exp" (``a · exp(-r/rho)``) or "power" (``epsilon · (sigma/r)^n``).
      r_cut: where the prior (energy, force and force derivative) reaches zero (Å);
        must not exceed the model's ``r_cut``.
      r_on: start of the switching window (Å); ``None``: ``0.5 · r_cut``. Below ``r_on``
        the prior is the bare pair potential.
      a, rho: "exp" amplitude (eV) and decay length (Å).
      epsilon, sigma, n: "power" energy (eV), length (Å) and exponent.
    """

    kind: str = "zbl"
    r_cut: float = 1.5
    r_on: float | None = None
    a: float = 1000.0
    rho: float = 0.2
    epsilon: float = 1.0
    sigma: float = 1.0
    n: int = 12

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = _coerce(f"prior {f.name}", getattr(self, f.name), hints[f.name])
            object.__setattr__(self, f.name, value)
        if self.kind not in PRIOR_KINDS:
            raise ValueError(f"config prior kind must be one of {PRIOR_KINDS}, got {self.kind!r}")
        if not self.r_cut > 0:
            raise ValueError(f"config prior r_cut must be positive (Å), got {self.r_cut}")
        if self.r_on is None:
            object.__setattr__(self, "r_on", 0.5 * self.r_cut)
        if not 0 <= self.r_on < self.r_cut:
            raise ValueError(
                f"config prior r_on must be in [0, r_cut={self.r_cut}), got {self.r_on}"
            )
        for key in ("a", "rho", "epsilon", "sigma"):
            if not getattr(self, key) > 0:
                raise ValueError(f"config prior {key} must be positive, got {getattr(self, key)}")
        if self.n < 1:
            raise ValueError(f"config prior n must be a positive integer, got {self.n}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PriorConfig:
        """Build from a mapping; ``ValueError`` names an unknown key or a bad value."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown config prior key(s) {unknown}; known keys: {sorted(names)}")
        return cls(**d)


def _species_numbers(value: Any) -> Any:
    """Element symbols in a species list become atomic numbers; other entries are left
    for the type check."""
    if isinstance(value, list | tuple) and any(isinstance(v, str) for v in value):
        from celli_scale.system import atomic_numbers

        return tuple(int(z) for z in atomic_numbers(list(value), "config species"))
    return value


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin is tuple:
        args = typing.get_args(tp)
        inner = _type_name(args[0]) if args else "value"
        return f"a list of {inner}s"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """``value`` checked against the annotation ``tp`` and normalised to Python types;
    ``ValueError`` naming the field ``name`` otherwise."""

    def fail() -> typing.NoReturn:
        raise ValueError(
            f"config {name} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})"
        )

    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            fail()
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(name, value, a)
            except ValueError:
                continue
        fail()
    if origin is tuple:
        if not isinstance(value, list | tuple):
            fail()
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(f"{name}[{k}]", v, args[0]) for k, v in enumerate(value))
        if len(args) != len(value):
            fail()
        pairs = enumerate(zip(value, args, strict=True))
        return tuple(_coerce(f"{name}[{k}]", v, a) for k, (v, a) in pairs)
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if tp is bool:
        if isinstance(value, bool | np.bool_):
            return bool(value)
        fail()
    if tp is int:
        if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Integral):
            fail()
        return int(value)
    if tp is float:
        if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
            fail()
        if not np.isfinite(float(value)):
            raise ValueError(f"config {name} must be finite, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            fail()
        return str(value)
    return value
