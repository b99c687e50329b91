"""CLI: run, sweep, report, describe on the built-in digits data (fast settings)."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from fedsqueeze.cli.main import app

runner = CliRunner()
FAST = [
    "--set",
    "rounds=3",
    "--set",
    "data.num_clients=6",
    "--set",
    "clients.per_round=2",
    "--set",
    "model.options={hidden = [16]}",
]


def test_run_writes_a_run_directory(tmp_path: Path) -> None:
    out = tmp_path / "r"
    res = runner.invoke(app, ["run", *FAST, "--out", str(out), "--format", "json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout[res.stdout.index("{") :])
    assert summary["rounds_completed"] == 3 and summary["status"] == "completed"
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3


def test_run_bad_key_is_one_line_exit_2(tmp_path: Path) -> None:
    res = runner.invoke(app, ["run", "--set", "clients.lrr=0.1", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2
    assert "did you mean 'clients.lr'" in res.stderr
    assert "Traceback" not in res.output


def test_run_more_clients_per_round_than_exist(tmp_path: Path) -> None:
    res = runner.invoke(app, ["run", "--set", "clients.per_round=50", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "more clients per round than exist" in res.stderr


def test_sweep_over_a_key_prints_the_table(tmp_path: Path) -> None:
    res = runner.invoke(
        app,
        [
            "sweep",
            *FAST,
            "--key",
            "compression.uplink",
            "--value",
            "fp32",
            "--value",
            "uniform:4",
            "--target",
            "0",
            "--out",
            str(tmp_path / "s"),
            "--format",
            "json",
        ],
    )
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout[res.stdout.index("[") :])
    assert [r["label"] for r in rows] == ["fp32", "uniform:4"]
    fp32, q4 = rows
    assert fp32["reduction_vs_baseline"] == 1.0
    assert 6 < q4["reduction_vs_baseline"] < 8.1  # 4-bit vs 32-bit, headers and scales included
    assert (tmp_path / "s" / "compare_cum_uplink_mb.png").exists()


def test_sweep_file_and_report(tmp_path: Path) -> None:
    base = tmp_path / "base.toml"
    base.write_text(
        'name = "b"\nrounds = 2\n[data]\nnum_clients = 4\n[clients]\nper_round = 2\n'
        "[model]\noptions = { hidden = [8] }\n"
    )
    sweep = tmp_path / "sweep.toml"
    sweep.write_text(
        'base = "base.toml"\nbaseline = "a"\n[[variant]]\nlabel = "a"\n'
        'set = { "compression.uplink" = "fp16" }\n[[variant]]\nlabel = "b b"\n'
        'set = { "compression.uplink" = "topk:10%", "compression.uplink_ef" = "ef21" }\n'
    )
    res = runner.invoke(app, ["sweep", str(sweep), "--out", str(tmp_path / "o"), "--format", "markdown"])
    assert res.exit_code == 0, res.output
    assert "| a |" in res.stdout and "| b b |" in res.stdout
    rep = runner.invoke(
        app, ["report", str(tmp_path / "o" / "a"), str(tmp_path / "o" / "b_b"), "--format", "json"]
    )
    assert rep.exit_code == 0, rep.output
    assert len(json.loads(rep.stdout)) == 2


def test_sweep_file_errors(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep.toml"
    sweep.write_text('config = { rounds = 2 }\n[[variant]]\nlabel = "a"\nsett = {}\n')
    res = runner.invoke(app, ["sweep", str(sweep), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "unknown key" in res.stderr


def test_describe_digits() -> None:
    res = runner.invoke(
        app,
        [
            "describe",
            "digits",
            "--partition",
            "dirichlet",
            "--alpha",
            "0.1",
            "--num-clients",
            "5",
            "--format",
            "json",
        ],
    )
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert sum(d["sizes"]) == 1438 and len(d["sizes"]) == 5  # 80% of the 1,797 digits
