"""celli_scale.io: extxyz, RuNNer/n2p2 input.data and npz round trips, units, errors."""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

import ase
import ase.io
import numpy as np
import pytest

import celli_scale as cs
from celli_scale import io
from celli_scale.io import DataFormatError, Frame

# Hand-computed from CODATA 2018 (not from celli_scale.units).
BOHR_A = 0.529177210903  # Å
HARTREE_EV = 27.211386245988  # eV
HA_PER_BOHR_EV_PER_A = 51.422067476325886  # eV/Å


def _grid(rng: np.random.Generator, shape: tuple[int, ...], scale: float) -> np.ndarray:
    """Random values with at most 8 decimals: they survive ASE's ``%16.8f`` columns exactly."""
    return np.round(rng.uniform(-scale, scale, shape), 8)


def _frames() -> list[Frame]:
    """Periodic triclinic with all labels, open charged molecule, partially periodic, bare."""
    rng = np.random.default_rng(42)
    cell = np.array([[6.0, 0.0, 0.0], [1.25, 5.5, 0.0], [0.5, -0.75, 7.0]])
    pos = np.array([[0.5, 0.5, 0.5], [2.0, 1.0, 3.0], [4.0, 3.0, 1.0], [1.0, 4.0, 5.0]])
    pos = np.round(pos + _grid(rng, (4, 3), 0.3), 8)
    stress = _grid(rng, (3, 3), 0.01)
    stress = stress + stress.T
    periodic = Frame(
        cs.System(pos, [8, 1, 1, 26], cell=cell, pbc=True, total_charge=-1.0),
        energy=-1234.5678901234567,
        forces=_grid(rng, (4, 3), 3.0),
        charges=_grid(rng, (4,), 1.0),
        stress=stress,
    )
    molecule = Frame(
        cs.System([[0.0, 0.0, 0.0], [0.0, 0.0, 1.12345678]], [6, 8], total_charge=1.0),
        energy=-3.25,
        forces=[[0.0, 0.0, 1.5], [0.0, 0.0, -1.5]],
    )
    slab = Frame(
        cs.System(
            [[0.0, 0.0, 5.0], [1.5, 1.5, 6.0]],
            [3, 9],
            cell=np.diag([3.0, 3.0, 20.0]),
            pbc=(True, True, False),
        ),
        charges=[0.75, -0.75],
    )
    bare = Frame(cs.System([[0.0, 0.0, 0.0]], [2]))
    return [periodic, molecule, slab, bare]


def _assert_system_equal(a: cs.System, b: cs.System, rtol: float = 0.0) -> None:
    np.testing.assert_allclose(np.asarray(a.positions), np.asarray(b.positions), rtol=rtol, atol=0)
    np.testing.assert_array_equal(np.asarray(a.species), np.asarray(b.species))
    assert a.pbc == b.pbc
    assert float(a.total_charge) == float(b.total_charge)
    if b.cell is None:
        assert a.cell is None
    else:
        np.testing.assert_allclose(np.asarray(a.cell), np.asarray(b.cell), rtol=rtol, atol=0)


def _assert_frame_equal(a: Frame, b: Frame, rtol: float = 0.0) -> None:
    _assert_system_equal(a.system, b.system, rtol)
    assert a.labels == b.labels
    if b.energy is not None:
        assert a.energy == pytest.approx(b.energy, rel=rtol, abs=0)
    for name in ("forces", "charges", "stress"):
        if getattr(b, name) is not None:
            np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=rtol, atol=0)


# -- Frame --------------------------------------------------------------------------------
def test_frame_validates_labels():
    s = cs.System([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]], [1, 1])
    with pytest.raises(ValueError, match=r"forces must have shape \(2, 3\)"):
        Frame(s, forces=np.zeros((3, 3)))
    with pytest.raises(ValueError, match="forces contain NaN or inf at atom 1"):
        Frame(s, forces=[[0.0, 0.0, 0.0], [0.0, np.inf, 0.0]])
    with pytest.raises(ValueError, match="energy must be finite"):
        Frame(s, energy=np.nan)
    with pytest.raises(ValueError, match=r"charges must have shape \(2,\)"):
        Frame(s, charges=[1.0])
    f = Frame(s, energy=np.float32(2.5), charges=[0.5, -0.5])
    assert f.energy == 2.5 and isinstance(f.energy, float)
    assert f.labels == ("energy", "charges")
    with pytest.raises(ValueError):
        f.charges[0] = 3.0  # read-only


