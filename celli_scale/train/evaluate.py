"""Errors of a potential on labelled data, grouped by (chemical formula, total charge).

Energy RMSE in meV/atom (per-structure energy error divided by its atom count), force
RMSE in meV/Å (over force components), charge RMSE in me (over atoms, where labelled).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

KEYS = ("energy_rmse_mev_per_atom", "force_rmse_mev_per_a", "charge_rmse_me")


def formula(species: Any) -> str:
    """Hill-ordered chemical formula of atomic numbers (ASE's ``get_chemical_formula``)."""
    from ase import Atoms

    return Atoms(numbers=np.asarray(species)).get_chemical_formula()


def predictions(pot: Any, frames: Sequence[Any]) -> list[dict[str, np.ndarray | float]]:
    """Energy (eV), forces (eV/Å) and charges (e or None) of every frame's structure."""
    out = []
    for f in frames:
        o = pot(f.system)
        q = None if o.charges is None else np.asarray(o.charges)[: f.system.n_atoms]
        out.append(
            {
                "energy": float(o.energy),
                "forces": np.asarray(o.forces)[: f.system.n_atoms],
                "charges": q,
            }
        )
    return out


def _rmse(sq: float, n: int) -> float | None:
    return math.sqrt(sq / n) if n else None


def error_table(frames: Sequence[Any], preds: Sequence[dict]) -> dict[str, Any]:
    """``{"groups": [...], "overall": {...}}`` with the keys of the ``evaluate`` JSON."""
    acc: dict[tuple[str, float], list[float]] = {}
    for f, p in zip(frames, preds, strict=True):
        key = (formula(f.system.species), float(f.system.total_charge))
        a = acc.setdefault(key, [0, 0.0, 0, 0.0, 0, 0.0, 0])
        n = f.system.n_atoms
        a[0] += 1
        if f.energy is not None:
            a[1] += ((p["energy"] - f.energy) / n * 1e3) ** 2
            a[2] += 1
        if f.forces is not None:
            a[3] += float(np.sum(((p["forces"] - f.forces) * 1e3) ** 2))
            a[4] += 3 * n
        if f.charges is not None and p["charges"] is not None:
            a[5] += float(np.sum(((p["charges"] - f.charges) * 1e3) ** 2))
            a[6] += n

    def row(a):
        return {
            "n_structures": int(a[0]),
            "energy_rmse_mev_per_atom": _rmse(a[1], a[2]),
            "force_rmse_mev_per_a": _rmse(a[3], a[4]),
            "charge_rmse_me": _rmse(a[5], a[6]),
        }

    groups = [{"formula": k[0], "total_charge": k[1], **row(a)} for k, a in sorted(acc.items())]
    total = [sum(a[i] for a in acc.values()) for i in range(7)]
    return {"groups": groups, "overall": row(total)}


def table_lines(table: dict[str, Any]) -> list[str]:
    """A plain-text table of :func:`error_table`."""

    def fmt(v):
        return "-" if v is None else f"{v:.3f}"

    head = f"{'formula':<14}{'charge':>7}{'n':>6}{'E meV/atom':>12}{'F meV/Å':>12}{'q me':>10}"
    lines = [head]
    rows = [*table["groups"], {"formula": "overall", "total_charge": None, **table["overall"]}]
    for r in rows:
        q = "" if r["total_charge"] is None else f"{r['total_charge']:+g}"
        lines.append(
            f"{r['formula']:<14}{q:>7}{r['n_structures']:>6}"
            f"{fmt(r['energy_rmse_mev_per_atom']):>12}{fmt(r['force_rmse_mev_per_a']):>12}"
            f"{fmt(r['charge_rmse_me']):>10}"
        )
    return lines


def parity_plot(frames: Sequence[Any], preds: Sequence[dict], path: str) -> None:
    """Parity plots (reference vs predicted) of energy per atom, forces and charges."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    e = [
        (f.energy / f.system.n_atoms, p["energy"] / f.system.n_atoms)
        for f, p in zip(frames, preds, strict=True)
        if f.energy is not None
    ]
    if e:
        panels.append(("energy (eV/atom)", np.asarray(e)))
    fo = [
        np.stack([f.forces.ravel(), p["forces"].ravel()], 1)
        for f, p in zip(frames, preds, strict=True)
        if f.forces is not None
    ]
    if fo:
        panels.append(("force (eV/Å)", np.concatenate(fo)))
    q = [
        np.stack([f.charges, p["charges"]], 1)
        for f, p in zip(frames, preds, strict=True)
        if f.charges is not None and p["charges"] is not None
    ]
    if q:
        panels.append(("charge (e)", np.concatenate(q)))
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(4 * max(len(panels), 1), 4))
    for ax, (name, d) in zip(np.atleast_1d(axes), panels, strict=False):
        ax.scatter(d[:, 0], d[:, 1], s=4)
        lo, hi = float(d.min()), float(d.max())
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_xlabel(f"reference {name}")
        ax.set_ylabel(f"predicted {name}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
