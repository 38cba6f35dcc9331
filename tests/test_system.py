"""System / Batch: validation messages, pytree behaviour, ASE round trip, padding."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import celli_scale as cs

TWO_ATOMS = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 1.0]])


def _water(shift: float = 0.0) -> cs.System:
    pos = np.array([[0.0, 0.0, 0.1173], [0.0, 0.7572, -0.4692], [0.0, -0.7572, -0.4692]]) + shift
    return cs.System(pos, [8, 1, 1])


# -- validation ---------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_position_names_atom(bad):
    pos = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    pos[2, 1] = bad
    with pytest.raises(ValueError, match=r"NaN or inf.*atom.*\[2\]"):
        cs.System(pos, [1, 1, 1])


def test_nan_cell():
    cell = np.eye(3) * 5.0
    cell[1, 1] = np.nan
    with pytest.raises(ValueError, match="cell contains NaN"):
        cs.System(TWO_ATOMS, [1, 1], cell=cell, pbc=True)


@pytest.mark.parametrize(
    "cell",
    [
        [[5.0, 0, 0], [10.0, 0, 0], [0, 0, 5.0]],  # two parallel vectors
        [[5.0, 0, 0], [0, 5.0, 0], [0, 0, 0]],  # a zero vector
        [[5.0, 0, 0], [0, 5.0, 0], [5.0, 5.0, 0]],  # coplanar
    ],
)
def test_singular_cell_with_pbc(cell):
    with pytest.raises(ValueError, match="singular"):
        cs.System(TWO_ATOMS, [1, 1], cell=cell, pbc=True)


def test_singular_cell_allowed_without_pbc():
    s = cs.System(TWO_ATOMS, [1, 1], cell=np.zeros((3, 3)), pbc=False)
    assert s.n_atoms == 2 and not s.periodic


@pytest.mark.parametrize("pbc", ["TTF", "abc", [1, 0, 2], [True, False], [[True] * 3]])
def test_bad_pbc_names_field(pbc):
    # before: any non-empty string (also "TTF") read as periodic along all axes
    with pytest.raises(ValueError, match="pbc must be a bool or 3 bools"):
        cs.System(TWO_ATOMS, [1, 1], cell=np.eye(3) * 5.0, pbc=pbc)


def test_pbc_accepts_bools_numpy_bools_and_0_1():
    cell = np.eye(3) * 5.0
    assert cs.System(TWO_ATOMS, [1, 1], cell=cell, pbc=[1, 0, 1]).pbc == (True, False, True)
    assert cs.System(TWO_ATOMS, [1, 1], cell=cell, pbc=np.bool_(True)).pbc == (True,) * 3
    assert cs.System(TWO_ATOMS, [1, 1], cell=cell, pbc=np.array([0, 0, 1])).pbc[2]


def test_pbc_without_cell():
    with pytest.raises(ValueError, match="needs a cell"):
        cs.System(TWO_ATOMS, [1, 1], pbc=True)
    with pytest.raises(ValueError, match="needs a cell"):
        cs.System(TWO_ATOMS, [1, 1], pbc=(False, True, False))


@pytest.mark.parametrize(
    "species, pattern",
    [
        ([1, 0], r"atomic number 0 at atom 1"),
        ([-3, 1], r"atomic number -3 at atom 0"),
        ([1, 119], r"atomic number 119 at atom 1"),
        ([1, 1000], r"atomic number 1000 at atom 1"),
        ([1.0, 6.5], r"integer.*atom 1"),
        ([np.nan, 1.0], r"NaN"),
    ],
)
def test_bad_species_names_atom(species, pattern):
    with pytest.raises(ValueError, match=pattern):
        cs.System(TWO_ATOMS, species)


def test_integer_valued_float_species_accepted():
    s = cs.System(TWO_ATOMS, [1.0, 8.0])
    np.testing.assert_array_equal(np.asarray(s.species), [1, 8])
    assert np.asarray(s.species).dtype.kind == "i"


def test_overlap_default_min_distance():
    pos = np.array([[0.0, 0.0, 0.0], [3.0, 0.0, 0.0], [3.0, 0.09, 0.0]])
    with pytest.raises(ValueError, match=r"atoms 1 and 2 are 0.09 Å apart.*0.1 Å"):
        cs.System(pos, [1, 1, 1])
    cs.System(pos + np.array([[0, 0, 0], [0, 0, 0], [0, 0.011, 0]]), [1, 1, 1])  # 0.101 Å: fine


def test_coincident_atoms_are_overlapping():
    with pytest.raises(ValueError, match="overlapping atoms: atoms 0 and 1 are 0 Å"):
        cs.System([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]], [1, 1])


def test_overlap_configurable():
    pos = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 0.5]])
    cs.System(pos, [1, 1])  # 0.5 Å > 0.1 Å default
    with pytest.raises(ValueError, match=r"0.5 Å apart \(minimum allowed 0.6 Å\)"):
        cs.System(pos, [1, 1], min_distance=0.6)
    close = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 0.05]])
    assert cs.System(close, [1, 1], min_distance=0.01).n_atoms == 2
    assert cs.System(close, [1, 1], min_distance=0.0).n_atoms == 2


def test_overlap_across_periodic_boundary():
    L = 6.0
    pos = np.array([[0.02, 1.0, 1.0], [L - 0.03, 1.0, 1.0]])
    with pytest.raises(ValueError, match=r"atoms 0 and 1 are 0.05 Å apart"):
        cs.System(pos, [1, 1], cell=np.eye(3) * L, pbc=True)
    # the same positions are fine when that axis is not periodic
    s = cs.System(pos, [1, 1], cell=np.eye(3) * L, pbc=(False, True, True))
    assert s.pbc == (False, True, True)


def test_overlap_across_triclinic_boundary():
    cell = np.array([[5.0, 0.0, 0.0], [2.5, 4.0, 0.0], [0.0, 0.0, 6.0]])
    # atom 1 sits 0.07 Å from the image of atom 0 shifted by the second lattice vector
    pos = np.array([[0.5, 0.2, 1.0], [0.5 + 2.5, 0.2 + 4.0 - 0.07, 1.0]])
    with pytest.raises(ValueError, match=r"0.07 Å apart"):
        cs.System(pos, [1, 1], cell=cell, pbc=True)


def test_length_mismatch():
    with pytest.raises(ValueError, match="lengths must match"):
        cs.System(TWO_ATOMS, [1, 1, 1])
    with pytest.raises(ValueError, match=r"shape \(N, 3\)"):
        cs.System(np.zeros((2, 2)), [1, 1])


def test_fractional_total_charge_is_allowed_and_kept():
    # Decision (System docstring): a non-integer total charge is physical for a subsystem;
    # it is accepted, kept exactly and is the constraint of the charge equilibration.
    s = cs.System(TWO_ATOMS * 2.0, [11, 17], total_charge=0.5)
    assert float(s.total_charge) == 0.5
    assert not hasattr(s, "check_integer_charge")
    r = cs.qeq.solve(s, np.array([-1.0, 1.0]), np.array([8.0, 8.0]), np.array([1.0, 1.0]))
    np.testing.assert_allclose(float(np.sum(r.charges)), 0.5, atol=1e-10)
    assert s.to_ase().info["charge"] == 0.5


@pytest.mark.parametrize("bad", ["abc", None, True, [1.0, 2.0], {"q": 1}])
def test_non_numeric_total_charge_names_field(bad):
    with pytest.raises(ValueError, match="total_charge"):
        cs.System(TWO_ATOMS, [1, 1], total_charge=bad)


def test_numpy_scalars_accepted_where_floats_are():
    s = cs.System(
        TWO_ATOMS,
        np.array([1, 8], dtype=np.int16),
        cell=np.eye(3, dtype=np.float32) * np.float32(5.0),
        pbc=np.array([True, True, True]),
        total_charge=np.float32(-1.0),
        min_distance=np.float32(0.5),
    )
    assert float(s.total_charge) == -1.0
    assert cs.System(TWO_ATOMS, [1, 1], total_charge=np.int64(2)).total_charge == 2.0
    with pytest.raises(ValueError, match="overlapping"):
        cs.System(TWO_ATOMS, [1, 1], min_distance=np.float64(1.5))
    with pytest.raises(ValueError, match="min_distance"):
        cs.System(TWO_ATOMS, [1, 1], min_distance="0.1")


def test_element_symbols_accepted_as_species():
    s = cs.System(TWO_ATOMS * 3.0, ["Na", "Cl"])
    np.testing.assert_array_equal(np.asarray(s.species), [11, 17])
    s = cs.System(TWO_ATOMS * 3.0, np.array(["O", "H"]))
    np.testing.assert_array_equal(np.asarray(s.species), [8, 1])
    s = cs.System(TWO_ATOMS * 3.0, ["C", 8])  # mixed
    np.testing.assert_array_equal(np.asarray(s.species), [6, 8])


@pytest.mark.parametrize(
    "species, pattern",
    [(["Na", "Xx"], r"unknown element symbol 'Xx' at atom 1"), ([1, None], r"atom 1")],
)
def test_bad_symbols_name_atom(species, pattern):
    with pytest.raises(ValueError, match=pattern):
        cs.System(TWO_ATOMS * 3.0, species)


def test_non_numeric_positions_and_cell_name_field():
    with pytest.raises(ValueError, match="positions must be real numbers"):
        cs.System([["a", "b", "c"]], [1])
    with pytest.raises(ValueError, match="cell must be real numbers"):
        cs.System(TWO_ATOMS, [1, 1], cell=[["x"] * 3] * 3, pbc=True)


@pytest.mark.parametrize(
    "cell, pattern",
    [
        (np.diag([5.0, 5.0, 1e-8]), r"lattice vector 2 is 1e-08 Å.*at least 0.001"),
        (np.diag([5.0, 5.0, 0.05]), r"lattice vector 2 is 0.05 Å.*own periodic image"),
        # long vectors, but lattice planes 1e-5 Å apart
        ([[5.0, 0, 0], [0, 5.0, 0], [5.0, 5.0, 1e-5]], r"flat cell.*periodic axis"),
    ],
)
def test_tiny_or_flat_cell_refused_fast(cell, pattern):
    # before: 1e-8 Å passed the relative singular check and the overlap search then ran
    # out of memory; a flat cell took most of a minute before its overlap error
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=pattern):
        cs.System(TWO_ATOMS, [1, 1], cell=cell, pbc=True)
    assert time.perf_counter() - t0 < 2.0


def test_slab_with_zero_open_vector_ase_convention():
    import ase

    pos = np.array([[0.0, 0.0, 0.0], [1.5, 1.5, 1.2], [0.0, 2.0, -0.9]])
    slab = cs.System(pos, [1, 8, 1], cell=np.diag([4.0, 4.0, 0.0]), pbc=(True, True, False))
    assert slab.pbc == (True, True, False)
    atoms = ase.Atoms("HOH", positions=pos, cell=[4.0, 4.0, 0.0], pbc=(True, True, False))
    s = cs.System.from_ase(atoms)
    assert s.pbc == (True, True, False)
    np.testing.assert_array_equal(np.asarray(s.cell), np.diag([4.0, 4.0, 0.0]))
    assert s.to_ase().cell.array[2].tolist() == [0.0, 0.0, 0.0]
    # overlap across the periodic boundary of the slab is still found
    with pytest.raises(ValueError, match="overlapping"):
        cs.System(
            [[0.0, 0.0, 0.0], [3.95, 0.0, 0.0]],
            [1, 1],
            cell=np.diag([4.0, 4.0, 0.0]),
            pbc=(True, True, False),
        )
    # electrostatics of partly periodic systems: a clear refusal, as for slabs with vacuum
    with pytest.raises(NotImplementedError, match="partly periodic"):
        cs.electrostatics.prepare(slab)
    # a zero vector along a periodic axis, or a non-zero open vector in the periodic
    # plane, stays singular
    with pytest.raises(ValueError, match="singular"):
        cs.System(pos, [1, 8, 1], cell=np.diag([4.0, 0.0, 5.0]), pbc=(True, True, False))
    with pytest.raises(ValueError, match="singular"):
        cs.System(
            pos,
            [1, 8, 1],
            cell=[[4.0, 0, 0], [0, 4.0, 0], [4.0, 4.0, 0]],
            pbc=(True, True, False),
        )


def test_non_finite_total_charge():
    with pytest.raises(ValueError, match="total_charge must be finite"):
        cs.System(TWO_ATOMS, [1, 1], total_charge=np.nan)


def test_immutable():
    s = cs.System(TWO_ATOMS, [1, 1])
    with pytest.raises(AttributeError):
        s.positions = TWO_ATOMS  # type: ignore[misc]


def test_replace_keeps_validation_of_unchanged_geometry():
    close = cs.System([[0.0, 0.0, 0.0], [0.0, 0.0, 0.05]], [1, 1], min_distance=0.0)
    # changing only the charge must not re-run the overlap check with the default 0.1 Å
    assert float(close.replace(total_charge=1.0).total_charge) == 1.0
    with pytest.raises(ValueError, match="overlapping"):
        close.replace(positions=np.asarray(close.positions) * 1.5)  # 0.075 Å < 0.1 Å
    moved = close.replace(positions=np.asarray(close.positions) * 1.5, min_distance=0.0)
    assert np.asarray(moved.positions)[1, 2] == pytest.approx(0.075, rel=1e-15)
    with pytest.raises(ValueError, match="total_charge must be finite"):
        close.replace(total_charge=np.inf)  # the other checks still run


# -- pytree -------------------------------------------------------------------------------
def test_grad_through_system():
    p = jnp.array([[0.0, 0.0, 0.0], [0.0, 0.5, 1.0]])
    Z = np.array([1, 8])
    g = jax.grad(lambda p: jnp.sum(cs.System(p, Z).positions ** 2))(p)
    np.testing.assert_allclose(np.asarray(g), 2.0 * np.asarray(p), rtol=0, atol=0)


def test_traced_positions_skip_concrete_checks():
    # overlapping (and NaN) positions inside a trace: no check can run, no error
    Z = np.array([1, 1])

    def f(p):
        s = cs.System(p, Z, cell=jnp.eye(3) * 4.0, pbc=True)
        return jnp.sum(s.positions)

    same = jnp.zeros((2, 3))
    assert float(jax.jit(f)(same)) == 0.0
    assert float(jax.grad(f)(same).sum()) == 6.0
    # ... while the same input outside a trace is rejected
    with pytest.raises(ValueError, match="overlapping"):
        cs.System(same, Z, cell=np.eye(3) * 4.0, pbc=True)


def test_pytree_round_trip_and_jit():
    s = cs.System(TWO_ATOMS, [1, 8], cell=np.eye(3) * 5.0, pbc=(True, True, False), total_charge=-1)
    leaves, treedef = jax.tree_util.tree_flatten(s)
    assert len(leaves) == 4  # positions, species, cell, total_charge; pbc is static
    s2 = jax.tree_util.tree_unflatten(treedef, leaves)
    assert s2.pbc == (True, True, False)
    out = jax.jit(lambda s: s.replace(positions=s.positions + 1.0))(s)
    np.testing.assert_array_equal(np.asarray(out.positions), TWO_ATOMS + 1.0)
    assert float(out.total_charge) == -1.0
    assert float(jax.jit(lambda s: s.volume())(s)) == pytest.approx(125.0, rel=1e-14)


# -- ASE ----------------------------------------------------------------------------------
def test_ase_round_trip_with_charge():
    cell = np.array([[5.0, 0.0, 0.0], [1.0, 6.0, 0.0], [0.5, 0.3, 7.0]])
    pos = np.array([[0.1, 0.2, 0.3], [1.5, 2.5, 3.5], [4.0, 4.5, 6.5]])
    s = cs.System(pos, [11, 17, 8], cell=cell, pbc=(True, True, False), total_charge=-1.0)
    atoms = s.to_ase()
    assert atoms.info["charge"] == -1.0
    assert list(atoms.numbers) == [11, 17, 8]
    np.testing.assert_array_equal(atoms.positions, pos)
    np.testing.assert_array_equal(atoms.cell.array, cell)
    s2 = cs.System.from_ase(atoms)
    np.testing.assert_array_equal(np.asarray(s2.positions), pos)
    np.testing.assert_array_equal(np.asarray(s2.species), [11, 17, 8])
    np.testing.assert_array_equal(np.asarray(s2.cell), cell)
    assert s2.pbc == (True, True, False)
    assert float(s2.total_charge) == -1.0


def test_from_ase_open_system_and_initial_charges():
    import ase

    atoms = ase.Atoms("NaCl", positions=[[0, 0, 0], [2.4, 0, 0]], charges=[1.0, 0.0])
    s = cs.System.from_ase(atoms)
    assert s.cell is None and s.pbc == (False, False, False)
    assert float(s.total_charge) == 1.0  # sum of initial charges when info has none
    atoms.info["charge"] = 2
    assert float(cs.System.from_ase(atoms).total_charge) == 2.0
    assert float(cs.System.from_ase(atoms, total_charge=-1).total_charge) == -1.0


# -- Batch --------------------------------------------------------------------------------
def _three_systems() -> list[cs.System]:
    periodic = cs.System(
        [[0.1, 0.2, 0.3], [1.1, 2.2, 3.3], [2.5, 0.5, 1.5], [3.9, 4.4, 4.9], [2.0, 3.0, 0.7]],
        [1, 6, 7, 8, 9],
        cell=np.diag([4.0, 4.5, 5.0]),
        pbc=True,
        total_charge=1.0,
    )
    return [_water(), periodic, cs.System([[0.0, 0.0, 0.0]], [3], total_charge=1.0)]


def test_batch_pads_with_mask_and_round_trips():
    systems = _three_systems()
    b = cs.Batch.from_systems(systems)
    assert b.positions.shape == (3, 5, 3) and b.species.shape == (3, 5)
    np.testing.assert_array_equal(
        np.asarray(b.mask),
        [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]],
    )
    assert np.all(np.asarray(b.species)[~np.asarray(b.mask)] == 0)
    assert np.all(np.asarray(b.positions)[~np.asarray(b.mask)] == 0.0)
    np.testing.assert_array_equal(np.asarray(b.total_charge), [0.0, 1.0, 1.0])
    assert len(b) == 3
    for k, s in enumerate(systems):
        r = b[k]
        np.testing.assert_array_equal(np.asarray(r.positions), np.asarray(s.positions))
        np.testing.assert_array_equal(np.asarray(r.species), np.asarray(s.species))
        assert r.pbc == s.pbc
        assert float(r.total_charge) == float(s.total_charge)
        if s.cell is None:
            assert r.cell is None
        else:
            np.testing.assert_array_equal(np.asarray(r.cell), np.asarray(s.cell))
    assert [x.n_atoms for x in b] == [3, 5, 1]


def test_batch_padding_size_does_not_change_data():
    systems = _three_systems()
    b5 = cs.Batch.from_systems(systems)
    b9 = cs.Batch.from_systems(systems, n_atoms=9)
    assert b9.n_atoms_padded == 9
    np.testing.assert_array_equal(np.asarray(b9.positions)[:, :5], np.asarray(b5.positions))
    np.testing.assert_array_equal(np.asarray(b9.species)[:, :5], np.asarray(b5.species))
    np.testing.assert_array_equal(np.asarray(b9.mask)[:, :5], np.asarray(b5.mask))
    assert not np.asarray(b9.mask)[:, 5:].any()
    np.testing.assert_array_equal(np.asarray(b9.cell), np.asarray(b5.cell))
    np.testing.assert_array_equal(np.asarray(b9.total_charge), np.asarray(b5.total_charge))
    for k in range(3):
        np.testing.assert_array_equal(np.asarray(b9[k].positions), np.asarray(b5[k].positions))


def test_batch_errors_and_pytree():
    systems = _three_systems()
    with pytest.raises(ValueError, match="smaller than the largest system"):
        cs.Batch.from_systems(systems, n_atoms=4)
    with pytest.raises(ValueError, match="at least one system"):
        cs.Batch.from_systems([])
    b = cs.Batch.from_systems(systems)
    shifted = jax.jit(lambda b: jax.tree_util.tree_map(lambda x: x, b))(b)
    assert shifted.pbc == b.pbc
    np.testing.assert_array_equal(np.asarray(shifted.positions), np.asarray(b.positions))
    total = jax.jit(lambda b: jnp.sum(jnp.where(b.mask, b.species, 0)))(b)
    assert int(total) == 8 + 1 + 1 + (1 + 6 + 7 + 8 + 9) + 3


def test_slab_with_zero_open_vector_has_no_stress_but_right_energy():
    # before: stress (1/V) dE/de divided by |det(cell)| = 0 and came back as -inf
    pos = np.array([[0.0, 0.0, 0.0], [1.5, 1.5, 1.2], [0.0, 2.0, -0.9]])
    flat = cs.System(pos, [1, 8, 1], cell=np.diag([4.0, 4.0, 0.0]), pbc=(True, True, False))
    vac = cs.System(pos, [1, 8, 1], cell=np.diag([4.0, 4.0, 30.0]), pbc=(True, True, False))
    pot = cs.Potential.from_config(
        {"name": "allegro", "r_cut": 3.0, "channels": 2, "n_radial": 4, "radial_mlp": [4]},
        example=vac,
    )
    a, b = pot(flat), pot(vac)
    assert a.stress is None and b.stress is not None and np.all(np.isfinite(b.stress))
    np.testing.assert_allclose(float(a.energy), float(b.energy), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(a.forces), np.asarray(b.forces), atol=1e-12)
