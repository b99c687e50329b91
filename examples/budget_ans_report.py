"""Entropy-coded budgets (issue #5): each ``budget:bits=R > T > ans`` run against its plain
``budget:bits=R > T`` run of the same seed, and the kept entries ``K`` on a first-round update.

    python examples/budget_ans_report.py --plain 0=runs/fmnist_budget_sweep \
        --plain 1=runs/fmnist_budget_sweep_06d_seed1 --ans 0=runs/fmnist_budget_sweep_06d_ans_seed0 \
        --ans 1=runs/fmnist_budget_sweep_06d_ans_seed1 [--data-dir /path/to/data] [--csv out.csv]

Runs are paired by uplink spec: ``budget:... > T > ans`` with the plain ``budget:... > T`` run of the
same seed (whatever the labels); every pair must have the same configuration apart from ``name`` and
the uplink spec (checked). Methods are named by the plain runs' labels of the first seed.
Prints Markdown: final accuracy per seed, plain and coded, the paired difference (coded - plain, in
percentage points; mean +- sample std over the seeds and a 95% t-interval), and the measured bytes
per client per round (mean, min-max) of the coded runs. With ``--data-dir``, also the kept entries
``K``, bytes per kept entry and relative error ``||x - x_hat||^2 / ||x||^2`` of each spec on the
first-round client update of ``examples/budget_bitwidth_study.py`` (seed-0 initialisation, 50 steps).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

from scipy import stats


def _runs(seed: int, root: Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for p in sorted(q for q in root.iterdir() if (q / "summary.json").is_file()):
        s = json.loads((p / "summary.json").read_text())
        cfg = json.loads((p / "config.json").read_text())["config"]
        if cfg["seed"] != seed:
            raise SystemExit(f"{p}: seed {cfg['seed']}, expected {seed}")
        metrics = [json.loads(line) for line in (p / "metrics.jsonl").read_text().splitlines() if line]
        per = [b for m in metrics for b in m["uplink_bytes_per_client"]]
        cfg = dict(cfg, name=None, compression=dict(cfg["compression"], uplink=None))
        out[s["name"]] = {"summary": s, "bytes": per, "config": json.dumps(cfg, sort_keys=True)}
    return out


def _ci(diffs: list[float]) -> str:
    m = statistics.fmean(diffs)
    if len(diffs) < 2:
        return f"{m:+.2f}"
    sd = statistics.stdev(diffs)
    h = stats.t.ppf(0.975, len(diffs) - 1) * sd / math.sqrt(len(diffs))
    return f"{m:+.2f} ± {sd:.2f} [{m - h:+.2f}, {m + h:+.2f}]"


def _pairs(arg: list[str]) -> dict[int, Path]:
    return {int(k): Path(v) for k, v in (a.split("=", 1) for a in arg)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plain", action="append", required=True, help="SEED=SWEEP_DIR of the plain runs")
    ap.add_argument("--ans", action="append", required=True, help="SEED=SWEEP_DIR of the '> ans' runs")
    ap.add_argument("--csv", type=Path)
    ap.add_argument("--data-dir", help="compute K on the first-round update (needs fashion_mnist)")
    args = ap.parse_args()
    plain = {s: _runs(s, d) for s, d in _pairs(args.plain).items()}
    coded = {s: _runs(s, d) for s, d in _pairs(args.ans).items()}
    seeds = sorted(set(plain) & set(coded))

    def by_spec(runs: dict[str, dict[str, Any]]) -> dict[str, tuple[str, dict[str, Any]]]:
        return {r["summary"]["uplink"]: (lab, r) for lab, r in runs.items()}

    ans_specs = [r["summary"]["uplink"] for r in coded[seeds[0]].values()]
    ans_specs = [sp for sp in ans_specs if sp.endswith(" > ans")]
    names: dict[str, str] = {}  # ans spec -> method label
    rows = []
    for spec in ans_specs:
        base = spec.removesuffix(" > ans")
        for s in seeds:
            if base not in by_spec(plain[s]) or spec not in by_spec(coded[s]):
                raise SystemExit(f"seed {s}: no run of {base!r} or of {spec!r}")
            lab, a = by_spec(plain[s])[base]
            b = by_spec(coded[s])[spec][1]
            names.setdefault(spec, lab)
            if a["config"] != b["config"]:
                raise SystemExit(f"{base!r} and {spec!r} (seed {s}) differ in more than name and uplink")
            rows.append(
                {
                    "method": names[spec],
                    "seed": s,
                    "plain_uplink": base,
                    "ans_uplink": spec,
                    "plain_final_accuracy": a["summary"]["final_test_accuracy"],
                    "ans_final_accuracy": b["summary"]["final_test_accuracy"],
                    "plain_bytes_mean": round(statistics.fmean(a["bytes"]), 1),
                    "ans_bytes_mean": round(statistics.fmean(b["bytes"]), 1),
                    "ans_bytes_min": min(b["bytes"]),
                    "ans_bytes_max": max(b["bytes"]),
                }
            )
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with args.csv.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)

    cols = " | ".join(f"seed {s}: plain / +ans" for s in seeds)
    print(f"| method | +ans bytes/client/round (min-max) | {cols} | +ans − plain: mean ± std [95% CI] |")
    print("|---|---:|" + "---:|" * (len(seeds) + 1))
    for spec in ans_specs:
        mine = [r for r in rows if r["ans_uplink"] == spec]
        per = [b for s in seeds for b in by_spec(coded[s])[spec][1]["bytes"]]
        cells = [f"{100 * r['plain_final_accuracy']:.2f} / {100 * r['ans_final_accuracy']:.2f}" for r in mine]
        diffs = [100 * (r["ans_final_accuracy"] - r["plain_final_accuracy"]) for r in mine]
        nbytes = f"{statistics.fmean(per):,.0f} ({min(per):,}-{max(per):,})"
        print(f"| {names[spec]} | {nbytes} | " + " | ".join(cells) + f" | {_ci(diffs)} |")

    if args.data_dir:
        import torch

        sys.path.insert(0, str(Path(__file__).parent))
        from budget_bitwidth_study import client_update

        from fedsqueeze.codecs import decode_state_dict, parse_spec

        update = client_update("fashion_mnist", args.data_dir)
        norm = sum(float((t**2).sum()) for t in update.values())
        print("\n| spec | K | bytes | bits per kept entry | relative error |\n|---|---:|---:|---:|---:|")
        for ans_spec in ans_specs:
            for spec in (ans_spec.removesuffix(" > ans"), ans_spec):
                fit = parse_spec(spec).fit_update(update, rng=torch.Generator().manual_seed(0))  # type: ignore[attr-defined]
                back = decode_state_dict(fit.payload)
                err = sum(float(((back[n] - t) ** 2).sum()) for n, t in update.items()) / norm
                bits = 8 * fit.nbytes / fit.knob
                print(f"| `{spec}` | {fit.knob:,} | {fit.nbytes:,} | {bits:.2f} | {err:.3f} |")


if __name__ == "__main__":
    main()
