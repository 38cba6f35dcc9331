"""Public electrostatics functions: array-level kernels and System-level conveniences.

``phi_i = ∂E/∂q_i`` everywhere (it includes the atom's own Gaussian self-energy term and
the neutralising-background term), so ``E = ½ Σ q_i φ_i`` exactly and ``φ`` is linear and
symmetric in the charges (the Qeq solvers use it as the matvec ``A q``).

The array-level functions (``*_arrays``) are pure and take prepared parameters and lists.
The System-level ones (:func:`energy`, :func:`potential`, :func:`energy_and_forces`) check
their inputs on the host, take parameters and a Verlet list from
:mod:`celli_scale.electrostatics.cache`, and run one compiled kernel per call.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from celli_scale import cell as cellmod
from celli_scale.electrostatics import cache, direct, ewald, pme
from celli_scale.electrostatics.limits import check_real, memory_limit
from celli_scale.electrostatics.params import ElectrostaticsParams, validate_sigma
from celli_scale.neighbors import NeighborList, neighbor_list
from celli_scale.strain import energy_forces_stress

# peak bytes per (atom, atom, image) element of the dense in-jit real-space sum with
# gradients (vector, distance, kernel, masks and their cotangents)
_BYTES_DENSE_ELEMENT = 96


def _is_concrete(x: Any) -> bool:
    return x is not None and not isinstance(x, jax.core.Tracer)


def real_space_neighbors(system, params: ElectrostaticsParams, capacity: int | None = None):
    """Host-side neighbor list with the real-space cut-off of ``params`` (``None`` for
    ``"direct"``). Reuse it for repeated evaluations at the same positions (e.g. Qeq
    matvecs) and pass it as ``neighbors=`` to keep the real-space part O(N) inside jit."""
    if not params.periodic:
        return None
    return neighbor_list(system, params.r_cut, capacity)


def _host_neighbors(positions, cell, mask, r_cut) -> NeighborList:
    pos = np.asarray(positions, dtype=float)
    idx = np.flatnonzero(np.asarray(mask, dtype=bool))
    i, j, s, _ = cellmod.host_pairs(pos[idx], np.asarray(cell, dtype=float), (True,) * 3, r_cut)
    e = max(i.size, 1)
    senders = np.zeros(e, np.int32)
    receivers = np.zeros(e, np.int32)
    shifts = np.zeros((e, 3), pos.dtype)
    m = np.zeros(e, bool)
    senders[: i.size], receivers[: i.size], shifts[: i.size], m[: i.size] = idx[i], idx[j], s, True
    return NeighborList(
        senders=jnp.asarray(senders),
        receivers=jnp.asarray(receivers),
        shifts=jnp.asarray(shifts, dtype=positions.dtype),
        mask=jnp.asarray(m),
        n_pairs=jnp.asarray(i.size, dtype=jnp.int32),
        r_cut=float(r_cut),
    )


def _check_sigma_cutoff(sigma: np.ndarray, params: ElectrostaticsParams) -> None:
    """Gaussian widths need ``r_cut >= 2 s max(σ)``; ``params`` may be for narrower ones."""
    if not params.periodic or sigma.size == 0:
        return
    s_max = float(np.max(sigma))
    if 2.0 * params.s * s_max > params.r_cut * (1 + 1e-9):
        raise ValueError(
            f"Gaussian width sigma={s_max:.4g} Å needs a real-space cut-off of "
            f"{2 * params.s * s_max:.4g} Å but params have r_cut={params.r_cut:.4g} Å; "
            "pass sigma to prepare()"
        )


def _inputs(positions, cell, charges, sigma, params, mask):
    positions = jnp.asarray(positions)
    if positions.ndim != 2 or positions.shape[1] != 3:
        raise ValueError(f"positions must have shape (N, 3), got {tuple(positions.shape)}")
    n = positions.shape[0]
    dtype = positions.dtype
    check_real("positions", positions)
    check_real("charges", charges)
    charges = jnp.asarray(charges)
    if charges.shape != (n,):
        raise ValueError(
            f"charges must have shape ({n},) (one charge per atom, e), got {tuple(charges.shape)}"
        )
    if mask is None:
        mask = jnp.ones(n, dtype=bool)
    else:
        mask = jnp.asarray(mask)
        if mask.shape != (n,) or mask.dtype != jnp.bool_:
            raise ValueError(
                f"mask must be a bool array of shape ({n},), got {mask.dtype}{tuple(mask.shape)}"
            )
    if params.periodic:
        if cell is None:
            raise ValueError(f"method {params.method!r} needs a cell; got cell=None")
        cell = jnp.asarray(cell, dtype=dtype)
        if cell.shape != (3, 3):
            raise ValueError(f"cell must have shape (3, 3), got {tuple(cell.shape)}")
    if sigma is not None:
        check_real("sigma", sigma)
        sigma = (
            jnp.broadcast_to(jnp.asarray(sigma, dtype=dtype), (n,))
            if jnp.ndim(sigma) == 0
            else jnp.asarray(sigma, dtype=dtype)
        )
        validate_sigma(sigma, n, mask)
        if _is_concrete(sigma) and _is_concrete(mask):
            _check_sigma_cutoff(np.where(np.asarray(mask), np.asarray(sigma), 0.0), params)
        sigma = jnp.where(mask, sigma, 1.0)
    q = jnp.where(mask, charges.astype(dtype), 0.0)
    positions = jnp.where(mask[:, None], positions, 0.0)
    return positions, cell, q, sigma, mask


def _evaluate(positions, cell, charges, sigma, params, neighbors, mask, want):
    positions, cell, q, sigma, mask = _inputs(positions, cell, charges, sigma, params, mask)
    if (
        params.periodic
        and neighbors is None
        and _is_concrete(positions)
        and _is_concrete(cell)
        and _is_concrete(mask)
    ):
        neighbors = _host_neighbors(positions, cell, mask, params.r_cut)
    return _compute(positions, cell, q, sigma, mask, params, neighbors, want)


def _check_dense_size(n: int, n_images: int) -> None:
    """Refuse (at trace time) a dense real-space sum that would not fit in memory."""
    nbytes = n * n * n_images * _BYTES_DENSE_ELEMENT
    if nbytes > memory_limit():
        raise ValueError(
            f"the dense in-jit real-space sum ({n} atoms × {n} atoms × {n_images} images, "
            f"used when positions are traced and no neighbor list is given) would need "
            f"about {nbytes / 2**30:.3g} GiB, over the limit of {memory_limit() / 2**30:.3g} "
            "GiB; pass neighbors= (real_space_neighbors) or a concrete cell"
        )


@partial(jax.jit, static_argnames=("want",))
def _compute(positions, cell, q, sigma, mask, params, neighbors, want):
    """The jit-compiled kernel (inlined when called inside an outer jit)."""
    if not params.periodic:
        if want == "phi":
            return jnp.where(mask, direct.potential(positions, q, sigma, mask), 0.0)
        return direct.energy(positions, q, sigma, mask)
    alpha = params.alpha
    volume = jnp.abs(jnp.linalg.det(cell))
    if neighbors is not None:
        real = ewald.real_space_pairs(
            positions, cell, q, sigma, alpha, neighbors, mask, want, r_cut=params.r_cut
        )
    else:
        _check_dense_size(positions.shape[0], params.shifts.shape[0])
        shifts = params.shifts.astype(positions.dtype)
        real = ewald.real_space_dense(
            positions, cell, q, sigma, alpha, params.r_cut, shifts, mask, want
        )
    if params.method == "ewald":
        recip = ewald.reciprocal(
            positions, cell, q, alpha, params.kvecs.astype(positions.dtype), want, params.kbox
        )
    else:
        recip = pme.reciprocal(
            positions, cell, q, alpha, params.grid, params.order, params.bsp_moduli, want
        )
    phi_self = ewald.self_and_background_potential(q, sigma, alpha, volume)
    if want == "phi":
        return jnp.where(mask, real + recip + phi_self, 0.0)
    return real + recip + 0.5 * jnp.sum(q * phi_self)


def potential_arrays(
    positions: jax.Array,
    cell: jax.Array | None,
    charges: jax.Array,
    sigma: jax.Array | None,
    params: ElectrostaticsParams,
    neighbors: NeighborList | None = None,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Electrostatic potential ``φ_i = ∂E/∂q_i`` at every atom, in V (= eV/e).

    Pure and jit-able; differentiable w.r.t. positions ``(N, 3)`` Å, cell ``(3, 3)`` Å
    (rows), charges ``(N,)`` e and sigma ``(N,)`` Å. Exactly linear and symmetric in the
    charges. ``neighbors``: real-space list from :func:`real_space_neighbors` (O(N)); if
    ``None`` it is built on the host when positions and cell are concrete, otherwise an
    exact dense all-pairs × images sum runs inside jit (O(N² S), small systems).
    ``mask``: optional ``(N,)`` bool, False for padding atoms (no charge, no effect, φ = 0).
    """
    return _evaluate(positions, cell, charges, sigma, params, neighbors, mask, "phi")


