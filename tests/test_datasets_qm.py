"""Reference data labelled by GFN2-xTB (celli_scale.datasets.qm): declared charge states and
sizes, reproducibility, an independent tblite re-labelling, forces against finite differences
of the energy, the manifest, the cache, failures named, and the ``datasets make`` command.

Labelling tests use the smallest sets (Ag3±: 3 atoms, ~0.1 s per structure; rock salt at
size 1: 8 atoms, ~1 s)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from celli_scale import cli, io
from celli_scale.datasets import qm
from celli_scale.system import System

needs_tblite = pytest.mark.skipif(
    importlib.util.find_spec("tblite") is None, reason="labelling needs tblite"
)

# Independent of celli_scale.units (CODATA 2018, as tblite's own docs use).
BOHR_IN_A = 0.529177210903
HARTREE_IN_EV = 27.211386245988

# name, size, expected (formula, total charge, atoms, pbc) of structures 0 and 1
DECLARED = [
    ("carbon-chain", None, [("C10H2", 0.0, 12, False), ("C10H3", 1.0, 13, False)]),
    ("nacl-cluster", None, [("Na8Cl8", 0.0, 16, False), ("Na9Cl8", 1.0, 17, False)]),
    ("ag3", None, [("Ag3", 1.0, 3, False), ("Ag3", -1.0, 3, False)]),
    ("au2-mgo", None, [("Au2Mg8O8", 0.0, 18, True), ("AlAu2Mg7O8", 0.0, 18, True)]),
    ("nacl-bulk", None, [("Na32Cl32", 0.0, 64, True), ("Na32Cl31", 1.0, 63, True)]),
    ("nacl-bulk", 3, [("Na108Cl108", 0.0, 216, True), ("Na108Cl107", 1.0, 215, True)]),
    ("carbon-chain", 6, [("C6H2", 0.0, 8, False), ("C6H3", 1.0, 9, False)]),
]


def _distances(s: System) -> np.ndarray:
    pos = np.asarray(s.positions)
    d = pos[:, None] - pos[None]
    if any(s.pbc):
        cell = np.asarray(s.cell)
        d = d - np.rint(d @ np.linalg.inv(cell)) @ cell  # minimum image (cubic-ish cells)
    r = np.linalg.norm(d, axis=-1)
    return r[np.triu_indices(len(pos), 1)]


@pytest.mark.parametrize("name,size,expected", DECLARED)
def test_structures_declared_charge_states_and_sizes(name, size, expected):
    systems = qm.structures(name, 4, seed=5, size=size)
    for k, s in enumerate(systems):
        f, q, n, pbc = expected[k % 2]
        assert qm.formula(s.species) == f
        assert float(s.total_charge) == q
        assert s.n_atoms == n
        assert s.pbc == (pbc,) * 3
        assert _distances(s).min() > 0.75  # thermal displacements keep atoms apart (Å)
    # reproducible with the seed; another seed differs; a larger n extends a smaller one
    again = qm.structures(name, 2, seed=5, size=size)
    for a, b in zip(again, systems, strict=False):
        np.testing.assert_array_equal(np.asarray(a.positions), np.asarray(b.positions))
    other = qm.structures(name, 1, seed=6, size=size)[0]
    assert np.abs(np.asarray(other.positions) - np.asarray(systems[0].positions)).max() > 1e-3


def test_ag3_same_geometry_in_both_charge_states():
    s = qm.structures("ag3", 4, seed=2)
    np.testing.assert_array_equal(np.asarray(s[0].positions), np.asarray(s[1].positions))
    np.testing.assert_array_equal(np.asarray(s[2].positions), np.asarray(s[3].positions))
    assert not np.allclose(np.asarray(s[0].positions), np.asarray(s[2].positions))


def test_au2_mgo_dopant_under_the_dimer():
    s = qm.structures("au2-mgo", 2, seed=0)[1]
    z, pos = np.asarray(s.species), np.asarray(s.positions)
    al, au = pos[z == 13][0], pos[z == 79]
    lowest_au = au[np.argmin(au[:, 2])]
    assert np.linalg.norm((lowest_au - al)[:2]) < 0.6  # laterally under it (rattle only)
    assert lowest_au[2] - al[2] > 3.5  # below the surface O (Å)
    assert float(np.asarray(s.cell)[2, 2]) - pos[:, 2].max() > 8.0  # vacuum


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown data set 'ag4'"):
        qm.structures("ag4", 2)
    with pytest.raises(ValueError, match="fixed size"):
        qm.structures("ag3", 2, size=2)
    with pytest.raises(ValueError, match="size >= 2"):
        qm.structures("nacl-bulk", 2, size=1)
    with pytest.raises(ValueError, match="n must be a positive integer"):
        qm.structures("ag3", 0)
    with pytest.raises(ValueError, match="max_redraws must be >= 0"):
        qm.generate("ag3", 2, max_redraws=-1, progress=False)


@needs_tblite
def test_labels_reproducible_and_charges_sum_to_total():
    a, _ = qm.generate("ag3", 2, seed=3, progress=False)
    b, _ = qm.generate("ag3", 2, seed=3, progress=False)
    for fa, fb in zip(a, b, strict=True):
        np.testing.assert_array_equal(np.asarray(fa.system.positions), fb.system.positions)
        np.testing.assert_allclose(fa.energy, fb.energy, rtol=1e-12)
        np.testing.assert_allclose(fa.forces, fb.forces, rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(fa.charges, fb.charges, rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(fa.charges.sum(), float(fa.system.total_charge), atol=1e-8)
    assert a[0].energy != a[1].energy  # same geometry, cation and anion differ


def _tblite_direct(numbers, positions_a, charge, cell_a=None):
    """GFN2-xTB in eV, eV/Å, e, written here without celli_scale's labeller."""
    from tblite.interface import Calculator

    kw = {}
    if cell_a is not None:
        kw = {"lattice": np.asarray(cell_a) / BOHR_IN_A, "periodic": np.array([True] * 3)}
    uhf = int(round(np.sum(numbers) - charge)) % 2
    calc = Calculator(
        "GFN2-xTB", np.asarray(numbers), np.asarray(positions_a) / BOHR_IN_A, charge, uhf, **kw
    )
    calc.set("verbosity", 0)
    res = calc.singlepoint()
    e = res.get("energy") * HARTREE_IN_EV
    f = -res.get("gradient") * HARTREE_IN_EV / BOHR_IN_A
    return e, f, res.get("charges")


