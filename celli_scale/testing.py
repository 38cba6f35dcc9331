"""Public test helpers for potentials: use them in your own tests, as ours do.

Like e3nn-jax's ``assert_equivariant``, each helper checks one physical property
numerically and raises ``AssertionError`` with the numbers when it fails:

* :func:`assert_equivariant`: E(3) and permutation symmetry of energy, forces, stress,
  charges and atomic energies;
* :func:`assert_forces_match_fd` / :func:`assert_stress_matches_fd`: derivatives against
  central finite differences;
* :func:`assert_padding_invariant`: padding (with :func:`padded_graph`, which sets NaN
  traps) changes nothing and gives finite, zero gradients on padded atoms;
* :func:`assert_dtype_preserved`: every floating output has the model's dtype.

:func:`random_params` re-draws every parameter ``O(1)`` (at initialisation some paths
carry almost no signal, so a dropped term could hide); :func:`orthogonal_matrix` gives a
random (im)proper rotation. Everything here evaluates through the public API
(:class:`celli_scale.Potential`, :func:`celli_scale.potential.energy_and_derivatives`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from celli_scale.models.layers import Graph
from celli_scale.system import System

__all__ = [
    "assert_dtype_preserved",
    "assert_equivariant",
    "assert_forces_match_fd",
    "assert_padding_invariant",
    "assert_stress_matches_fd",
    "orthogonal_matrix",
    "padded_graph",
    "random_params",
    "relative_error",
    "run_with_devices",
    "small_celli_config",
]


def small_allegro_config(**overrides: Any) -> dict[str, Any]:
    """A narrow Allegro config (Na, Cl; r_cut 3.5 Å, 4 channels, 2 layers, float64) that
    compiles in seconds; ``overrides`` replace or add keys (e.g. ``name="celli"``)."""
    cfg: dict[str, Any] = dict(
        name="allegro",
        r_cut=3.5,
        l_max=2,
        channels=4,
        n_layers=2,
        n_radial=4,
        species=(11, 17),
        radial_mlp=(16,),
        latent_dim=16,
        species_embed_dim=4,
        latent_mlp=(16,),
        edge_eng_mlp=(8,),
        avg_num_neighbors=6.0,
        dtype="float64",
    )
    cfg.update(overrides)
    return cfg


def small_celli_config(**overrides: Any) -> dict[str, Any]:
    """A narrow CELLI config: :func:`small_allegro_config` with ``l_max=1`` (short compile
    times) and 8-wide Qeq-layer MLPs; ``overrides`` replace or add keys."""
    cfg = small_allegro_config(l_max=1)
    cfg.update(
        name="celli",
        chi_mlp=(8,),
        charge_embed_mlp=(8,),
        charge_embed_dim=4,
        feedback_mlp=(8,),
        feedback_init=0.5,
    )
    cfg.update(overrides)
    return cfg


def relative_error(a: Any, b: Any) -> float:
    """``max |a - b| / max |b|`` (``b`` is the reference)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-300))


def orthogonal_matrix(seed: int, reflect: bool = False) -> np.ndarray:
    """A random ``(3, 3)`` rotation (``det = +1``), or an improper one (``det = -1``) with
    ``reflect``; orthonormal to float64 precision."""
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if (np.linalg.det(q) < 0) != reflect:
        q[:, 0] *= -1
    return q


