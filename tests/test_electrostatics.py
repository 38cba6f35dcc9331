"""Electrostatics: direct, Ewald and PME against analytic Madelung constants, pymatgen,
open-boundary sums, finite differences, and the φ = ∂E/∂q contract used by Qeq."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import celli_scale as cs
from celli_scale import electrostatics as el
from celli_scale.units import COULOMB

# ---------------------------------------------------------------------------- helpers


def cubic_crystal(frac_pos, charges, a, species=(11, 17)):
    frac_pos = np.asarray(frac_pos, float)
    z = [species[0] if c > 0 else species[1] for c in charges]
    s = cs.System(frac_pos * a, z, cell=np.eye(3) * a, pbc=True)
    return s, np.asarray(charges, float)


FCC = np.array([[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]])


def rock_salt(a=5.64):
    pos = np.concatenate([FCC, FCC + [0.5, 0, 0]])
    return cubic_crystal(pos, [1.0] * 4 + [-1.0] * 4, a), a / 2


def cscl(a=4.12):
    return cubic_crystal([[0, 0, 0], [0.5, 0.5, 0.5]], [1.0, -1.0], a), a * np.sqrt(3) / 2


def zincblende(a=5.41):
    pos = np.concatenate([FCC, FCC + 0.25])
    return cubic_crystal(pos, [2.0] * 4 + [-2.0] * 4, a, (30, 16)), a * np.sqrt(3) / 4


MADELUNG = {  # REFERENCES.md, per ion pair
    "rock_salt": (rock_salt, 1.747564594633),
    "cscl": (cscl, 1.762674773070),
    "zincblende": (zincblende, 1.638055053388),
}


def random_system(n, seed, charged=False, min_distance=1.3):
    """Random triclinic periodic system with random charges (neutral unless ``charged``)."""
    rng = np.random.default_rng(seed)
    cell = np.diag([7.0, 8.0, 9.0]) + rng.uniform(-1.5, 1.5, (3, 3))
    for _ in range(1000):
        pos = rng.uniform(size=(n, 3)) @ cell
        try:
            s = cs.System(pos, np.full(n, 8), cell=cell, pbc=True, min_distance=min_distance)
            break
        except ValueError:
            continue
    q = rng.normal(size=n)
    q = q + (0.7 - q.sum()) / n if charged else q - q.mean()
    sigma = rng.uniform(0.6, 1.2, size=n)
    return s, q, sigma


@jax.jit
def _forces(positions, cell, q, sigma, params, neighbors):
    return -jax.grad(el.energy_arrays)(positions, cell, q, sigma, params, neighbors)


def forces(s, q, sigma, params, neighbors=None):
    """-dE/dr; with ``neighbors=None`` the dense real-space path (traced positions)."""
    return _forces(s.positions, s.cell, jnp.asarray(q), sigma, params, neighbors)


# -------------------------------------------------------------------------- Madelung


@pytest.mark.parametrize("name", sorted(MADELUNG))
@pytest.mark.parametrize("method, accuracy, rtol", [("ewald", 1e-9, 1e-7), ("pme", 1e-7, 1e-5)])
def test_madelung(name, method, accuracy, rtol):
    build, m = MADELUNG[name]
    (s, q), r0 = build()
    z2 = abs(q[0] * q[-1])
    e = el.energy(s, q, method=method, accuracy=accuracy)
    e_pair = float(e) / (s.n_atoms / 2)
    assert e_pair == pytest.approx(-m * COULOMB * z2 / r0, rel=rtol)
    # perfect crystal: every force vanishes by symmetry
    f = forces(s, q, None, el.prepare(s, method, accuracy))
    assert np.max(np.abs(f)) < 1e-6 * COULOMB * z2 / r0**2


def test_madelung_supercell_triclinic_cell():
    """Rock salt in its 2-atom primitive (triclinic, fcc) cell: same Madelung energy."""
    a = 5.64
    cell = 0.5 * a * np.array([[0, 1, 1], [1, 0, 1], [1, 1, 0]])
    s = cs.System([[0, 0, 0], [a / 2, 0, 0]], [11, 17], cell=cell, pbc=True)
    q = np.array([1.0, -1.0])
    for method, acc, rtol in [("ewald", 1e-9, 1e-7), ("pme", 1e-7, 1e-5)]:
        e = float(el.energy(s, q, method=method, accuracy=acc))
        assert e == pytest.approx(-1.747564594633 * COULOMB / (a / 2), rel=rtol)


# ---------------------------------------------------------------------------- pymatgen


def pymatgen_ewald(s, q):
    from pymatgen.analysis.ewald import EwaldSummation
    from pymatgen.core import Lattice, Structure

    st = Structure(
        Lattice(np.asarray(s.cell)),
        ["O"] * s.n_atoms,
        np.asarray(s.positions),
        coords_are_cartesian=True,
        site_properties={"charge": list(q)},
    )
    ew = EwaldSummation(st, acc_factor=30.0, compute_forces=True)
    return ew.total_energy, ew.forces


@pytest.mark.parametrize("seed", [0, 1])
def test_against_pymatgen(seed):
    s, q, _ = random_system(16, seed)
    e_ref, f_ref = pymatgen_ewald(s, q)
    fscale = np.max(np.abs(f_ref))
    results = {}
    for method in ("ewald", "pme"):
        params = el.prepare(s, method, 1e-7)
        nl = el.real_space_neighbors(s, params)
        e = float(el.energy(s, q, params=params, neighbors=nl))
        f = np.asarray(forces(s, q, None, params, nl))
        results[method] = (e, f)
        assert e == pytest.approx(e_ref, rel=1e-6), method
        assert np.max(np.abs(f - f_ref)) < 1e-6 * fscale, method
    (e1, f1), (e2, f2) = results["ewald"], results["pme"]
    assert e2 == pytest.approx(e1, rel=1e-6)
    assert np.max(np.abs(f2 - f1)) < 1e-6 * fscale


@pytest.mark.parametrize("method, factor", [("ewald", 1.0), ("pme", 2.0)])
def test_accuracy_meaning(method, factor):
    """``accuracy`` bounds the relative RMS force error (in units of COULOMB <q²>/a²) and
    the relative energy error, checked against a 1e-13 Ewald reference."""
    for seed in (3,):
        s, q, _ = random_system(30, seed, min_distance=1.0)
        ref = el.prepare(s, "ewald", 1e-13)
        e_ref = float(el.energy(s, q, params=ref))
        f_ref = np.asarray(forces(s, q, None, ref, el.real_space_neighbors(s, ref)))
        vol = abs(np.linalg.det(np.asarray(s.cell)))
        f_unit = COULOMB * np.mean(q**2) / (vol / s.n_atoms) ** (2 / 3)
        for acc in (1e-4, 1e-6):
            p = el.prepare(s, method, acc)
            e = float(el.energy(s, q, params=p))
            f = np.asarray(forces(s, q, None, p, el.real_space_neighbors(s, p)))
            assert abs(e / e_ref - 1) < acc
            assert np.sqrt(np.mean((f - f_ref) ** 2)) / f_unit < factor * acc
            # and the check can fail: a much looser setting misses the tighter target
        loose = el.prepare(s, method, 1e-2)
        f = np.asarray(forces(s, q, None, loose, el.real_space_neighbors(s, loose)))
        assert np.sqrt(np.mean((f - f_ref) ** 2)) / f_unit > 1e-5


# ---------------------------------------------------------------------- Gaussian charges


def test_gaussian_large_cell_matches_open_boundary():
    """Four Gaussian charges without dipole or second moment in a 64 Å cell: the periodic
    energy equals the open-boundary one (image terms are O(L^-5))."""
    d = 1.6
    pos = np.array([[d, 0, 0], [-d, 0, 0], [0, d, 0], [0, -d, 0]]) + 32.0
    q = np.array([1.0, 1.0, -1.0, -1.0])
    sigma = np.array([0.9, 0.9, 1.1, 1.1])
    open_s = cs.System(pos, [1] * 4)
    per_s = cs.System(pos, [1] * 4, cell=np.eye(3) * 64.0, pbc=True)
    e_open = float(el.energy(open_s, q, sigma))
    phi_open = np.asarray(el.potential(open_s, q, sigma))
    for method in ("ewald", "pme"):
        e = float(el.energy(per_s, q, sigma, method=method, accuracy=1e-8))
        assert e == pytest.approx(e_open, rel=1e-5), method
        phi = np.asarray(el.potential(per_s, q, sigma, method=method, accuracy=1e-8))
        assert np.allclose(phi, phi_open, rtol=1e-5, atol=1e-5 * np.abs(phi_open).max())
    # the Gaussian result differs from point charges (the test can fail)
    assert abs(float(el.energy(open_s, q)) - e_open) > 0.1


def test_direct_gaussian_analytic_pair():
    pos = np.array([[0.0, 0, 0], [0, 0, 2.5]])
    s = cs.System(pos, [1, 1])
    q = np.array([0.7, -0.4])
    sig = np.array([0.8, 1.3])
    from scipy.special import erf

    g = np.sqrt(sig[0] ** 2 + sig[1] ** 2)
    ref = COULOMB * (
        q[0] * q[1] * erf(2.5 / (np.sqrt(2) * g)) / 2.5 + np.sum(q**2 / (2 * sig * np.sqrt(np.pi)))
    )
    assert float(el.energy(s, q, sig)) == pytest.approx(ref, rel=1e-13)
    assert float(el.energy(s, q)) == pytest.approx(COULOMB * q[0] * q[1] / 2.5, rel=1e-13)


@pytest.mark.parametrize("method", ["direct", "ewald", "pme"])
def test_sigma_to_zero_gives_point_charges(method):
    s, q, _ = random_system(10, 5)
    if method == "direct":
        s = cs.System(s.positions, s.species)
    sig = np.full(s.n_atoms, 1e-4)
    self_e = COULOMB * np.sum(q**2 / (2 * sig * np.sqrt(np.pi)))
    kw = {} if method == "direct" else dict(method=method, accuracy=1e-8)
    e_g = float(el.energy(s, q, sig, **kw)) - self_e
    e_p = float(el.energy(s, q, **kw))
    assert e_g == pytest.approx(e_p, rel=1e-9, abs=1e-9)


def test_broad_gaussians_extend_cutoff():
    s, q, _ = random_system(8, 6)
    p_point = el.prepare(s, "ewald", 1e-6)
    sig = np.full(8, 3.0)
    p = el.prepare(s, "ewald", 1e-6, sigma=sig)
    assert p.r_cut >= 2 * p.s * 3.0 > p_point.r_cut
    with pytest.raises(ValueError, match="pass sigma to prepare"):
        el.energy(s, q, sig, params=p_point)
    # broad Gaussians: Ewald at two accuracies agrees (cut-off extension is consistent)
    e1 = float(el.energy(s, q, sig, method="ewald", accuracy=1e-6))
    e2 = float(el.energy(s, q, sig, method="ewald", accuracy=1e-10))
    # energy scale of the accuracy: COULOMB <q²>/a per atom (the total here nearly cancels)
    a = (abs(np.linalg.det(np.asarray(s.cell))) / 8) ** (1 / 3)
    assert abs(e1 - e2) < 1e-6 * COULOMB * np.sum(q**2) / a


# ------------------------------------------------------- forces and stress by finite differences


def _central(fun, x, h):
    x = np.asarray(x, float)
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        d = np.zeros_like(x)
        d[idx] = h
        g[idx] = (fun(x + d) - fun(x - d)) / (2 * h)
    return g


@pytest.mark.parametrize("method", ["ewald", "pme"])
@pytest.mark.parametrize("gaussian", [False, True])
def test_forces_and_stress_finite_differences(method, gaussian):
    s, q, sig = random_system(6, 7, charged=True)
    sig = sig if gaussian else None
    params = el.prepare(s, method, 1e-6, sigma=sig)
    pos0, cell0 = np.asarray(s.positions), np.asarray(s.cell)
    e_fn = jax.jit(lambda p, c: el.energy_arrays(p, c, q, sig, params))
    # forces (dense path inside jit) vs central differences of the same energy function
    f = -np.asarray(jax.grad(e_fn)(jnp.asarray(pos0), jnp.asarray(cell0)))
    f_fd = -_central(lambda p: float(e_fn(p, cell0)), pos0, 1e-4)
    assert np.max(np.abs(f - f_fd)) < 1e-6 * max(np.max(np.abs(f)), 1.0)
    # the neighbor-list path gives the same forces
    f_nl = np.asarray(forces(s, q, sig, params, el.real_space_neighbors(s, params)))
    assert np.max(np.abs(f_nl - f)) < 1e-9 * np.max(np.abs(f))

    # stress = (1/V) dE/d(eps), positions and cell strained by (1 + eps), eps symmetric
    def strained(eps):
        eps = 0.5 * (eps + eps.T)
        t = jnp.eye(3) + eps
        return e_fn(jnp.asarray(pos0) @ t, jnp.asarray(cell0) @ t)

    vol = abs(np.linalg.det(cell0))
    stress = np.asarray(jax.grad(strained)(jnp.zeros((3, 3)))) / vol
    stress_fd = _central(lambda e: float(strained(jnp.asarray(e))), np.zeros((3, 3)), 1e-5) / vol
    assert np.allclose(stress, stress.T, atol=1e-12)
    assert np.max(np.abs(stress - stress_fd)) < 1e-6 * np.max(np.abs(stress))
    assert np.max(np.abs(stress)) > 1e-4  # non-trivial


def test_open_boundary_forces_finite_differences():
    s, q, sig = random_system(7, 8)
    pos0 = np.asarray(s.positions)
    params = el.prepare(cs.System(pos0, s.species), "direct")
    e_fn = lambda p: float(el.energy_arrays(p, None, q, sig, params))  # noqa: E731
    f = -np.asarray(
        jax.grad(lambda p: el.energy_arrays(p, None, q, sig, params))(jnp.asarray(pos0))
    )
    assert np.allclose(f, -_central(e_fn, pos0, 1e-5), atol=1e-7 * np.abs(f).max())


def test_grad_through_system_constructor():
    """jax.grad through cs.System(p, ...) with traced positions: the neighbor list is
    built at the primal positions (outside jit) and equals the explicit-list forces."""
    s, q, _ = random_system(6, 9)
    params = el.prepare(s, "ewald", 1e-8)
    g = jax.grad(lambda p: el.energy(cs.System(p, s.species, s.cell, pbc=True), q, params=params))(
        s.positions
    )
    f_nl = forces(s, q, None, params, el.real_space_neighbors(s, params))
    assert np.allclose(-np.asarray(g), np.asarray(f_nl), atol=1e-10)


@pytest.mark.parametrize("method", ["ewald", "pme"])
def test_net_charge_energy_independent_of_alpha(method):
    """Net-charged cell with the neutralising background: the energy does not depend on
    the Ewald split α (nor on the accuracy setting)."""
    s, q, sig = random_system(8, 10, charged=True)
    assert abs(q.sum() - 0.7) < 1e-12
    vol = abs(np.linalg.det(np.asarray(s.cell)))
    for sigma in (None, sig):
        p1 = el.prepare(s, method, 1e-12, sigma=sigma)
        p2 = p1.replace(alpha=0.8 * p1.alpha)  # smaller α: still converged with p1's cut-offs
        p3 = el.prepare(s, method, 1e-6, sigma=sigma)
        e1, e2, e3 = (float(el.energy(s, q, sigma, params=p)) for p in (p1, p2, p3))
        assert e2 == pytest.approx(e1, rel=1e-8)
        assert e3 == pytest.approx(e1, rel=1e-6)
        # the background term alone changes by far more between the two α
        bg = lambda p: COULOMB * np.pi * q.sum() ** 2 / (2 * vol * p.alpha**2)  # noqa: E731
        assert abs(bg(p1) - bg(p2)) > 1e4 * abs(e1 - e2)


# ----------------------------------------------------------------- phi = dE/dq, linearity, mask


@pytest.mark.parametrize("method", ["direct", "ewald", "pme"])
@pytest.mark.parametrize("gaussian", [False, True])
def test_potential_is_charge_gradient_and_symmetric(method, gaussian):
    s, q, sig = random_system(9, 11, charged=True)
    if method == "direct":
        s = cs.System(s.positions, s.species)
    sig = sig if gaussian else None
    params = el.prepare(s, method, 1e-8, sigma=sig)
    cell = s.cell if params.periodic else None
    nl = el.real_space_neighbors(s, params)
    phi_fn = lambda qq: el.potential_arrays(s.positions, cell, qq, sig, params, nl)  # noqa: E731
    e_fn = lambda qq: el.energy_arrays(s.positions, cell, qq, sig, params, nl)  # noqa: E731
    phi = np.asarray(phi_fn(q))
    assert float(e_fn(q)) == pytest.approx(0.5 * q @ phi, rel=1e-12)
    assert np.allclose(np.asarray(jax.grad(e_fn)(jnp.asarray(q))), phi, rtol=1e-12, atol=1e-12)
    a = np.asarray(jax.jacfwd(phi_fn)(jnp.asarray(q)))
    assert np.allclose(a, a.T, rtol=1e-12, atol=1e-12 * np.abs(a).max())
    assert np.allclose(a @ q, phi, rtol=1e-11, atol=1e-11 * np.abs(phi).max())
    assert np.all(np.linalg.eigvalsh(a) > 0) or sig is None  # Gaussians: A positive definite
    # jit and dense fallback (no neighbor list inside jit) agree with the host path
    phi_jit = np.asarray(
        jax.jit(lambda p, qq: el.potential_arrays(p, cell, qq, sig, params))(s.positions, q)
    )
    assert np.allclose(phi_jit, phi, rtol=1e-11, atol=1e-11 * np.abs(phi).max())


@pytest.mark.parametrize("method", ["direct", "ewald", "pme"])
def test_padding_changes_nothing(method):
    s, q, sig = random_system(7, 12, charged=True)
    if method == "direct":
        s = cs.System(s.positions, s.species)
    params = el.prepare(s, method, 1e-8, sigma=sig)
    cell = s.cell if params.periodic else None
    n_pad = 3
    # padding atoms on top of a real atom and at NaN-free garbage positions, with junk charges
    pos_p = jnp.concatenate(
        [s.positions, jnp.stack([s.positions[0], s.positions[0], s.positions[1]])]
    )
    q_p = jnp.concatenate([jnp.asarray(q), jnp.array([5.0, -3.0, 2.0])])
    sig_p = jnp.concatenate([jnp.asarray(sig), jnp.array([0.0, -1.0, 0.0])])
    mask = jnp.arange(s.n_atoms + n_pad) < s.n_atoms
    e0 = float(el.energy_arrays(s.positions, cell, q, sig, params))
    phi0 = np.asarray(el.potential_arrays(s.positions, cell, q, sig, params))
    e1 = float(el.energy_arrays(pos_p, cell, q_p, sig_p, params, mask=mask))
    phi1 = np.asarray(el.potential_arrays(pos_p, cell, q_p, sig_p, params, mask=mask))
    assert e1 == pytest.approx(e0, rel=1e-12)
    assert np.allclose(phi1[: s.n_atoms], phi0, rtol=1e-12, atol=1e-12)
    assert np.all(phi1[s.n_atoms :] == 0)

    def loss(p, qq, ss):
        return el.energy_arrays(p, cell, qq, ss, params, mask=mask)

    grads = jax.grad(loss, argnums=(0, 1, 2))(pos_p, q_p, sig_p)  # traced: dense path
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))
        assert np.all(np.asarray(g)[s.n_atoms :] == 0)
    g_ref = jax.grad(lambda p: el.energy_arrays(p, cell, q, sig, params))(s.positions)
    assert np.allclose(np.asarray(grads[0])[: s.n_atoms], np.asarray(g_ref), atol=1e-10)


def test_padded_neighbor_list_entries_are_safe():
    s, q, _ = random_system(6, 13)
    params = el.prepare(s, "ewald", 1e-6)
    nl = el.real_space_neighbors(s, params)
    nl_big = el.real_space_neighbors(s, params, capacity=nl.capacity + 50)
    assert int(np.sum(~np.asarray(nl_big.mask))) == 50
    f = forces(s, q, None, params, nl)
    f_big = forces(s, q, None, params, nl_big)
    assert np.all(np.isfinite(np.asarray(f_big)))
    assert np.allclose(np.asarray(f_big), np.asarray(f), atol=1e-12)


# ----------------------------------------------------------------------------- method choice


def test_auto_method_rule():
    s, q, _ = random_system(5, 14)
    assert el.prepare(s).method == "ewald"
    assert el.prepare(cs.System(s.positions, s.species)).method == "direct"
    big = cs.System(
        np.random.default_rng(0).uniform(0, 30, (el.AUTO_PME_MIN_ATOMS, 3)),
        np.ones(el.AUTO_PME_MIN_ATOMS, int),
        cell=np.eye(3) * 30,
        pbc=True,
        validate=False,
    )
    assert el.prepare(big).method == "pme"


# ------------------------------------------------------------------------------- bad input


def test_bad_input():
    s, q, sig = random_system(5, 15)
    bad = sig.copy()
    bad[2] = 0.0
    with pytest.raises(ValueError, match="atom 2"):
        el.energy(s, q, bad)
    bad[2] = -0.5
    with pytest.raises(ValueError, match="atom 2"):
        el.prepare(s, "ewald", 1e-6, sigma=bad)
    with pytest.raises(ValueError, match="charges must have shape"):
        el.energy(s, q[:4])
    with pytest.raises(ValueError, match="charges must have shape"):
        el.potential(s, np.ones((5, 1)))
    with pytest.raises(ValueError, match="needs a cell"):
        cs.System(s.positions, s.species, pbc=True)
    slab = cs.System(s.positions, s.species, cell=s.cell, pbc=(True, True, False))
    for method in ("auto", "ewald", "pme"):
        with pytest.raises(NotImplementedError, match="partly periodic"):
            el.energy(slab, q, method=method)
    with pytest.raises(ValueError, match="direct"):
        el.energy(s, q, method="direct")
    with pytest.raises(ValueError, match="periodic"):
        el.energy(cs.System(s.positions, s.species), q, method="ewald")
    with pytest.raises(ValueError, match="method must be one of"):
        el.prepare(s, "p3m")
    with pytest.raises(ValueError, match="accuracy"):
        el.prepare(s, "ewald", 0.5)
    with pytest.raises(ValueError, match="order"):
        el.prepare(s, "pme", order=5)


# ------------------------------------------- public energy_and_forces: one compiled call


def jittered_crystal(n_side=3, seed=0, spacing=2.6, jitter=0.25):
    """n_side³ atoms on a jittered grid in a slightly triclinic cell, neutral random charges."""
    rng = np.random.default_rng(seed)
    cell = spacing * n_side * (np.eye(3) + rng.uniform(-0.06, 0.06, (3, 3)))
    idx = np.stack(np.meshgrid(*[np.arange(n_side)] * 3, indexing="ij"), -1).reshape(-1, 3)
    frac = (idx + 0.5 + rng.uniform(-jitter, jitter, idx.shape) * 2 / spacing) / n_side
    n = frac.shape[0]
    s = cs.System(frac @ cell, np.full(n, 8), cell=cell, pbc=True, min_distance=1.0)
    q = rng.normal(size=n)
    return s, q - q.mean(), rng.uniform(0.6, 1.1, n)


@jax.jit
def _exact_energy_forces(positions, cell, q, sigma, params, neighbors):
    e, g = jax.value_and_grad(el.energy_arrays)(positions, cell, q, sigma, params, neighbors)
    return e, -g


def exact_reference(s, q, sigma, params, capacity=None):
    """The prepared kernel with an exact (skin-free) list built for these positions."""
    nl = el.real_space_neighbors(s, params, capacity=capacity)
    return _exact_energy_forces(s.positions, s.cell, jnp.asarray(q), sigma, params, nl)


class CompileCounter:
    """Counts XLA compilations (jax.monitoring) while active."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.count = 0

    def _listener(self, name, duration, **kw):
        if name == self.EVENT:
            self.count += 1

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self._listener)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listener)


