"""Reporting of a scaling study: ``results.csv`` (one row per model × size × processes ×
devices), ``time_vs_n.png`` (log-log, fitted slope per model), ``speedup_vs_devices.png``
(speed-up and parallel efficiency over workers, devices and processes as separate
series), ``ratio_celli_mpnn.png`` (CELLI/MACE and CELLI/NequIP time ratios vs N) and
``results.md`` (tables, slopes, speed-ups, configuration, machine).

Units: seconds are wall-clock seconds per batch step (process 0's clock; the step ends
with an all-reduce, so it includes the slowest worker); ``atoms_steps_per_s`` is
``batch · N / seconds``; memory (process 0's) in MiB. Everything here works on plain row
dicts (:data:`CSV_COLUMNS`), so it can be tested without running a study.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from celli_scale.study.config import StudyConfig

#: Columns of ``results.csv``, in order.
CSV_COLUMNS = (
    "model",
    "n_grid",
    "n_atoms",
    "n_edges",
    "dtype",
    "processes",
    "devices",
    "workers",
    "batch",
    "seconds",
    "seconds_min",
    "seconds_per_structure",
    "atoms_steps_per_s",
    "cpu_seconds",
    "peak_rss_mb",
    "compiled_mb",
    "compile_s",
    "energy_sum",
    "platform",
    "status",
)


def complete_row(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with every :data:`CSV_COLUMNS` key (missing numbers NaN, texts "")."""
    row = {"processes": 1, **row}
    row.setdefault("workers", row["processes"] * row.get("devices", 1))
    full = {k: row.get(k, math.nan) for k in CSV_COLUMNS}
    for k in ("model", "dtype", "platform", "status"):
        full[k] = row.get(k, "")
    return full


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Write ``rows`` as ``path`` (columns :data:`CSV_COLUMNS`)."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(CSV_COLUMNS))
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in CSV_COLUMNS})


def ok_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows that ran (status "ok", finite time)."""
    return [r for r in rows if r.get("status") == "ok" and np.isfinite(r.get("seconds", math.nan))]


def _workers(row: dict[str, Any]) -> int:
    """Devices in the row's mesh: processes × devices per process."""
    w = row.get("workers")
    if w is None or (isinstance(w, float) and not math.isfinite(w)):
        return int(row.get("processes", 1)) * int(row.get("devices", 1))
    return int(w)


def _single_device_times(rows, model: str) -> tuple[np.ndarray, np.ndarray]:
    """(N, seconds per structure) of ``model`` on the fewest workers in ``rows``."""
    w0 = min((_workers(x) for x in rows), default=1)
    pts = sorted(
        (r["n_atoms"], r["seconds_per_structure"])
        for r in ok_rows(rows)
        if r["model"] == model and _workers(r) == w0
    )
    if not pts:
        return np.zeros(0), np.zeros(0)
    n, t = np.asarray(pts, dtype=float).T
    return n, t