def test_frame_from_ase_charge_sources():
    atoms = ase.Atoms("NaCl", positions=[[0, 0, 0], [2.5, 0, 0]])
    assert Frame.from_ase(atoms).charges is None
    atoms.set_initial_charges([0.8, -0.3])
    f = Frame.from_ase(atoms)
    np.testing.assert_array_equal(f.charges, [0.8, -0.3])
    assert float(f.system.total_charge) == pytest.approx(0.5, abs=1e-15)  # sum of labels
    atoms.info["charge"] = 0
    assert float(Frame.from_ase(atoms).system.total_charge) == 0.0  # info wins


def test_frame_from_ase_ignores_stale_results():
    from ase.calculators.singlepoint import SinglePointCalculator

    atoms = ase.Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]])
    atoms.calc = SinglePointCalculator(atoms, energy=-1.5, forces=np.ones((2, 3)))
    f = Frame.from_ase(atoms)
    assert f.energy == -1.5 and f.labels == ("energy", "forces")
    atoms.positions[1, 2] = 0.8  # the stored results no longer belong to these atoms
    assert Frame.from_ase(atoms).labels == ()


# -- extxyz -------------------------------------------------------------------------------
def test_extxyz_round_trip_exact(tmp_path):
    frames = _frames()
    path = tmp_path / "data.xyz"
    io.write_extxyz(path, frames)
    back = io.read_extxyz(path)
    assert len(back) == 4
    for a, b in zip(back, frames, strict=True):
        _assert_frame_equal(a, b, rtol=0.0)
    assert back[0].energy == -1234.5678901234567
    assert float(back[1].system.total_charge) == 1.0
    assert back[2].system.pbc == (True, True, False)
    assert back[3].labels == ()


def test_extxyz_precision_of_per_atom_columns(tmp_path):
    rng = np.random.default_rng(0)
    pos = rng.uniform(0.0, 10.0, (20, 3))
    forces = rng.normal(size=(20, 3))
    f = Frame(cs.System(pos, np.full(20, 6), min_distance=0.0), forces=forces, energy=1 / 3)
    io.write_extxyz(tmp_path / "x.extxyz", f)
    (g,) = io.read(tmp_path / "x.extxyz")
    assert g.energy == 1 / 3  # info values are written exactly
    assert np.abs(np.asarray(g.system.positions) - pos).max() <= 5.0000001e-9
    assert np.abs(g.forces - forces).max() <= 5.0000001e-9


def test_extxyz_readable_by_plain_ase(tmp_path):
    frames = _frames()
    io.write_extxyz(tmp_path / "d.xyz", frames)
    atoms = ase.io.read(tmp_path / "d.xyz", index=0)
    ref = frames[0]
    assert atoms.get_potential_energy() == ref.energy
    np.testing.assert_array_equal(atoms.get_forces(), ref.forces)
    np.testing.assert_array_equal(atoms.get_charges(), ref.charges)
    np.testing.assert_array_equal(atoms.get_stress(voigt=False), ref.stress)
    assert atoms.info["charge"] == -1.0
    assert list(atoms.pbc) == [True, True, True]


def test_extxyz_errors(tmp_path):
    bad = tmp_path / "bad.xyz"
    bad.write_text("two\nnot a header\nH 0 0 0\n")
    with pytest.raises(DataFormatError, match="bad.xyz"):
        io.read_extxyz(bad)
    overlap = tmp_path / "overlap.xyz"
    overlap.write_text('2\nProperties=species:S:1:pos:R:3 pbc="F F F"\nH 0 0 0\nH 0 0 0.01\n')
    with pytest.raises(DataFormatError, match=r"overlap.xyz frame 0: overlapping atoms"):
        io.read_extxyz(overlap)
    with pytest.raises(FileNotFoundError):
        io.read_extxyz(tmp_path / "missing.xyz")


HEADER = 'Lattice="5 0 0 0 5 0 0 0 5" Properties=species:S:1:pos:R:3 pbc="T T T"'