@pytest.mark.parametrize("method", ["direct", "ewald", "pme"])
@pytest.mark.parametrize("gaussian", [False, True])
def test_energy_and_forces_matches_grad_and_finite_differences(method, gaussian):
    s, q, sig = random_system(6, 20, charged=method != "direct")
    if method == "direct":
        s = cs.System(s.positions, s.species)
    sig = sig if gaussian else None
    kw = dict(method=method, accuracy=1e-8)
    e, f = el.energy_and_forces(s, q, sig, **kw)
    assert f.shape == (6, 3) and f.dtype == jnp.float64
    assert float(e) == pytest.approx(float(el.energy(s, q, sig, **kw)), rel=1e-12)
    g = jax.grad(lambda p: el.energy(s.replace(positions=p), q, sig, **kw))(s.positions)
    assert np.allclose(np.asarray(f), -np.asarray(g), rtol=0, atol=1e-10 * np.abs(f).max())

    def e_at(p):
        return float(el.energy(s.replace(positions=jnp.asarray(p)), q, sig, **kw))

    f_fd = -_central(e_at, s.positions, 1e-4)
    assert np.max(np.abs(np.asarray(f) - f_fd)) < 1e-6 * np.abs(f).max()
    assert np.abs(f).max() > 0.1  # non-trivial