@needs_tblite
def test_labeller_process_death_is_a_named_error_and_the_next_call_works():
    """tblite runs in a helper process (qm._Helper); if it dies, the call raises a
    LabelError naming the structure and the next call starts a new helper; the isolated
    and in-process results agree."""
    s = qm.structures("ag3", 1, seed=2)[0]
    first = qm.label_one(s)

    class DiesInTheHelper:  # unpickled there as os._exit(3)
        def __reduce__(self):
            import os

            return (os._exit, (3,))

    with pytest.raises(qm.LabelError, match=r"tblite process died \(exit status 3\).*Ag3"):
        qm.label_one(s, DiesInTheHelper())
    again = qm.label_one(s)
    here = qm.label_one(s, isolated=False)
    np.testing.assert_allclose(again.energy, first.energy, rtol=1e-13)
    np.testing.assert_allclose(here.energy, first.energy, rtol=1e-13)
    np.testing.assert_allclose(here.forces, first.forces, atol=1e-12)


@needs_tblite
def test_spot_check_against_tblite_directly():
    frame = qm.generate("ag3", 2, seed=11, progress=False)[0][1]
    s = frame.system
    e, f, q = _tblite_direct(np.asarray(s.species), np.asarray(s.positions), -1.0)
    np.testing.assert_allclose(frame.energy, e, rtol=1e-6)
    np.testing.assert_allclose(frame.forces, f, rtol=1e-6, atol=1e-6 * np.abs(f).max())
    np.testing.assert_allclose(frame.charges, q, rtol=1e-6, atol=1e-6)
    # the periodic path (lattice in Bohr): the same trimer in a triclinic box
    cell = np.array([[8.0, 0.0, 0.0], [1.0, 8.5, 0.0], [0.5, -0.7, 9.0]])
    boxed = System(s.positions, s.species, cell=cell, pbc=True, total_charge=-1.0)
    mine = qm.label_one(boxed)
    e, f, q = _tblite_direct(np.asarray(s.species), np.asarray(s.positions), -1.0, cell)
    assert abs(mine.energy - frame.energy) > 1e-4  # the images matter
    np.testing.assert_allclose(mine.energy, e, rtol=1e-6)
    np.testing.assert_allclose(mine.forces, f, rtol=1e-6, atol=1e-6 * np.abs(f).max())
    np.testing.assert_allclose(mine.charges, q, rtol=1e-6, atol=1e-6)


