"""Saved potentials: manifest check on load, strict config types, damaged checkpoints."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

import celli_scale as cs
from celli_scale import potential as potmod
from celli_scale.datasets import random_cluster

CONFIG = {"name": "allegro", "channels": 4, "l_max": 1, "n_layers": 1, "r_cut": 4.0}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    s = random_cluster(n=6, species=(1, 8))
    pot = cs.Potential.from_config(CONFIG, seed=0, example=s)
    path = tmp_path_factory.mktemp("saved") / "model"
    pot.save(path)
    return path, s, float(pot(s).energy)


@pytest.fixture
def copy(saved, tmp_path):
    path, s, energy = saved
    dst = tmp_path / "model"
    shutil.copytree(path, dst)
    return dst, s, energy


def _largest_param_file(path):
    return max(
        (p for p in (path / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size
    )


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def _rehash(path):
    """What a hand-made (or re-signed) model looks like: manifest matching its files."""
    m = json.loads((path / "manifest.json").read_text())
    for name in m["sha256"]:
        m["sha256"][name] = hashlib.sha256((path / name).read_bytes()).hexdigest()
    (path / "manifest.json").write_text(json.dumps(m))


def test_round_trip_with_manifest(copy):
    path, s, energy = copy
    m = json.loads((path / "manifest.json").read_text())
    assert m["format"] == potmod.SAVE_FORMAT
    assert "config.json" in m["sha256"]
    assert any(k.startswith("params/") for k in m["sha256"])
    again = cs.Potential.load(path)
    assert float(again(s).energy) == energy


def test_flipped_parameter_byte_refused(copy):
    # before: loaded, and the energy changed silently
    path, _, _ = copy
    f = _largest_param_file(path)
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 0x40
    f.write_bytes(bytes(b))
    with pytest.raises(potmod.SavedModelError, match=f"{f.name}: changed since"):
        cs.Potential.load(path)


@pytest.mark.parametrize(
    "changes", [{"r_cut": 3.0}, {"species": [8, 1]}, {"dtype": "float32"}, {"r_cut": True}]
)
def test_edited_config_refused(copy, changes):
    # before: r_cut 4 -> 3 or a new dtype loaded silently; r_cut true was read as 1 Å
    path, _, _ = copy
    _edit_config(path, **changes)
    with pytest.raises(ValueError, match=r"config\.json: changed since"):
        cs.Potential.load(path)


@pytest.mark.parametrize(
    "value, pattern",
    [(True, "r_cut must be a number, got True"), ("5", "r_cut must be a number, got '5'")],
)
def test_badly_typed_config_refused_even_with_matching_manifest(copy, value, pattern):
    path, _, _ = copy
    _edit_config(path, r_cut=value)
    _rehash(path)
    with pytest.raises(potmod.SavedModelError, match=rf"config\.json: config {pattern}"):
        cs.Potential.load(path)


def test_config_json_not_an_object(copy):
    path, _, _ = copy
    (path / "config.json").write_text("[1, 2]")
    _rehash(path)
    with pytest.raises(potmod.SavedModelError, match="expected a JSON object"):
        cs.Potential.load(path)


def test_truncated_checkpoint_one_clear_error(copy):
    path, _, _ = copy
    f = _largest_param_file(path)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(potmod.SavedModelError, match=f"{f.name}: changed since"):
        cs.Potential.load(path)
    # the same damage without a manifest: orbax's error wrapped, naming the directory
    (path / "manifest.json").unlink()
    with pytest.warns(UserWarning, match="no manifest.json"):
        with pytest.raises(potmod.SavedModelError, match=r"params: the parameter checkpoint"):
            cs.Potential.load(path)


def test_missing_or_added_files_refused(copy):
    path, _, _ = copy
    (path / "params" / "extra.bin").write_bytes(b"x")
    with pytest.raises(potmod.SavedModelError, match="extra.bin: not listed"):
        cs.Potential.load(path)
    shutil.rmtree(path / "params")
    with pytest.raises(potmod.SavedModelError, match="listed in manifest.json but missing"):
        cs.Potential.load(path)


def test_manifest_malformed_or_wrong_format(copy):
    path, _, _ = copy
    (path / "manifest.json").write_text('{"format": "other/9", "sha256": {}}')
    with pytest.raises(potmod.SavedModelError, match="field 'format'"):
        cs.Potential.load(path)
    (path / "manifest.json").write_text("{oops")
    with pytest.raises(potmod.SavedModelError, match="manifest.json: malformed JSON"):
        cs.Potential.load(path)


def test_model_without_manifest_loads_with_warning(copy):
    path, s, energy = copy
    (path / "manifest.json").unlink()
    with pytest.warns(UserWarning, match="cannot be checked"):
        again = cs.Potential.load(path)
    assert float(again(s).energy) == energy


def test_not_a_saved_potential(tmp_path):
    with pytest.raises(potmod.SavedModelError, match="no such directory"):
        cs.Potential.load(tmp_path / "nothing")
    with pytest.raises(potmod.SavedModelError, match="missing config.json"):
        cs.Potential.load(tmp_path)


@pytest.mark.parametrize(
    "config, pattern",
    [
        ([("name", "allegro")], "needs a dict"),
        ("allegro", "needs a dict"),
        ({"name": "allegro", "r_cut": "5"}, "config r_cut must be a number, got '5'"),
        ({"name": "allegro", "r_cut": True}, "config r_cut must be a number, got True"),
        ({"name": "allegro", "channels": 8.0}, "config channels must be an integer"),
        ({"name": "allegro", "channels": True}, "config channels must be an integer"),
        ({"name": "allegro", "radial_mlp": [8, "8"]}, r"config radial_mlp\[1\]"),
        ({"name": "allegro", "radial_mlp": 8}, "config radial_mlp must be a list"),
        ({"name": "allegro", "parity": 1}, "config parity must be true/false"),
        ({"name": "allegro", "r_cut": float("nan")}, "config r_cut must be finite"),
        ({"name": "celli", "qeq_tol": "1e-8"}, "config qeq_tol must be a number or null"),
        ({"name": "allegro", "dtype": 64}, "config dtype must be a string"),
    ],
)
def test_from_config_strict_types(config, pattern):
    with pytest.raises(ValueError, match=pattern):
        cs.Potential.from_config(config, example=random_cluster(n=3))


def test_from_config_accepts_numpy_scalars_and_symbols(tmp_path):
    cfg = dict(CONFIG, r_cut=np.float32(3.5), channels=np.int64(4), species=["H", "O"])
    pot = cs.Potential.from_config(cfg, seed=np.int64(1))
    assert pot.config.r_cut == 3.5 and type(pot.config.r_cut) is float
    assert pot.config.species == (1, 8)
    pot.save(tmp_path / "m")  # plain JSON types
    assert json.loads((tmp_path / "m" / "config.json").read_text())["r_cut"] == 3.5
    with pytest.raises(ValueError, match="seed must be an integer"):
        cs.Potential.from_config(CONFIG, seed=1.5, example=random_cluster(n=3))
