"""ShardedPotential over several jax.distributed processes: 2 local processes (1 CPU
device each, one domain each) give the energy, forces and (CELLI) charges of 1 process
with 2 host devices and of the unsharded Potential (float64), on a first call and on a
second call that reuses the decomposition; the distributed Qeq solve alone matches too;
every socket the processes listen on is on loopback. ``celli-scale run`` under 2
processes prints and writes once (process 0), the numbers of a single process."""

from __future__ import annotations

import json
import re
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import celli_scale as cs
from celli_scale import io
from celli_scale.datasets import nacl_grid
from celli_scale.distributed import launch
from celli_scale.md import MD, MDConfig
from celli_scale.testing import small_allegro_config

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
ATOL = 1e-8  # float64; the same sums in either layout

#: One worker: ``python -c WORKER KIND [ref]``. Joins the run its environment names (a
#: no-op for one process), evaluates a small periodic system over 2 domains twice (the
#: second call moves the atoms a little: the decomposition and the Qeq warm start are
#: reused), and process 0 prints one JSON line; other processes print the sockets they
#: listen on (``LISTENING [...]``). With ``ref`` it also evaluates the unsharded Potential.
WORKER = textwrap.dedent(
    """
    import json, sys
    from celli_scale.distributed import launch, multihost
    placement = multihost.initialize()
    import jax
    jax.config.update("jax_enable_x64", True)
    import numpy as np
    import celli_scale as cs
    from celli_scale.distributed.sharded import ShardedPotential

    kind, with_ref = sys.argv[1], "ref" in sys.argv[2:]
    if kind == "allegro":
        from celli_scale.datasets import nacl_grid
        from celli_scale.testing import small_allegro_config
        system = nacl_grid(4, 2.2, 0.1, 1)
        pot = cs.Potential.from_config(
            small_allegro_config(dtype="float64"), seed=0, example=system
        )
    else:
        from celli_scale.potential import Potential
        from tests.test_sharded_celli import CELLI, _params, _periodic
        system = _periodic(1, total_charge=1.0)
        pot = cs.Potential.from_config(dict(CELLI, elec_method="ewald"), seed=0, example=system)
        pot = Potential(pot.model, _params(pot.params))
    moved = system.replace(
        positions=np.asarray(system.positions)
        + 0.02 * np.random.default_rng(7).standard_normal((system.n_atoms, 3))
    )
    sp = ShardedPotential(pot, mesh_shape=(2, 1, 1))
    mesh_processes = sorted({int(d.process_index) for d in jax.devices()[:2]})

    def record(out):
        r = {"energy": float(out.energy), "forces": np.asarray(out.forces).tolist()}
        if out.charges is not None:
            r["charges"] = np.asarray(out.charges).tolist()
        return r

    calls = [record(sp(system)), record(sp(moved))]
    result = {
        "processes": jax.process_count(),
        "devices": len(jax.devices()),
        "mesh_processes": mesh_processes,
        "decompositions": sp.stats.decompositions,
        "calls": calls,
        "listening": launch.listening_addresses(),
    }
    if with_ref:
        result["ref"] = [record(pot(system)), record(pot(moved))]
    if kind == "celli":  # the distributed Qeq on its own, over the same 2 devices
        from celli_scale import qeq
        from celli_scale.distributed import qeq as dqeq
        rng = np.random.default_rng(0)
        n = system.n_atoms
        chi, hard, sig = rng.normal(0, 2, n), 8 + 4 * rng.random(n), 0.8 + 0.3 * rng.random(n)
        dist = dqeq.solve(system, chi, hard, sig, devices=2, method="ewald", weights=chi)
        result["qeq"] = {
            "charges": np.asarray(dist.charges).tolist(),
            "chi_grad": np.asarray(dist.chi_grad).tolist(),
            "mu": float(dist.chemical_potential),
        }
        if with_ref:
            dense = qeq.solve(system, chi, hard, sig, method="dense", electrostatics="ewald")
            result["qeq_ref"] = np.asarray(dense.charges).tolist()
    if jax.process_index() == 0:
        print(json.dumps(result), flush=True)
    else:
        print("LISTENING " + json.dumps(result["listening"]), flush=True)
    """
)


def _env(dist: str | None, devices: int) -> dict[str, str]:
    """This environment (the suite's compiler flags kept) with ``devices`` host devices,
    the checkout on the path and the process's place in the run (None: a single one)."""
    env = launch.worker_env(devices, dist)
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _group(argv: list[str], processes: int, timeout_s: float = 240) -> launch.GroupResult:
    """``argv`` as ``processes`` jax.distributed processes with 1 device each, or (1) as
    one process with 2 host devices."""
    if processes == 1:
        envs = [_env(None, devices=2)]
    else:
        address = f"127.0.0.1:{launch.free_loopback_port()}"
        envs = [_env(launch.distributed_env(address, processes, i), 1) for i in range(processes)]
    r = launch.run_group([argv] * processes, env=envs, cwd=ROOT, timeout_s=timeout_s)
    assert r.ok, r.reason(timeout_s)
    return r


def _result(r: launch.GroupResult) -> dict:
    lines = [line for line in r.stdout_lines if line.startswith("{")]
    assert len(lines) == 1, r.stdout_lines  # process 0 alone prints
    return json.loads(lines[0])