def potential_operator(
    positions: jax.Array,
    cell: jax.Array | None,
    sigma: jax.Array | None,
    params: ElectrostaticsParams,
    neighbors: NeighborList | None = None,
    mask: jax.Array | None = None,
):
    """The linear map ``q ↦ φ`` of :func:`potential_arrays` for a fixed geometry, with
    what does not depend on the charges computed once: the real-space pair kernel
    (arranged one row per atom when ``neighbors.row_capacity`` is set) and the PME spline
    stencil and influence function. For many products with the same positions (the
    Qeq's CG iterations); equal to :func:`potential_arrays` to round-off and
    differentiable the same way (through the closed-over geometry)."""
    n = jnp.shape(positions)[0]
    dtype = jnp.asarray(positions).dtype
    positions, cell, _, sigma, mask = _inputs(
        positions, cell, jnp.zeros((n,), dtype), sigma, params, mask
    )
    if not params.periodic or neighbors is None:
        return lambda q: _compute(
            positions, cell, jnp.where(mask, q, 0.0), sigma, mask, params, neighbors, "phi"
        )
    alpha = params.alpha
    volume = jnp.abs(jnp.linalg.det(cell))
    real = ewald.real_space_operator(
        positions, cell, sigma, alpha, neighbors, mask, r_cut=params.r_cut
    )
    if params.method == "pme":
        recip = pme.operator(positions, cell, alpha, params.grid, params.order, params.bsp_moduli)
    else:
        kvecs = params.kvecs.astype(positions.dtype)

        def recip(q):
            return ewald.reciprocal(positions, cell, q, alpha, kvecs, "phi", params.kbox)

    def apply(q):
        q = jnp.where(mask, q, 0.0)
        phi_self = ewald.self_and_background_potential(q, sigma, alpha, volume)
        return jnp.where(mask, real(q) + recip(q) + phi_self, 0.0)

    return apply