@pytest.mark.parametrize(
    "text, pattern",
    [
        # before: IndexError from ASE (the CLI printed a traceback)
        ("", r"empty.xyz: no frames \(the file is empty\)"),
        ("\n\n", r"empty.xyz: no frames"),
        # before: "could not assign tuple of length 3 to structure with 4 fields."
        (
            f"2\n{HEADER}\nH 0 0 0\nH 1 1\n",
            r"empty.xyz line 4 \(frame 0, atom 1\): 3 columns, but "
            r"Properties=species:S:1:pos:R:3 needs 4",
        ),
        # before: "not a readable extxyz file: 'Xx'"
        (f"2\n{HEADER}\nH 0 0 0\nXx 1 1 1\n", r"line 4 \(frame 0, atom 1\): unknown element 'Xx'"),
        (
            f"1\n{HEADER}\nH 0 0 0\n1\n{HEADER}\nQ 1 1 1\n",
            r"line 6 \(frame 1, atom 0\): unknown element 'Q'",
        ),
        (f"3\n{HEADER}\nH 0 0 0\n", r"line 1: frame 0 announces 3 atoms but the file ends"),
        ("2\n", r"line 1: frame 0 ends before its comment line"),
        (f"1\n{HEADER}\nH 0 0 0\nabc\n", r"line 4: frame 1 should start with the number"),
        ("0\n\n", r"line 1: frame 0 has 0 atoms"),
        ("1\nProperties=species:S:1:pos:Q\nH 0 0 0\n", r"line 2: malformed Properties"),
    ],
)
def test_extxyz_malformed_names_line_and_problem(tmp_path, text, pattern):
    path = tmp_path / "empty.xyz"
    path.write_text(text)
    with pytest.raises(DataFormatError, match=pattern):
        io.read(path)


def test_extxyz_slab_with_zero_open_vector(tmp_path):
    # ASE writes slabs with a zero vector along the open axis; before: "singular cell"
    path = tmp_path / "slab.xyz"
    path.write_text(
        '2\nLattice="4 0 0 0 4 0 0 0 0" Properties=species:S:1:pos:R:3 pbc="T T F"\n'
        "H 0 0 0\nH 2 2 1\n"
    )
    (f,) = io.read(path)
    assert f.system.pbc == (True, True, False)
    np.testing.assert_array_equal(np.asarray(f.system.cell)[2], [0.0, 0.0, 0.0])


def test_extxyz_frame_index_out_of_range(tmp_path):
    # before: "not a readable extxyz file: " (empty reason)
    path = tmp_path / "one.xyz"
    path.write_text(f"2\n{HEADER}\nH 0 0 0\nH 1 1 1\n")
    with pytest.raises(DataFormatError, match=r"one.xyz: frame index 5 is out of range: the "):
        io.read(path, index=5)
    with pytest.raises(DataFormatError, match="out of range: the file has 1 frame$"):
        io.read(path, index=-2)
    with pytest.raises(DataFormatError, match=r"bad frame index.*step 0"):
        io.read(path, index="3:1:0")
    assert len(io.read(path, index=np.int64(0))) == 1
    assert len(io.read(path, index="0:5")) == 1


def test_frame_numbers_in_errors_follow_the_index(tmp_path):
    path = tmp_path / "two.xyz"
    path.write_text(f"2\n{HEADER}\nH 0 0 0\nH 1 1 1\n2\n{HEADER}\nH 0 0 0\nH 0 0 0.01\n")
    with pytest.raises(DataFormatError, match=r"two.xyz frame 1: overlapping atoms"):
        io.read(path, index=1)


def test_index_out_of_range_for_every_format(tmp_path):
    frames = _frames()[:2]
    for name in ("set.npz", "input.data"):
        io.write(tmp_path / name, frames)
        with pytest.raises(DataFormatError, match=rf"{name}: frame index 2 is out of range"):
            io.read(tmp_path / name, index=2)
        with pytest.raises(DataFormatError, match=rf"{name}: bad frame index"):
            io.read(tmp_path / name, index=1.5)


# -- RuNNer / n2p2 input.data --------------------------------------------------------------
UNITS_FILE = """\
begin
comment one Bohr, one Hartree, one Hartree/Bohr
lattice 10.0 0.0 0.0
lattice 0.0 12.0 0.0
lattice 0.0 0.0 14.0
atom 1.0 0.0 0.0 O -0.5 0.0 1.0 0.0 -2.0
atom 3.0 2.0 0.0 H 0.25 0.0 0.0 0.5 0.0
energy 1.0
charge -0.25
end

begin
atom 0.0 0.0 0.0 Na 0.0 0.0 0.0 0.0 0.0
atom 0.0 0.0 5.0 Cl 0.0 0.0 0.0 0.0 0.0
energy -0.5
end
"""


