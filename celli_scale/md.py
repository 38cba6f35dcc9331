"""Molecular dynamics with jax-md, driven by any :class:`~celli_scale.potential.Potential`.

:class:`MD` runs NVE (velocity Verlet), NVT Langevin (BAOAB) or NVT Nosé–Hoover chain
dynamics of one structure, ``every`` steps per compiled block (a ``lax.scan``); between
blocks the host only reads a few flags, records a frame and updates the progress bar.

Units: positions Å, energies eV, masses amu, time fs (ASE's internal time unit inside the
integrator: ``dt_internal = dt_fs * ase.units.fs``), temperatures K (``kT = k_B T`` in eV).

Neighbor lists. The model's edges (and CELLI's electrostatics pairs in periodic cells) are
Verlet lists built to the cut-off plus ``skin``; the edges are packed to the cut-off inside
each step (:func:`celli_scale.potential.compact_graph`), the electrostatics pairs beyond
their cut-off are masked by the real-space sum. They are rebuilt *inside* the compiled loop
(``neighbors="jit"``, a dense search over atoms and periodic images,
:func:`celli_scale.neighbors.neighbor_list_fn`) as soon as an atom has moved half the skin
since the last build; for systems where that dense search would not fit in memory
(``neighbors="host"``, chosen by ``"auto"``), the host rebuilds them between blocks. Every
overflow (more pairs than the fixed capacity of a list or of its packed form) and every
stale list (host mode: an atom moved half the skin inside a block) is flagged inside the
step; the host then grows the capacities or rebuilds, and redoes the whole block from its
start. A step never runs on a list that misses a pair.

CELLI. The charges of each step's Qeq solve are carried to the next step as the CG's
initial guess (``qeq="warm"``; ``"cold"`` starts from zero every step). The residual of
every solve is checked on the host after each block (:class:`~celli_scale.qeq.QeqConvergenceError`).
``qeq="xl"``: extended-Lagrangian charge propagation (Niklasson et al., J. Chem. Phys. 130,
214109 (2009), K = 5 with dissipation): auxiliary charges ``n`` are integrated time-reversibly
with the atoms, ``n(t+δt) = 2n(t) − n(t−δt) + κ(q(t) − n(t)) + α Σ_k c_k n(t−kδt)``, and each
step's CG starts from ``n`` and runs a fixed ``xl_iterations`` iterations (its residual is
recorded, not checked: the solve is not converged by design). The forces are those of the
model at these charges (implicit differentiation as for converged solves), so the energy
conservation must be measured (bench/bench_md.py), not assumed.

A :class:`~celli_scale.distributed.ShardedPotential` drives MD too: it keeps its own lists,
halo and Qeq warm start, so its steps advance on the host around ``sp(system)`` (the
integrator halves are still compiled jax-md steps).

Why the integrator steps are composed here rather than called as ``jax_md.simulate.nve``
etc.: jax-md's ``apply_fn`` calls a force function that returns forces only, so the Qeq
charges (the warm start of the next step), the energy and the list flags could not leave
the step. The steps below are jax-md's own building blocks (``momentum_step``,
``position_step``, ``stochastic_step``, ``nose_hoover_chain``, ``initialize_momenta``) in
the order of jax-md's ``nve`` / ``nvt_langevin`` / ``nvt_nose_hoover``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from celli_scale.system import System

log = logging.getLogger(__name__)

ENSEMBLES = ("nve", "langevin", "nose_hoover")
QEQ_MODES = ("warm", "cold", "xl")
#: Extended-Lagrangian coefficients for K = 5 (Niklasson, Steneteg, Odell 2009, Table I):
#: κ, α and c_0..c_5 (Σ c_k = 0, so the total charge of n is kept).
XL_KAPPA = 1.82
XL_ALPHA = 0.018
XL_C = (-6.0, 14.0, -8.0, -3.0, 4.0, -1.0)
NEIGHBOR_MODES = ("auto", "jit", "host")


@dataclasses.dataclass(frozen=True)
class MDConfig:
    """Settings of an :class:`MD` run.

    Attributes:
      ensemble: "nve" (velocity Verlet), "langevin" (BAOAB) or "nose_hoover" (chain).
      dt: time step (fs).
      temperature: K; initial Maxwell–Boltzmann velocities (unless given) and the target
        of the thermostats.
      friction: Langevin friction γ (1/fs).
      tau: Nosé–Hoover chain period (fs; default 100 ``dt``).
      chain_length: Nosé–Hoover chain length.
      every: steps per compiled block = stride of recorded frames and of the host checks.
      seed: PRNG seed (velocities, Langevin noise).
      qeq: CELLI: "warm" (start each CG solve from the previous step's charges), "cold", or
        "xl" (extended-Lagrangian auxiliary charges as the guess, ``xl_iterations`` CG
        iterations per step).
      xl_iterations: CG iterations per step with ``qeq="xl"``.
      neighbors: "auto", "jit" (lists rebuilt inside the compiled loop) or "host".
      skin: Verlet skin (Å); None: the potential's ``skin``.
    """

    ensemble: str = "nve"
    dt: float = 1.0
    temperature: float = 300.0
    friction: float = 0.01
    tau: float | None = None
    chain_length: int = 3
    every: int = 10
    seed: int = 0
    qeq: str = "warm"
    xl_iterations: int = 4
    neighbors: str = "auto"
    skin: float | None = None

    def __post_init__(self) -> None:
        if self.ensemble not in ENSEMBLES:
            raise ValueError(f"ensemble must be one of {ENSEMBLES}, got {self.ensemble!r}")
        if self.qeq not in QEQ_MODES:
            raise ValueError(f"qeq must be one of {QEQ_MODES}, got {self.qeq!r}")
        if self.neighbors not in NEIGHBOR_MODES:
            raise ValueError(f"neighbors must be one of {NEIGHBOR_MODES}, got {self.neighbors!r}")
        for name in ("dt", "friction"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive number, got {v!r}")
        t = self.temperature
        if not (isinstance(t, int | float) and math.isfinite(t) and t >= 0):
            raise ValueError(f"temperature must be a number of K >= 0, got {t!r}")
        if self.ensemble != "nve" and t <= 0:
            raise ValueError(f"a thermostat needs a temperature > 0 K, got {t!r}")
        if self.tau is not None and not (math.isfinite(self.tau) and self.tau > 0):
            raise ValueError(f"tau must be a positive number of fs, got {self.tau!r}")
        if int(self.every) < 1 or int(self.chain_length) < 1 or int(self.xl_iterations) < 1:
            raise ValueError("every, chain_length and xl_iterations must be positive integers")
        if self.skin is not None and not (math.isfinite(self.skin) and self.skin > 0):
            raise ValueError(f"skin must be a positive number of Å, got {self.skin!r}")


@dataclasses.dataclass
class Frame:
    """One recorded frame (host arrays): ``step``, ``time`` (fs), ``positions`` (Å),
    ``velocities`` (Å/fs), ``forces`` (eV/Å), ``energy`` (potential, eV), ``kinetic``
    (eV), ``temperature`` (K), ``conserved`` (eV: total energy for NVE, the extended
    Hamiltonian for Nosé–Hoover, None for Langevin), ``charges`` (e) or None."""

    step: int
    time: float
    positions: np.ndarray
    velocities: np.ndarray
    forces: np.ndarray
    energy: float
    kinetic: float
    temperature: float
    conserved: float | None
    charges: np.ndarray | None = None


@dataclasses.dataclass
class MDResult:
    """What :meth:`MD.run` returns: the recorded ``frames``; per-step arrays ``energy``
    (potential, eV), ``kinetic`` (eV), ``conserved`` (eV or None), ``qeq_iterations``
    (CELLI) or None; ``wall`` seconds of the run and ``stats`` (list rebuilds inside the
    loop and on the host, overflows, redone blocks)."""

    frames: list[Frame]
    energy: np.ndarray
    kinetic: np.ndarray
    conserved: np.ndarray | None
    qeq_iterations: np.ndarray | None
    wall: float
    stats: dict
    n_atoms: int = 1
    dt: float = 1.0
    #: seconds after the first block (which includes the compilation), and its steps
    wall_warm: float = 0.0
    steps_warm: int = 0

    @property
    def drift(self) -> float | None:
        """Drift of the conserved quantity, eV per atom per ps (least-squares slope over
        all steps); None for Langevin dynamics."""
        if self.conserved is None or self.conserved.size < 2:
            return None
        t = np.arange(self.conserved.size, dtype=float) * self.dt / 1000.0  # ps
        return float(np.polyfit(t, self.conserved, 1)[0] / self.n_atoms)

    @property
    def steps_per_second(self) -> float:
        """Steps per second after the first block (compilation excluded) when the run had
        more than one block, else over the whole run."""
        if self.steps_warm > 0 and self.wall_warm > 0:
            return float(self.steps_warm / self.wall_warm)
        return float(self.energy.size / self.wall) if self.wall > 0 else float("nan")


# -- flags of a block ----------------------------------------------------------------------
_EDGE_OVER = 1  # a Verlet list rebuilt inside the loop has more pairs than its capacity
_PACK_OVER = 2  # more pairs within the cut-offs than the packed capacity
_STALE = 4  # host mode: an atom moved half the skin inside the block


class MD:
    """Molecular dynamics of ``system`` with ``pot`` (see the module docstring).

    Args:
      pot: any :class:`~celli_scale.potential.Potential` (its parameters are used as they
        are at each :meth:`run`).
      system: the starting structure (its cell is kept: NVE/NVT).
      config: :class:`MDConfig`.
      velocities: optional ``(N, 3)`` Å/fs; default Maxwell–Boltzmann at
        ``config.temperature`` (zero total momentum).
      masses: optional ``(N,)`` amu; default ASE's standard atomic masses.

    Example:
      >>> md = MD(pot, system, MDConfig(ensemble="langevin", temperature=300.0))  # doctest: +SKIP
      >>> res = md.run(1000, trajectory="traj.xyz")
      >>> res.frames[-1].temperature
    """

    def __init__(
        self,
        pot: Any,
        system: System,
        config: MDConfig = MDConfig(),
        *,
        velocities: Any = None,
        masses: Any = None,
    ) -> None:
        from ase.data import atomic_masses
        from ase.units import fs, kB

        if not isinstance(system, System):
            raise ValueError(f"MD needs a celli_scale.System, got {type(system).__name__}")
        if pot.params is None:
            raise ValueError("the potential has no parameters")
        self.pot, self.cfg, self.system = pot, config, system
        self.n_atoms = system.n_atoms
        self.skin = float(pot.skin if config.skin is None else config.skin)
        if not self.skin > 0:
            raise ValueError("MD needs Verlet lists: give a skin > 0 (MDConfig.skin)")
        self._fs = float(fs)
        self._kT = float(kB * config.temperature)
        self.dt = float(config.dt) * self._fs
        if masses is None:
            masses = atomic_masses[np.asarray(system.species)]
        masses = np.asarray(masses, dtype=float)
        if masses.shape != (self.n_atoms,) or not np.all(np.isfinite(masses) & (masses > 0)):
            raise ValueError(f"masses must be {self.n_atoms} positive numbers (amu)")
        self.stats = {
            "steps": 0,
            "jit_rebuilds": 0,
            "host_rebuilds": 0,
            "overflows": 0,
            "redone_blocks": 0,
        }
        self._blocks: dict[tuple, Any] = {}
        self._masses = masses
        self._verlet = None
        #: a ShardedPotential (any potential without Potential's compiled Verlet kernel):
        #: steps advance on the host around its calls (it keeps its own lists, halo and
        #: Qeq warm start); the integrator halves are still compiled jax-md steps
        self.sharded = not hasattr(pot, "evaluate_verlet")
        if self.sharded and config.qeq == "xl":
            raise ValueError("qeq='xl' needs a Potential (not a ShardedPotential)")
        self.reset(velocities=velocities)
        self.neighbors = "sharded" if self.sharded else self._choose_neighbors(config.neighbors)

    def reset(
        self, positions: Any = None, *, velocities: Any = None, seed: int | None = None
    ) -> None:
        """Start again from ``positions`` (default: the system's; same atoms and cell) with
        ``velocities`` (Å/fs; default Maxwell–Boltzmann from ``seed``, default
        ``config.seed``), keeping the compiled blocks (and the list capacities): a sampler
        that restarts MD for new parameters does not recompile."""
        from jax_md import simulate

        config = self.cfg
        pos_np = np.asarray(self.system.positions if positions is None else positions, float)
        if pos_np.shape != (self.n_atoms, 3) or not np.all(np.isfinite(pos_np)):
            raise ValueError(f"positions must be a finite ({self.n_atoms}, 3) array (Å)")
        self._step_count = 0
        # lists and electrostatics parameters, as pot(system) builds them
        if not self.sharded:
            self._verlet = self._host_lists(self._system_at(pos_np), self._verlet)
        # the jax-md state
        fdtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
        pos = jnp.asarray(pos_np, fdtype)
        mass = jnp.asarray(self._masses, fdtype)[:, None]
        key = jax.random.PRNGKey(int(config.seed if seed is None else seed))
        key, vkey = jax.random.split(key)
        zeros = jnp.zeros_like(pos)
        if config.ensemble == "langevin":
            state = simulate.NVTLangevinState(pos, zeros, zeros, mass, key)
        elif config.ensemble == "nose_hoover":
            state = simulate.NVTNoseHooverState(pos, zeros, zeros, mass, None)
        else:
            state = simulate.NVEState(pos, zeros, zeros, mass)
        if velocities is None:
            if self._kT > 0:
                state = simulate.initialize_momenta(state, vkey, self._kT)
        else:
            v = np.asarray(velocities, dtype=float)
            if v.shape != (self.n_atoms, 3) or not np.all(np.isfinite(v)):
                raise ValueError(f"velocities must be a finite ({self.n_atoms}, 3) array (Å/fs)")
            state = state.set(momentum=mass * jnp.asarray(v / self._fs, fdtype))
        if config.ensemble == "nose_hoover":
            tau = (config.tau if config.tau is not None else 100 * config.dt) * self._fs
            self._chain = simulate.nose_hoover_chain(self.dt, int(config.chain_length), 2, 3, tau)
            ke = simulate.kinetic_energy(state)
            state = state.set(chain=self._chain.initialize(3 * self.n_atoms, ke, self._kT))
        self.state = state
        self.charges = None
        if self.pot.is_charge_model:
            self.charges = jnp.zeros((self.n_atoms,), self.pot.config.jnp_dtype)
        self._xl_hist = None
        self._init_forces()
        if self.pot.is_charge_model and config.qeq == "xl":  # n(t - kδt) = q(0), k = 0..5
            q0 = jnp.asarray(self.charges, self.state.position.dtype)
            self._xl_hist = jnp.tile(q0[None], (len(XL_C), 1))

    @property
    def _growth(self) -> float:
        """Head-room when a capacity grows: at least 10 % (the potential's own growth may be
        1, exact lists, which would redo a block for every extra pair)."""
        return max(float(self.pot.capacity_growth), 1.1)

    # -- lists ----------------------------------------------------------------------------
    def _host_lists(self, system: System, old: Any, min_capacity: tuple[int, int] = (0, 0)):
        """Verlet lists (and electrostatics parameters) built on the host, as
        ``pot(system)`` builds them, with this run's skin."""
        st = self.pot.verlet_state(system, old, skin=self.skin, min_capacity=min_capacity)
        self.stats["host_rebuilds"] += 1
        return st

    def _choose_neighbors(self, mode: str) -> str:
        """ "jit" when the dense search of the in-loop rebuild fits the search memory
        guard (:func:`celli_scale.cell.search_byte_limit`), else "host"."""
        from celli_scale import cell as cellmod

        if mode != "auto":
            return mode
        g = self._verlet.graph
        n_img = 1
        cutoffs = [self.pot.config.r_cut + self.skin]
        if g.elec_neighbors is not None:
            cutoffs.append(g.elec_params.r_cut + self.skin)
        if self.system.periodic:
            n_img = max(
                cellmod.image_shifts(
                    np.asarray(self.system.cell, float), self.system.pbc, 1.1 * c
                ).shape[0]
                for c in cutoffs
            )
        need = self.n_atoms**2 * n_img * 34
        return "jit" if need <= min(cellmod.search_byte_limit(), 2**30) else "host"

    def _builders(self):
        """Jit-able rebuilds of the Verlet lists at their current capacities."""
        from celli_scale.neighbors import neighbor_list_fn

        g = self._verlet.graph
        s = self.system
        cell = None if not s.periodic else np.asarray(s.cell, float)
        edge = neighbor_list_fn(
            self.pot.config.r_cut + self.skin, int(g.senders.shape[0]), cell, s.pbc
        )
        elec = None
        if g.elec_neighbors is not None:
            elec = neighbor_list_fn(
                g.elec_params.r_cut + self.skin,
                int(g.elec_neighbors.senders.shape[0]),
                cell,
                s.pbc,
            )
        return edge, elec

    # -- the compiled block -----------------------------------------------------------------
    def _block_fn(self, n_steps: int):
        """``block(params, carry) -> (carry, per-step records)`` for the current list
        capacities (compiled once per capacities and block length)."""
        st = self._verlet
        g = st.graph
        key = (
            n_steps,
            int(g.senders.shape[0]),
            None if g.elec_neighbors is None else int(g.elec_neighbors.senders.shape[0]),
            st.caps,
            self.neighbors,
        )
        if key in self._blocks:
            return self._blocks[key]
        from jax_md import simulate

        from celli_scale.potential import compact_graph, energy_and_derivatives

        pot, cfg = self.pot, self.cfg
        model, r_cut, caps = pot.model, pot.config.r_cut, st.caps
        mdtype = pot.config.jnp_dtype
        warm = cfg.qeq in ("warm", "xl") and pot.is_charge_model
        xl = cfg.qeq == "xl" and pot.is_charge_model
        if xl:  # the same parameters, a fixed number of CG iterations
            model = model.clone(
                config=dataclasses.replace(model.config, qeq_maxiter=int(cfg.xl_iterations))
            )
        xl_c = jnp.asarray(XL_C)
        half2 = (0.5 * self.skin) ** 2
        periodic = self.system.periodic
        cell = jnp.asarray(np.asarray(self.system.cell, float)) if periodic else None
        pbc = jnp.asarray(np.asarray(self.system.pbc, bool))
        jit_lists = self.neighbors == "jit"
        edge_fn, elec_fn = self._builders() if jit_lists else (None, None)

        def wrap(R):
            if not periodic:
                return R
            frac = R @ jnp.linalg.inv(cell.astype(R.dtype))
            frac = jnp.where(pbc, frac - jnp.floor(frac), frac)
            return frac @ cell.astype(R.dtype)

        def rebuild(R, graph):
            Rw = wrap(R)
            nl = edge_fn(Rw)
            over = nl.n_pairs > graph.senders.shape[0]
            counts = [nl.n_pairs]
            graph = graph.replace(
                senders=nl.senders,
                receivers=nl.receivers,
                shifts=nl.shifts.astype(graph.shifts.dtype),
                edge_mask=nl.mask,
            )
            if elec_fn is not None:
                old = graph.elec_neighbors
                e = elec_fn(Rw)
                over = over | (e.n_pairs > old.senders.shape[0])
                counts.append(e.n_pairs)
                graph = graph.replace(
                    elec_neighbors=old.replace(
                        senders=e.senders.astype(old.senders.dtype),
                        receivers=e.receivers.astype(old.receivers.dtype),
                        shifts=e.shifts.astype(old.shifts.dtype),
                        mask=e.mask,
                        n_pairs=e.n_pairs.astype(old.n_pairs.dtype),
                    )
                )
            else:
                counts.append(jnp.zeros((), jnp.int32))
            return Rw, graph, over, jnp.stack(counts).astype(jnp.int32)

        def lists(state, aux):
            """Rebuild (jit mode) or flag (host mode) when an atom moved half the skin."""
            graph, ref, flags, n_reb = aux["graph"], aux["ref"], aux["flags"], aux["n_reb"]
            R = state.position
            moved = jnp.max(jnp.sum((R - ref) ** 2, axis=1)) >= half2
            lc = aux["list_counts"]
            if jit_lists:

                def yes(_):
                    Rw, gr, over, counts = rebuild(R, graph)
                    return Rw, gr, Rw, over, counts

                def no(_):
                    return R, graph, ref, jnp.asarray(False), jnp.zeros((2,), jnp.int32)

                R, graph, ref, over, counts = jax.lax.cond(moved, yes, no, None)
                flags = flags | jnp.where(over, _EDGE_OVER, 0)
                n_reb = n_reb + moved.astype(jnp.int32)
                lc = jnp.maximum(lc, counts)
            else:
                flags = flags | jnp.where(moved, _STALE, 0)
            aux = dict(aux, graph=graph, ref=ref, flags=flags, n_reb=n_reb, list_counts=lc)
            return state.set(position=R), aux

        def force(state, aux, params):
            guess = None
            if warm:
                guess = aux["xl"][0].astype(mdtype) if xl else aux["charges"]
            graph = aux["graph"].replace(
                positions=state.position.astype(mdtype), charges_guess=guess
            )
            graph, counts = compact_graph(graph, r_cut, caps)
            e, f, _, out = energy_and_derivatives(model, params, graph)
            over = jnp.any(counts > jnp.asarray(caps, counts.dtype))
            aux = dict(aux, flags=aux["flags"] | jnp.where(over, _PACK_OVER, 0))
            aux["pack_counts"] = jnp.maximum(aux["pack_counts"], counts.astype(jnp.int32))
            if out.charges is not None:
                aux["charges"] = out.charges.astype(aux["charges"].dtype)
                aux["residual"] = jnp.maximum(aux["residual"], out.qeq_residual)
                iters = out.qeq_iterations
                if xl:  # propagate the auxiliary charges to the next step
                    h = aux["xl"]
                    q = out.charges.astype(h.dtype)
                    nxt = (
                        2.0 * h[0]
                        - h[1]
                        + XL_KAPPA * (q - h[0])
                        + XL_ALPHA * jnp.tensordot(xl_c.astype(h.dtype), h, axes=1)
                    )
                    aux["xl"] = jnp.concatenate([nxt[None], h[:-1]], axis=0)
            else:
                iters = jnp.zeros((), jnp.int32)
            aux["energy"] = e.astype(state.position.dtype)
            return state.set(force=f.astype(state.position.dtype)), aux, iters

        pre, post = self._integrator()

        def step(params, carry):
            state, aux = carry
            state = pre(state)
            state, aux = lists(state, aux)
            state, aux, iters = force(state, aux, params)
            state, extra = post(state)
            ke = simulate.kinetic_energy(state)
            cons = jnp.nan if extra is None else aux["energy"] + ke + extra
            return (state, aux), (aux["energy"], ke, cons, iters)

        def block(params, state, aux):
            (state, aux), rec = jax.lax.scan(
                lambda c, _: step(params, c), (state, aux), None, length=n_steps
            )
            return state, aux, rec

        fn = jax.jit(block)
        self._blocks[key] = fn
        return fn

    def _integrator(self):
        """``(pre, post)``: one step of the ensemble's integrator split around the force
        call, from jax-md's building blocks in the order of its ``nve`` (velocity Verlet),
        ``nvt_langevin`` (BAOAB) and ``nvt_nose_hoover``. ``pre(state) -> state`` (positions
        at the new step); ``post(state with the new forces) -> (state, extra)``, ``extra``
        the thermostat's part of the conserved energy (0 for NVE, None for Langevin)."""
        from jax_md import simulate

        cfg, dt, kT = self.cfg, self.dt, self._kT
        gamma = float(cfg.friction) / self._fs
        chain = getattr(self, "_chain", None)
        n = self.n_atoms

        def shift(r, dr, **kw):  # no wrapping between list rebuilds
            return r + dr

        def pre(state):
            if cfg.ensemble == "langevin":
                state = simulate.momentum_step(state, dt / 2)
                state = simulate.position_step(state, shift, dt / 2)
                state = simulate.stochastic_step(state, dt, kT, gamma)
                return simulate.position_step(state, shift, dt / 2)
            if cfg.ensemble == "nose_hoover":
                ch = chain.update_mass(state.chain, kT)
                p, ch = chain.half_step(state.momentum, ch, kT)
                state = state.set(momentum=p, chain=ch)
            state = simulate.momentum_step(state, dt / 2)
            return simulate.position_step(state, shift, dt)

        def post(state):
            state = simulate.momentum_step(state, dt / 2)
            if cfg.ensemble == "langevin":
                return state, None
            if cfg.ensemble == "nve":
                return state, 0.0
            ch = state.chain.set(kinetic_energy=simulate.kinetic_energy(state))
            p, ch = chain.half_step(state.momentum, ch, kT)
            state = state.set(momentum=p, chain=ch)
            return state, _chain_energy(ch, 3 * n, kT)

        return pre, post

    def _aux(self):
        st = self._verlet
        dtype = self.state.position.dtype
        charges = self.charges if self.charges is not None else jnp.zeros((0,), dtype)
        return {
            "graph": st.graph,
            "ref": jnp.asarray(st.reference, dtype),
            "flags": jnp.zeros((), jnp.int32),
            "n_reb": jnp.zeros((), jnp.int32),
            "charges": charges,
            "residual": jnp.zeros((), self.pot.config.jnp_dtype),
            "energy": jnp.zeros((), dtype),
            "list_counts": jnp.zeros((2,), jnp.int32),
            "xl": self._xl_hist if self._xl_hist is not None else jnp.zeros((0,), dtype),
            "pack_counts": jnp.zeros((len(st.caps),), jnp.int32),
        }

    def _host_block(self, n_steps: int):
        """``n_steps`` steps with the force call on the host (a ShardedPotential): the
        compiled integrator halves around ``pot(system)``. Returns what a compiled block
        returns (the state, ``{"energy", "charges"}``, per-step records)."""
        from jax_md import simulate

        if getattr(self, "_halves", None) is None:
            pre, post = self._integrator()
            self._halves = (jax.jit(pre), jax.jit(post), jax.jit(simulate.kinetic_energy))
        pre, post, kin = self._halves
        state = self.state
        rec: list[list[float]] = [[], [], [], []]
        out = None
        for _ in range(n_steps):
            state = pre(state)
            out = self.pot(self._system_at(np.asarray(state.position)))
            state = state.set(force=jnp.asarray(out.forces, state.position.dtype))
            state, extra = post(state)
            ke = float(kin(state))
            e = float(out.energy)
            rec[0].append(e)
            rec[1].append(ke)
            rec[2].append(np.nan if extra is None else e + ke + float(extra))
            it = getattr(out, "qeq_iterations", None)
            rec[3].append(0 if it is None else int(it))
        aux = {"energy": jnp.asarray(rec[0][-1]), "charges": self.charges}
        if out is not None and out.charges is not None:
            aux["charges"] = jnp.asarray(out.charges)
        return state, aux, tuple(np.asarray(r) for r in rec)

    def _init_forces(self) -> None:
        """Forces (and charges, energy) at the starting positions, through the kernel of
        ``pot(system)`` (:attr:`Potential.evaluate_verlet`)."""
        if self.sharded:
            out = self.pot(self._system_at(np.asarray(self.state.position)))
            self.state = self.state.set(force=jnp.asarray(out.forces, self.state.position.dtype))
            self._energy = float(out.energy)
            if self.charges is not None and out.charges is not None:
                self.charges = jnp.asarray(out.charges)
            return
        e, f, _, out = self.evaluate(stress=False)
        self.state = self.state.set(force=f.astype(self.state.position.dtype))
        self._energy = float(e)
        if self.charges is not None:
            self.charges = out.charges

    def evaluate(self, stress: bool = False):
        """``(energy, forces, stress, ModelOutput)`` at the current positions on the current
        lists (e.g. for the pressure at a recorded frame: ``stress=True`` in a periodic
        cell)."""
        pot = self.pot
        while True:
            st = self._verlet
            graph = st.graph.replace(
                positions=self.state.position.astype(pot.config.jnp_dtype),
                charges_guess=self.charges if self.cfg.qeq != "cold" else None,
            )
            *res, counts = pot.evaluate_verlet(pot.params, graph, caps=st.caps, stress=stress)
            counts = np.asarray(counts)
            if np.all(counts <= np.asarray(st.caps)):
                break
            self._grow_caps(counts)
        pot.check_output(res[3])
        return tuple(res)

    def _grow_caps(self, counts: np.ndarray) -> None:
        g = self._growth
        self.stats["overflows"] += 1
        self._verlet.caps = tuple(
            max(int(c), int(np.ceil(int(n) * g)))
            for n, c in zip(counts, self._verlet.caps, strict=True)
        )

    # -- running ----------------------------------------------------------------------------
    def run(
        self,
        steps: int,
        *,
        trajectory: str | Path | None = None,
        progress: bool = True,
    ) -> MDResult:
        """Run ``steps`` steps (rounded up to whole blocks of ``every``), recording a frame
        after each block (appended to the extended-XYZ ``trajectory`` when given).
        Continues from where the previous :meth:`run` ended."""
        from celli_scale.qeq import check_residual

        steps = int(steps)
        if steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps}")
        every = int(self.cfg.every)
        n_blocks = -(-steps // every)
        frames, energy, kinetic, cons, iters = [], [], [], [], []
        bar = _bar(n_blocks * every, progress)
        t0 = time.perf_counter()
        e0 = None
        t1 = None
        params = self.pot.params
        for b in range(n_blocks):
            if self.sharded:
                state, aux, rec = self._host_block(every)
            else:
                while True:
                    fn = self._block_fn(every)
                    state, aux, rec = fn(params, self.state, self._aux())
                    flags = int(aux["flags"])
                    if flags == 0:
                        break
                    self.stats["redone_blocks"] += 1
                    self._redo(flags, aux)
            if self.sharded:
                pass  # the sharded potential checks its Qeq solves itself
            elif self.cfg.qeq == "xl":
                self.stats["xl_residual_max"] = max(
                    self.stats.get("xl_residual_max", 0.0), float(aux["residual"])
                )
                self._xl_hist = aux["xl"]
            elif self.pot.is_charge_model and self.pot.qeq_tol is not None:
                check_residual(aux["residual"], self.pot.qeq_tol, where="MD step")
            self.state = state
            if not self.sharded:
                self.stats["jit_rebuilds"] += int(aux["n_reb"])
                self._verlet.graph = aux["graph"]
                self._verlet.reference = np.asarray(aux["ref"])
            if self.charges is not None:
                self.charges = aux["charges"]
            e, k, c, it = (np.asarray(x) for x in rec)
            if not np.all(np.isfinite(e)):
                raise FloatingPointError(
                    f"MD: non-finite potential energy near step {self._step_count + every}; "
                    "the time step is too large or the structure exploded"
                )
            energy.append(e)
            kinetic.append(k)
            cons.append(c)
            iters.append(it)
            self._step_count += every
            self.stats["steps"] += every
            if self.neighbors == "host":
                self._maybe_host_rebuild()
            fr = self._frame(aux)
            frames.append(fr)
            if trajectory is not None:
                _append_xyz(trajectory, self.system, fr)
            if e0 is None and fr.conserved is not None:
                e0 = float(c[0])
            if bar is not None:
                bar.update(every)
                post = {"T": f"{fr.temperature:.0f}K", "E": f"{fr.energy:.4f}"}
                if e0 is not None:
                    post["drift"] = f"{(fr.conserved - e0) / self.n_atoms:+.2e}eV/atom"
                if t1 is not None:
                    post["steps/s"] = f"{every * b / (time.perf_counter() - t1):.1f}"
                bar.set_postfix(post)
            if t1 is None:
                t1 = time.perf_counter()
        if bar is not None:
            bar.close()
        wall = time.perf_counter() - t0
        cons_a = np.concatenate(cons)
        res = MDResult(
            frames=frames,
            energy=np.concatenate(energy),
            kinetic=np.concatenate(kinetic),
            conserved=None if self.cfg.ensemble == "langevin" else cons_a,
            qeq_iterations=np.concatenate(iters) if self.pot.is_charge_model else None,
            wall=wall,
            stats=dict(self.stats),
            n_atoms=self.n_atoms,
            dt=float(self.cfg.dt),
            wall_warm=time.perf_counter() - t1 if n_blocks > 1 else 0.0,
            steps_warm=every * (n_blocks - 1),
        )
        return res

    def _redo(self, flags: int, aux: dict) -> None:
        """Make the lists able to hold the block, before it is redone from its start."""
        g = self._growth
        if flags & _PACK_OVER:
            self._grow_caps(np.asarray(aux["pack_counts"]))
            log.info("MD: packed pair capacities grown to %s; block redone", self._verlet.caps)
        if flags & (_EDGE_OVER | _STALE):
            need = (0, 0)
            if flags & _EDGE_OVER:  # rebuilt with room for the pairs the loop found
                self.stats["overflows"] += 1
                need = tuple(int(n) for n in np.ceil(np.asarray(aux["list_counts"]) * g))
                log.info("MD: Verlet list capacities grown to %s; block redone", list(need))
            system = self._system_at(np.asarray(self.state.position))
            new = self._host_lists(system, self._verlet, min_capacity=need)
            new.charges = self._verlet.charges
            new.caps = tuple(max(a, b) for a, b in zip(new.caps, self._verlet.caps, strict=True))
            self._verlet = new
            if flags & _STALE and self._stale_again():
                raise RuntimeError(
                    f"MD: atoms moved more than half the skin ({0.5 * self.skin} Å) within one "
                    f"block of {self.cfg.every} steps right after a rebuild: use a smaller "
                    "MDConfig.every or a larger skin"
                )

    def _stale_again(self) -> bool:
        n = getattr(self, "_stale_count", 0) + 1
        self._stale_count = n
        return n > 3

    def _maybe_host_rebuild(self) -> None:
        """Host mode: rebuild after a block once an atom has moved a quarter of the skin."""
        pos = np.asarray(self.state.position)
        d2 = np.max(np.sum((pos - self._verlet.reference) ** 2, axis=1))
        if d2 >= (0.25 * self.skin) ** 2:
            system = self._system_at(pos)
            new = self._host_lists(system, self._verlet)
            new.charges = self._verlet.charges
            self._verlet = new
        self._stale_count = 0

    def _system_at(self, pos: np.ndarray) -> System:
        s = self.system
        return System(
            pos, s.species, cell=s.cell, pbc=s.pbc, total_charge=s.total_charge, min_distance=0.0
        )

    def _frame(self, aux: dict) -> Frame:
        from jax_md import simulate

        st = self.state
        mass = np.asarray(st.mass)
        v = np.asarray(st.momentum) / mass * self._fs  # Å/fs (ASE time unit: 1 fs = units.fs)
        ke = float(simulate.kinetic_energy(st))
        energy = float(aux["energy"])
        cons = None
        if self.cfg.ensemble == "nve":
            cons = energy + ke
        elif self.cfg.ensemble == "nose_hoover":
            cons = energy + ke + float(_chain_energy(st.chain, 3 * self.n_atoms, self._kT))
        from ase.units import kB

        return Frame(
            step=self._step_count,
            time=self._step_count * float(self.cfg.dt),
            positions=np.asarray(st.position, dtype=float),
            velocities=v,
            forces=np.asarray(st.force, dtype=float),
            energy=energy,
            kinetic=ke,
            temperature=2.0 * ke / (3 * self.n_atoms * kB),
            conserved=cons,
            charges=None if self.charges is None else np.asarray(self.charges, dtype=float),
        )


def _chain_energy(chain, dof: int, kT: float):
    """The Nosé–Hoover chain's part of the conserved extended Hamiltonian (as jax-md's
    ``nvt_nose_hoover_invariant``)."""
    e = chain.momentum[0] ** 2 / (2 * chain.mass[0]) + dof * kT * chain.position[0]
    e = e + jnp.sum(chain.momentum[1:] ** 2 / (2 * chain.mass[1:]) + kT * chain.position[1:])
    return e


def _bar(total: int, progress: bool):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="step", desc="MD")


def _append_xyz(path: str | Path, system: System, fr: Frame) -> None:
    """Append one frame to an extended-XYZ file (positions, velocities in ASE units,
    forces, energy, charges)."""
    import ase.io
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.units import fs

    atoms = System(
        fr.positions, system.species, cell=system.cell, pbc=system.pbc, min_distance=0.0
    ).to_ase()
    atoms.set_velocities(fr.velocities / fs)  # ASE's velocity unit: Å per ASE time unit
    atoms.set_masses(None)
    if fr.charges is not None:
        atoms.set_initial_charges(fr.charges)
    atoms.calc = SinglePointCalculator(atoms, energy=fr.energy, forces=fr.forces)
    atoms.info.update(step=fr.step, time_fs=fr.time, temperature_K=fr.temperature)
    ase.io.write(str(path), atoms, format="extxyz", append=True)


# -- top-down training (celli_scale.train.difftre / relative_entropy) ----------------------
def potential_energy_fn(pot: Any, system: System, *, capacity_growth: float = 1.5):
    """``energy_fn(params, positions, box=None, **unused) -> eV`` of ``pot``'s model for
    frames of ``system`` (same atoms, species and cell), as the reweighting trainers take
    it: a traced function of the parameters and positions (jit/vmap-able). Neighbor lists
    are built inside (a dense search over atoms and images, capacities from ``system``
    with ``capacity_growth`` head-room); a frame with more pairs than that, or whose Qeq
    solve (CELLI) missed its tolerance, gets a NaN energy (never a silently missing pair or
    wrong charge; the trainers then stop with a FloatingPointError). ``box`` (side lengths
    of an orthorhombic cell, within 5 % of the system's) replaces the cell, so that the
    trainers' pressure (a strain of positions and box together) is the model's virial."""
    from celli_scale.neighbors import neighbor_list_fn

    # CELLI: electrostatics prepared for elec_sigma_max, any width training may reach
    elec = pot.elec_params(system) if pot.is_charge_model else None
    g0 = pot.graph(system, elec_params=elec)
    periodic = system.periodic
    cell = np.asarray(system.cell, float) if periodic else None
    r_cut = float(pot.config.r_cut)
    n_edge = max(int(np.ceil(int(np.sum(g0.edge_mask)) * capacity_growth)), 1)
    edge_fn = neighbor_list_fn(r_cut, n_edge, cell, system.pbc)
    elec_fn = None
    if g0.elec_neighbors is not None:
        n_el = int(np.sum(np.asarray(g0.elec_neighbors.mask)))
        n_el = max(int(np.ceil(n_el * capacity_growth)), 1)
        elec_fn = neighbor_list_fn(g0.elec_params.r_cut, n_el, cell, system.pbc)
    dtype = pot.config.jnp_dtype
    model = pot.model
    qeq_tol = pot.qeq_tol
    from celli_scale.qeq import RESIDUAL_SLACK

    orthorhombic = cell is not None and np.allclose(cell, np.diag(np.diag(cell)))

    def energy_fn(params, positions, box=None, **unused):
        pos = jnp.asarray(positions).astype(dtype)
        cell_now = g0.cell
        if box is not None and cell is not None:
            # the reweighting trainers' pressure strains positions and box together
            if not orthorhombic:
                raise ValueError("a box (side lengths) needs an orthorhombic cell")
            if not _traced(box):
                b = np.broadcast_to(np.asarray(box, float), (3,))
                if not np.allclose(b, np.diag(cell), rtol=0.05):
                    raise ValueError(f"box {b} differs from the system's cell {np.diag(cell)}")
            cell_now = jnp.diag(jnp.broadcast_to(jnp.asarray(box), (3,))).astype(dtype)
        nl = edge_fn(pos, cell_now if cell is not None else None)
        over = nl.n_pairs > n_edge
        g = g0.replace(
            positions=pos,
            cell=cell_now,
            senders=nl.senders,
            receivers=nl.receivers,
            shifts=nl.shifts.astype(g0.shifts.dtype),
            edge_mask=nl.mask,
        )
        if elec_fn is not None:
            e = elec_fn(pos, cell_now)
            over = over | (e.n_pairs > e.senders.shape[0])
            old = g0.elec_neighbors
            g = g.replace(
                elec_neighbors=old.replace(
                    senders=e.senders,
                    receivers=e.receivers,
                    shifts=e.shifts.astype(old.shifts.dtype),
                    mask=e.mask,
                    n_pairs=e.n_pairs.astype(old.n_pairs.dtype),
                )
            )
        out = model.apply(params, g)
        bad = over
        if qeq_tol is not None and out.qeq_residual is not None:
            # a Qeq solve that missed its tolerance gives NaN, never a silently wrong energy
            bad = bad | ~(out.qeq_residual <= RESIDUAL_SLACK * qeq_tol)
        return jnp.where(bad, jnp.nan, out.energy)

    return energy_fn


def _traced(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def potential_sampler(
    pot: Any,
    system: System,
    config: MDConfig = MDConfig(ensemble="langevin"),
    *,
    n_equilibration: int = 1000,
    n_frames: int = 100,
    stride: int = 10,
):
    """A sampler for the reweighting trainers: ``sampler(params, key, state_point) ->
    positions (n_frames, N, 3)``: :class:`MD` of ``pot`` with ``params`` from the state
    point's positions (same species and cell as ``system``) at its temperature (``config``
    must be a thermostat), ``n_equilibration`` steps, then ``n_frames`` frames every
    ``stride`` steps; the seed comes from ``key``."""
    if config.ensemble == "nve":
        raise ValueError("a sampler for reweighting needs a thermostat (langevin, nose_hoover)")
    if n_frames < 1 or stride < 1 or n_equilibration < 0:
        raise ValueError("n_frames and stride must be positive, n_equilibration >= 0")

    from celli_scale.potential import Potential

    runs: dict[tuple, MD] = {}  # one MD (compiled once) per temperature and masses

    def sampler(params, key, state_point):
        pos = np.asarray(state_point.positions, float)
        masses = np.broadcast_to(np.asarray(state_point.masses, float), (system.n_atoms,))
        seed = int(jax.random.randint(key, (), 0, 2**31 - 1))
        tag = (float(state_point.temperature), masses.tobytes())
        md = runs.get(tag)
        if md is None:
            p = Potential(pot.model, jax.device_get(params), capacity_growth=1.2, skin=pot.skin)
            cfg = dataclasses.replace(
                config, temperature=float(state_point.temperature), every=int(stride)
            )
            md = runs[tag] = MD(
                p, system.replace(positions=pos, min_distance=0.0), cfg, masses=masses
            )
        md.pot.params = jax.device_get(params)
        md.reset(pos, seed=seed)
        if n_equilibration:
            md.run(-(-n_equilibration // stride) * stride, progress=False)
        res = md.run(n_frames * stride, progress=False)
        return jnp.asarray(np.stack([f.positions for f in res.frames]))

    return sampler


# -- observables -----------------------------------------------------------------------------
def _min_image(positions: jax.Array, cell: jax.Array | None) -> jax.Array:
    """All pair vectors ``(N, N, 3)`` under the minimum-image convention (open: plain)."""
    d = positions[None, :, :] - positions[:, None, :]
    if cell is None:
        return d
    inv = jnp.linalg.inv(cell)
    f = d @ inv
    f = f - jnp.round(f)
    return f @ cell


def rdf(positions, cell, r_max: float, n_bins: int = 100, species=None, pair=None):
    """Radial distribution function g(r) of one frame (periodic cell; minimum image, so
    ``r_max`` must not exceed half the smallest cell width). ``pair=(Za, Zb)`` restricts
    it to that species pair (``species`` then required). Returns ``(r, g)``: bin centres
    (Å) and g (dimensionless). Jit-able for fixed ``n_bins``/``r_max``."""
    pos = jnp.asarray(positions)
    cell = jnp.asarray(cell, pos.dtype)
    n = pos.shape[0]
    widths = _widths(np.asarray(cell, float))
    if r_max > 0.5 * widths.min() + 1e-9:
        raise ValueError(
            f"rdf: r_max {r_max} Å exceeds half the smallest cell width "
            f"({0.5 * widths.min():.3f} Å)"
        )
    d = jnp.sqrt(jnp.sum(_min_image(pos, cell) ** 2, axis=-1) + jnp.eye(n))
    w = 1.0 - jnp.eye(n)
    na = nb = n
    if pair is not None:
        if species is None:
            raise ValueError("rdf: pair needs species")
        z = np.asarray(species)
        a, b = (z == pair[0]), (z == pair[1])
        na, nb = int(a.sum()), int(b.sum())
        if na == 0 or nb == 0:
            raise ValueError(f"rdf: no atoms of species pair {pair}")
        w = w * jnp.asarray(np.outer(a, b), pos.dtype)
    edges = jnp.linspace(0.0, r_max, n_bins + 1)
    h, _ = jnp.histogram(d.reshape(-1), bins=edges, weights=w.reshape(-1))
    vol = abs(float(np.linalg.det(np.asarray(cell, float))))
    shell = 4.0 / 3.0 * jnp.pi * (edges[1:] ** 3 - edges[:-1] ** 3)
    g = h / (na * nb / vol * shell)
    return 0.5 * (edges[1:] + edges[:-1]), g


def adf(positions, cell, r_cut: float, n_bins: int = 90):
    """Angular distribution of one frame: the normalised histogram over θ ∈ [0, π] of the
    angles j–i–k between neighbors j, k of i within ``r_cut`` (minimum image). Returns
    ``(θ centres in rad, density)`` with ``Σ density · Δθ = 1``."""
    pos = jnp.asarray(positions)
    cellj = None if cell is None else jnp.asarray(cell, pos.dtype)
    n = pos.shape[0]
    v = _min_image(pos, cellj)  # (i, j, 3)
    r = jnp.sqrt(jnp.sum(v**2, axis=-1) + jnp.eye(n))
    nb = (r < r_cut) & ~jnp.eye(n, dtype=bool)
    u = v / r[..., None]
    cos = jnp.einsum("ijx,ikx->ijk", u, u)
    m = nb[:, :, None] & nb[:, None, :] & ~jnp.eye(n, dtype=bool)[None, :, :]
    theta = jnp.arccos(jnp.clip(cos, -1.0, 1.0))
    edges = jnp.linspace(0.0, jnp.pi, n_bins + 1)
    h, _ = jnp.histogram(theta.reshape(-1), bins=edges, weights=m.reshape(-1).astype(pos.dtype))
    dens = h / jnp.maximum(jnp.sum(h), 1.0) / (edges[1] - edges[0])
    return 0.5 * (edges[1:] + edges[:-1]), dens


def pressure(stress, kinetic: float, volume: float) -> float:
    """Instantaneous pressure (eV/Å³): kinetic part ``2 K / (3 V)`` minus the trace of the
    virial stress ``(1/V) ∂E/∂ε`` over three (``PotentialOutput.stress``; ASE's sign)."""
    return float(2.0 * kinetic / (3.0 * volume) - np.trace(np.asarray(stress)) / 3.0)


def density(system: System, masses=None) -> float:
    """Mass density (g/cm³) of a periodic structure."""
    from ase.data import atomic_masses

    if not system.periodic:
        raise ValueError("density needs a periodic cell")
    m = atomic_masses[np.asarray(system.species)] if masses is None else np.asarray(masses)
    vol = abs(float(np.linalg.det(np.asarray(system.cell, float))))
    return float(np.sum(m) * 1.66053906660 / vol)


def dipole(positions, charges) -> np.ndarray:
    """Dipole ``Σ q_i R_i`` (e·Å) of an open structure (for a neutral one, independent of
    the origin)."""
    return np.asarray(charges, float) @ np.asarray(positions, float)


def _widths(cell: np.ndarray) -> np.ndarray:
    """Perpendicular widths of a cell (Å)."""
    vol = abs(np.linalg.det(cell))
    return np.array(
        [vol / np.linalg.norm(np.cross(cell[(i + 1) % 3], cell[(i + 2) % 3])) for i in range(3)]
    )


__all__ = [
    "MD",
    "MDConfig",
    "MDResult",
    "Frame",
    "rdf",
    "adf",
    "pressure",
    "density",
    "dipole",
]


# -- the command --------------------------------------------------------------------------
MD_TOP_KEYS = {"model", "seed", "structure", "frame", "md", "steps", "out", "rdf", "progress"}


def add_parser(sub) -> None:
    """Register ``md CONFIG.yaml``."""
    p = sub.add_parser(
        "md",
        help="molecular dynamics (jax-md) with a saved or freshly built potential",
        description="NVE / NVT Langevin / Nosé–Hoover MD from a YAML config (see "
        "celli_scale.md.run_from_config): trajectory (extended XYZ), a per-frame log "
        "(CSV), the RDF averaged over the frames and a plot.",
    )
    p.add_argument("config", help="YAML MD config")


def main(args) -> int:
    from celli_scale.config_io import load_yaml

    res, out = run_from_config(load_yaml(args.config), base=Path(args.config).parent)
    f = res.frames[-1]
    print(
        f"{res.energy.size} steps in {res.wall:.1f} s ({res.steps_per_second:.1f} steps/s, "
        f"{res.steps_per_second * f.positions.shape[0]:.0f} atom-steps/s); "
        f"final T {f.temperature:.1f} K, E_pot {f.energy:.6f} eV"
        + ("" if res.drift is None else f", drift {res.drift:+.3e} eV/atom/ps")
    )
    print(f"written: {out}")
    return 0


def structure_from_spec(spec: Any, base: Path | str = ".", frame: int = 0) -> System:
    """A structure from a config value: a file name (relative to ``base``; frame ``frame``)
    or a generator ``{nacl_grid|rocksalt: {arguments}}`` (:mod:`celli_scale.datasets`)."""
    base = Path(base)
    from celli_scale import io
    from celli_scale.datasets import synthetic

    if isinstance(spec, str):
        frames = io.read(base / spec)
        if not frames:
            raise ValueError(f"structure file {spec} holds no frames")
        try:
            return frames[frame].system
        except IndexError:
            msg = f"structure file {spec} has {len(frames)} frames, no frame {frame}"
            raise ValueError(msg) from None
    if isinstance(spec, dict) and len(spec) == 1:
        ((name, kw),) = spec.items()
        gens = {"nacl_grid": synthetic.nacl_grid, "rocksalt": synthetic.rocksalt}
        if name not in gens:
            raise ValueError(f"structure generator {name!r} unknown (known: {sorted(gens)})")
        if not isinstance(kw, dict):
            raise ValueError(f"structure.{name} must be a mapping of arguments")
        return gens[name](**kw)
    raise ValueError("'structure' must be a file name or {nacl_grid|rocksalt: {...}}")


def run_from_config(cfg: Any, base: Path | None = None) -> tuple[MDResult, Path]:
    """Run an MD config (paths relative to ``base``)::

        model: path/to/model            # Potential.save directory, or a model config
        seed: 0                         #   (a mapping) built with fresh parameters
        structure: start.xyz            # or {nacl_grid: {n: 4, spacing: 2.8, rattle: 0.05}}
        frame: 0
        md: {ensemble: langevin, dt: 1.0, temperature: 300, friction: 0.01, every: 10}
        steps: 1000
        out: out/md                     # traj.xyz, log.csv, rdf.csv, md.png
        rdf: {r_max: 6.0, n_bins: 100}  # optional (periodic structures)
        progress: true

    Returns the :class:`MDResult` and the output directory.
    """
    from celli_scale.potential import Potential

    if not isinstance(cfg, dict):
        raise ValueError("the MD config must be a mapping")
    unknown = sorted(set(cfg) - MD_TOP_KEYS)
    if unknown:
        raise ValueError(
            f"unknown key(s) in the MD config: {', '.join(unknown)} "
            f"(known: {', '.join(sorted(MD_TOP_KEYS))})"
        )
    for k in ("model", "structure", "steps"):
        if k not in cfg:
            raise ValueError(f"the MD config needs '{k}'")
    base = Path(".") if base is None else Path(base)
    system = structure_from_spec(cfg["structure"], base, int(cfg.get("frame", 0)))
    model = cfg["model"]
    if isinstance(model, str):
        pot = Potential.load(base / model)
    elif isinstance(model, dict):
        pot = Potential.from_config(model, seed=int(cfg.get("seed", 0)), example=system)
    else:
        raise ValueError("'model' must be a saved model directory or a model config mapping")
    mdc = cfg.get("md", {})
    if not isinstance(mdc, dict):
        raise ValueError("'md' must be a mapping")
    fields = {f.name for f in dataclasses.fields(MDConfig)}
    bad = sorted(set(mdc) - fields)
    if bad:
        raise ValueError(
            f"unknown key(s) in md: {', '.join(bad)} (known: {', '.join(sorted(fields))})"
        )
    md = MD(pot, system, MDConfig(**mdc))
    out = base / str(cfg.get("out", "out/md"))
    out.mkdir(parents=True, exist_ok=True)
    traj = out / "traj.xyz"
    traj.unlink(missing_ok=True)
    res = md.run(int(cfg["steps"]), trajectory=traj, progress=bool(cfg.get("progress", True)))
    _write_log(out / "log.csv", res)
    rdf_cfg = cfg.get("rdf")
    curve = None
    if rdf_cfg is not None:
        if not system.periodic:
            raise ValueError("rdf needs a periodic structure")
        r_max = float(rdf_cfg.get("r_max", 0.5 * _widths(np.asarray(system.cell, float)).min()))
        n_bins = int(rdf_cfg.get("n_bins", 100))
        gs = [rdf(f.positions, system.cell, r_max, n_bins)[1] for f in res.frames]
        r = np.asarray(rdf(res.frames[0].positions, system.cell, r_max, n_bins)[0])
        curve = (r, np.mean(np.asarray(gs), axis=0))
        np.savetxt(
            out / "rdf.csv", np.column_stack(curve), delimiter=",", header="r_A,g", comments=""
        )
    _plot(out / "md.png", res, curve)
    return res, out


def _write_log(path: Path, res: MDResult) -> None:
    import csv

    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(
            ["step", "time_fs", "potential_eV", "kinetic_eV", "temperature_K", "conserved_eV"]
        )
        for f in res.frames:
            w.writerow(
                [
                    f.step,
                    f.time,
                    f.energy,
                    f.kinetic,
                    f.temperature,
                    "" if f.conserved is None else f.conserved,
                ]
            )


def _plot(path: Path, res: MDResult, curve) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = 3 if curve is not None else 2
    fig, ax = plt.subplots(1, n, figsize=(4.2 * n, 3.2))
    t = np.array([f.time for f in res.frames])
    ax[0].plot(t, [f.temperature for f in res.frames])
    ax[0].set(xlabel="time (fs)", ylabel="T (K)")
    ax[1].plot(t, [f.energy for f in res.frames], label="potential")
    if res.conserved is not None:
        ax[1].plot(t, [f.conserved for f in res.frames], label="conserved")
    ax[1].set(xlabel="time (fs)", ylabel="energy (eV)")
    ax[1].legend()
    if curve is not None:
        ax[2].plot(*curve)
        ax[2].set(xlabel="r (Å)", ylabel="g(r)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
