"""Side by side: our CG charge equilibration vs dense bordered Qeq solvers, periodic NaCl grid.

System: the PEERS.md NaCl grid (n³ sites, spacing 2.2 Å, cubic cell 2.2·n Å, periodic),
rattled by 0.05 Å (normal, seed 0); Gaussian charges σ = 1 Å, hardness J = 10 eV/e²,
electronegativity χ = −3 eV/e on Na, +3 eV/e on Cl plus N(0, 0.2 eV/e) noise (seed 0; the
rattle and the noise keep the solution from being a single symmetric mode), total charge 0.
N = 512, 1000, 4096 (n = 8, 10, 16), and 8000 (n = 20) with ``--sides 8 10 16 20``.

Contenders (each in its own process, warm, timed interleaved: every round calls every variant
once, in turn; the minimum over ``--rounds`` rounds (default 7, 5 from N = 4096) is reported;
the process not being timed waits idle on its pipe):

* ``ours64`` / ``ours32``: ``celli_scale.qeq.solve_arrays(method="cg")`` jitted, float64
  tol 1e-8 (x64 on) and float32 tol 1e-5 (x64 off, separate process); electrostatics
  ``el.prepare(system, "auto", 1e-6, sigma)`` (→ PME) and ``el.real_space_neighbors``
  prepared outside the timing and passed as jit arguments; the timed call is one solve
  (``block_until_ready``).
* ``mlipops``: openmm's mlipops 0.6.0 ``ChargeEquilibration(CoulombEwald(...))``, torch
  CPU, float32 (its only precision), ``solver="direct"`` (``torch.linalg.solve`` of the
  bordered matrix). Its Ewald parameters are ours for accuracy 1e-6 (``el.prepare(...,
  "ewald", 1e-6, sigma)``: α, real-space cut-off, k-box ``kmax``). Its neighbor list is
  cached after the warm-up (same positions tensor), so the timed ``forward`` is assembly +
  solve. mlipops builds the Qeq matrix without Coulomb's constant (its CoulombEwald
  ``prefactor`` is not applied) and with radius a = √2·σ, so it is given χ/k_e, J/k_e
  (same charges) and radius √2 σ. Also timed: ``torch.linalg.solve`` alone on the bordered
  matrix (``mlipops_solve``).
* ``dense``: an independent in-process dense bordered solve (numpy/scipy, no jax): the
  periodic Gaussian-charge Coulomb matrix by Ewald (the same α, cut-off and half k-sphere
  as above; real-space pairs precomputed, distances and erf terms, the reciprocal part as
  two GEMMs ``Cᵀ diag(a_k) C + Sᵀ diag(a_k) S``, self and background terms) plus diag(J);
  ``scipy.linalg.solve`` (LAPACK gesv, LU) of ``[[A, 1], [1ᵀ, 0]] [q; λ] = [−χ; Q]``.
  Assembly and solve are timed separately, in float64 and in float32.

Charges are compared (max |Δq|) against the dense float64 solve. The dense worker also
solves, untimed, the matrix as mlipops 0.6.0 writes it
(``ChargeEquilibration._compute_interactions_ewald``: the direct-space values and the
reciprocal sum over its half k-set are added and then both multiplied by 4π/V, where the
Hessian has the direct part unscaled and 8π/V on the half set; the diagonal is then replaced
by J + 1/(σ√π), dropping the Ewald self-image terms) to tell whether a difference of
mlipops' charges is its formula.

Install and run (nothing goes into the project's .venv)::

    python3 -m venv /tmp/venv-mlipops
    /tmp/venv-mlipops/bin/pip install torch==2.13.0    # the CPU wheel of this machine kind
    /tmp/venv-mlipops/bin/pip install mlipops==0.6.0 numpy
    /work/main/.venv/bin/python bench/bench_qeq_vs_dense.py --sides 8 10 16 [20]
    # --mlipops-python PATH (default /tmp/venv-mlipops/bin/python; skipped if absent)
    # --rounds R  --json out.json

Without mlipops the other contenders still run (the script says mlipops was skipped).
The asv class ``QeqVsDense`` (tests/test_bench.py runs it in quick mode, N = 64, dense
anchor) measures the same ratios. Run time on 2 cores: about 5 min for N = 512, 1000, 4096;
about 6 min more for N = 8000 (4.6 GB peak).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

SPACING = 2.2
SIGMA = 1.0  # Å
HARDNESS = 10.0  # eV/e²
CHI = 3.0  # eV/e (Na: −CHI, Cl: +CHI)
CHI_NOISE = 0.2
RATTLE = 0.05
ACCURACY = 1e-6
TOL64, TOL32 = 1e-8, 1e-5
DEFAULT_MLIPOPS_PY = "/tmp/venv-mlipops/bin/python"
QUICK = os.environ.get("CELLI_BENCH_QUICK", "") not in ("", "0")
TAG = "@@"


# ---------------------------------------------------------------------------------------
# the structure (driver)
# ---------------------------------------------------------------------------------------
def write_structure(n: int, path: str) -> dict:
    import jax

    jax.config.update("jax_enable_x64", True)
    import celli_scale as cs
    from celli_scale import cell as cellmod
    from celli_scale import electrostatics as el
    from celli_scale.units import COULOMB

    idx = np.stack(np.meshgrid(*[np.arange(n)] * 3, indexing="ij"), -1).reshape(-1, 3)
    rng = np.random.default_rng(0)
    pos = idx * SPACING + rng.normal(0.0, RATTLE, idx.shape)
    na = idx.sum(axis=1) % 2 == 0
    chi = np.where(na, -CHI, CHI) + rng.normal(0.0, CHI_NOISE, na.size)
    cell = np.eye(3) * SPACING * n
    z = np.where(na, 11, 17)
    sigma = np.full(na.size, SIGMA)
    hard = np.full(na.size, HARDNESS)
    s = cs.System(pos, z, cell=cell, pbc=True, validate=False)
    p = el.prepare(s, "ewald", ACCURACY, sigma=sigma)
    i, j, sh, _ = cellmod.host_pairs(pos, cell, (True,) * 3, p.r_cut)
    np.savez(
        path,
        pos=pos,
        cell=cell,
        chi=chi,
        hardness=hard,
        sigma=sigma,
        z=z,
        total_charge=0.0,
        alpha=p.alpha,
        r_cut=p.r_cut,
        kvecs=np.asarray(p.kvecs),
        kbox=np.asarray(p.kbox),
        pi=i,
        pj=j,
        pshift=sh,
        coulomb=COULOMB,
    )
    return dict(
        alpha=p.alpha,
        r_cut=p.r_cut,
        n_k_half=int(p.kvecs.shape[0]),
        kbox=list(p.kbox),
        n_pairs=int(i.size),
    )


# ---------------------------------------------------------------------------------------
# workers: each answers "run VARIANT" (one timed call), "save PATH", "quit" on stdin
# ---------------------------------------------------------------------------------------
def _say(**msg):
    sys.stdout.write(TAG + json.dumps(msg) + "\n")
    sys.stdout.flush()


def _serve(variants: dict, info: dict, charges) -> None:
    _say(ready=True, variants=list(variants), info=info)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "run":
            t0 = time.perf_counter()
            variants[cmd[1]]()
            _say(t=time.perf_counter() - t0)
        elif cmd[0] == "save":
            np.savez(cmd[1], **{k: np.asarray(v, dtype=np.float64) for k, v in charges().items()})
            _say(ok=True)
        elif cmd[0] == "quit":
            return


def worker_ours(npz: str, x64: bool) -> None:
    from functools import partial

    import jax
    import jax.numpy as jnp

    import celli_scale as cs  # its import turns x64 on: set the wanted mode after it
    from celli_scale import electrostatics as el
    from celli_scale import qeq

    jax.config.update("jax_enable_x64", x64)

    d = np.load(npz)
    dt = np.float64 if x64 else np.float32
    tol = TOL64 if x64 else TOL32
    s = cs.System(d["pos"].astype(dt), d["z"], cell=d["cell"].astype(dt), pbc=True, validate=False)
    sigma = jnp.asarray(d["sigma"], dt)
    t0 = time.perf_counter()
    params = el.prepare(s, "auto", ACCURACY, sigma=sigma)
    nl = el.real_space_neighbors(s, params)
    prep = time.perf_counter() - t0
    args = (
        s.positions,
        s.cell,
        jnp.asarray(d["chi"], dt),
        jnp.asarray(d["hardness"], dt),
        sigma,
        jnp.asarray(float(d["total_charge"]), dt),
        params,
        nl,
    )
    solve = jax.jit(partial(qeq.solve_arrays, method="cg", tol=tol))
    t0 = time.perf_counter()
    res = jax.block_until_ready(solve(*args))
    compile_s = time.perf_counter() - t0
    res = jax.block_until_ready(solve(*args))
    qeq.check(res)
    state = {"res": res}

    def run():
        state["res"] = jax.block_until_ready(solve(*args).charges)

    info = dict(
        x64=bool(jax.config.jax_enable_x64),
        dtype=str(res.charges.dtype),
        tol=tol,
        electrostatics=params.method,
        alpha=params.alpha,
        r_cut=params.r_cut,
        grid=list(params.grid),
        iterations=int(res.iterations),
        residual=float(res.residual),
        converged=bool(res.converged),
        prep_s=prep,
        compile_s=compile_s,
        jax=jax.__version__,
    )
    _serve({"cg64" if x64 else "cg32": run}, info, lambda: {"q": res.charges})


def worker_mlipops(npz: str) -> None:
    from importlib.metadata import version

    import mlipops
    import torch

    d = np.load(npz)
    k_e = float(d["coulomb"])
    f32 = torch.float32
    pos = torch.tensor(d["pos"], dtype=f32)
    box = torch.tensor(d["cell"], dtype=f32)
    chi = torch.tensor(d["chi"] / k_e, dtype=f32)
    hard = torch.tensor(d["hardness"] / k_e, dtype=f32)
    radius = torch.tensor(math.sqrt(2.0) * d["sigma"], dtype=f32)
    kmax = [int(x) for x in d["kbox"]]
    nl = mlipops.NeighborList(cutoff=float(d["r_cut"]))
    coul = mlipops.CoulombEwald(nl, None, *kmax, alpha=float(d["alpha"]), prefactor=k_e)
    qeq = mlipops.ChargeEquilibration(coul)
    q_total = float(d["total_charge"])

    def forward():
        with torch.no_grad():
            return qeq(pos, chi, hard, radius, total_charge=q_total, box_vectors=box)

    t0 = time.perf_counter()
    q = forward()  # also builds and caches the neighbor list (same positions tensor)
    first_s = time.perf_counter() - t0
    q = forward()
    n = pos.shape[0]
    with torch.no_grad():
        inter = qeq._compute_interactions_ewald(pos, hard, radius, box, None, 1)
    ones = torch.ones((n, 1), dtype=f32)
    mat = torch.cat(
        [torch.cat([inter, ones], 1), torch.cat([ones.T, torch.zeros((1, 1), dtype=f32)], 1)]
    )
    rhs = torch.cat([-chi, torch.tensor([q_total], dtype=f32)])
    torch.linalg.solve(mat, rhs)

    info = dict(
        torch=torch.__version__,
        mlipops=version("mlipops"),
        threads=torch.get_num_threads(),
        kmax=kmax,
        n_waves=int(coul.wave_indices.shape[0]),
        n_pairs=int(nl(pos, box).shape[0]),
        first_call_s=first_s,
    )
    _serve(
        {"mlipops": forward, "mlipops_solve": lambda: torch.linalg.solve(mat, rhs)},
        info,
        lambda: {"q": q.numpy()},
    )


def _assemble(d, dtype, variant="ewald"):
    """The bordered Qeq matrix ``[[A, 1], [1ᵀ, 0]]`` (eV/e²), A by Ewald (numpy/scipy)."""
    from scipy.special import erf

    pos = d["pos"].astype(dtype)
    cell = d["cell"].astype(dtype)
    sig = d["sigma"].astype(dtype)
    hard = d["hardness"].astype(dtype)
    k_e = dtype(d["coulomb"])
    alpha = dtype(d["alpha"])
    i, j, sh = d["pi"], d["pj"], d["pshift"].astype(dtype)
    n = pos.shape[0]
    vol = abs(float(np.linalg.det(d["cell"])))
    # real space: erf(r/√2γ)/r − erf(αr)/r over the precomputed pairs (both directions)
    vec = pos[j] - pos[i] + sh @ cell
    r = np.sqrt(np.einsum("ij,ij->i", vec, vec))
    gam = np.sqrt(sig[i] ** 2 + sig[j] ** 2)
    val = (erf(r / (np.sqrt(dtype(2)) * gam)) - erf(alpha * r)) / r
    m = np.zeros((n + 1, n + 1), dtype)
    a = m[:n, :n]
    if variant == "mlipops":  # mlipops assigns (i, j) once per pair; same as a sum here
        a[i, j] = val
    else:
        np.add.at(a, (i, j), val)
    # reciprocal space over the half k-set: (8π/V) Σ_half a_k cos(k·r_ij)
    kv = 2 * np.pi * d["kvecs"].astype(dtype) @ np.linalg.inv(cell).T
    k2 = np.einsum("ij,ij->i", kv, kv)
    ak = (np.exp(-k2 / (4 * alpha * alpha)) / k2).astype(dtype)
    ph = kv @ pos.T
    c, s = np.cos(ph), np.sin(ph)
    diag = np.arange(n)
    if variant == "mlipops":
        # as mlipops 0.6.0 writes it: direct + Σ_half a_k (cc + ss), all times 4π/V
        a += (c * ak[:, None]).T @ c
        a += (s * ak[:, None]).T @ s
        a *= k_e * 4 * np.pi / vol
        a[diag, diag] = hard + k_e / (sig * np.sqrt(np.pi))
        m[:n, n] = 1
        m[n, :n] = 1
        return m
    pref = 8 * np.pi / vol
    a += pref * ((c * ak[:, None]).T @ c)
    a += pref * ((s * ak[:, None]).T @ s)
    # self: Gaussian self-energy, Ewald self term, neutralising background
    a -= dtype(np.pi / (alpha * alpha * vol))
    a *= k_e
    a[diag, diag] += hard + k_e * (1 / (sig * np.sqrt(np.pi)) - 2 * alpha / np.sqrt(np.pi))
    m[:n, n] = 1
    m[n, :n] = 1
    return m


def worker_dense(npz: str) -> None:
    import scipy
    import scipy.linalg as sla

    d = np.load(npz)
    n = d["pos"].shape[0]
    rhs64 = np.concatenate([-d["chi"], [float(d["total_charge"])]])
    mats, sols = {}, {}

    def assemble(dt):
        def f():
            mats[dt] = _assemble(d, dt)

        return f

    def solve(dt):
        def f():
            sols[dt] = sla.solve(mats[dt], rhs64.astype(dt), check_finite=False)

        return f

    variants = {}
    for name, dt in (("64", np.float64), ("32", np.float32)):
        variants["dense_assemble" + name] = assemble(dt)
        variants["dense_solve" + name] = solve(dt)
    for f in variants.values():  # warm-up
        f()
    q_ml = sla.solve(_assemble(d, np.float64, "mlipops"), rhs64, check_finite=False)[:n]
    a64 = mats[np.float64][:n, :n]
    sym = float(np.max(np.abs(a64 - a64.T)))
    ev_min = None
    if n <= 4096:  # smallest eigenvalue of A on the constraint surface Σq = 0
        proj = np.eye(n) - 1.0 / n
        ev = np.linalg.eigvalsh(proj @ a64 @ proj)
        ev_min = float(ev[1])  # ev[0] ≈ 0: the projected-out direction 1
    info = dict(
        numpy=np.__version__, scipy=scipy.__version__, max_asym=sym, min_eig_A_on_sum0=ev_min
    )
    _serve(
        variants,
        info,
        lambda: {
            "q64": sols[np.float64][:n],
            "q32": sols[np.float32][:n],
            "q_mlipops_formula": q_ml,
        },
    )


# ---------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------
class Worker:
    def __init__(self, name, argv, log):
        self.name = name
        self.log = open(log, "w")
        t0 = time.perf_counter()
        self.p = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True
        )
        msg = self._read()
        self.setup_s = time.perf_counter() - t0
        self.variants, self.info = msg["variants"], msg["info"]

    def _read(self):
        while True:
            line = self.p.stdout.readline()
            if not line:
                raise RuntimeError(f"worker {self.name} died (see {self.log.name})")
            if line.startswith(TAG):
                return json.loads(line[len(TAG) :])

    def ask(self, cmd):
        self.p.stdin.write(cmd + "\n")
        self.p.stdin.flush()
        return self._read()

    def close(self):
        try:
            self.p.stdin.write("quit\n")
            self.p.stdin.flush()
            self.p.wait(timeout=60)
        except Exception:
            self.p.kill()
        self.log.close()


ALL_KINDS = ("ours64", "ours32", "dense", "mlipops")


def run_size(
    n: int, rounds: int, mlipops_py: str | None, tmp: str, kinds: tuple = ALL_KINDS
) -> dict:
    n_atoms = n**3
    npz = os.path.join(tmp, f"qeq_{n}.npz")
    print(f"\n=== N = {n_atoms} (n = {n}, L = {SPACING * n:.1f} Å) ===", flush=True)
    geo = write_structure(n, npz)
    print(
        f"  Ewald parameters for the dense solvers (ours, accuracy {ACCURACY:g}): "
        f"alpha {geo['alpha']:.3f}/Å, r_cut {geo['r_cut']:.2f} Å, k-box {geo['kbox']}, "
        f"{geo['n_k_half']} half-sphere k, {geo['n_pairs']} real-space pairs",
        flush=True,
    )
    me = os.path.abspath(__file__)
    specs = [
        ("ours64", [sys.executable, me, "--worker", "ours64", npz]),
        ("ours32", [sys.executable, me, "--worker", "ours32", npz]),
        ("dense", [sys.executable, me, "--worker", "dense", npz]),
    ]
    if mlipops_py:
        specs.append(("mlipops", [mlipops_py, me, "--worker", "mlipops", npz]))
    specs = [sp for sp in specs if sp[0] in kinds]
    workers = []
    for name, argv in specs:
        try:
            w = Worker(name, argv, os.path.join(tmp, f"{name}_{n}.log"))
        except Exception as exc:
            print(f"  {name}: FAILED to start ({exc})", flush=True)
            continue
        print(f"  {name:<8} ready in {w.setup_s:6.1f} s: {w.info}", flush=True)
        workers.append(w)
    times = {(w.name, v): [] for w in workers for v in w.variants}
    for _ in range(rounds):
        for w in workers:
            for v in w.variants:
                times[(w.name, v)].append(w.ask(f"run {v}")["t"])
    charges = {}
    for w in workers:
        path = os.path.join(tmp, f"q_{w.name}_{n}.npz")
        w.ask(f"save {path}")
        charges.update({f"{w.name}:{k}": v for k, v in np.load(path).items()})
        w.close()
    res = {"geometry": geo, "info": {w.name: w.info for w in workers}, "times": {}}
    for (_, v), ts in times.items():
        res["times"][v] = dict(t_min=min(ts), t_median=float(np.median(ts)), times=ts)
        print(f"  {v:<16} min {min(ts) * 1e3:10.2f} ms   median {np.median(ts) * 1e3:10.2f} ms")
    ref = charges.get("dense:q64")
    dq = {}
    if ref is not None:
        print(f"  charges: max |q| {np.max(np.abs(ref)):.4f} e (dense float64 reference)")
        for k, q in charges.items():
            if k == "dense:q64":
                continue
            dq[f"{k} vs dense:q64"] = float(np.max(np.abs(q - ref)))
    for a, b in (
        ("mlipops:q", "ours64:q"),
        ("mlipops:q", "dense:q_mlipops_formula"),
        ("ours32:q", "ours64:q"),
    ):
        if a in charges and b in charges:
            dq[f"{a} vs {b}"] = float(np.max(np.abs(charges[a] - charges[b])))
    for k, v in dq.items():
        print(f"  max |dq| {k:<42} {v:.3e} e")
    res["max_dq"] = dq
    return res


def mlipops_python(path: str | None = DEFAULT_MLIPOPS_PY) -> str | None:
    """``path`` if that interpreter imports mlipops, torch and numpy, else ``None``."""
    if not path or not os.path.exists(path):
        return None
    probe = subprocess.run([path, "-c", "import mlipops, torch, numpy"], capture_output=True)
    return path if probe.returncode == 0 else None


class QeqVsDense:
    """asv: our jitted CG solve (float64, tol 1e-8) over a dense bordered solve, measured
    side by side as in ``main`` (interleaved, min over rounds): ``dense`` = the in-process
    numpy/scipy Ewald assembly + LU solve (float64), ``mlipops`` = mlipops 0.6.0's
    ``ChargeEquilibration`` forward (float32; skipped when /tmp/venv-mlipops is absent).
    Quick mode (``CELLI_BENCH_QUICK=1``): N = 64, 3 rounds."""

    params = ([64] if QUICK else [1000, 4096], ["dense", "mlipops"])
    param_names = ("n_atoms", "anchor")
    timeout = 1800
    rounds = 1
    repeat = 1
    number = 1

    def setup(self, n_atoms, anchor):
        ml = None
        if anchor == "mlipops":
            ml = mlipops_python()
            if ml is None:
                raise NotImplementedError(f"mlipops not importable with {DEFAULT_MLIPOPS_PY}")
        n = round(n_atoms ** (1 / 3))
        self._tmp = tempfile.TemporaryDirectory(prefix="qeq_vs_dense_")
        rounds = 3 if QUICK else 5
        self.res = run_size(n, rounds, ml, self._tmp.name, kinds=("ours64", anchor))
        t = {k: v["t_min"] for k, v in self.res["times"].items()}
        other = t["mlipops"] if anchor == "mlipops" else t["dense_assemble64"] + t["dense_solve64"]
        self.ratio = t["cg64"] / other
        key = "mlipops:q vs ours64:q" if anchor == "mlipops" else "ours64:q vs dense:q64"
        self.max_dq = self.res["max_dq"][key]

    def teardown(self, n_atoms, anchor):
        self._tmp.cleanup()

    def track_ours_over_anchor(self, n_atoms, anchor):
        return self.ratio

    track_ours_over_anchor.unit = "ratio"

    def track_cg_iterations(self, n_atoms, anchor):
        return float(self.res["info"]["ours64"]["iterations"])

    track_cg_iterations.unit = "iterations"

    def track_max_dq_vs_ours(self, n_atoms, anchor):
        """max |q_anchor − q_ours| in e (mlipops 0.6.0 differs by ~0.1 e: its formula)."""
        return self.max_dq

    track_max_dq_vs_ours.unit = "e"


def summary(results: dict) -> None:
    print(
        "\nN      ours CG f64   (it)  ours CG f32   (it)  mlipops f32   (solve)   "
        "dense asm64+solve64   dense asm32+solve32   ours64/mlipops  ours64/dense64"
    )
    for n_atoms, r in results["sizes"].items():
        t = {k: v["t_min"] for k, v in r["times"].items()}
        it64 = r["info"].get("ours64", {}).get("iterations", "-")
        it32 = r["info"].get("ours32", {}).get("iterations", "-")

        def ms(k, t=t):
            return f"{t[k] * 1e3:.1f}" if k in t else "-"

        d64 = t.get("dense_assemble64", np.nan) + t.get("dense_solve64", np.nan)
        r_ml = t["cg64"] / t["mlipops"] if "cg64" in t and "mlipops" in t else np.nan
        r_d = t["cg64"] / d64 if "cg64" in t else np.nan
        print(
            f"{n_atoms:<6} {ms('cg64'):>10} ({it64:>3})  {ms('cg32'):>10} ({it32:>3})  "
            f"{ms('mlipops'):>10} ({ms('mlipops_solve'):>7})   "
            f"{ms('dense_assemble64'):>8}+{ms('dense_solve64'):<8}     "
            f"{ms('dense_assemble32'):>8}+{ms('dense_solve32'):<8}     "
            f"{r_ml:>10.3f}      {r_d:>10.3f}"
        )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", choices=["ours64", "ours32", "dense", "mlipops"])
    ap.add_argument("npz", nargs="?")
    ap.add_argument("--sides", type=int, nargs="+", default=[8, 10, 16])
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--mlipops-python", default=DEFAULT_MLIPOPS_PY)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.worker == "ours64":
        return worker_ours(args.npz, True) or 0
    if args.worker == "ours32":
        return worker_ours(args.npz, False) or 0
    if args.worker == "dense":
        return worker_dense(args.npz) or 0
    if args.worker == "mlipops":
        return worker_mlipops(args.npz) or 0

    mlipops_py = mlipops_python(args.mlipops_python)
    if mlipops_py is None:
        print(
            f"mlipops not importable with {args.mlipops_python}: skipping it "
            "(dense numpy anchor only)"
        )
    results = {"sizes": {}}
    with tempfile.TemporaryDirectory(prefix="qeq_vs_dense_") as tmp:
        for n in args.sides:
            rounds = args.rounds or (5 if n >= 16 else 7)
            results["sizes"][n**3] = run_size(n, rounds, mlipops_py, tmp)
            if args.json:
                with open(args.json, "w") as fh:
                    json.dump(results, fh, indent=1)
    summary(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