def test_runner_units_against_hand_values(tmp_path):
    path = tmp_path / "input.data"
    path.write_text(UNITS_FILE)
    f, g = io.read_runner(path)
    pos = np.asarray(f.system.positions)
    assert pos[0, 0] == pytest.approx(BOHR_A, rel=1e-15)
    assert pos[1, 0] == pytest.approx(3 * BOHR_A, rel=1e-15)
    assert pos[1, 1] == pytest.approx(2 * BOHR_A, rel=1e-15)
    np.testing.assert_allclose(np.asarray(f.system.cell), np.diag([10.0, 12.0, 14.0]) * BOHR_A)
    assert f.system.pbc == (True, True, True)
    assert f.energy == pytest.approx(HARTREE_EV, rel=1e-15)
    assert f.forces[0, 0] == pytest.approx(HA_PER_BOHR_EV_PER_A, rel=1e-14)
    assert f.forces[0, 2] == pytest.approx(-2 * HA_PER_BOHR_EV_PER_A, rel=1e-14)
    assert f.forces[1, 1] == pytest.approx(0.5 * HA_PER_BOHR_EV_PER_A, rel=1e-14)
    np.testing.assert_array_equal(f.charges, [-0.5, 0.25])  # e: no conversion
    assert float(f.system.total_charge) == -0.25
    np.testing.assert_array_equal(np.asarray(f.system.species), [8, 1])
    # second block: open, no 'charge' line, all-zero atomic charges (n2p2's placeholder)
    assert g.system.cell is None and g.system.pbc == (False, False, False)
    assert np.asarray(g.system.positions)[1, 2] == pytest.approx(5 * BOHR_A, rel=1e-15)
    assert g.energy == pytest.approx(-0.5 * HARTREE_EV, rel=1e-15)
    assert g.charges is None
    assert float(g.system.total_charge) == 0.0
    np.testing.assert_array_equal(g.forces, np.zeros((2, 3)))


def test_runner_round_trip(tmp_path):
    frames = [f for f in _frames() if f.system.periodic is False or all(f.system.pbc)]
    frames = [
        Frame(
            f.system,
            energy=-7.5 if f.energy is None else f.energy,
            forces=np.zeros((f.n_atoms, 3)) if f.forces is None else f.forces,
            charges=f.charges,
        )
        for f in frames
    ]
    path = tmp_path / "input.data"
    io.write_runner(path, frames)
    back = io.read_runner(path)
    assert len(back) == len(frames) == 3
    for a, b in zip(back, frames, strict=True):
        _assert_frame_equal(a, b, rtol=1e-12)
    # written in atomic units
    text = path.read_text()
    first_energy = next(line for line in text.splitlines() if line.startswith("energy"))
    assert float(first_energy.split()[1]) == pytest.approx(-1234.5678901234567 / HARTREE_EV)


def test_write_runner_refusals_and_fill(tmp_path, caplog):
    fr = _frames()
    with pytest.raises(ValueError, match=r"frame 0 has pbc=\(True, True, False\)"):
        io.write_runner(tmp_path / "a.data", [fr[2]])
    with pytest.raises(ValueError, match="frame 0 has no energy"):
        io.write_runner(tmp_path / "a.data", [fr[3]])
    io.write_runner(tmp_path / "a.data", [fr[3]], fill_missing=True)
    (g,) = io.read_runner(tmp_path / "a.data")
    assert g.energy == 0.0
    np.testing.assert_array_equal(g.forces, np.zeros((1, 3)))
    with caplog.at_level(logging.WARNING, logger="celli_scale.io"):
        io.write_runner(tmp_path / "b.data", [fr[0]])
    assert "cannot store stress" in caplog.text
    assert io.read_runner(tmp_path / "b.data")[0].stress is None


GOOD_BLOCK = [
    "begin",
    "comment test",
    "lattice 10.0 0.0 0.0",
    "lattice 0.0 10.0 0.0",
    "lattice 0.0 0.0 10.0",
    "atom 0.0 0.0 0.0 H 0.0 0.0 0.0 0.0 0.0",
    "atom 1.0 2.0 3.0 H 0.0 0.0 0.0 0.0 0.0",
    "energy -1.0",
    "charge 0.0",
    "end",
]


