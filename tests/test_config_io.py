"""Safe YAML loading: no anchors/aliases (alias bombs), YAML 1.2 floats, clear errors."""

from __future__ import annotations

import time

import pytest
import yaml

from celli_scale.config_io import ConfigFileError, load_yaml, parse_yaml

BOMB = "\n".join(
    ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    + [f"{chr(98 + k)}: &{chr(98 + k)} [{', '.join(['*' + chr(97 + k)] * 10)}]" for k in range(8)]
)


def test_alias_bomb_refused_quickly(tmp_path):
    # before: yaml.safe_load accepted it; expanding it ran for minutes into a MemoryError
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    t0 = time.perf_counter()
    with pytest.raises(ConfigFileError, match=r"bomb\.yaml line 1, column 4: YAML anchor 'a'"):
        load_yaml(path)
    assert time.perf_counter() - t0 < 1.0


def test_plain_alias_and_anchor_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("base: {r_cut: 5}\nother: *x\n")
    with pytest.raises(ConfigFileError, match=r"c\.yaml line 2.*alias 'x'"):
        load_yaml(path)
    path.write_text("base: &b {r_cut: 5}\n")
    with pytest.raises(ConfigFileError, match="anchor 'b'"):
        load_yaml(path)


@pytest.mark.parametrize(
    "text, value",
    [
        ("1e3", 1000.0),
        ("1E-5", 1e-5),
        ("-2.5e+2", -250.0),
        ("+3e0", 3.0),
        ("1.5", 1.5),
        (".5", 0.5),
        ("6.", 6.0),
        ("1.0e-6", 1e-6),
        ("10", 10),
        ("0x1f", 31),
        ("1_000", 1000),
        ("1e3x", "1e3x"),
        ("e3", "e3"),
        ("'1e3'", "1e3"),
        ("true", True),
        ("null", None),
        (".", "."),
        ("-.e3", "-.e3"),
    ],
)
def test_yaml12_floats(text, value):
    got = parse_yaml(f"x: {text}")["x"]
    assert got == value and type(got) is type(value)


def test_safe_load_unchanged():
    # the float resolver is private to our loader
    assert yaml.safe_load("x: 1e3") == {"x": "1e3"}


def test_nested_config_and_errors(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text("model: {name: celli, elec_accuracy: 1e-6}\nsizes: [64, 1E3]\n")
    assert load_yaml(path) == {
        "model": {"name": "celli", "elec_accuracy": 1e-6},
        "sizes": [64, 1000.0],
    }
    path.write_text("a: [1, 2\n")
    with pytest.raises(ConfigFileError, match=r"study\.yaml line 2"):
        load_yaml(path)
    path.write_text("x: !!python/object:os.system ls\n")
    with pytest.raises(ConfigFileError, match="study.yaml"):
        load_yaml(path)
    path.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigFileError, match="not a UTF-8 text file"):
        load_yaml(path)
    with pytest.raises(FileNotFoundError):
        load_yaml(tmp_path / "missing.yaml")
