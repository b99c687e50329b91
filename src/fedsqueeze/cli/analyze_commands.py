"""``fedsqueeze analyze``: per-layer kurtosis / GenNorm beta / law fits of FedAvg updates over rounds.

Thin over :func:`fedsqueeze.stats.analyze.analyze`; registers itself on ``app`` when imported.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from fedsqueeze.cli.main import _err, _out, _print_json, _user_errors, app


class AnalyzeFormat(str, Enum):
    table = "table"
    json = "json"


def _num(v: float | None, fmt: str = ".3g") -> str:
    return "-" if v is None else format(v, fmt)


def _wins(wins: dict[str, int]) -> str:
    return " ".join(f"{law}:{k}" for law, k in wins.items()) or "-"


@app.command("analyze")
def analyze_cmd(
    config: Annotated[
        Path | None, typer.Argument(help="Run config (TOML/YAML); built-in defaults if omitted.")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a key: --set clients.lr=0.05")
    ] = None,
    rounds: Annotated[
        int | None, typer.Option("--rounds", min=1, help="FedAvg rounds (default: the config's).")
    ] = None,
    clients: Annotated[
        int | None, typer.Option("--clients", min=1, help="Clients per round (default: the config's).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Output folder (default runs/analyze-<name>).")
    ] = None,
    pass_rates: Annotated[
        bool, typer.Option("--pass-rates", help="Also Spearman/KS pass rates at n=100 and 3000.")
    ] = False,
    linear_y: Annotated[
        bool, typer.Option("--linear-y", help="Linear y axis for the histograms (default log).")
    ] = False,
    no_plots: Annotated[bool, typer.Option("--no-plots", help="Write no figures.")] = False,
    fmt: Annotated[AnalyzeFormat, typer.Option("--format", help="Output.")] = AnalyzeFormat.table,
) -> None:
    """Train plain FedAvg and fit Gaussian/Laplace/GenNorm/double-Weibull laws to every layer's update
    every round; writes stats.jsonl, stats.csv, summary.json and figures, prints a per-layer table."""
    from fedsqueeze.experiment.config import load_config
    from fedsqueeze.stats.analyze import analyze

    with _user_errors():
        cfg = load_config(config, set_ or [])
        out_dir = out or Path("runs") / f"analyze-{cfg.name}"
        n_rounds = rounds or cfg.rounds

        def progress(p: dict[str, Any]) -> None:
            acc = p["test_accuracy"]
            _err().print(
                f"round {p['round']}/{p['rounds']}: "
                f"acc {'-' if acc is None else f'{acc:.4f}'}, {p['seconds']:.1f} s"
            )

        result = analyze(
            cfg,
            out_dir,
            rounds=n_rounds,
            clients=clients,
            pass_rates=pass_rates,
            log_y=not linear_y,
            plots=not no_plots,
            progress=progress,
        )
    s = result.summary
    if fmt == AnalyzeFormat.json:
        _print_json(
            {k: s[k] for k in ("rounds", "clients_per_round", "layers", "verdict", "final_test_accuracy")}
            | {"out_dir": str(out_dir), "figures": s["figures"]}
        )
        return
    table = Table(title=f"{cfg.name}: update statistics per layer ({s['rounds']} rounds, {out_dir})")
    for col in ("layer", "kind", "shape"):
        table.add_column(col)
    for col in ("rounds", "median β", "β range", "median kurtosis"):
        table.add_column(col, justify="right")
    table.add_column("best law by W2 (rounds won)")
    for row in s["layers"]:
        table.add_row(
            row["layer"],
            row["kind"],
            row["shape"],
            str(row["rounds"]) + (f" ({row['skipped']} skipped)" if row["skipped"] else ""),
            _num(row["median_beta"]),
            f"{_num(row['min_beta'])}-{_num(row['max_beta'])}",
            _num(row["median_kurtosis"]),
            _wins(row["wins_w2"]),
        )
    console = _out()
    console.print(table)
    for kind, v in s["verdict"].items():
        console.print(f"{kind}: {v['text']}")
    acc = s["final_test_accuracy"]
    if acc is not None:
        console.print(f"final test accuracy {acc:.4f}")
    if s["ignored_settings"]:
        console.print(f"ignored (analyze runs plain uncompressed FedAvg): {', '.join(s['ignored_settings'])}")
    if s["figures"]:
        console.print(f"figures: {', '.join(s['figures'])}")