def _edit(lineno: int, new: str | None) -> str:
    lines = list(GOOD_BLOCK)
    if new is None:
        del lines[lineno - 1]
    else:
        lines[lineno - 1] = new
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    "text, pattern",
    [
        (_edit(7, "atom 1.0 2.0 3.0 H 0.0 0.0 0.0 0.0"), r"line 7: 'atom' needs 10 fields, got 9"),
        (_edit(7, "atom 1.0 2.0 3.0 H 0.0 0.0 0.0"), r"line 7: 'atom' needs 10 fields, got 8"),
        (
            _edit(6, "atom 0.0 abc 0.0 H 0.0 0.0 0.0 0.0 0.0"),
            r"line 6: 'atom' field 2 \(y\) is not a number: 'abc'",
        ),
        (
            _edit(6, "atom 0.0 0.0 0.0 Xx 0.0 0.0 0.0 0.0 0.0"),
            r"line 6: 'atom' field 4 \(element\) is not an element: 'Xx'",
        ),
        (
            _edit(6, "atom 0.0 0.0 0.0 H 0.0 0.0 nan 0.0 0.0"),
            r"line 6: 'atom' field 7 \(fx\) is not finite",
        ),
        (_edit(8, "energy"), r"line 8: 'energy' needs 2 fields, got 1"),
        (_edit(9, "energy 2.0"), r"line 9: 'energy' appears twice"),
        (_edit(9, "charge one"), r"line 9: 'charge' field 1 \(charge\) is not a number"),
        (_edit(4, "lattice 0.0 10.0"), r"line 4: 'lattice' needs 4 fields, got 3"),
        (_edit(5, None), r"line 9: 'lattice' needs 3 lines .* got 2"),
        (_edit(5, "lattice 0.0 10.0 0.0"), r"block at lines 1-10: singular"),
        (
            _edit(7, "atom 0.05 0.0 0.0 H 0.0 0.0 0.0 0.0 0.0"),
            r"block at lines 1-10: overlapping atoms: atoms 0 and 1",
        ),
        (_edit(10, None), r"line 1: 'begin' has no matching 'end'"),
        (_edit(10, "begin"), r"line 10: 'begin' before the 'end' of the block at line 1"),
        (_edit(2, "coment typo"), r"line 2: unknown keyword 'coment'"),
        ("atom 0 0 0 H 0 0 0 0 0\n", r"line 1: 'atom' outside a begin/end block"),
        ("begin\nenergy 1.0\nend\n", r"line 3: the block at line 1 has no 'atom' lines"),
        ("\n\n", r"no 'begin'/'end' blocks"),
    ],
)
def test_runner_malformed(tmp_path, text, pattern):
    path = tmp_path / "input.data"
    path.write_text(text)
    with pytest.raises(DataFormatError, match=pattern) as err:
        io.read_runner(path)
    assert str(err.value).startswith(str(path))


def test_runner_good_block_and_binary(tmp_path):
    path = tmp_path / "input.data"
    path.write_text("\n".join(GOOD_BLOCK) + "\n")
    (f,) = io.read_runner(path)
    assert f.n_atoms == 2 and f.energy == -HARTREE_EV
    path.write_bytes(b"\x80\x81\xfe\xff" * 10)
    with pytest.raises(DataFormatError, match="not a text file"):
        io.read_runner(path)


# -- npz ----------------------------------------------------------------------------------
def test_npz_round_trip_bit_exact(tmp_path):
    rng = np.random.default_rng(7)
    frames = _frames()
    # full-precision values (no 8-decimal grid): npz must keep every bit
    s0 = frames[0].system
    frames[0] = Frame(
        s0.replace(positions=np.asarray(s0.positions) + rng.normal(0, 1e-3, (4, 3))),
        energy=float(rng.normal()),
        forces=rng.normal(size=(4, 3)),
        charges=rng.normal(size=4),
        stress=frames[0].stress,
    )
    path = tmp_path / "d.npz"
    io.save_npz(path, frames)
    back = io.load_npz(path)
    assert len(back) == 4
    for a, b in zip(back, frames, strict=True):
        _assert_frame_equal(a, b, rtol=0.0)
    with np.load(path, allow_pickle=False) as data:
        assert data["positions"].shape == (4, 4, 3)
        np.testing.assert_array_equal(data["n_atoms"], [4, 2, 2, 1])
        np.testing.assert_array_equal(data["has_energy"], [True, True, False, False])
        np.testing.assert_array_equal(data["has_charges"], [True, False, True, False])
        np.testing.assert_array_equal(data["has_cell"], [True, False, True, False])
        assert np.isnan(data["energy"][2]) and np.isnan(data["forces"][1, 2:]).all()
        np.testing.assert_array_equal(data["species"][1], [6, 8, 0, 0])
    assert not list(tmp_path.glob("*.tmp"))


