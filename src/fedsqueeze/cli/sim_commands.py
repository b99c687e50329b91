"""Simulation commands: ``run``, ``sweep``, ``describe``, ``report`` (thin over the library)."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedsqueeze.cli.main import _err, _out, _print_json, _user_errors, app
from fedsqueeze.errors import ConfigError


class ReportFormat(str, Enum):
    table = "table"
    json = "json"
    markdown = "markdown"


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("acc {task.fields[acc]}  up {task.fields[up]} MB  down {task.fields[down]} MB"),
        TimeElapsedColumn(),
        console=_err(),
        transient=False,
    )


def _fields(rec: dict[str, Any]) -> dict[str, str]:
    acc = rec.get("test_accuracy")
    return {
        "acc": "  -  " if acc is None else f"{acc:.4f}",
        "up": f"{rec['cum_uplink_bytes'] / 1e6:.3f}",
        "down": f"{rec['cum_downlink_bytes'] / 1e6:.3f}",
    }


@app.command("run")
def run_cmd(
    config: Annotated[
        Path | None, typer.Argument(help="Run config (TOML/YAML); built-in defaults if omitted.")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a key: --set clients.lr=0.05")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Run directory (default runs/<name>).")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue a killed run from its last checkpoint.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
    fmt: Annotated[ReportFormat, typer.Option("--format", help="Summary output.")] = ReportFormat.table,
) -> None:
    """Run one federated experiment; writes config.json, metrics.jsonl, summary.json and plots."""
    from fedsqueeze.experiment import load_config, run

    with _user_errors():
        cfg = load_config(config, set_ or [])
        out_dir = out or Path("runs") / cfg.name
        with _progress() as prog:
            task = prog.add_task(cfg.name, total=cfg.rounds, acc="  -  ", up="0", down="0")
            if resume:
                done = (
                    sum(1 for _ in (out_dir / "metrics.jsonl").open())
                    if (out_dir / "metrics.jsonl").exists()
                    else 0
                )
                prog.update(task, completed=min(done, cfg.rounds))

            def cb(rec: dict[str, Any]) -> None:
                f = _fields(rec)
                prog.update(task, completed=rec["round"], acc=f["acc"], up=f["up"], down=f["down"])

            result = run(cfg, out_dir, resume=resume, progress=None if quiet else cb)
        if fmt == ReportFormat.json:
            _print_json(result.summary)
        else:
            s = result.summary
            acc = s["final_test_accuracy"]
            _out().print(
                f"[bold]{cfg.name}[/]: {s['rounds_completed']} rounds, final accuracy "
                f"{'n/a' if acc is None else f'{acc:.4f}'}, uplink {s['total_uplink_bytes'] / 1e6:.3f} MB, "
                f"downlink {s['total_downlink_bytes'] / 1e6:.3f} MB, "
                f"modelled time {s['modelled_time_s']:.1f} s -> {out_dir}"
            )


@app.command("sweep")
def sweep_cmd(
    spec: Annotated[
        Path | None, typer.Argument(help="Sweep file or run config; the built-in quickstart if omitted.")
    ] = None,
    key: Annotated[
        str | None, typer.Option("--key", help="Sweep this dotted key (with --value ...).")
    ] = None,
    value: Annotated[list[str] | None, typer.Option("--value", help="A value of --key (repeat).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a key in every run.")] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Sweep directory (default runs/sweep-<name>).")
    ] = None,
    target: Annotated[
        float | None, typer.Option("--target", help="Target test accuracy for the table.")
    ] = None,
    baseline: Annotated[
        str | None, typer.Option("--baseline", help="Label of the reference variant.")
    ] = None,
    fmt: Annotated[ReportFormat, typer.Option("--format", help="Table output.")] = ReportFormat.table,
) -> None:
    """Run one config under several variants and print the comparison table (+ combined plots)."""
    from fedsqueeze.experiment.sweep import (
        QUICKSTART_FILE,
        SweepSpec,
        load_sweep,
        run_sweep,
        variants_from_key,
    )
    from fedsqueeze.reports import render_table

    with _user_errors():
        sweep = load_sweep(QUICKSTART_FILE if spec is None else spec)
        if key is not None:
            if not value:
                raise ConfigError("--key needs at least one --value")
            sweep = SweepSpec(sweep.base, variants_from_key(key, value), sweep.target_accuracy, value[0])
        elif value:
            raise ConfigError("--value needs --key")
        if target is not None:
            sweep.target_accuracy = target
        if baseline is not None:
            sweep.baseline = baseline
        name = str(sweep.base.get("name", "sweep"))
        out_dir = out or Path("runs") / f"sweep-{name}"
        with _progress() as prog:
            tasks: dict[str, Any] = {}

            def on_start(label: str, rounds: int) -> None:
                tasks[label] = prog.add_task(label, total=rounds, acc="  -  ", up="0", down="0")

            def cb(label: str, rec: dict[str, Any]) -> None:
                f = _fields(rec)
                prog.update(tasks[label], completed=rec["round"], acc=f["acc"], up=f["up"], down=f["down"])

            result = run_sweep(sweep, out_dir, overrides=set_ or [], progress=cb, on_start=on_start)
        if fmt == ReportFormat.json:
            _print_json(result.rows)
        else:
            typer.echo(render_table(result.rows, fmt=fmt.value))
            if fmt == ReportFormat.table:
                _err().print(f"runs and plots in {out_dir} ({', '.join(p.name for p in result.plots)})")


@app.command("report")
def report_cmd(
    runs: Annotated[list[Path], typer.Argument(help="Run directories to compare.")],
    target: Annotated[float | None, typer.Option("--target")] = None,
    baseline: Annotated[str | None, typer.Option("--baseline")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write a combined plot (PNG) here.")] = None,
    fmt: Annotated[ReportFormat, typer.Option("--format")] = ReportFormat.table,
) -> None:
    """Comparison table (and optional combined plot) from existing run directories."""
    from fedsqueeze.reports import comparison_table, load_run, plot_comparison, render_table

    with _user_errors():
        records = [load_run(r) for r in runs]
        rows = comparison_table(records, target_accuracy=target, baseline=baseline)
        if plot is not None:
            plot_comparison(records, plot, x="cum_uplink_mb")
        if fmt == ReportFormat.json:
            _print_json(rows)
        else:
            typer.echo(render_table(rows, fmt=fmt.value))


@app.command("describe")
def describe_cmd(
    dataset: Annotated[
        str, typer.Argument(help="mnist, fashion_mnist, cifar10, shakespeare, digits, synthetic")
    ],
    partition: Annotated[str, typer.Option("--partition")] = "iid",
    num_clients: Annotated[int, typer.Option("--num-clients")] = 10,
    alpha: Annotated[float, typer.Option("--alpha")] = 0.5,
    shards_per_client: Annotated[int, typer.Option("--shards-per-client")] = 2,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="Default: $FEDSQUEEZE_DATA.")] = None,
    fmt: Annotated[ReportFormat, typer.Option("--format")] = ReportFormat.table,
) -> None:
    """Per-client sizes and label histograms of a partition (deterministic from --seed)."""
    from fedsqueeze.data import describe, load_dataset
    from fedsqueeze.data import partition as make_partition
    from fedsqueeze.sim.seeds import derive_seed

    with _user_errors():
        data = load_dataset(dataset, data_dir)
        labels = data.train.y.numpy()
        parts = make_partition(
            labels,
            num_clients,
            partition,
            seed=derive_seed(seed, "partition"),
            alpha=alpha,
            shards_per_client=shards_per_client,
            natural=data.natural_clients,
        )
        summary = describe(parts, labels, data.num_classes)
        if fmt == ReportFormat.json:
            typer.echo(json.dumps(summary.to_dict(), indent=2))
        else:
            _out().print(summary.render())