@needs_tblite
def test_forces_are_minus_the_energy_gradient():
    frame = qm.generate("ag3", 2, seed=4, progress=False)[0][1]
    s, h = frame.system, 1e-3  # Å
    energies = []
    for sign in (1, -1):
        pos = np.array(s.positions)
        pos[1, 0] += sign * h
        moved = System(pos, s.species, total_charge=s.total_charge)
        energies.append(qm.label_one(moved).energy)
    fd = -(energies[0] - energies[1]) / (2 * h)
    assert abs(frame.forces[1, 0]) > 0.05  # a force worth checking (eV/Å)
    np.testing.assert_allclose(fd, frame.forces[1, 0], rtol=1e-4, atol=1e-5)


@needs_tblite
def test_cache_reuses_frames_without_relabelling(tmp_path, monkeypatch):
    first = qm.make("ag3", 2, seed=7, cache_dir=tmp_path, progress=False)

    def fail(*args, **kwargs):
        raise AssertionError("relabelled although cached")

    monkeypatch.setattr(qm, "label_one", fail)
    again = qm.make("ag3", 2, seed=7, cache_dir=tmp_path, progress=False)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(np.asarray(a.system.positions), b.system.positions)
        assert a.energy == b.energy
        np.testing.assert_array_equal(a.forces, b.forces)
        np.testing.assert_array_equal(a.charges, b.charges)
        assert float(a.system.total_charge) == float(b.system.total_charge)
    with pytest.raises(AssertionError, match="relabelled"):  # another seed is not cached
        qm.make("ag3", 2, seed=8, cache_dir=tmp_path, progress=False)
    with pytest.raises(AssertionError, match="relabelled"):  # nor other settings
        qm.make(
            "ag3",
            2,
            seed=7,
            cache_dir=tmp_path,
            progress=False,
            settings=qm.XTBSettings(accuracy=0.5),
        )
    monkeypatch.setenv(qm.CACHE_ENV, str(tmp_path))
    assert qm.default_cache_dir() == tmp_path
    assert len(qm.make("ag3", 2, seed=7, progress=False)) == 2  # the env's cache


@needs_tblite
def test_scf_failure_names_the_structure(monkeypatch, tmp_path):
    from tblite.exceptions import TBLiteRuntimeError

    def fail(system, settings):
        raise TBLiteRuntimeError("SCF not converged in 250 cycles")

    monkeypatch.setattr(qm, "label_one", fail)
    with pytest.raises(qm.LabelError, match=r"ag3 structure 0 \(Ag3, total charge \+1 e\).*SCF"):
        qm.make("ag3", 2, cache_dir=tmp_path, progress=False)
    assert not list(tmp_path.iterdir())  # nothing cached


@needs_tblite
def test_failed_structure_redrawn_and_listed(monkeypatch):
    from tblite.exceptions import TBLiteRuntimeError

    calls = []

    def flaky(system, settings):
        calls.append(system)
        if len(calls) == 2:  # structure 1, first geometry
            raise TBLiteRuntimeError("SCF not converged")
        return io.Frame(system, energy=0.0)

    monkeypatch.setattr(qm, "label_one", flaky)
    frames, manifest = qm.generate("carbon-chain", 2, max_redraws=1, progress=False)
    assert len(frames) == 2 and len(calls) == 3
    assert [r["structure"] for r in manifest["redrawn"]] == [1]
    assert "carbon-chain structure 1 (C10H3, total charge +1 e)" in manifest["redrawn"][0]["reason"]
    redrawn = frames[1].system
    assert float(redrawn.total_charge) == 1.0 and redrawn.n_atoms == 13  # same charge state
    assert not np.allclose(np.asarray(redrawn.positions), np.asarray(calls[1].positions))