def fit_slopes(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Least-squares slope of log(time) vs log(N) per model, on the fewest-device rows
    (NaN with fewer than two sizes)."""
    slopes = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        n, t = _single_device_times(rows, model)
        slopes[model] = float(np.polyfit(np.log(n), np.log(t), 1)[0]) if n.size >= 2 else math.nan
    return slopes


def _figure(ncols: int = 1):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, ncols, figsize=(5.2 * ncols, 4))
    return plt, fig, ax


def plot_time_vs_n(rows, slopes: dict[str, float], path: Path) -> None:
    plt, fig, ax = _figure()
    d0 = min(_workers(r) for r in rows)
    for model in dict.fromkeys(r["model"] for r in rows):
        n, t = _single_device_times(rows, model)
        if n.size:
            s = slopes.get(model, math.nan)
            label = f"{model} (slope {s:.2f})" if np.isfinite(s) else f"{model}"
            ax.loglog(n, t, marker="o", label=label)
    ax.set_xlabel("atoms N")
    ax.set_ylabel("energy + forces, s per structure")
    ax.set_title(f"time vs N ({d0} worker{'s' if d0 > 1 else ''})")
    _legend_or_note(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def speedups(rows) -> dict[tuple[str, int, str], list[tuple[int, float]]]:
    """Speed-up over one worker, from throughput (atoms · steps / s), per model, for the
    largest size that ran on one worker: ``{(model, N, "devices" | "processes"):
    [(workers, speed-up), ...]}``. Throughput ratios serve strong scaling (fixed batch,
    = T(1)/T(w)) and weak scaling (batch ∝ workers) alike; efficiency = speed-up / w.
    "devices" series keep one process, "processes" series one device per process."""
    ok = ok_rows(rows)
    out: dict[tuple[str, int, str], list[tuple[int, float]]] = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in ok if r["model"] == model]
        base = {r["n_atoms"]: r["atoms_steps_per_s"] for r in mine if _workers(r) == 1}
        if not base:
            continue
        n_atoms = max(base)
        for layout in ("devices", "processes"):
            pts = {
                _workers(r): r["atoms_steps_per_s"] / base[n_atoms]
                for r in mine
                if r["n_atoms"] == n_atoms
                and (
                    int(r.get("processes", 1)) == 1
                    if layout == "devices"
                    else int(r.get("devices", 1)) == 1
                )
            }
            if len(pts) > 1:
                out[(model, n_atoms, layout)] = sorted(pts.items())
    return out


def plot_speedup(rows, path: Path) -> None:
    plt, fig, (a1, a2) = _figure(2)
    for (model, n_atoms, layout), pts in speedups(rows).items():
        w, sp = (np.asarray(v, dtype=float) for v in zip(*pts, strict=True))
        style = "-" if layout == "devices" else "--"
        label = f"{model} N={n_atoms} ({layout})"
        a1.plot(w, sp, style, marker="o", label=label)
        a2.plot(w, sp / w, style, marker="o", label=label)
    ws = sorted({_workers(r) for r in rows})
    a1.plot(ws, ws, "k:", lw=1, label="ideal")
    xlabel = "workers (devices × processes; data-parallel batch)"
    a1.set_xlabel(xlabel)
    a1.set_ylabel("speed-up (throughput / one worker's)")
    a2.set_xlabel(xlabel)
    a2.set_ylabel("parallel efficiency")
    a2.set_ylim(0, 1.2)
    for a in (a1, a2):
        a.set_xticks(ws)
        _legend_or_note(a)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def time_ratios(rows, num: str, den: str) -> list[tuple[int, float]]:
    """(N, t_num / t_den) at the fewest devices, for sizes both ran."""
    tn = dict(zip(*[list(a) for a in _single_device_times(rows, num)], strict=True))
    td = dict(zip(*[list(a) for a in _single_device_times(rows, den)], strict=True))
    return [(int(n), tn[n] / td[n]) for n in sorted(set(tn) & set(td))]


def plot_ratios(rows, path: Path) -> None:
    plt, fig, ax = _figure()
    for den in ("mace", "nequip"):
        pts = time_ratios(rows, "celli", den)
        if pts:
            n, r = zip(*pts, strict=True)
            ax.semilogx(
                n, r, marker="o", label=f"CELLI / {den.upper() if den == 'mace' else 'NequIP'}"
            )
    ax.axhline(1.0, color="k", lw=0.8, ls=":")
    ax.set_xlabel("atoms N")
    ax.set_ylabel("time ratio (energy + forces)")
    ax.set_title("CELLI vs message passing")
    _legend_or_note(ax, "needs celli and mace or nequip in the study")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _legend_or_note(ax, note: str = "no successful points") -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, note, ha="center", va="center", transform=ax.transAxes)


def machine_summary() -> str:
    import platform

    import jax

    dev = jax.devices()[0]
    return (
        f"{platform.node() or 'host'}: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPU cores, jax {jax.__version__}, device {dev.platform} "
        f"({dev.device_kind}), load average {os.getloadavg()[0]:.1f} at the end"
    )


def _fmt(v: Any, spec: str) -> str:
    try:
        return format(float(v), spec) if np.isfinite(float(v)) else "–"
    except (TypeError, ValueError):
        return str(v)


def write_markdown(rows, slopes: dict[str, float], cfg: StudyConfig, path: Path) -> None:
    lines = [
        "# Scaling study",
        "",
        f"Machine: {machine_summary()}.",
        f"NaCl grid (spacing {cfg.spacing} Å, rattle {cfg.rattle} Å), {cfg.dtype}, "
        f"{cfg.mode} scaling ("
        + (
            f"batch of {cfg.batch_size} structures per step"
            if cfg.mode == "strong"
            else f"{cfg.batch_size} structure(s) per worker"
        )
        + "), data-parallel (batch over devices; processes joined by jax.distributed "
        f"on 127.0.0.1), median of {cfg.repeats} warm evaluations of energy + forces.",
        "",
        "| model | N | edges | processes | devices | batch | s / step | s / structure "
        "| atoms·steps/s | peak RSS (MiB) | status |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['n_atoms']} | {_fmt(r['n_edges'], '.0f')} | "
            f"{r.get('processes', 1)} | {r['devices']} | {r['batch']} | "
            f"{_fmt(r['seconds'], '.4g')} | {_fmt(r['seconds_per_structure'], '.4g')} | "
            f"{_fmt(r['atoms_steps_per_s'], '.4g')} | {_fmt(r['peak_rss_mb'], '.0f')} | "
            f"{r['status']} |"
        )
    sp = speedups(rows)
    if sp:
        lines += [
            "",
            "## Speed-up and efficiency (throughput over one worker's)",
            "",
            "| model | N | layout | workers | speed-up | efficiency |",
            "|---|---:|---|---:|---:|---:|",
        ]
        for (model, n_atoms, layout), pts in sp.items():
            lines += [
                f"| {model} | {n_atoms} | {layout} | {w} | {v:.3f} | {v / w:.3f} |" for w, v in pts
            ]
    lines += ["", "## Fitted slope of log(time) vs log(N)", "", "| model | slope |", "|---|---:|"]
    lines += [f"| {m} | {_fmt(s, '.3f')} |" for m, s in slopes.items()]
    ratio_lines = []
    for den in ("mace", "nequip", "allegro"):
        for n, r in time_ratios(rows, "celli", den):
            ratio_lines.append(f"| CELLI / {den} | {n} | {r:.3f} |")
    if ratio_lines:
        lines += [
            "",
            "## Time ratios",
            "",
            "| ratio | N | value |",
            "|---|---:|---:|",
            *ratio_lines,
        ]
    lines += [
        "",
        "## Configuration",
        "",
        "```json",
        json.dumps({m: cfg.model_config(m) for m in cfg.models}, indent=1),
        "```",
        "",
    ]
    path.write_text("\n".join(lines))


def write_report(rows: Sequence[dict[str, Any]], cfg: StudyConfig, out: Path) -> None:
    """Every output of a study into ``out``: ``results.csv``, the three plots and
    ``results.md``."""
    out = Path(out)
    write_csv(rows, out / "results.csv")
    slopes = fit_slopes(rows)
    plot_time_vs_n(rows, slopes, out / "time_vs_n.png")
    plot_speedup(rows, out / "speedup_vs_devices.png")
    plot_ratios(rows, out / "ratio_celli_mpnn.png")
    write_markdown(rows, slopes, cfg, out / "results.md")
