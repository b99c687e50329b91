"""Tables for a budget sweep (examples/fmnist_budget_sweep.toml): per budget, each method's measured
uplink bytes per client per round, bits per parameter, final/best accuracy and accuracy per Mbit.

    python examples/budget_sweep_report.py runs/fmnist_budget_sweep [more sweep dirs] \
        --out docs/results/fmnist_budget_sweep [--rename "OLD LABEL=NEW LABEL"]

writes ``<out>.json`` and ``<out>.csv`` (one row per run) and ``<out>_accuracy_vs_uplink_mb.png``
(one panel per budget, the fp32 reference in each: test accuracy against cumulative uplink MB,
log x, from :func:`fedsqueeze.reports.plots.series`), and prints one Markdown table per budget.

Definitions (per run; ``d`` = model parameters, bytes are ``len(payload)`` as the run loop records):

* ``bytes/client/round``: mean of ``uplink_bytes_per_client`` over all clients and rounds (min, max),
  rejected (non-finite) updates left out;
* ``budget used``: that mean over the budget ``floor(R d / 8)``;
* ``bits/param``: ``8 * bytes/client/round / d``;
* ``acc/Mbit``: ``(final accuracy - 0.10) / (uplink Mbit one client sent over the run)``, i.e. the
  accuracy gained over chance (10 balanced classes) per Mbit of one client's uplink, in the spirit of
  M22's "per-bit accuracy" (M22 takes the best improvement over training; this takes the final one).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
from pathlib import Path
from typing import Any

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fedsqueeze.reports import load_run
from fedsqueeze.reports.plots import series
from fedsqueeze.reports.runs import RunRecord


def _row(run_dir: Path, rename: dict[str, str]) -> dict[str, Any]:
    summary = json.loads((run_dir / "summary.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())["config"]
    label = rename.get(str(run_dir), rename.get(summary["name"], summary["name"]))
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    per_client = [  # a rejected (NaN) update sends nothing: it is not a round of that method
        b
        for m in metrics
        for c, b in zip(m["clients"], m["uplink_bytes_per_client"], strict=True)
        if c not in m.get("rejected_clients", [])
    ]
    evaluated = [m["test_accuracy"] for m in metrics if m.get("test_accuracy") is not None]
    d = int(summary["model_params"])
    spec = summary["uplink"]
    # R: the budget policy's, else a label ending in "@<R>d" (a codec sized by hand to that budget)
    m = re.match(r"budget:bits=([0-9.]+)", spec) or re.search(r"@([0-9.]+)d$", label)
    bits = float(m.group(1)) if m else None
    budget = int(bits * d // 8) if bits is not None else None
    mean_b = statistics.fmean(per_client)
    final = evaluated[-1] if evaluated else None
    mbit_per_client = sum(per_client) * 8 / 1e6 / len(metrics[0]["uplink_bytes_per_client"])
    return {
        "label": label,
        "algorithm": config["algorithm"]["name"],
        "R_bits_per_param": bits,
        "uplink": spec,
        "uplink_ef": summary["uplink_ef"],
        "budget_bytes": budget,
        "bytes_per_client_round_mean": round(mean_b, 1),
        "bytes_per_client_round_min": min(per_client),
        "bytes_per_client_round_max": max(per_client),
        "budget_used": round(mean_b / budget, 4) if budget else None,
        "bits_per_param": round(8 * mean_b / d, 4),
        "final_accuracy": final,
        "best_accuracy": max(evaluated) if evaluated else None,
        "acc_gain_per_mbit": round((final - 0.10) / mbit_per_client, 4) if final is not None else None,
        "uplink_mbit_per_client": round(mbit_per_client, 3),
        "rounds": summary["rounds_completed"],
        "status": summary["status"],
        "wall_time_s": round(summary["wall_time_s"], 1),
        "model_params": d,
    }


def _table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| method | uplink spec | algorithm, EF | bytes/client/round (min-max) | budget used | bits/param "
        "| final acc | best acc | acc/Mbit | rounds |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for r in rows:
        acc = "diverged" if r["final_accuracy"] is None else f"{r['final_accuracy']:.4f}"
        best = "-" if r["best_accuracy"] is None else f"{r['best_accuracy']:.4f}"
        used = "-" if r["budget_used"] is None else f"{100 * r['budget_used']:.2f}%"
        per = "-" if r["acc_gain_per_mbit"] is None else f"{r['acc_gain_per_mbit']:.4f}"
        lines.append(
            f"| {r['label']} | `{r['uplink']}` | {r['algorithm']}, {r['uplink_ef']} "
            f"| {r['bytes_per_client_round_mean']:,.0f} "
            f"({r['bytes_per_client_round_min']:,}-{r['bytes_per_client_round_max']:,}) | {used} "
            f"| {r['bits_per_param']:.3f} | {acc} | {best} | {per} | {r['rounds']} |"
        )
    return head + "\n".join(lines)


def _plot(groups: list[tuple[str, list[RunRecord]]], path: Path) -> None:
    fig = Figure(figsize=(6.2 * len(groups), 5.2), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(groups), sharey=True, squeeze=False)[0]
    markers = "os^vD<>pPX*h"
    for ax, (title, runs) in zip(axes, groups, strict=True):
        colors = colormaps["tab20"]
        for i, run in enumerate(runs):
            xs, ys = series(run, "cum_uplink_mb", log_x=True)
            ax.plot(
                xs,
                ys,
                marker=markers[i % len(markers)],
                markersize=4,
                linewidth=1.2,
                color=colors(i % 20),
                label=run.label if xs else f"{run.label} (diverged)",
            )
        ax.set_xscale("log")
        ax.set_xlabel("cumulative uplink, both clients (MB, 1e6 bytes)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right", fontsize="x-small")
    axes[0].set_ylabel("test accuracy")
    fig.savefig(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep_dirs", type=Path, nargs="+")
    ap.add_argument("--out", type=Path, required=True, help="output prefix (no suffix)")
    ap.add_argument(
        "--rename", action="append", default=[], help="OLD=NEW: OLD a run label or run directory (last '=')"
    )
    args = ap.parse_args()
    rename = dict(r.rsplit("=", 1) for r in args.rename)  # labels may hold '=', new ones may not
    dirs = [
        p
        for sweep in args.sweep_dirs
        for p in sorted(
            (p for p in sweep.iterdir() if (p / "summary.json").is_file()),
            key=lambda p: (p / "summary.json").stat().st_mtime,
        )
    ]
    rows = [_row(p, rename) for p in dirs]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    with args.out.with_suffix(".csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    records = [load_run(p, label=r["label"]) for p, r in zip(dirs, rows, strict=True)]
    budgets = sorted({r["R_bits_per_param"] for r in rows if r["R_bits_per_param"] is not None})
    groups = []
    for bits in budgets:
        idx = [i for i, r in enumerate(rows) if r["R_bits_per_param"] in (None, bits)]
        groups.append((f"R = {bits} d bits per client per round", [records[i] for i in idx]))
        print(f"\n### R = {bits} d bits per client per round\n")
        print(_table([rows[i] for i in idx]))
    _plot(groups, args.out.parent / f"{args.out.name}_accuracy_vs_uplink_mb.png")


if __name__ == "__main__":
    main()
