"""Seed replicates of a budget sweep (issue #5): final test accuracy per method and seed, the spread
between methods against the spread between seeds, and paired (same-seed) differences.

    python examples/budget_seed_replicates.py 0=runs/fmnist_budget_sweep 1=runs/seed1 2=runs/seed2 \
        --csv docs/results/fmnist_budget_sweep_seeds.csv [--ref "uniform @0.6d" --ref "Weibull-LM @0.6d"]

Each ``SEED=DIR`` is a sweep directory whose runs used that seed (checked against ``config.json``);
runs are matched across seeds by label, and every matched run must have the same configuration apart
from ``seed`` and ``compression`` (checked). Writes one CSV row per run and prints Markdown.

Statistics (accuracies in percentage points; ``n`` seeds per method):

* per method: mean and sample standard deviation (``n - 1``) over the seeds;
* unpaired: one-way ANOVA of the compressed methods (seed differences count as noise);
* paired: the seed fixes the partition, the initialisation and the batch order of every run, so the
  seeds act as blocks; two-way ANOVA without interaction (method + seed) gives the method x seed
  residual standard deviation, and ``method - ref`` per seed gives mean +- std and a 95% t-interval
  (``t_{0.975, n-1}``; not corrected for the number of comparisons); Tukey's HSD on the two-way
  residual lists the pairs of method means that differ with all pairs compared at 5% jointly.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats


def _runs(seed: int, root: Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    done = [p for p in root.iterdir() if (p / "summary.json").is_file()]
    for p in sorted(done, key=lambda p: (p / "summary.json").stat().st_mtime):  # run order
        s = json.loads((p / "summary.json").read_text())
        cfg = json.loads((p / "config.json").read_text())["config"]
        if cfg["seed"] != seed:
            raise SystemExit(f"{p}: seed {cfg['seed']}, expected {seed}")
        metrics = [json.loads(line) for line in (p / "metrics.jsonl").read_text().splitlines() if line]
        per = [b for m in metrics for b in m["uplink_bytes_per_client"]]
        evals = [m["test_accuracy"] for m in metrics if m.get("test_accuracy") is not None]
        rest = {k: v for k, v in cfg.items() if k not in ("seed", "compression", "name")}
        out[s["name"]] = {
            "row": {
                "method": s["name"],
                "uplink": s["uplink"],
                "uplink_ef": s["uplink_ef"],
                "seed": seed,
                "final_accuracy": s["final_test_accuracy"],
                "best_accuracy": s["best_test_accuracy"],
                "test_accuracy_per_eval": " ".join(f"{a:.4f}" for a in evals),
                "bytes_per_client_round_mean": round(statistics.fmean(per), 1),
                "bytes_per_client_round_max": max(per),
                "rounds": s["rounds_completed"],
                "status": s["status"],
            },
            "config": json.dumps(rest, sort_keys=True),
        }
    return out


def _ci(diffs: list[float]) -> str:
    m, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    h = stats.t.ppf(0.975, len(diffs) - 1) * sd / math.sqrt(len(diffs))
    return f"{m:+.2f} ± {sd:.2f} [{m - h:+.2f}, {m + h:+.2f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("seed_dirs", nargs="+", help="SEED=SWEEP_DIR")
    ap.add_argument("--csv", type=Path, required=True)
    ap.add_argument("--ref", action="append", default=[], help="label of a paired-difference reference")
    ap.add_argument("--uncompressed", default="fp32", help="label left out of the method statistics")
    args = ap.parse_args()
    by_seed = {int(k): _runs(int(k), Path(v)) for k, v in (a.split("=", 1) for a in args.seed_dirs)}
    seeds = sorted(by_seed)
    labels = [lab for lab in by_seed[seeds[0]] if all(lab in by_seed[s] for s in seeds)]
    configs = {by_seed[s][lab]["config"] for s in seeds for lab in labels}
    if len(configs) != 1:
        raise SystemExit("runs differ in more than seed and compression")
    rows = [by_seed[s][lab]["row"] for s in seeds for lab in labels]
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    with args.csv.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)

    acc = {lab: [100 * by_seed[s][lab]["row"]["final_accuracy"] for s in seeds] for lab in labels}
    comp = [lab for lab in labels if lab != args.uncompressed]
    refs = [r for r in args.ref if r in acc]
    head = "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std |"
    head += "".join(f" − {r}: mean ± std [95% CI] |" for r in refs)
    print(head + "\n|---|" + "---:|" * (len(seeds) + 1 + len(refs)))
    for lab in labels:
        a = acc[lab]
        cells = [f"{x:.2f}" for x in a] + [f"{statistics.fmean(a):.2f} ± {statistics.stdev(a):.2f}"]
        for r in refs:
            cells.append(
                "-" if lab in (r, args.uncompressed) else _ci([x - y for x, y in zip(a, acc[r], strict=True)])
            )
        print(f"| {lab} | " + " | ".join(cells) + " |")

    y = np.array([acc[lab] for lab in comp])
    means, sds = y.mean(1), y.std(1, ddof=1)
    pooled = math.sqrt(float((sds**2).mean()))
    f1, p1 = stats.f_oneway(*y)
    g = y.mean()
    a_, b_ = y.shape
    ss_m = b_ * ((means - g) ** 2).sum()
    ss_s = a_ * ((y.mean(0) - g) ** 2).sum()
    ss_e = ((y - g) ** 2).sum() - ss_m - ss_s
    df_m, df_s, df_e = a_ - 1, b_ - 1, (a_ - 1) * (b_ - 1)
    f_m, f_s = (ss_m / df_m) / (ss_e / df_e), (ss_s / df_s) / (ss_e / df_e)
    print(f"\ncompressed methods: {a_}, seeds: {b_}")
    print(
        f"between methods: means {means.min():.2f}-{means.max():.2f} (range {np.ptp(means):.2f}), "
        f"std of means {means.std(ddof=1):.2f} "
        f"(no-effect expectation pooled/sqrt(n) = {pooled / math.sqrt(b_):.2f})"
    )
    print(f"within methods: std {sds.min():.2f}-{sds.max():.2f}, pooled {pooled:.2f}")
    print(f"one-way ANOVA (unpaired): F({df_m},{a_ * (b_ - 1)}) = {f1:.2f}, p = {p1:.3f}")
    print(
        f"two-way ANOVA (seed as block): method F({df_m},{df_e}) = {f_m:.1f}, "
        f"p = {stats.f.sf(f_m, df_m, df_e):.1e}; "
        f"seed F({df_s},{df_e}) = {f_s:.0f}, p = {stats.f.sf(f_s, df_s, df_e):.1e}; "
        f"residual std {math.sqrt(ss_e / df_e):.3f}; seed means " + ", ".join(f"{m:.2f}" for m in y.mean(0))
    )
    hsd = stats.studentized_range.ppf(0.95, a_, df_e) * math.sqrt(ss_e / df_e / b_)
    print(
        f"Tukey HSD (5%, all {a_ * (a_ - 1) // 2} pairs, two-way residual): {hsd:.2f}; "
        "pairs of means further apart:"
    )
    for i, j in ((i, j) for i in range(a_) for j in range(a_) if means[i] - means[j] > hsd):
        print(f"  {comp[i]} > {comp[j]} by {means[i] - means[j]:.2f}")
    for i, s in enumerate(seeds):
        order = sorted(comp, key=lambda lab: -acc[lab][i])
        print(f"seed {s} order: " + ", ".join(f"{lab} {acc[lab][i]:.2f}" for lab in order))


if __name__ == "__main__":
    main()