@needs_tblite
def test_same_geometry_sets_redraw_the_geometry_in_every_charge_state(monkeypatch):
    """ag3 labels each geometry as Ag3+ and Ag3-: when the anion's SCF fails, both
    structures of that geometry are redrawn together (the pairs stay pairs)."""
    calls = []

    def flaky(system, settings):
        calls.append(system)
        if len(calls) == 4:  # geometry 1, the anion, first draw
            raise qm.LabelError("SCF not converged")
        return io.Frame(system, energy=float(system.total_charge))

    monkeypatch.setattr(qm, "label_one", flaky)
    frames, manifest = qm.generate("ag3", 4, progress=False)
    assert len(frames) == 4 and len(calls) == 6
    assert [float(f.system.total_charge) for f in frames] == [1.0, -1.0, 1.0, -1.0]
    assert [r["structure"] for r in manifest["redrawn"]] == [3]
    for a, b in ((0, 1), (2, 3)):  # each pair shares its geometry
        np.testing.assert_array_equal(frames[a].system.positions, frames[b].system.positions)
    assert not np.allclose(np.asarray(frames[2].system.positions), np.asarray(calls[2].positions))


@needs_tblite
def test_cli_writes_readable_file_and_manifest(tmp_path, capsys):
    out = tmp_path / "ag3.xyz"
    argv = ["datasets", "make", "ag3", "--n", "2", "--out", str(out), "--seed", "9"]
    assert cli.main([*argv, "--cache-dir", str(tmp_path / "cache"), "--no-progress"]) == 0
    assert "ag3: 2 structures" in capsys.readouterr().out
    frames = io.read(out)
    ref = qm.make("ag3", 2, seed=9, cache_dir=tmp_path / "cache", progress=False)
    assert [float(f.system.total_charge) for f in frames] == [1.0, -1.0]
    for f, r in zip(frames, ref, strict=True):
        assert f.labels == ("energy", "forces", "charges")
        np.testing.assert_allclose(f.energy, r.energy, rtol=1e-12)
        np.testing.assert_allclose(f.forces, r.forces, atol=1e-7)  # 8 decimals on disk
        np.testing.assert_allclose(f.charges, r.charges, atol=1e-7)
        np.testing.assert_allclose(np.asarray(f.system.positions), r.system.positions, atol=1e-7)
    manifest = json.loads((tmp_path / "ag3.json").read_text())
    from importlib.metadata import version

    assert manifest["engine"] == "tblite" and manifest["engine_version"] == version("tblite")
    assert manifest["method"] == "GFN2-xTB"
    assert manifest["settings"] == {
        "accuracy": 1.0,
        "electronic_temperature_K": 300.0,
        "max_iterations": 250,
        "annealing_start_K": None,
    }
    assert (manifest["system"], manifest["n"], manifest["seed"]) == ("ag3", 2, 9)
    assert manifest["charge_states"] == [
        {"formula": "Ag3", "total_charge": 1.0, "n_atoms": 3, "n_structures": 1},
        {"formula": "Ag3", "total_charge": -1.0, "n_atoms": 3, "n_structures": 1},
    ]
    assert manifest["file"] == "ag3.xyz" and manifest["redrawn"] == []


@needs_tblite
def test_cli_reports_scf_failure(tmp_path, monkeypatch, capsys):
    from tblite.exceptions import TBLiteRuntimeError

    def fail(system, settings):
        raise TBLiteRuntimeError("SCF not converged in 250 cycles")

    monkeypatch.setattr(qm, "label_one", fail)
    argv = ["datasets", "make", "ag3", "--n", "2", "--out", str(tmp_path / "a.xyz")]
    assert cli.main([*argv, "--no-cache", "--no-progress"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("error: ag3 structure 0 (Ag3, total charge +1 e)")
    assert not (tmp_path / "a.xyz").exists()
