"""Host-side state the System-level calls reuse: prepared parameters and Verlet lists.

:func:`celli_scale.electrostatics.energy`, ``potential`` and ``energy_and_forces`` take a
:class:`~celli_scale.System` and do the host work themselves: :func:`prepare` (α, cut-offs,
k-vectors or grid) and a real-space neighbor list. Redone on every call this costs more
than the jitted kernel (0.3–0.6 s at N = 1,000) and changes array shapes, so it is kept:

* parameters in a small LRU keyed on everything :func:`prepare` reads (method, accuracy,
  cell bytes, atom count, pbc, dtype, largest Gaussian width);
* one Verlet list per (cut-off, cell, atom count): built to ``r_cut (1 + SKIN)`` and
  reused while no atom has moved more than half the skin since the build (positions as
  given, not wrapped, so an atom that is wrapped back into the cell triggers a rebuild);
  its capacity has :data:`HEADROOM` so that a rebuilt list keeps its shape and the
  compiled kernel is reused. The kernels mask pairs beyond ``r_cut``, so results do not
  depend on the skin or on the history of the list.

Inside ``jit`` (positions abstract, cell concrete) the list comes from the same state
through ``jax.pure_callback``, at a capacity fixed when the function is traced; if more
pairs appear later the callback raises (never a silent drop). :func:`clear` empties
everything; :func:`stats` counts builds and reuses.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from celli_scale import cell as cellmod
from celli_scale.electrostatics.params import ElectrostaticsParams, prepare
from celli_scale.neighbors import NeighborList, NeighborListOverflowError

#: Verlet skin, relative to the real-space cut-off.
SKIN = 0.03
#: Capacity head-room of a list: ``ceil(HEADROOM × pairs)`` slots.
HEADROOM = 1.1
#: Entries kept per cache (least recently used dropped first).
MAX_ENTRIES = 4

_FIELDS = ("senders", "receivers", "shifts", "mask")
_lock = threading.RLock()
_params: OrderedDict = OrderedDict()
_lists: OrderedDict = OrderedDict()
_stats = {"params_prepared": 0, "params_reused": 0, "lists_built": 0, "lists_reused": 0}


def clear() -> None:
    """Forget every cached parameter set and neighbor list."""
    with _lock:
        _params.clear()
        _lists.clear()
        for k in _stats:
            _stats[k] = 0


def stats() -> dict[str, int]:
    """Counts since the last :func:`clear`: parameters prepared/reused, lists built/reused."""
    with _lock:
        return dict(_stats)


def _put(cache: OrderedDict, key, value) -> None:
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > MAX_ENTRIES:
        cache.popitem(last=False)


def primal(x: Any) -> np.ndarray | None:
    """Concrete value of ``x`` as numpy, also under ``jax.grad`` outside jit (the primal of
    a linearisation tracer); ``None`` inside ``jit`` (abstract) or for ``None``."""
    if x is None:
        return None
    if isinstance(x, jax.core.Tracer):
        x = jax.lax.stop_gradient(x)
        if isinstance(x, jax.core.Tracer):
            return None
    return np.asarray(x)


def params(system, method: str, accuracy: float, sigma: Any, cell: np.ndarray | None):
    """:func:`prepare` for ``system`` (concrete ``cell`` or None for open systems), cached."""
    sig = primal(sigma)
    sigma_max = None if sig is None else float(np.max(sig))
    key = (
        method,
        float(accuracy),
        int(system.positions.shape[0]),
        tuple(system.pbc),
        str(system.positions.dtype),
        None if cell is None else cell.astype(np.float64).tobytes(),
        sigma_max,
    )
    with _lock:
        hit = _params.get(key)
        if hit is not None:
            _params.move_to_end(key)
            _stats["params_reused"] += 1
            return hit
    probe = system
    if cell is not None and isinstance(system.cell, jax.core.Tracer):
        probe = system.replace(cell=cell, min_distance=0.0)
    with jax.ensure_compile_time_eval():  # concrete arrays even when called inside jit
        p = prepare(probe, method, accuracy, sig if sig is None else np.asarray(sig, dtype=float))
    with _lock:
        _stats["params_prepared"] += 1
        _put(_params, key, p)
    return p


class _VerletList:
    """A neighbor list with a skin and its build positions; host arrays after a build,
    device arrays once the host path used it."""

    def __init__(self, cell: np.ndarray, r_cut: float, dtype) -> None:
        self.cell = cell
        self.r_cut = float(r_cut)
        self.r_list = float(r_cut) * (1.0 + SKIN)
        self.dtype = dtype
        self.ref: np.ndarray | None = None
        self.host: dict[str, np.ndarray] = {}
        self.n_pairs = 0
        self.capacity = 0
        self._device: NeighborList | None = None

    def fresh(self, pos: np.ndarray) -> bool:
        if self.ref is None or pos.shape != self.ref.shape:
            return False
        d2 = np.max(np.sum((pos - self.ref) ** 2, axis=1)) if pos.size else 0.0
        return bool(d2 <= (0.5 * (self.r_list - self.r_cut)) ** 2)

    def update(self, pos: np.ndarray) -> None:
        """Rebuild at ``pos`` unless the list built last still covers it."""
        if self.fresh(pos):
            _stats["lists_reused"] += 1
            return
        i, j, s, _ = cellmod.host_pairs(pos, self.cell, (True, True, True), self.r_list)
        n = int(i.size)
        if n > self.capacity:
            self.capacity = max(int(math.ceil(HEADROOM * n)), 1)
        cap = self.capacity
        senders = np.zeros(cap, np.int32)
        receivers = np.zeros(cap, np.int32)
        shifts = np.zeros((cap, 3), self.dtype)
        mask = np.zeros(cap, bool)
        senders[:n], receivers[:n], shifts[:n], mask[:n] = i, j, s, True
        self.host = dict(senders=senders, receivers=receivers, shifts=shifts, mask=mask)
        self.n_pairs = n
        self.ref = pos.copy()
        self._device = None
        _stats["lists_built"] += 1

    def device(self) -> NeighborList:
        """The list as device arrays (the host copy is dropped: one copy in memory)."""
        if self._device is None:
            with jax.ensure_compile_time_eval():  # concrete even when called while tracing
                self._device = NeighborList(
                    **{k: jnp.asarray(v) for k, v in self.host.items()},
                    n_pairs=jnp.asarray(self.n_pairs, dtype=jnp.int32),
                    r_cut=self.r_list,
                )
            self.host = {}
        return self._device

    def _host_arrays(self) -> dict[str, np.ndarray]:
        if self.host:
            return self.host
        return {k: np.asarray(getattr(self._device, k)) for k in _FIELDS}

    def padded(self, capacity: int) -> tuple[np.ndarray, ...]:
        """Host arrays at ``capacity`` slots (the callback's fixed shape)."""
        if self.n_pairs > capacity:
            raise NeighborListOverflowError(
                f"electrostatics neighbor list: {self.n_pairs} pairs within "
                f"{self.r_list:.4g} Å but the jitted function was traced for {capacity}; "
                "call it once with concrete positions first (sizes the list) or pass neighbors="
            )
        out = []
        host = self._host_arrays()
        for k in _FIELDS:
            a = host[k]
            if a.shape[0] >= capacity:
                out.append(a[:capacity])
            else:
                pad = np.zeros((capacity - a.shape[0], *a.shape[1:]), a.dtype)
                out.append(np.concatenate([a, pad]))
        return (*out, np.asarray(self.n_pairs, np.int32))


def _verlet(p: ElectrostaticsParams, cell: np.ndarray, n: int, dtype) -> _VerletList:
    key = (p.r_cut, cell.astype(np.float64).tobytes(), n, str(dtype))
    with _lock:
        v = _lists.get(key)
        if v is None:
            v = _VerletList(np.asarray(cell, dtype=float), p.r_cut, np.dtype(dtype))
            _put(_lists, key, v)
        else:
            _lists.move_to_end(key)
    return v


def _estimated_capacity(p: ElectrostaticsParams, cell: np.ndarray, n: int) -> int:
    """Uniform-density estimate of the pairs within the list cut-off, with head-room."""
    r = p.r_cut * (1.0 + SKIN)
    vol = abs(float(np.linalg.det(cell)))
    return int(math.ceil(1.5 * n * (n / vol) * (4.0 / 3.0) * math.pi * r**3)) + 64


def neighbors(p: ElectrostaticsParams, positions: Any, cell: np.ndarray) -> NeighborList:
    """The real-space list for ``positions`` (concrete: host; abstract: a pure callback)."""
    n = int(positions.shape[0])
    dtype = positions.dtype
    v = _verlet(p, cell, n, dtype)
    pos = primal(positions)
    if pos is not None:
        with _lock:
            v.update(np.asarray(pos, dtype=float))
            return v.device()
    capacity = v.capacity if v.capacity else _estimated_capacity(p, cell, n)
    shapes = (
        jax.ShapeDtypeStruct((capacity,), jnp.int32),
        jax.ShapeDtypeStruct((capacity,), jnp.int32),
        jax.ShapeDtypeStruct((capacity, 3), dtype),
        jax.ShapeDtypeStruct((capacity,), jnp.bool_),
        jax.ShapeDtypeStruct((), jnp.int32),
    )

    def host(pos_now):
        with _lock:
            v.update(np.asarray(pos_now, dtype=float))
            return v.padded(capacity)

    senders, receivers, shifts, mask, n_pairs = jax.pure_callback(
        host, shapes, jax.lax.stop_gradient(positions), vmap_method="sequential"
    )
    return NeighborList(
        senders=senders,
        receivers=receivers,
        shifts=shifts,
        mask=mask,
        n_pairs=n_pairs,
        r_cut=v.r_list,
    )
