"""Input checks of the charge equilibration (:mod:`celli_scale.qeq`): per-atom arrays,
atom groups with their total charges, solver settings. Each raises ``ValueError`` naming
the input and the problem; inputs traced under ``jit`` are checked for shape only."""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from celli_scale.units import COULOMB

#: Solver choices of :func:`celli_scale.qeq.solve`.
METHODS = ("auto", "dense", "cg")


def is_concrete(x: Any) -> bool:
    return x is not None and not isinstance(x, jax.core.Tracer)


def check_per_atom(name: str, x: Any, n: int, unit: str) -> None:
    if not is_concrete(x):
        if jnp.shape(x) != (n,):
            raise ValueError(f"{name} must have shape ({n},) ({unit} per atom), got {jnp.shape(x)}")
        return
    arr = np.asarray(x)
    if arr.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) ({unit} per atom), got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise ValueError(f"{name} must be real numbers, got dtype {arr.dtype}")
    bad = ~np.isfinite(arr.astype(float))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{name} is not finite at atom {i} ({arr[i]})")


def check_groups(n: int, groups: Any, group_charges: Any, total_charge: Any):
    """Validate (and, on the host, normalise) per-group charge constraints.

    ``groups`` is an ``(N,)`` int array of group ids ``0..G-1`` or (concrete only) a
    sequence of ``G`` index lists that together cover every atom exactly once.
    ``group_charges`` is ``(G,)`` in e. Returns ``(ids, group_charges)`` (numpy when
    concrete, the inputs unchanged when traced).
    """
    if (groups is None) != (group_charges is None):
        raise ValueError("groups and group_charges must be given together (or neither)")
    if not is_concrete(group_charges):
        gshape = jnp.shape(group_charges)
        if len(gshape) != 1 or gshape[0] < 1:
            raise ValueError(f"group_charges must have shape (G,) with G >= 1, got {gshape}")
    else:
        gc = np.asarray(group_charges)
        if gc.ndim != 1 or gc.size < 1:
            raise ValueError(f"group_charges must have shape (G,) with G >= 1, got {gc.shape}")
        if not np.issubdtype(gc.dtype, np.number) or np.iscomplexobj(gc):
            raise ValueError(f"group_charges must be real numbers, got dtype {gc.dtype}")
        bad = ~np.isfinite(gc.astype(float))
        if bad.any():
            raise ValueError(f"group_charges is not finite at group {int(np.flatnonzero(bad)[0])}")
        group_charges = gc
    ng = jnp.shape(group_charges)[0]
    if not is_concrete(groups):
        if jnp.shape(groups) != (n,) or not jnp.issubdtype(jnp.asarray(groups).dtype, jnp.integer):
            raise ValueError(
                f"groups must be an ({n},) integer array of group ids, got shape "
                f"{jnp.shape(groups)} dtype {jnp.asarray(groups).dtype}"
            )
        return groups, group_charges
    if not isinstance(groups, (np.ndarray, jax.Array)) and any(np.ndim(g) == 1 for g in groups):
        # a sequence of index lists: every atom in exactly one group
        if len(groups) != ng:
            raise ValueError(
                f"groups lists {len(groups)} groups but group_charges has {ng} charges"
            )
        ids = np.full(n, -1, dtype=np.int32)
        for g, idx in enumerate(groups):
            idx = np.asarray(idx)
            if idx.size == 0:
                idx = idx.astype(np.int64)
            if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
                raise ValueError(f"group {g} must be a list of atom indices, got {idx!r}")
            out = (idx < 0) | (idx >= n)
            if out.any():
                raise ValueError(f"group {g} has atom index {int(idx[out][0])} outside 0..{n - 1}")
            seen = ids[idx] >= 0
            if seen.any() or np.unique(idx).size != idx.size:
                i = int(idx[seen][0]) if seen.any() else int(idx[np.argmax(np.bincount(idx))])
                raise ValueError(f"groups overlap: atom {i} is in more than one group")
            ids[idx] = g
        if (ids < 0).any():
            raise ValueError(f"atom {int(np.flatnonzero(ids < 0)[0])} is in no group")
    else:
        ids = np.asarray(groups)
        if ids.shape != (n,):
            raise ValueError(
                f"groups must have shape ({n},) (one group id per atom), got {ids.shape}"
            )
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"groups must be integer group ids, got dtype {ids.dtype}")
        out = (ids < 0) | (ids >= ng)
        if out.any():
            i = int(np.flatnonzero(out)[0])
            raise ValueError(
                f"groups: atom {i} has group id {int(ids[i])}, outside 0..{ng - 1} "
                f"(group_charges has {ng} entries)"
            )
        ids = ids.astype(np.int32)
    empty = np.bincount(ids, minlength=ng) == 0
    if empty.any():
        raise ValueError(f"group {int(np.flatnonzero(empty)[0])} has no atoms")
    if is_concrete(total_charge) and is_concrete(group_charges):
        tot = float(np.asarray(total_charge))
        gsum = float(np.sum(np.asarray(group_charges, dtype=float)))
        if abs(tot - gsum) > 1e-6 * max(1.0, float(np.sum(np.abs(group_charges)))):
            raise ValueError(
                f"total charge {tot:g} e differs from the sum of the group charges {gsum:g} e "
                "(give a consistent total charge, or none)"
            )
    return ids, group_charges


def check_inputs(n, chi, hardness, sigma, q0, tol, method) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    # any real number type (numpy scalars included), but not bool, NaN or inf
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not 0 < tol < np.inf:
        raise ValueError(f"tol must be a positive, finite number, got {tol!r}")
    check_per_atom("chi", chi, n, "eV/e")
    check_per_atom("hardness", hardness, n, "eV/e²")
    if sigma is not None:
        check_per_atom("sigma", sigma, n, "Å")
        if is_concrete(sigma):
            s = np.asarray(sigma, dtype=float)
            if np.any(s <= 0):
                i = int(np.flatnonzero(s <= 0)[0])
                raise ValueError(f"sigma must be positive: atom {i} has sigma = {s[i]} Å")
    if q0 is not None:
        check_per_atom("q0", q0, n, "e")
    if is_concrete(hardness) and (sigma is None or is_concrete(sigma)):
        # The diagonal of an SPD matrix is positive. A_ii = J_i + Gaussian self term
        # (exact for open point charges; periodic self-image terms are small and are
        # caught by the solver's own definiteness test).
        d = np.asarray(hardness, dtype=float) + (
            0.0 if sigma is None else COULOMB / (np.asarray(sigma, dtype=float) * np.sqrt(np.pi))
        )
        if np.any(d <= 0):
            i = int(np.flatnonzero(d <= 0)[0])
            what = "hardness" if sigma is None else "hardness + COULOMB/(sigma*sqrt(pi))"
            raise ValueError(
                f"Qeq matrix is not positive definite: atom {i} has {what} = {d[i]:.6g} "
                f"eV/e² <= 0 (hardness[{i}] = {float(np.asarray(hardness)[i]):.6g})"
            )


__all__ = ["METHODS", "check_groups", "check_inputs", "check_per_atom", "is_concrete"]