@pytest.mark.parametrize("method", ["ewald", "pme"])
def test_energy_and_forces_stress_matches_strain_finite_differences(method):
    s, q, sig = random_system(6, 21, charged=True)
    e, f, stress = el.energy_and_forces(s, q, sig, method=method, accuracy=1e-8, stress=True)
    # the same energy function strained: parameters and list fixed at zero strain
    p0 = el.prepare(s, method, 1e-8, sigma=sig)
    nl0 = el.real_space_neighbors(s, p0)
    pos0, cell0 = np.asarray(s.positions), np.asarray(s.cell)

    def e_strained(eps):
        t = np.eye(3) + 0.5 * (eps + eps.T)
        st = cs.System(pos0 @ t, s.species, cell0 @ t, pbc=True)
        return float(el.energy(st, q, sig, params=p0, neighbors=nl0))

    vol = abs(np.linalg.det(cell0))
    stress_fd = _central(e_strained, np.zeros((3, 3)), 1e-5) / vol
    stress = np.asarray(stress)
    assert np.allclose(stress, stress.T, atol=1e-12)
    assert np.max(np.abs(stress - stress_fd)) < 1e-6 * np.max(np.abs(stress))
    assert np.max(np.abs(stress)) > 1e-4
    e2, f2 = el.energy_and_forces(s, q, sig, method=method, accuracy=1e-8)
    assert float(e2) == float(e) and np.array_equal(np.asarray(f2), np.asarray(f))
    with pytest.raises(ValueError, match="stress needs a periodic"):
        el.energy_and_forces(cs.System(s.positions, s.species), q, stress=True)


