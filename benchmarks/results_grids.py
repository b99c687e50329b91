"""The two MNIST results grids of docs/results: FedComLoc vs Scaffnew/FedAvg/EF21 over Dirichlet
alpha, and Byzantine robustness of every aggregator, with and without uplink compression.

Commands::

    # (re)write the sweep files from the grids defined below (examples/*_sweep.toml)
    .venv/bin/python benchmarks/results_grids.py write-sweeps

    # run a sweep one variant at a time, one JSON line per run (stdout and OUT/results.jsonl);
    # finished variants are skipped, a killed one is restarted, so the command can be re-run
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/results_grids.py run \
        examples/mnist_fedcomloc_alpha_sweep.toml --out /tmp/fedcomloc --set data.data_dir=/path/to/data

    # tables (Markdown + JSON + CSV) from the run directories
    .venv/bin/python benchmarks/results_grids.py table fedcomloc /tmp/fedcomloc --prefix docs/results/x

The sweep files also run with the library's own runner (``fedsqueeze sweep FILE``), which writes
per-run plots and a combined comparison table; this script only differs in skipping finished runs,
writing no per-run plots, and printing machine-readable lines.

A JSON line (``run``) holds: ``label``, ``status`` (``completed`` / ``diverged``), ``rounds``
(communication rounds completed), ``final_accuracy`` (last evaluated test accuracy; for a diverged
run the last *finite* evaluation before it diverged), ``best_accuracy``, ``uplink_mb`` /
``downlink_mb`` (measured payload bytes summed over all clients and rounds, 1 MB = 1e6 bytes),
``local_steps_per_client`` (SGD steps, or EF21 gradient evaluations, per client over the run),
``h_sum_norm`` (Scaffnew/FedComLoc: final ``||sum_i w_i h_i||``), ``diverged_round``,
``rejected_updates`` (non-finite client updates the loop rejected) and ``first_rejection_round``,
``wall_time_s``, and the config fields the tables group by.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from fedsqueeze.errors import ConfigError
from fedsqueeze.experiment.config import apply_overrides, config_from_dict
from fedsqueeze.experiment.run import RunDiverged, run
from fedsqueeze.experiment.sweep import _slug, load_sweep

ROOT = Path(__file__).resolve().parents[1]
FEDCOMLOC_SWEEP = ROOT / "examples" / "mnist_fedcomloc_alpha_sweep.toml"
ROBUSTNESS_SWEEP = ROOT / "examples" / "mnist_robustness_sweep.toml"

# ------------------------------------------------------------------------------------------ grids
ALPHAS = (0.1, 0.3, 1.0)
P = 0.2  # Scaffnew/FedComLoc communication probability: E[K] = 5 local steps per round
CODECS = {"topk10%": "topk:10%", "uniform8": "uniform:8", "uniform4": "uniform:4"}
EF21_OPTIONS = {"stepsize": 0.5, "gradient": "minibatch"}  # gamma = 5 x lr, batch = 5 x 64 (see doc)
EF21_BATCH = 320


def fedcomloc_variants() -> list[tuple[str, dict[str, Any]]]:
    """(label, overrides) of Table 1: alpha x method x compressor."""
    out: list[tuple[str, dict[str, Any]]] = []
    for a in ALPHAS:
        pre = f"a{a}"
        base: dict[str, Any] = {"data.alpha": a}
        out.append((f"{pre}/fedavg/fp32", dict(base)))
        out.append(
            (f"{pre}/scaffnew/fp32", {**base, "algorithm.name": "scaffnew", "algorithm.options": {"p": P}})
        )
        for tag, spec in CODECS.items():
            out.append(
                (
                    f"{pre}/fedcomloc-com/{tag}",
                    {
                        **base,
                        "algorithm.name": "fedcomloc",
                        "algorithm.options": {"p": P, "variant": "com", "compress": "model"},
                        "compression.uplink": spec,
                    },
                )
            )
        for tag, spec in CODECS.items():
            out.append(
                (
                    f"{pre}/fedcomloc-local/{tag}",
                    {
                        **base,
                        "algorithm.name": "fedcomloc",
                        "algorithm.options": {"p": P, "variant": "local", "local_codec": spec},
                    },
                )
            )
        for tag, spec in CODECS.items():
            out.append(
                (
                    f"{pre}/fedcomloc-global/{tag}",
                    {
                        **base,
                        "algorithm.name": "fedcomloc",
                        "algorithm.options": {"p": P, "variant": "global", "compress": "model"},
                        "compression.downlink": spec,
                        "compression.downlink_mode": "model",
                    },
                )
            )
        # the same Top-K 10% on model *differences* (compress = "delta"), to separate the effect of
        # sparsifying the model itself from that of compressing the message
        out.append(
            (
                f"{pre}/fedcomloc-com-delta/topk10%",
                {
                    **base,
                    "algorithm.name": "fedcomloc",
                    "algorithm.options": {"p": P, "variant": "com", "compress": "delta"},
                    "compression.uplink": "topk:10%",
                },
            )
        )
        out.append(
            (
                f"{pre}/fedcomloc-global-delta/topk10%",
                {
                    **base,
                    "algorithm.name": "fedcomloc",
                    "algorithm.options": {"p": P, "variant": "global", "compress": "delta"},
                    "compression.downlink": "topk:10%",
                    "compression.downlink_mode": "delta",
                },
            )
        )
        out.append(
            (
                f"{pre}/ef21/topk10%",
                {
                    **base,
                    "algorithm.name": "ef21",
                    "algorithm.options": dict(EF21_OPTIONS),
                    "compression.uplink": "topk:10%",
                    "clients.batch_size": EF21_BATCH,
                },
            )
        )
    return out


NUM_CLIENTS_T2 = 10
AGGREGATORS: dict[str, dict[str, Any]] = {
    "mean": {},
    "median": {},
    "trimmed_mean": {},  # beta unset: trims f = num_byzantine per side
    "krum": {},
    "multi_krum": {},  # m unset: averages the n - f best-scored updates
    "centered_clipping": {"tau": 0.5},  # ~ honest ||x_i - mean|| in a pilot (0.3-0.6)
    "clipped_differences": {},  # inner median, clip_multiplier 1
    "bucketing": {},  # inner median, bucket_size 2
}
ATTACKS = ("sign_flip", "scaled", "gaussian", "label_flip")
EXTRA_ATTACKS = ("alie",)
FRACTIONS = (0.1, 0.2)
COMPRESSION = {
    "fp32": {"compression.uplink": "fp32", "compression.uplink_ef": "none"},
    "topk1%>u4+ef14": {"compression.uplink": "topk:1% > uniform:4", "compression.uplink_ef": "ef14"},
}


def _f(agg: str, fraction: float) -> int:
    """num_byzantine the defence is configured for: the true count (mean only tolerates 0)."""
    return 0 if agg == "mean" else math.floor(fraction * NUM_CLIENTS_T2 + 1e-9)


def robustness_variants() -> list[tuple[str, dict[str, Any]]]:
    """(label, overrides) of Table 2: compression x aggregator x (no attack | attack x fraction)."""
    out: list[tuple[str, dict[str, Any]]] = []
    for attacks in (ATTACKS, EXTRA_ATTACKS):
        for comp, comp_set in COMPRESSION.items():
            for agg, opts in AGGREGATORS.items():
                base = {**comp_set, "algorithm.aggregator": agg, "algorithm.aggregator_options": dict(opts)}
                if attacks is ATTACKS:  # no-attack references, with the f the defence uses below
                    fs = sorted({_f(agg, fr) for fr in FRACTIONS})
                    for f in fs:
                        out.append(
                            (
                                f"{comp}/{agg}/none/f{f}",
                                {
                                    **base,
                                    "algorithm.num_byzantine": f,
                                    "attack.name": "none",
                                    "attack.fraction": 0.0,
                                },
                            )
                        )
                for atk in attacks:
                    for fr in FRACTIONS:
                        out.append(
                            (
                                f"{comp}/{agg}/{atk}/{round(fr * 100)}%",
                                {
                                    **base,
                                    "algorithm.num_byzantine": _f(agg, fr),
                                    "attack.name": atk,
                                    "attack.fraction": fr,
                                },
                            )
                        )
    return out


# ------------------------------------------------------------------------------------------ TOML
def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }" if v else "{}"
    raise TypeError(f"cannot write {v!r} as TOML")


def sweep_text(header: str, base: str, variants: list[tuple[str, dict[str, Any]]], baseline: str) -> str:
    lines = [header.rstrip(), f'base = "{base}"', f'baseline = "{baseline}"', ""]
    for label, sets in variants:
        body = ", ".join(f'"{k}" = {_toml_value(v)}' for k, v in sets.items())
        lines += ["[[variant]]", f'label = "{label}"', f"set = {{ {body} }}", ""]
    return "\n".join(lines)


FEDCOMLOC_HEADER = """\
# Table 1 of docs/results/mnist_fedcomloc.md: FedAvg, Scaffnew, FedComLoc-Com/-Local/-Global
# (Top-K 10%, uniform 8-bit, uniform 4-bit) and EF21 (Top-K 10%) for Dirichlet alpha in {0.1, 0.3, 1.0}.
# GENERATED by `benchmarks/results_grids.py write-sweeps` (edit the grid there). 42 runs, about 15 min
# of one CPU thread (14 min measured; the FedComLoc-Local rows are ~40-80 s each):
#   OMP_NUM_THREADS=1 fedsqueeze sweep examples/mnist_fedcomloc_alpha_sweep.toml \\
#       --set data.data_dir=/path/to/data --out /tmp/fedcomloc
# or, resumable with JSON lines:  python benchmarks/results_grids.py run <this file> --out ... --set ...
# Labels: a<alpha>/<method>/<compressor>. "-delta" rows compress model differences instead of models.
"""

ROBUSTNESS_HEADER = """\
# Table 2 of docs/results/mnist_robustness.md: every aggregator under sign_flip, scaled, gaussian,
# label_flip (and alie, last) with 10% / 20% Byzantine clients (1 / 2 of 10, all sampled every round),
# uplink fp32 or Top-1% > 4-bit with EF14, plus the no-attack reference of each aggregator at the
# num_byzantine it is configured with. GENERATED by `benchmarks/results_grids.py write-sweeps`.
# 190 runs, about 12 min of one CPU thread (measured):
#   OMP_NUM_THREADS=1 fedsqueeze sweep examples/mnist_robustness_sweep.toml \\
#       --set data.data_dir=/path/to/data --out /tmp/robustness
# Labels: <uplink>/<aggregator>/<attack>/<fraction, or f<num_byzantine> for the no-attack runs>.
"""


def write_sweeps() -> list[Path]:
    FEDCOMLOC_SWEEP.write_text(
        sweep_text(FEDCOMLOC_HEADER, "mnist_fedcomloc_base.toml", fedcomloc_variants(), "a0.3/scaffnew/fp32")
    )
    ROBUSTNESS_SWEEP.write_text(
        sweep_text(
            ROBUSTNESS_HEADER, "mnist_robustness_base.toml", robustness_variants(), "fp32/mean/none/f0"
        )
    )
    return [FEDCOMLOC_SWEEP, ROBUSTNESS_SWEEP]


# ------------------------------------------------------------------------------------------ run
def row_from_dir(run_dir: Path, label: str) -> dict[str, Any]:
    """The JSON line of one finished (or diverged) run directory (see module docstring)."""
    cfg = json.loads((run_dir / "config.json").read_text())["config"]
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    finite = [
        m["test_accuracy"]
        for m in metrics
        if m.get("test_accuracy") is not None
        and m.get("test_loss") is not None
        and math.isfinite(m["test_loss"])
    ]
    last = metrics[-1] if metrics else {}
    n = cfg["data"]["num_clients"]
    diverged = summary["status"] == "diverged"
    return {
        "label": label,
        "status": summary["status"],
        "rounds": summary["rounds_completed"],
        "final_accuracy": finite[-1] if finite else None,
        "best_accuracy": max(finite) if finite else None,
        "uplink_mb": summary["total_uplink_bytes"] / 1e6,
        "downlink_mb": summary["total_downlink_bytes"] / 1e6,
        "local_steps_per_client": summary["local_steps"] / n,
        "h_sum_norm": last.get("h_weighted_sum_norm"),
        "diverged_round": summary["rounds_completed"] if diverged else None,
        "rejected_updates": summary["rejected_updates"],
        "first_rejection_round": next((m["round"] for m in metrics if m.get("rejected_updates")), None),
        "wall_time_s": summary["wall_time_s"],
        "model_params": summary["model_params"],
        "alpha": cfg["data"]["alpha"],
        "num_clients": n,
        "algorithm": cfg["algorithm"]["name"],
        "algorithm_options": cfg["algorithm"]["options"],
        "aggregator": cfg["algorithm"]["aggregator"],
        "num_byzantine": cfg["algorithm"]["num_byzantine"],
        "attack": cfg["attack"]["name"],
        "attack_fraction": cfg["attack"]["fraction"],
        "uplink": cfg["compression"]["uplink"],
        "uplink_ef": cfg["compression"]["uplink_ef"],
        "downlink": cfg["compression"]["downlink"],
        "downlink_mode": cfg["compression"]["downlink_mode"],
        "dir": str(run_dir),
    }


def run_grid(sweep: Path, out: Path, overrides: list[str], only: str | None) -> int:
    spec = load_sweep(sweep)
    base = apply_overrides(spec.base, overrides)
    todo = []
    for v in spec.variants:
        if only is not None and not re.search(only, v.label):
            continue
        raw = apply_overrides(base, v.overrides)
        raw["name"] = v.label
        todo.append((v.label, config_from_dict(raw)))  # every variant validated before any run
    out.mkdir(parents=True, exist_ok=True)
    with (out / "results.jsonl").open("a") as log:
        for label, cfg in todo:
            d = out / _slug(label)
            if not (d / "summary.json").is_file():
                if d.exists():  # killed mid-run: start it again
                    shutil.rmtree(d)
                t0 = time.perf_counter()
                with contextlib.suppress(RunDiverged):  # a diverged run keeps its outputs
                    run(cfg, d, plots=False)
                print(f"# {label}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
            line = json.dumps(row_from_dir(d, label))
            print(line, flush=True)
            log.write(line + "\n")
            log.flush()
    return 0


# ------------------------------------------------------------------------------------------ tables
def _rows(out: Path, labels: list[str]) -> dict[str, dict[str, Any]]:
    rows = {}
    for label in labels:
        d = out / _slug(label)
        if (d / "summary.json").is_file():
            rows[label] = row_from_dir(d, label)
    return rows


def _acc(x: float | None) -> str:
    return "–" if x is None else f"{x:.4f}"


METHOD_NAMES = {
    "fedavg": "FedAvg",
    "scaffnew": "Scaffnew",
    "fedcomloc-com": "FedComLoc-Com",
    "fedcomloc-local": "FedComLoc-Local",
    "fedcomloc-global": "FedComLoc-Global",
    "fedcomloc-com-delta": "FedComLoc-Com (Δ)",
    "fedcomloc-global-delta": "FedComLoc-Global (Δ)",
    "ef21": "EF21",
}
CODEC_NAMES = {
    "fp32": "none (fp32)",
    "topk10%": "Top-K 10%",
    "uniform8": "uniform 8-bit",
    "uniform4": "uniform 4-bit",
}


def fedcomloc_table(out: Path) -> tuple[str, list[dict[str, Any]]]:
    labels = [lab for lab, _ in fedcomloc_variants()]
    rows = _rows(out, labels)
    md: list[str] = []
    flat: list[dict[str, Any]] = []
    for a in ALPHAS:
        ref = rows.get(f"a{a}/scaffnew/fp32")
        md += [
            f"**Dirichlet α = {a}**",
            "",
            "| method | compressor | final acc | best acc | uplink MB | downlink MB | comm. rounds "
            "| local steps / client | up+down per round vs Scaffnew | note |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for label in labels:
            if not label.startswith(f"a{a}/"):
                continue
            _, method, codec = label.split("/")
            r = rows.get(label)
            if r is None:
                md.append(f"| {METHOD_NAMES[method]} | {CODEC_NAMES[codec]} | pending | | | | | | | |")
                continue
            rel = ""  # bytes per communication round (fair to runs that stopped early)
            if ref is not None and r["rounds"]:
                per_round = (r["uplink_mb"] + r["downlink_mb"]) / r["rounds"]
                ref_round = (ref["uplink_mb"] + ref["downlink_mb"]) / ref["rounds"]
                rel = f"{100 * (per_round / ref_round - 1):+.0f}%"
            notes = []
            if r["status"] == "diverged":
                notes.append(f"diverged at round {r['diverged_round']} (acc = last finite eval)")
            if r["status"] != "diverged" and r["rejected_updates"]:
                notes.append(
                    f"{r['rejected_updates']} non-finite client updates rejected from round "
                    f"{r['first_rejection_round']} on"
                )
            if r["h_sum_norm"] is not None and r["h_sum_norm"] > 1e-3:
                notes.append(f"‖Σ w_i h_i‖ = {r['h_sum_norm']:.3g}")
            if method == "ef21":
                notes.append("1 gradient of B=320 per round")
            md.append(
                f"| {METHOD_NAMES[method]} | {CODEC_NAMES[codec]} | {_acc(r['final_accuracy'])} "
                f"| {_acc(r['best_accuracy'])} | {r['uplink_mb']:.1f} | {r['downlink_mb']:.1f} "
                f"| {r['rounds']} | {r['local_steps_per_client']:.0f} | {rel} | {'; '.join(notes)} |"
            )
            flat.append({"method": method, "compressor": codec, **r})
        md.append("")
    return "\n".join(md), flat


ATTACK_COLS = [("none", None)] + [(a, fr) for a in ATTACKS + EXTRA_ATTACKS for fr in FRACTIONS]


def robustness_table(out: Path) -> tuple[str, list[dict[str, Any]]]:
    labels = [lab for lab, _ in robustness_variants()]
    rows = _rows(out, labels)
    md: list[str] = []
    flat: list[dict[str, Any]] = []
    present = [c for c in ATTACK_COLS if c[0] == "none" or any(f"/{c[0]}/" in k for k in rows)]
    for comp in COMPRESSION:
        head = ["aggregator", "no attack (f=1 / f=2)"] + [f"{a} {round(fr * 100)}%" for a, fr in present[1:]]
        md += [
            f"**uplink {comp}** (final test accuracy after 30 rounds; f = num_byzantine)",
            "",
            "| " + " | ".join(head) + " |",
            "| --- | " + " | ".join("---:" for _ in head[1:]) + " |",
        ]
        for agg in AGGREGATORS:
            cells = []
            refs = [rows.get(f"{comp}/{agg}/none/f{f}") for f in sorted({_f(agg, fr) for fr in FRACTIONS})]
            cells.append(" / ".join(_cell(r) for r in refs))
            for atk, fr in present[1:]:
                cells.append(_cell(rows.get(f"{comp}/{agg}/{atk}/{round(fr * 100)}%")))
            md.append(f"| {agg} | " + " | ".join(cells) + " |")
        md.append("")
    for label, r in rows.items():
        flat.append({"uplink_setting": label.split("/")[0], **r})
    return "\n".join(md), flat


def _cell(r: dict[str, Any] | None) -> str:
    if r is None:
        return "pending"
    if r["status"] == "diverged":
        return f"div@{r['diverged_round']}"
    return f"{r['final_accuracy']:.3f}"


def write_table(kind: str, out: Path, prefix: Path) -> None:
    md, flat = fedcomloc_table(out) if kind == "fedcomloc" else robustness_table(out)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    Path(str(prefix) + "_table.md").write_text(md)
    drop = ("dir", "model_params", "num_clients", "wall_time_s", "first_rejection_round")
    keep = [k for k in flat[0] if k not in drop] if flat else []
    body = ",\n".join(json.dumps({k: r[k] for k in keep}, separators=(",", ":")) for r in flat)
    Path(str(prefix) + ".json").write_text("[\n" + body + "\n]\n")  # one run per line
    with Path(str(prefix) + ".csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keep, extrasaction="ignore")
        w.writeheader()
        for r in flat:
            w.writerow({k: json.dumps(v) if isinstance(v, dict) else v for k, v in r.items()})
    print(md)


PLOT_LABELS = (
    "fedavg/fp32",
    "scaffnew/fp32",
    "fedcomloc-com/uniform8",
    "fedcomloc-com-delta/topk10%",
    "fedcomloc-local/topk10%",
    "fedcomloc-global-delta/topk10%",
    "ef21/topk10%",
)


def plot_fedcomloc(out: Path, path: Path, alpha: float = 0.3) -> Path:
    """Test accuracy vs cumulative uplink MB (log x) of the rows that completed, at one alpha."""
    from fedsqueeze.reports import load_run, plot_comparison

    runs = [
        load_run(out / _slug(f"a{alpha}/{lab}"), label=lab)
        for lab in PLOT_LABELS
        if (out / _slug(f"a{alpha}/{lab}") / "summary.json").is_file()
    ]
    return plot_comparison(
        runs, path, x="cum_uplink_mb", log_x=True, title=f"MNIST MLP, 10 clients, Dirichlet α = {alpha}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("write-sweeps", help="rewrite examples/mnist_{fedcomloc_alpha,robustness}_sweep.toml")
    r = sub.add_parser("run", help="run a sweep file variant by variant (JSON lines)")
    r.add_argument("sweep", type=Path)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    r.add_argument("--only", default=None, help="regex on the variant label")
    t = sub.add_parser("table", help="Markdown/JSON/CSV tables from run directories")
    t.add_argument("kind", choices=("fedcomloc", "robustness"))
    t.add_argument("out", type=Path)
    t.add_argument(
        "--prefix", type=Path, required=True, help="writes PREFIX_table.md, PREFIX.json, PREFIX.csv"
    )
    t.add_argument("--plot", type=Path, default=None, help="fedcomloc: accuracy vs uplink MB plot (PNG)")
    a = p.parse_args(argv)
    try:
        if a.cmd == "write-sweeps":
            for path in write_sweeps():
                print(path)
            return 0
        if a.cmd == "run":
            return run_grid(a.sweep, a.out, a.overrides, a.only)
        write_table(a.kind, a.out, a.prefix)
        if a.plot is not None and a.kind == "fedcomloc":
            print(plot_fedcomloc(a.out, a.plot))
        return 0
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