def _npz_arrays(tmp_path: Path) -> dict[str, np.ndarray]:
    io.save_npz(tmp_path / "ok.npz", _frames())
    with np.load(tmp_path / "ok.npz", allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


@pytest.mark.parametrize(
    "change, pattern",
    [
        (lambda a: a.pop("species"), r"field 'species': missing"),
        (lambda a: a.update(format=np.array("other/1")), r"field 'format'"),
        (lambda a: a.update(n_atoms=np.array([4, 2, 9, 1])), r"'n_atoms': frame 2 has 9 atoms"),
        (lambda a: a.update(cell=np.zeros((4, 3))), r"field 'cell': expected shape \(4, 3, 3\)"),
        (lambda a: a["positions"].__setitem__((1, 0, 0), np.nan), r"frame 1: positions .*NaN"),
        (lambda a: a["has_stress"].__setitem__(1, True), r"frame 1: stress contain NaN"),
    ],
)
def test_npz_malformed(tmp_path, change, pattern):
    arrays = _npz_arrays(tmp_path)
    change(arrays)
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataFormatError, match=pattern):
        io.load_npz(tmp_path / "bad.npz")


def test_npz_never_unpickles(tmp_path):
    arrays = _npz_arrays(tmp_path)
    arrays["species"] = np.array([object()] * 4, dtype=object)
    np.savez(tmp_path / "obj.npz", **arrays)
    with pytest.raises(DataFormatError, match=r"obj.npz: not a readable .npz.*pickle") as e:
        io.load_npz(tmp_path / "obj.npz")
    assert "allow_pickle" not in str(e.value) and "'species'" in str(e.value)
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(DataFormatError, match="junk.npz"):
        io.load_npz(tmp_path / "junk.npz")
    assert zipfile.is_zipfile(tmp_path / "obj.npz")


def test_npz_wrong_kinds_of_file(tmp_path):
    # before: a .npy named .npz ended in a TypeError; a text file read as npz passed on
    # numpy's advice to load it with allow_pickle
    np.save(tmp_path / "a.npy", np.arange(3))
    (tmp_path / "a.npy").rename(tmp_path / "a.npz")
    with pytest.raises(DataFormatError, match="a.npz: a single .npy array, not an .npz"):
        io.read(tmp_path / "a.npz")
    (tmp_path / "notes.txt").write_text("hello\nworld\n")
    with pytest.raises(DataFormatError, match="notes.txt: not an .npz data set") as e:
        io.read(tmp_path / "notes.txt", format="npz")
    assert "pickle" not in str(e.value)
    (tmp_path / "empty.npz").write_bytes(b"")
    with pytest.raises(DataFormatError, match="empty.npz: not an .npz data set"):
        io.read(tmp_path / "empty.npz")


def test_directory_is_not_a_file(tmp_path):
    with pytest.raises(DataFormatError, match="a directory, not a structure"):
        io.read(tmp_path, format="extxyz")


# -- dispatch -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, fmt",
    [
        ("a.xyz", "extxyz"),
        ("a.extxyz", "extxyz"),
        ("input.data", "runner"),
        ("train.data", "runner"),
        ("set.npz", "npz"),
        ("POSCAR", "ase"),
    ],
)
def test_read_write_dispatch(tmp_path, name, fmt):
    assert io.guess_format(name) == fmt
    frames = [f for f in _frames() if f.energy is not None and f.forces is not None]
    path = tmp_path / name
    if fmt == "ase":
        ase.io.write(path, frames[0].system.to_ase(), format="vasp")
        (g,) = io.read(path)
        _assert_system_equal(g.system, frames[0].system.replace(total_charge=0.0), rtol=1e-12)
        return
    io.write(path, frames)
    back = io.read(path)
    assert len(back) == 2
    _assert_frame_equal(back[1], frames[1], rtol=1e-12)
    (last,) = io.read(path, index=-1)
    _assert_frame_equal(last, frames[1], rtol=1e-12)
    (first,) = io.read(path, index="0:1")
    assert first.n_atoms == 4


def test_read_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        io.read(tmp_path / "missing.npz")
    (tmp_path / "notes.txt").write_text("hello\n")
    with pytest.raises(DataFormatError, match="notes.txt"):
        io.read(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="cannot tell the format"):
        io.write(tmp_path / "out.cif", _frames())
    with pytest.raises(ValueError, match="unknown format"):
        io.read(tmp_path / "notes.txt", format="pdb2")