@pytest.mark.parametrize("method", ["ewald", "pme"])
def test_public_calls_compile_once_and_follow_moving_atoms(method):
    """Moved atoms: no recompilation, the Verlet list is reused within the skin and
    rebuilt beyond it (also when an atom is wrapped back by a lattice vector), and every
    result equals the prepared kernel with an exact list built for those positions."""
    s, q, _ = jittered_crystal(3, seed=1)
    el.cache.clear()
    params = el.prepare(s, method, 1e-6)
    cap = 2 * el.real_space_neighbors(s, params).capacity  # one shape for the reference
    el.energy_and_forces(s, q, method=method)  # compiles
    el.energy(s, q, method=method)
    rng = np.random.default_rng(2)
    pos = np.asarray(s.positions)
    cell = np.asarray(s.cell)
    moves = ["small", "small", "large", "small", "wrap", "large"]
    with CompileCounter() as counter:
        for move in moves:
            if move == "small":  # well inside half the skin
                pos = pos + rng.uniform(-0.01, 0.01, pos.shape)
            elif move == "large":
                pos = pos + rng.uniform(-0.3, 0.3, pos.shape)
            else:  # atom 0 wrapped by a lattice vector: same structure, other image
                pos = pos.copy()
                pos[0] += cell[0]
            st = s.replace(positions=pos)
            e, f = el.energy_and_forces(st, q, method=method)
            e_only = el.energy(st, q, method=method)
            n_compiled = counter.count
            e_ref, f_ref = exact_reference(st, q, None, params, cap)
            counter.count = n_compiled  # the reference's own compilation does not count
            assert float(e) == pytest.approx(float(e_ref), rel=1e-12, abs=1e-12), move
            assert float(e_only) == pytest.approx(float(e_ref), rel=1e-12, abs=1e-12), move
            assert np.allclose(np.asarray(f), np.asarray(f_ref), rtol=0, atol=1e-10), move
    assert counter.count == 0
    st = el.cache.stats()
    assert st["params_prepared"] == 1
    assert st["lists_built"] >= 1 + moves.count("large") + moves.count("wrap")
    assert st["lists_reused"] >= 2 * moves.count("small")