def _assert_same(a: dict, b: dict, what: str) -> None:
    assert a["energy"] == pytest.approx(b["energy"], rel=1e-10, abs=ATOL), what
    fa, fb = np.asarray(a["forces"]), np.asarray(b["forces"])
    assert fa.shape == fb.shape and np.abs(fb).max() > 1e-3, what
    np.testing.assert_allclose(fa, fb, rtol=0, atol=ATOL, err_msg=what)
    assert ("charges" in a) == ("charges" in b), what
    if "charges" in b:
        qa, qb = np.asarray(a["charges"]), np.asarray(b["charges"])
        assert np.abs(qb).max() > 0.1, what  # charges that mean something
        np.testing.assert_allclose(qa, qb, rtol=0, atol=ATOL, err_msg=what)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["allegro", "celli"])
def test_two_processes_equal_one_process_and_unsharded(kind):
    one = _result(_group([PY, "-c", WORKER, kind, "ref"], processes=1))
    r2 = _group([PY, "-c", WORKER, kind], processes=2)
    two = _result(r2)
    assert (one["processes"], one["devices"], one["mesh_processes"]) == (1, 2, [0])
    # the two domains live on the two processes' devices
    assert (two["processes"], two["devices"], two["mesh_processes"]) == (2, 2, [0, 1])
    assert one["decompositions"] == two["decompositions"] == 1  # the second call reused it
    for k in range(2):
        _assert_same(two["calls"][k], one["calls"][k], f"call {k}: 2 processes vs 1")
        _assert_same(two["calls"][k], one["ref"][k], f"call {k}: 2 processes vs unsharded")
        _assert_same(one["calls"][k], one["ref"][k], f"call {k}: 1 process vs unsharded")
    if kind == "celli":
        assert sum(two["calls"][0]["charges"]) == pytest.approx(1.0, abs=1e-10)
        # dqeq.solve over the two processes: the charges, their implicit gradient and the
        # chemical potential of one process, the charges of the dense solve
        a, b = two["qeq"], one["qeq"]
        np.testing.assert_allclose(a["charges"], b["charges"], rtol=0, atol=ATOL)
        np.testing.assert_allclose(a["chi_grad"], b["chi_grad"], rtol=0, atol=ATOL)
        assert a["mu"] == pytest.approx(b["mu"], abs=ATOL)
        np.testing.assert_allclose(a["charges"], one["qeq_ref"], rtol=0, atol=ATOL)
    # the coordinator and gloo listen, and only on loopback, in both processes
    m = re.search(r"LISTENING (\[[^\]]*\])", r2.stderr_tails[1])
    assert m, r2.stderr_tails[1]
    other = json.loads(m.group(1))
    assert two["listening"], "process 0 reports no listening socket (the coordinator)"
    for addr in two["listening"] + other:
        assert launch.is_loopback(addr), (two["listening"], other)


def saved_model_and_structure(tmp_path: Path):
    """A float64 Allegro saved to ``tmp_path/model``, a 64-atom NaCl grid written to
    ``tmp_path/nacl.xyz``; returns the unsharded potential's output on it (the reference
    of a ``celli-scale run``)."""
    system = nacl_grid(4, 2.2, 0.1, 0)
    pot = cs.Potential.from_config(small_allegro_config(dtype="float64"), example=system)
    pot.save(tmp_path / "model")
    io.write(tmp_path / "nacl.xyz", io.Frame(system))
    return pot(io.read(tmp_path / "nacl.xyz")[0].system)


@pytest.mark.slow
def test_run_command_under_two_processes(tmp_path):
    """``celli-scale run --devices 2 --md 4`` as 2 processes of 1 device each: the unsharded
    potential's numbers (1 process with 2 devices: tests/test_cli_run.py) and its NVE
    trajectory (``MD`` on the unsharded potential); process 0 alone prints the report and
    writes --out and --trajectory."""
    ref = saved_model_and_structure(tmp_path)
    out, traj = tmp_path / "out.xyz", tmp_path / "traj.xyz"
    argv = [PY, "-m", "celli_scale.cli", "run", str(tmp_path / "nacl.xyz")]
    argv += ["--model", str(tmp_path / "model"), "--devices", "2", "--out", str(out)]
    argv += ["--md", "4", "--trajectory", str(traj)]
    r = _group(argv, 2)
    report = "\n".join(r.stdout_lines)
    assert "(2 shards)" in report and "processes: 2" in report, report
    assert sum(line.startswith("energy:") for line in r.stdout_lines) == 1, report
    assert sum(line.startswith("md: 4 steps NVE") for line in r.stdout_lines) == 1, report
    assert "energy:" not in r.stderr_tails[1]  # process 1 printed no report
    assert "wrote" not in r.stderr_tails[1]
    system = io.read(tmp_path / "nacl.xyz")[0].system
    cfg = MDConfig(ensemble="nve", dt=1.0, temperature=300.0, every=4)
    want = MD(cs.Potential.load(tmp_path / "model"), system, cfg).run(4, progress=False)
    (last,) = io.read(traj)  # one block of 4 steps: one frame
    np.testing.assert_allclose(last.system.positions, want.frames[-1].positions, rtol=0, atol=1e-7)
    assert abs(last.energy - float(want.energy[-1])) < 1e-7
    (got,) = io.read(out)
    assert abs(got.energy - float(ref.energy)) < 1e-8
    np.testing.assert_allclose(got.forces, np.asarray(ref.forces), rtol=0, atol=1e-8)
    np.testing.assert_allclose(got.stress, np.asarray(ref.stress), rtol=0, atol=1e-8)
    assert not list(tmp_path.glob(".out*.tmp"))
