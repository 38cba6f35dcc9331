"""The ``celli-scale`` command line: info, --help, errors, demo hand-off."""

from __future__ import annotations

import types

import numpy as np
import pytest

import celli_scale as cs
from celli_scale import cli, io
from celli_scale.cli import main


def _write_dataset(path) -> None:
    cell = np.diag([5.0, 6.0, 7.0])
    water = cs.System(
        [[1.0, 1.0, 1.0], [1.0, 1.757, 0.413], [1.0, 0.243, 0.413]],
        [8, 1, 1],
        cell=cell,
        pbc=True,
        total_charge=-1.0,
    )
    frames = [
        io.Frame(water, energy=-14.25, forces=np.zeros((3, 3)), charges=[-1.2, 0.1, 0.1]),
        io.Frame(
            cs.System(
                [
                    [0.0, 0.0, 0.0],
                    [0.0, 0.0, 1.1],
                    [3.0, 0.0, 0.0],
                    [3.0, 0.0, 1.1],
                    [6.0, 0.0, 0.0],
                ],
                [6, 8, 6, 8, 3],
                total_charge=1.0,
            ),
            energy=-3.0,
        ),
    ]
    io.write_extxyz(path, frames)


def test_info_extxyz(tmp_path, capsys):
    path = tmp_path / "set.xyz"
    _write_dataset(path)
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "frames: 2" in out
    assert "atoms per frame: min 3, max 5 (total 8)" in out
    assert "H 2, Li 1, C 2, O 3" in out  # ordered by atomic number, counted over all frames
    assert "pbc T T T" in out
    assert "5.000000     0.000000     0.000000" in out
    assert "total charge (e): -1 (1 frame), 1 (1 frame)" in out
    assert "labels: energy 2/2, forces 1/2, charges 1/2" in out
    assert "stress" not in out


def test_info_runner_and_npz(tmp_path, capsys):
    src = tmp_path / "set.xyz"
    _write_dataset(src)
    frames = io.read(src)
    io.save_npz(tmp_path / "set.npz", frames)
    assert main(["info", str(tmp_path / "set.npz")]) == 0
    out = capsys.readouterr().out
    assert "format: npz" in out and "frames: 2" in out and "H 2, Li 1, C 2, O 3" in out
    io.write_runner(tmp_path / "input.data", frames[:1])
    assert main(["info", str(tmp_path / "input.data")]) == 0
    out = capsys.readouterr().out
    assert "format: runner" in out
    assert "total charge (e): -1 (1 frame)" in out
    assert "labels: energy 1/1, forces 1/1, charges 1/1" in out


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "info" in out and "demo" in out


def test_missing_file_exits_2(tmp_path, capsys):
    rc = main(["info", str(tmp_path / "nope.xyz")])
    assert rc == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip()
    assert err.startswith("error:") and "nope.xyz" in err
    assert "\n" not in err and "Traceback" not in err


def test_malformed_file_exits_2(tmp_path, capsys):
    path = tmp_path / "input.data"
    path.write_text("begin\natom 0 0 0 H 0 0\nend\n")
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:")
    assert "line 2: 'atom' needs 10 fields, got 7" in err
    assert "\n" not in err


def test_bad_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["info", "a.xyz", "extra"])
    assert exc.value.code == 2


def test_demo_hands_parsed_options_to_demo_main(monkeypatch):
    seen = {}

    def add_parser(sub):
        p = sub.add_parser("demo", help="fake demo")
        p.add_argument("--n", type=int, default=4)

    def fake_main(args):
        seen["n"] = args.n
        return 3

    module = types.ModuleType("celli_scale.demo")
    module.add_parser = add_parser  # type: ignore[attr-defined]
    module.main = fake_main  # type: ignore[attr-defined]
    monkeypatch.setattr(cli, "demo", module)  # cli imports celli_scale.demo directly
    assert main(["demo", "--n", "7"]) == 3
    assert seen["n"] == 7


def _user_error(capsys, argv) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err
    return err


def test_info_user_errors_one_line(tmp_path, capsys):
    # before: IndexError traceback (empty .xyz), TypeError traceback (.npy named .npz),
    # and numpy's advice to use allow_pickle (--format npz on a text file)
    (tmp_path / "empty.xyz").write_text("")
    assert "empty.xyz: no frames" in _user_error(capsys, ["info", str(tmp_path / "empty.xyz")])
    np.save(tmp_path / "a.npy", np.arange(3))
    (tmp_path / "a.npy").rename(tmp_path / "a.npz")
    err = _user_error(capsys, ["info", str(tmp_path / "a.npz")])
    assert "a.npz: a single .npy array" in err
    (tmp_path / "notes.txt").write_text("hello\n")
    err = _user_error(capsys, ["info", "--format", "npz", str(tmp_path / "notes.txt")])
    assert "notes.txt: not an .npz data set" in err and "pickle" not in err
    (tmp_path / "bad.xyz").write_text("2\nProperties=species:S:1:pos:R:3\nH 0 0 0\nXx 1 1 1\n")
    err = _user_error(capsys, ["info", str(tmp_path / "bad.xyz")])
    assert "bad.xyz line 4 (frame 0, atom 1): unknown element 'Xx'" in err
    err = _user_error(capsys, ["info", str(tmp_path)])
    assert "a directory" in err


def test_info_lines_without_frames():
    from celli_scale.cli import info_lines

    assert info_lines([], "x.xyz", "extxyz") == ["file: x.xyz (format: extxyz)", "frames: 0"]


def test_not_implemented_and_interrupt_are_reported_without_traceback(monkeypatch, capsys):
    import celli_scale.cli as cli

    def not_implemented(args):
        raise NotImplementedError("electrostatics for partly periodic systems")

    monkeypatch.setattr(cli, "_cmd_info", not_implemented)
    err = _user_error(capsys, ["info", "x.xyz"])
    assert err == "error: electrostatics for partly periodic systems"

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_info", interrupted)
    assert main(["info", "x.xyz"]) == 130
    assert capsys.readouterr().err.strip() == "error: interrupted"

    def bug(args):
        raise TypeError("a programming error keeps its traceback")

    monkeypatch.setattr(cli, "_cmd_info", bug)
    with pytest.raises(TypeError):
        main(["info", "x.xyz"])