def test_traced_positions_inside_jit_use_the_cached_list():
    """Inside jit (abstract positions, concrete cell) the list comes from a host callback:
    results follow the atoms, also beyond the skin, and equal the host path."""
    s, q, _ = jittered_crystal(3, seed=3)
    el.cache.clear()
    e_fn = jax.jit(lambda p: el.energy(s.replace(positions=p), q, method="ewald"))
    ef_fn = jax.jit(lambda p: el.energy_and_forces(s.replace(positions=p), q, method="ewald"))
    params = el.prepare(s, "ewald", 1e-6)
    cap = 2 * el.real_space_neighbors(s, params).capacity
    rng = np.random.default_rng(4)
    pos = np.asarray(s.positions)
    for _ in range(3):
        pos = pos + rng.uniform(-0.3, 0.3, pos.shape)
        st = s.replace(positions=pos)
        e_ref, f_ref = exact_reference(st, q, None, params, cap)
        assert float(e_fn(jnp.asarray(pos))) == pytest.approx(float(e_ref), rel=1e-12)
        e, f = ef_fn(jnp.asarray(pos))
        assert float(e) == pytest.approx(float(e_ref), rel=1e-12)
        assert np.allclose(np.asarray(f), np.asarray(f_ref), rtol=0, atol=1e-10)
    assert el.cache.stats()["lists_built"] >= 3


