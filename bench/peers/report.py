"""The report: ``peers.md`` from the driver's document (the JSON it writes as
``peers.json``): the timing table with the ratios to ours, versions, the untimed
correctness checks and the hyper-parameter mapping. Standard library only."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

from bench.peers.spec import MAPPING, PEER_PACKAGE


def _fmt_s(row: dict[str, Any] | None) -> str:
    """Median seconds of a row, or the short form of why there is none."""
    if not row:
        return "–"
    if row.get("status") != "ok" or "seconds" not in row:
        return str(row.get("status", "–")).split(" (")[0].split(":")[0]
    return f"{row['seconds']:.3f}"


def _run_rss(row: dict[str, Any] | None) -> float | None:
    """Peak resident MiB during the timed calls (else over the whole process)."""
    if not row:
        return None
    return row.get("run_peak_rss_mb") or row.get("peak_rss_mb")


def _fmt_g(x: Any, spec: str) -> str:
    """``x`` formatted with ``spec``, or "–" when absent."""
    return "–" if x is None else format(x, spec)


#: Result keys of a point, as written in peers.md.
SIDE_LABELS = {"ours": "ours", "peer": "peer eager", "peer_aoti": "peer AOTInductor"}


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> str:
    """``b`` seconds / ``a`` seconds, when both were measured."""
    if not (a and b and a.get("status") == b.get("status") == "ok"):
        return "–"
    if "seconds" not in a or "seconds" not in b:
        return "–"
    return f"{b['seconds'] / a['seconds']:.2f}"


def write_markdown(doc: dict[str, Any], path: Path) -> None:
    """``peers.md``: the timing table, versions, checks and the hyper-parameter mapping."""
    keys = ("ours", "peer", "peer_aoti")
    lines = [
        "# Peer comparison: our JAX models vs the reference PyTorch implementations",
        "",
        f"Machine: {doc['machine']}. Written by `python -m bench.peers` on {doc['date']}.",
        "",
        "Warm energy + forces of one NaCl grid (PEERS.md, spacing 2.2 Å, rattle 0.05 Å, "
        f"periodic), median of {doc['repeats']} runs after {doc['warmup']} warm-up "
        "call(s), seconds; every run under `flock /tmp/celli_cpu.lock`, the sides "
        "interleaved point by point. Ours: `jax.jit` (XLA CPU, 2 cores). Peer eager: "
        "torch eager mode, `torch.set_num_threads(2)` (mace-torch's calculator path; no "
        "torch.compile). Peer AOTInductor: nequip / nequip-allegro compiled as "
        "`nequip-compile --mode aotinductor --target ase` does (nequip's recommended "
        "inference path; compilation not timed). *Others' CPU*: cores used by other "
        "processes during the timed calls (the lock does not stop untimed work); a point "
        f"above {doc.get('max_foreign', 0.15)} was re-measured up to "
        f"{doc.get('retries', 3)} times and the least disturbed attempt kept (marked † "
        "if still above).",
        "",
        "| model | N | edges | dtype | ours s | peer eager s | eager/ours | peer AOTI s | "
        "AOTI/ours | params ours / peer | peak RSS while timing, MiB, ours / eager / AOTI | "
        "others' CPU ours / eager / AOTI |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in doc["points"]:
        o, q, a = (p.get(k) for k in keys)
        edges = {r.get("n_edges") for r in (o, q, a) if r and r.get("n_edges") is not None}
        e_str = "/".join(str(e) for e in sorted(edges)) if edges else "–"
        rss = " / ".join(_fmt_g(_run_rss(r), ".0f") for r in (o, q, a))
        busy = " / ".join(
            f"{r['foreign_cpu_cores']:.2f}{'†' if r.get('contended') else ''}"
            if r and "foreign_cpu_cores" in r
            else "–"
            for r in (o, q, a)
        )
        params = f"{(o or {}).get('n_params', '–')} / {(q or a or {}).get('n_params', '–')}"
        lines.append(
            f"| {p['model']} ({PEER_PACKAGE[p['model']]}) | {p['n_atoms']} | {e_str} | "
            f"{p['dtype']} | {_fmt_s(o)} | {_fmt_s(q)} | {_ratio(o, q)} | {_fmt_s(a)} | "
            f"{_ratio(o, a)} | {params} | {rss} | {busy} |"
        )
    notes = [
        f"- {p['model']} N={p['n_atoms']} {p['dtype']} {SIDE_LABELS[k]}: {p[k]['status']}"
        for p in doc["points"]
        for k in keys
        if p.get(k) and p[k].get("status") != "ok"
    ]
    if notes:
        lines += ["", "Points not measured:", *notes]
    v = {**doc["versions"].get("peers", {}), **doc["versions"].get("ours", {})}
    lines += ["", "Versions: " + ", ".join(f"{k} {v[k]}" for k in sorted(v)) + "."]
    if doc.get("checks"):
        lines += [
            "",
            f"## Correctness checks (untimed, N = {doc.get('check_grid_n', 4) ** 3}, float64)",
            "",
            "Random weights differ between the sides, so energies are not comparable; each "
            "side is checked on its own. Edges: directed pairs within r_cut (must agree).",
            "",
            "| model | side | edges | energy (eV) | max abs F | abs sum F / (N max abs F) | "
            "FD − autograd, atom 0 (eV/Å) | AOTI − eager, max abs F | status |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for c in doc["checks"]:
            lines.append(
                f"| {c.get('model')} | {SIDE_LABELS[check_key(c)]} | {c.get('n_edges')} | "
                f"{_fmt_g(c.get('energy'), '.6g')} | {_fmt_g(c.get('max_abs_force'), '.3g')} | "
                f"{_fmt_g(c.get('force_sum_rel'), '.1e')} | "
                f"{_fmt_g(c.get('fd_max_abs_err'), '.1e')} | "
                f"{_fmt_g(c.get('aoti_minus_eager_max_abs_force'), '.1e')} | {c.get('status')} |"
            )
    lines += ["", "## Hyper-parameter mapping", ""]
    for model, rows in MAPPING.items():
        lines += [
            f"### {model} vs {PEER_PACKAGE[model]}",
            "",
            "| ours | peer | difference |",
            "|---|---|---|",
        ]
        lines += [f"| {a} | {b} | {c or '–'} |" for a, b, c in rows]
        lines.append("")
    path.write_text("\n".join(lines).rstrip() + "\n")


def machine_summary() -> str:
    """The machine in a few words: architecture, CPU cores, memory."""
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except OSError:
        pass
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, {mem / 2**30:.0f} GiB RAM, no GPU"


def check_key(row: dict[str, Any]) -> str:
    """Side key ("ours", "peer", "peer_aoti") of a check row."""
    return row.get("side_key") or ("ours" if row.get("side") == "ours" else "peer")