def random_params(params: Any, seed: int, scale: float = 1.0) -> Any:
    """``params`` with every leaf redrawn from ``N(0, scale²)`` (same structure and dtypes)."""
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return tree.unflatten(
        [scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
    )


def padded_graph(graph: Graph, n_atoms: int, n_edges: int, seed: int = 0) -> Graph:
    """``graph`` with ``n_atoms`` padded atoms and ``n_edges`` padded edges appended.

    The padding sets NaN traps a careless model falls into: padded atoms all sit at the
    origin (coincident, so edges between them have zero length: a NaN in any unguarded
    ``1/r`` or ``sqrt`` gradient), half the padded edges join padded atoms and the other
    half join random (also real) atoms with random image shifts, so the edge mask alone
    must remove them. Padded atoms have species index 0. Electrostatics parameters and
    neighbours (CELLI) are kept: they index real atoms only.
    """
    rng = np.random.default_rng(seed)
    n0 = graph.positions.shape[0]
    n = n0 + n_atoms
    dt = graph.positions.dtype
    if n_atoms:
        half = n_edges // 2
        snd = np.concatenate([rng.integers(n0, n, half), rng.integers(0, n, n_edges - half)])
        rcv = np.concatenate([rng.integers(n0, n, half), rng.integers(0, n, n_edges - half)])
    else:
        snd, rcv = rng.integers(0, n, n_edges), rng.integers(0, n, n_edges)
    shifts = rng.integers(-1, 2, (n_edges, 3)) * bool(graph.periodic)
    idx = graph.senders.dtype
    return graph.replace(
        positions=jnp.concatenate([graph.positions, jnp.zeros((n_atoms, 3), dt)]),
        species=jnp.concatenate([graph.species, jnp.zeros(n_atoms, graph.species.dtype)]),
        node_mask=jnp.concatenate([graph.node_mask, jnp.zeros(n_atoms, bool)]),
        senders=jnp.concatenate([graph.senders, jnp.asarray(snd, idx)]),
        receivers=jnp.concatenate([graph.receivers, jnp.asarray(rcv, idx)]),
        shifts=jnp.concatenate([graph.shifts, jnp.asarray(shifts, graph.shifts.dtype)]),
        edge_mask=jnp.concatenate([graph.edge_mask, jnp.zeros(n_edges, bool)]),
    )


def _transformed(system: System, rot: np.ndarray, shift: np.ndarray, perm: np.ndarray) -> System:
    return System(
        (np.asarray(system.positions) @ rot.T + shift)[perm],
        np.asarray(system.species)[perm],
        cell=None if system.cell is None else np.asarray(system.cell) @ rot.T,
        pbc=system.pbc,
        total_charge=system.total_charge,
    )


def assert_equivariant(
    evaluate: Callable[[System], Any],
    system: System,
    *,
    seed: int = 0,
    reflect: bool = False,
    rtol: float = 1e-9,
) -> None:
    """Energy invariant; forces, stress, charges and atomic energies co-/invariant under a
    random rotation (improper with ``reflect``), translation and atom permutation.

    Args:
      evaluate: ``System -> output`` with ``energy`` and ``forces``, and optionally
        ``stress``, ``charges``, ``node_energies`` (e.g. a :class:`celli_scale.Potential`).
      system: a concrete structure (the cell rotates with it).
      rtol: relative tolerance of every comparison (max-norm, relative to the reference).
    """
    rot = orthogonal_matrix(seed, reflect)
    rng = np.random.default_rng(seed)
    shift = rng.uniform(-2.0, 2.0, 3)
    perm = rng.permutation(system.n_atoms)
    out = evaluate(system)
    out2 = evaluate(_transformed(system, rot, shift, perm))
    n = system.n_atoms
    checks = {
        "energy": (out2.energy, out.energy),
        "forces": (np.asarray(out2.forces)[:n], (np.asarray(out.forces)[:n] @ rot.T)[perm]),
    }
    if getattr(out, "stress", None) is not None:
        checks["stress"] = (out2.stress, rot @ np.asarray(out.stress) @ rot.T)
    for key in ("charges", "node_energies"):
        if getattr(out, key, None) is not None:
            checks[key] = (np.asarray(getattr(out2, key))[:n], np.asarray(getattr(out, key))[perm])
    for key, (got, want) in checks.items():
        err = relative_error(got, want)
        assert err <= rtol, f"{key} not equivariant: relative error {err:.3g} > {rtol:g}"


def assert_forces_match_fd(
    energy: Callable[[np.ndarray], float],
    positions: Any,
    forces: Any,
    *,
    components: Sequence[tuple[int, int]] | None = None,
    h: float = 1e-4,
    rtol: float = 1e-6,
    atol: float | None = None,
) -> None:
    """``forces`` equal ``-∂E/∂r`` by central finite differences (step ``h`` Å):
    ``|F - F_fd| <= atol + rtol |F_fd|`` for every checked component.

    Args:
      energy: ``positions (N, 3) -> E`` (eV).
      positions: ``(N, 3)`` Å where the forces were evaluated.
      forces: ``(N, 3)`` eV/Å.
      components: ``(atom, axis)`` pairs to check (default: all).
      rtol: tolerance relative to each finite difference.
      atol: absolute tolerance (eV/Å); default ``rtol · max |F|``. ``max |F|`` must be
        non-trivial (> 1e-3 eV/Å).
    """
    pos = np.asarray(positions, dtype=float)
    f = np.asarray(forces, dtype=float)
    if components is None:
        components = [(a, k) for a in range(pos.shape[0]) for k in range(3)]
    scale = float(np.abs(f).max())
    assert scale > 1e-3, f"forces are trivial (max |F| = {scale:.3g} eV/Å)"
    for a, k in components:
        e = []
        for sgn in (1, -1):
            p = pos.copy()
            p[a, k] += sgn * h
            e.append(float(energy(p)))
        fd = -(e[0] - e[1]) / (2 * h)
        tol = (rtol * scale if atol is None else atol) + rtol * abs(fd)
        assert abs(f[a, k] - fd) <= tol, (
            f"force on atom {a} axis {k}: {f[a, k]:.10g} vs finite difference {fd:.10g}"
        )


def assert_stress_matches_fd(
    energy: Callable[[jax.Array, jax.Array], Any],
    positions: Any,
    cell: Any,
    stress: Any,
    *,
    components: Sequence[tuple[int, int]] = ((0, 0), (1, 2), (2, 2)),
    h: float = 1e-5,
    rtol: float = 1e-6,
) -> None:
    """``stress`` equals ``(1/V) ∂E/∂ε`` by central differences of a symmetric strain
    ``ε`` applied to positions and cell (``r → r (1 + ε)``).

    Args:
      energy: ``(positions (N, 3), cell (3, 3)) -> E`` (eV), e.g. a model evaluated on
        one fixed graph with the positions and cell replaced.
      positions, cell: Å, where the stress was evaluated.
      stress: ``(3, 3)`` eV/Å³.
      rtol: tolerance relative to ``max(1, max |σ|)``.
    """
    pos = jnp.asarray(positions)
    c = jnp.asarray(cell)
    vol = abs(float(np.linalg.det(np.asarray(c, dtype=float))))
    s = np.asarray(stress, dtype=float)
    for a, b in components:
        e = []
        for sgn in (1, -1):
            eps = np.zeros((3, 3))
            eps[a, b] += sgn * h / 2
            eps[b, a] += sgn * h / 2
            d = jnp.asarray(np.eye(3) + eps, pos.dtype)
            e.append(float(energy(pos @ d, c @ d)))
        fd = (e[0] - e[1]) / (2 * h) / vol
        assert abs(s[a, b] - fd) <= rtol * max(1.0, float(np.abs(s).max())), (
            f"stress[{a}, {b}]: {s[a, b]:.10g} vs finite difference {fd:.10g}"
        )


def assert_padding_invariant(
    pot: Any,
    system: System,
    *,
    n_atoms: int = 3,
    n_edges: int = 17,
    rtol: float = 1e-12,
    seed: int = 0,
) -> None:
    """Padding a graph (:func:`padded_graph`) changes no energy, force, stress, charge or
    atomic energy; padded atoms get exactly zero forces, charges and energies, and every
    force is finite (no NaN leaks from the traps).

    ``pot`` is a :class:`celli_scale.Potential`; its ``evaluate`` is used on both graphs.
    """
    g = pot.graph(system)
    gp = padded_graph(g, n_atoms, n_edges, seed=seed)
    stress = system.periodic
    e, f, s, out = pot.evaluate(pot.params, g, stress=stress)
    ep, fp, sp, outp = pot.evaluate(pot.params, gp, stress=stress)
    n = system.n_atoms
    fp = np.asarray(fp)
    assert np.all(np.isfinite(fp)), "NaN/inf force with padding"
    assert np.all(fp[g.positions.shape[0] :] == 0.0), "padded atoms have non-zero forces"
    pairs = {"energy": (ep, e), "forces": (fp[:n], np.asarray(f)[:n])}
    if stress:
        pairs["stress"] = (sp, s)
    for key in ("charges", "node_energies"):
        if getattr(out, key) is not None:
            got = np.asarray(getattr(outp, key))
            assert np.all(got[g.positions.shape[0] :] == 0.0), f"padded atoms have {key}"
            pairs[key] = (got[:n], np.asarray(getattr(out, key))[:n])
    for key, (got, want) in pairs.items():
        err = relative_error(got, want)
        assert err <= rtol, f"padding changed {key}: relative error {err:.3g} > {rtol:g}"


def assert_dtype_preserved(tree: Any, dtype: Any) -> None:
    """Every floating-point array in ``tree`` (e.g. a model output) has ``dtype``."""
    want = jnp.dtype(dtype)
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    assert leaves, "nothing to check"
    for path, x in leaves:
        x = jnp.asarray(x)
        if jnp.issubdtype(x.dtype, jnp.floating):
            assert x.dtype == want, f"{jax.tree_util.keystr(path)} is {x.dtype}, expected {want}"


def run_with_devices(code: str, n_devices: int, cwd: Any, timeout: float = 300.0) -> Any:
    """Run ``code`` in a fresh Python with ``n_devices`` fake CPU devices (the flag must be
    set before JAX starts, so a test needing more devices than its process has runs it
    here; the compiler flags of the test suite are kept). Returns the
    ``subprocess.CompletedProcess`` (text output captured)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        f"--xla_force_host_platform_device_count={int(n_devices)} "
        "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    )
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(cwd), env.get("PYTHONPATH", "")]))
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