# ------------------------------------------------------------------ hardening (issue 16)


def test_sigma_broader_than_cell_is_refused():
    """Was: a ~370 Å real-space cut-off and an out-of-memory kill (13 GB)."""
    s, q, _ = random_system(16, 22)
    with pytest.raises(ValueError, match=r"sigma.*=50 Å is broader than the cell"):
        el.energy(s, q, sigma=50.0, method="ewald")
    h = el.limits.min_cell_width(np.asarray(s.cell))
    el.check_sigma_max(h, s.cell)  # the bound itself is allowed
    with pytest.raises(ValueError, match="elec_sigma_max=.* broader than the cell"):
        el.check_sigma_max(1.01 * h, s.cell, what="elec_sigma_max")
    el.check_sigma_max(1e3, np.eye(3), pbc=False)  # open: no bound


def test_memory_estimate_refuses_before_allocating():
    s, q, _ = jittered_crystal(3, seed=5)
    p = el.prepare(s, "ewald", 1e-6)
    est = el.estimate_resources("ewald", s.n_atoms, s.cell, p.r_cut, 2 * p.alpha * p.s)
    n_pairs = int(el.real_space_neighbors(s, p).n_pairs)
    assert 0.7 < n_pairs / est.pairs < 1.3
    assert 0.7 < p.kvecs.shape[0] / est.kvectors < 1.5
    # the split favours the (factorised) k-space sum: its k-vectors are the largest part
    with pytest.raises(ValueError, match=r"largest part is \d+ k-vectors \(k_cut=.*GiB"):
        el.prepare(s, "ewald", 1e-6, max_bytes=est.nbytes // 2)
    pp = el.prepare(s, "pme", 1e-6)
    est = el.estimate_resources("pme", s.n_atoms, s.cell, pp.r_cut, grid=pp.grid, order=pp.order)
    assert est.grid_points == np.prod(pp.grid)
    # the dense in-jit real-space sum (traced positions, no list) is refused at trace time
    old = el.limits.MEMORY_FRACTION
    try:
        el.limits.MEMORY_FRACTION = 1e-9
        with pytest.raises(ValueError, match="dense in-jit real-space sum"):
            jax.jit(lambda x: el.energy_arrays(x, s.cell, q, None, p))(s.positions)
    finally:
        el.limits.MEMORY_FRACTION = old


@pytest.mark.parametrize("method", ["direct", "ewald"])
def test_nan_charges_name_the_atom(method):
    """Was: NaN energy, silently."""
    s, q, _ = random_system(5, 23)
    if method == "direct":
        s = cs.System(s.positions, s.species)
    bad = q.copy()
    bad[3] = np.nan
    with pytest.raises(ValueError, match="atom 3 has charge nan"):
        el.energy(s, bad, method=method)
    for fn in ("potential", "energy_and_forces"):
        with pytest.raises(ValueError, match="atom 3 has charge nan"):
            getattr(el, fn)(s, bad, method=method)
    bad[3] = np.inf
    with pytest.raises(ValueError, match="atom 3 has charge inf"):
        el.energy(s, bad, method=method)
    # inside jit nothing raises: the NaN comes back
    assert np.isnan(float(jax.jit(lambda qq: el.energy(s, qq, method=method))(bad * np.nan)))


def test_complex_input_refused():
    """Was: the imaginary part silently dropped."""
    s, q, sig = random_system(5, 24)
    with pytest.raises(ValueError, match="charges must be real"):
        el.energy(s, q + 0.5j)
    with pytest.raises(ValueError, match="charges must be real"):
        el.energy_arrays(s.positions, s.cell, q.astype(complex), None, el.prepare(s))
    with pytest.raises(ValueError, match="sigma must be real"):
        el.energy(s, q, sig + 0j)
    with pytest.raises(ValueError, match="sigma must be real"):
        el.prepare(s, sigma=sig.astype(np.complex128))


def test_coulomb_constant_from_codata():
    """Was 14.399645 (rounded, 3.3e-8 relative). scipy: same formula, so equal to
    rounding; ASE's CODATA 2022 table derives ε₀ from μ₀ and agrees to ~1.2e-12."""
    import math

    import ase.units
    from scipy import constants as si

    ref = si.e / (4 * math.pi * si.epsilon_0) * 1e10
    assert COULOMB == pytest.approx(ref, rel=1e-15)
    u = ase.units.create_units("2022")
    assert COULOMB == pytest.approx(u["_e"] / (4 * math.pi * u["_eps0"]) * 1e10, rel=5e-12)
    assert abs(COULOMB / 14.399645 - 1) > 1e-8  # not the old rounded value


@pytest.mark.parametrize("method", ["ewald", "pme"])
def test_unified_parameters_keep_each_structures_accuracy(method):
    """Parameters made one shape for a batch (one split, padded k-vectors, the largest PME
    grid) give each structure's energy, charge-potential and forces as its own parameters
    do, to the accuracy asked for; the zero-padded k-vectors add nothing, not even NaN
    gradients."""
    from celli_scale.electrostatics.params import PAD_SHIFT, unify

    acc = 1e-8
    systems = [
        cs.datasets.rocksalt(1, rattle=0.1, seed=1),
        cs.datasets.rocksalt(1, a=6.3, rattle=0.1, seed=2),
        cs.datasets.rocksalt(2, a=5.5, rattle=0.1, seed=3),
    ]
    own = [
        el.prepare(s, method=method, accuracy=acc, sigma=np.full(s.n_atoms, 0.8)) for s in systems
    ]
    uni = unify(own, [s.cell for s in systems])
    assert len({(p.alpha, p.r_cut, p.kvecs.shape, p.shifts.shape, p.grid) for p in uni}) == 1
    assert uni[0].alpha == min(p.alpha for p in own)
    if method == "ewald":
        assert len({p.kvecs.shape for p in own}) > 1  # the padding is exercised
    assert any(np.any(np.all(np.asarray(p.shifts) == PAD_SHIFT, axis=1)) for p in uni)
    for s, p0, p1 in zip(systems, own, uni, strict=True):
        q = np.where(np.asarray(s.species) == 11, 1.0, -1.0)
        sig = np.full(s.n_atoms, 0.8)
        ref = el.energy_and_forces(s, q, sig, params=p0)
        got = el.energy_and_forces(s, q, sig, params=p1)
        scale = abs(float(ref[0]))
        assert abs(float(got[0]) - float(ref[0])) < 10 * acc * scale
        f_scale = float(np.max(np.abs(ref[1])))
        assert float(np.max(np.abs(np.asarray(got[1]) - ref[1]))) < 10 * acc * max(f_scale, 1.0)
        # gradients w.r.t. the cell go through kspace's padded rows: finite
        nl = el.real_space_neighbors(s, p1)

        def e_of_cell(cell, s=s, q=q, sig=sig, p1=p1, nl=nl):
            pos = jnp.asarray(s.positions)
            return el.energy_arrays(pos, cell, q, sig, p1, nl)

        g = jax.grad(e_of_cell)(jnp.asarray(s.cell))
        assert np.all(np.isfinite(np.asarray(g)))


def test_factorised_ewald_sum_equals_the_plain_one():
    """The per-axis factorised reciprocal sum (``kbox``) gives the k-by-k sum's energy,
    potentials and derivatives w.r.t. positions and cell, in a triclinic cell, with zero
    rows of batch padding in ``kvecs``."""
    from celli_scale.electrostatics import ewald

    base = cs.datasets.rocksalt(2, rattle=0.1, seed=4)
    shear = np.array([[1.0, 0.2, 0.1], [0.0, 1.0, -0.15], [0.0, 0.0, 1.1]])
    s = cs.System(
        np.asarray(base.positions) @ shear, base.species, cell=np.asarray(base.cell) @ shear,
        pbc=True,
    )  # fmt: skip
    p = el.prepare(s, method="ewald", accuracy=1e-8)
    assert p.kbox == tuple(int(m) for m in np.abs(np.asarray(p.kvecs)).max(axis=0))
    kv = jnp.concatenate([p.kvecs, jnp.zeros((5, 3))])  # padding rows
    q = jnp.asarray(np.random.default_rng(1).normal(size=s.n_atoms))
    pos, cell = jnp.asarray(s.positions), jnp.asarray(s.cell)

    def recip(x, c, want, kbox):
        return ewald.reciprocal(x, c, q, p.alpha, kv, want, kbox)

    for want in ("energy", "phi"):
        ref, got = recip(pos, cell, want, ()), recip(pos, cell, want, p.kbox)
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12 * float(jnp.max(jnp.abs(ref))))
    grads = [
        jax.grad(lambda x, c, k=k: recip(x, c, "energy", k), (0, 1))(pos, cell)
        for k in ((), p.kbox)
    ]
    for a, b in zip(*grads, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-11, atol=1e-11 * float(jnp.max(jnp.abs(a))))