def energy_arrays(
    positions: jax.Array,
    cell: jax.Array | None,
    charges: jax.Array,
    sigma: jax.Array | None,
    params: ElectrostaticsParams,
    neighbors: NeighborList | None = None,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Electrostatic energy in eV (``= ½ q·φ``); same arguments as :func:`potential_arrays`."""
    return _evaluate(positions, cell, charges, sigma, params, neighbors, mask, "energy")


def _check_charges(charges: Any, n: int) -> None:
    """Host checks of System-level charges: real, one per atom, finite (when concrete)."""
    check_real("charges", charges)
    if jnp.shape(charges) != (n,):
        raise ValueError(
            f"charges must have shape ({n},) (one charge per atom, e), got {jnp.shape(charges)}"
        )
    q = cache.primal(charges)
    if q is not None and not np.all(np.isfinite(q)):
        i = int(np.flatnonzero(~np.isfinite(q))[0])
        raise ValueError(f"charges must be finite (e); atom {i} has charge {q[i]}")


def _system_state(system, charges, sigma, method, accuracy, params, neighbors):
    """Checks, cached parameters and the cached real-space list for a System-level call."""
    _check_charges(charges, system.n_atoms)
    sigma_now = cache.primal(sigma)
    validate_sigma(sigma if sigma_now is None else sigma_now, system.n_atoms)
    if params is not None and sigma_now is not None:
        _check_sigma_cutoff(np.broadcast_to(sigma_now, (system.n_atoms,)), params)
    cell_np = cache.primal(system.cell) if system.periodic else None
    if params is None:
        if system.periodic and cell_np is None:
            raise ValueError(
                "electrostatics needs a concrete cell to choose its parameters (the cell "
                "is traced inside jit): call prepare() outside and pass params="
            )
        params = cache.params(system, method, accuracy, sigma, cell_np)
    elif params.periodic != system.periodic:
        raise ValueError(
            f"params are for method {params.method!r} but the system has pbc={system.pbc}"
        )
    cell = system.cell if params.periodic else None
    if params.periodic and neighbors is None and cell_np is not None:
        neighbors = cache.neighbors(params, system.positions, cell_np)
    return params, cell, neighbors


def _arg(x):
    """Arrays as jit arguments (lists and scalars become one numpy leaf)."""
    return x if x is None or isinstance(x, jax.Array) else np.asarray(x)


@partial(jax.jit, static_argnames=("want",))
def _system_kernel(positions, cell, charges, sigma, params, neighbors, want):
    """``_inputs`` and ``_compute`` in one compiled call (no eager ops per call)."""
    positions, cell, q, sigma, mask = _inputs(positions, cell, charges, sigma, params, None)
    return _compute(positions, cell, q, sigma, mask, params, neighbors, want)


def _on_system(system, charges, sigma, method, accuracy, params, neighbors, want):
    """Cached parameters and list (host), then the one compiled System-level kernel."""
    params, cell, neighbors = _system_state(
        system, charges, sigma, method, accuracy, params, neighbors
    )
    args = (system.positions, cell, _arg(charges), _arg(sigma), params, neighbors)
    return _system_kernel(*args, want)


def energy(
    system,
    charges: jax.Array,
    sigma: jax.Array | None = None,
    method: str = "auto",
    accuracy: float = 1e-6,
    *,
    params: ElectrostaticsParams | None = None,
    neighbors: NeighborList | None = None,
) -> jax.Array:
    """Electrostatic energy (eV) of ``charges`` (e) on ``system``.

    Gaussian charges of widths ``sigma`` (Å) if given, else point charges. Periodic
    systems get a uniform neutralising background for a net charge. Differentiable
    w.r.t. positions, cell, charges and sigma.

    Parameters (:func:`prepare`) and the real-space neighbor list are kept between calls
    (:mod:`celli_scale.electrostatics.cache`) and the kernel is compiled once per
    (method, shapes), so repeated calls on moving atoms cost one kernel call. ``params``
    override ``method``/``accuracy``; they are required when the cell is traced inside
    ``jit``. ``neighbors`` (from :func:`real_space_neighbors`) override the cached list.

    Raises:
      ValueError: bad charges (shape, non-real dtype, NaN/inf naming the atom; the value
        check runs when the charges are concrete), bad sigma, or any :func:`prepare` error.

    Example:
      >>> e, f = energy_and_forces(system, q)      # forces: the fast, recommended way
      >>> e = energy(system, q, method="ewald", accuracy=1e-8)
      >>> f = -jax.grad(lambda p: energy(system.replace(positions=p), q))(system.positions)
    """
    return _on_system(system, charges, sigma, method, accuracy, params, neighbors, "energy")


def potential(
    system,
    charges: jax.Array,
    sigma: jax.Array | None = None,
    method: str = "auto",
    accuracy: float = 1e-6,
    *,
    params: ElectrostaticsParams | None = None,
    neighbors: NeighborList | None = None,
) -> jax.Array:
    """Potential ``φ_i = ∂E/∂q_i`` (V = eV/e) at every atom; see :func:`energy`."""
    return _on_system(system, charges, sigma, method, accuracy, params, neighbors, "phi")


@partial(jax.jit, static_argnames=("stress",))
def _energy_forces(positions, cell, charges, sigma, params, neighbors, stress):
    """One compiled energy-and-gradient kernel (strain derivative when ``stress``)."""
    positions, cell, q, sigma, mask = _inputs(positions, cell, charges, sigma, params, None)

    def e_fn(pos, c):
        return _compute(pos, c, q, sigma, mask, params, neighbors, "energy")

    return energy_forces_stress(e_fn, positions, cell, stress=stress)


def energy_and_forces(
    system,
    charges: jax.Array,
    sigma: jax.Array | None = None,
    method: str = "auto",
    accuracy: float = 1e-6,
    *,
    stress: bool = False,
    params: ElectrostaticsParams | None = None,
    neighbors: NeighborList | None = None,
):
    """Energy (eV), forces ``-∂E/∂r`` (eV/Å) and optionally stress (eV/Å³), in one call.

    The recommended way to get forces: one jit-compiled ``value_and_grad`` kernel,
    compiled once per (method, shapes), with the parameters and the real-space Verlet
    list kept between calls (:mod:`celli_scale.electrostatics.cache`; rebuilt when atoms
    moved more than half the skin, at the same capacity). Arguments as :func:`energy`.

    Args:
      stress: also return the stress ``(1/V) ∂E/∂ε`` ``(3, 3)`` eV/Å³ for a symmetric
        strain ε applied to positions and cell (ASE's sign convention, as
        :mod:`celli_scale.potential`); periodic systems only.

    Returns:
      ``(energy, forces)`` — ``()`` eV and ``(N, 3)`` eV/Å — or
      ``(energy, forces, stress)`` with ``stress=True``. Differentiable again w.r.t.
      charges, sigma and positions.

    Raises:
      ValueError: as :func:`energy`; ``stress=True`` on an open system.

    Example:
      >>> e, f = energy_and_forces(system, q)                    # doctest: +SKIP
      >>> e, f, s = energy_and_forces(system, q, method="pme", stress=True)  # doctest: +SKIP
    """
    params, cell, neighbors = _system_state(
        system, charges, sigma, method, accuracy, params, neighbors
    )
    if stress and not params.periodic:
        raise ValueError("stress needs a periodic system (pbc all True); this one is open")
    args = (system.positions, cell, _arg(charges), _arg(sigma), params, neighbors)
    e, f, s = _energy_forces(*args, stress)
    return (e, f, s) if stress else (e, f)