@pytest.mark.parametrize("method", ["direct", "ewald", "pme"])
@pytest.mark.parametrize("rows", ["none", "fits", "outgrown"])
def test_potential_operator_equals_potential_arrays(method, rows):
    """The Qeq's operator (kernel, stencil, influence computed once; pairs in rows per
    atom) gives the potential and its position and width derivatives of
    potential_arrays, also when the list outgrew its row capacity (scatter fallback)."""
    if method == "direct" and rows != "none":
        pytest.skip("open systems have no real-space list")
    s, q, sig = random_system(9, 12, charged=True)
    if method == "direct":
        s = cs.System(s.positions, s.species)
    params = el.prepare(s, method, 1e-8, sigma=sig)
    cell = s.cell if params.periodic else None
    nl = el.real_space_neighbors(s, params) if params.periodic else None
    if rows != "none":
        nl = cs.neighbors.with_row_capacity(nl)
        most = nl.row_capacity
        if rows == "outgrown":
            nl = nl.replace(row_capacity=most - 1)
    mask = jnp.ones(9, bool).at[4].set(False)  # a padded atom too
    w = np.random.default_rng(3).normal(size=9)

    def via_op(p, sg, qq):
        return el.potential_operator(p, cell, sg, params, nl, mask)(qq)

    def via_arrays(p, sg, qq):
        return el.potential_arrays(p, cell, qq, sg, params, nl, mask)

    x = (s.positions, jnp.asarray(sig), jnp.asarray(q))
    ref, got = via_arrays(*x), jax.jit(via_op)(*x)
    assert np.allclose(got, ref, rtol=1e-12, atol=1e-12 * np.abs(ref).max())
    assert float(got[4]) == 0.0
    g_ref = jax.grad(lambda *a: jnp.dot(w, via_arrays(*a)), argnums=(0, 1))(*x)
    g_op = jax.jit(jax.grad(lambda *a: jnp.dot(w, via_op(*a)), argnums=(0, 1)))(*x)
    for a, b in zip(g_op, g_ref, strict=True):
        assert np.allclose(a, b, rtol=1e-10, atol=1e-10 * np.abs(b).max())
