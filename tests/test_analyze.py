"""``fedsqueeze analyze``: per-layer update statistics over FedAvg rounds (digits, small MLP, fast)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import fedsqueeze.cli.analyze_commands  # noqa: F401  (registers `analyze` on app)
from fedsqueeze.cli.main import app
from fedsqueeze.errors import ConfigError
from fedsqueeze.experiment.config import load_config
from fedsqueeze.stats.analyze import (
    BETA_PNG,
    COLUMNS,
    KINDS,
    KURTOSIS_PNG,
    STATS_CSV,
    STATS_JSONL,
    SUMMARY_JSON,
    AnalysisResult,
    analyze,
    layer_record,
)

FAST = [
    "rounds=5",
    "data.num_clients=6",
    "clients.per_round=3",
    "model.options={hidden = [16]}",
]
ROUNDS = 2
runner = CliRunner()


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> AnalysisResult:
    cfg = load_config(None, FAST)
    return analyze(cfg, tmp_path_factory.mktemp("an"), rounds=ROUNDS, pass_rates=True, pass_trials=5)


def test_files_written_and_one_record_per_round_layer_kind(result: AnalysisResult) -> None:
    out = result.out_dir
    for name in (STATS_JSONL, STATS_CSV, SUMMARY_JSON, BETA_PNG, KURTOSIS_PNG):
        assert (out / name).stat().st_size > 0, name
    layers = ["1.weight", "1.bias", "3.weight", "3.bias"]
    for layer in layers:
        assert (out / f"hist_{layer}.png").stat().st_size > 0
    keys = [(r["round"], r["layer"], r["kind"]) for r in result.records]
    assert sorted(keys) == sorted((t, la, k) for t in (1, 2) for la in layers for k in KINDS)
    assert all(list(r) == list(COLUMNS) for r in result.records)
    assert len(result.figures) == len(layers) + 2


def test_values_finite_and_sensible(result: AnalysisResult) -> None:
    for r in result.records:
        assert r["skipped"] is None
        for col in ("mean", "std", "excess_kurtosis", "beta", "alpha", "c"):
            assert math.isfinite(r[col]), (col, r)
        assert r["std"] > 0 and r["alpha"] > 0 and 0.1 - 1e-9 <= r["beta"] <= 10.0 + 1e-9
        for law in ("gaussian", "laplace", "gennorm", "dweibull"):
            assert math.isfinite(r[f"w2_{law}"]) and r[f"w2_{law}"] >= 0
            assert math.isfinite(r[f"loglik_{law}"])
        assert r["best_w2"] in ("gaussian", "laplace", "gennorm", "dweibull")
        assert r["num_clients"] == (1 if r["kind"] == "client" else 3)
        assert (r["client"] is not None) == (r["kind"] == "client")
        # n=100 pass rates need 200 entries; the 16-entry bias layers have none
        assert (r["spearman_100"] is None) == (r["n"] < 200)
        assert r["spearman_3000"] is None  # no layer has 6000 entries
    pooled = [r for r in result.records if r["kind"] == "pooled"]
    assert all(
        r["n"]
        == 3 * next(q["n"] for q in result.records if q["kind"] == "client" and q["layer"] == r["layer"])
        for r in pooled
    )
    accs = [p["test_accuracy"] for p in result.summary["per_round"]]
    assert len(accs) == ROUNDS and all(0.0 <= a <= 1.0 for a in accs)


def test_csv_jsonl_summary_consistent(result: AnalysisResult) -> None:
    out = result.out_dir
    lines = [json.loads(line) for line in (out / STATS_JSONL).read_text().splitlines()]
    assert lines == result.records
    with (out / STATS_CSV).open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(lines)
    assert list(rows[0]) == list(COLUMNS)
    for row, rec in zip(rows, lines, strict=True):
        assert (int(row["round"]), row["layer"], row["kind"]) == (rec["round"], rec["layer"], rec["kind"])
        for col in ("n", "std", "excess_kurtosis", "beta", "w2_gennorm", "loglik_laplace"):
            assert float(row[col]) == pytest.approx(rec[col], rel=1e-12)
        assert row["best_w2"] == rec["best_w2"]
        assert row["skipped"] == "" and rec["skipped"] is None
    summary = json.loads((out / SUMMARY_JSON).read_text())
    assert summary["rounds"] == ROUNDS and summary["clients_per_round"] == 3
    for kind in KINDS:
        cells = [r for r in lines if r["kind"] == kind]
        v = summary["verdict"][kind]
        assert v["cells"] == len(cells)
        assert v["beta_below_2"] == sum(r["beta"] < 2 for r in cells)
        assert f"β < 2 in {v['beta_below_2']} of {len(cells)} (layer, round) cells" in v["text"]
    for row in summary["layers"]:
        mine = [r for r in lines if r["layer"] == row["layer"] and r["kind"] == row["kind"]]
        assert row["rounds"] == len(mine) == ROUNDS
        assert row["median_beta"] == pytest.approx(float(np.median([r["beta"] for r in mine])))
        assert sum(row["wins_w2"].values()) == ROUNDS


def test_synthetic_laplace_layer_has_beta_near_one() -> None:
    x = torch.from_numpy(np.random.default_rng(1).laplace(0.0, 1e-3, size=50_000)).float()
    rec, fit = layer_record(x, pass_rates=True, pass_trials=10)
    assert fit is not None and rec["skipped"] is None
    assert rec["beta"] == pytest.approx(1.0, abs=0.05)
    assert rec["alpha"] == pytest.approx(1e-3, rel=0.05)
    assert rec["excess_kurtosis"] == pytest.approx(3.0, abs=0.5)
    assert rec["best_loglik"] in ("laplace", "gennorm", "dweibull")  # dweibull with c = 1 is Laplace
    assert rec["w2_laplace"] < rec["w2_gaussian"]
    assert rec["spearman_100"] is not None and rec["ks_3000"] is not None
    g = torch.from_numpy(np.random.default_rng(2).normal(size=50_000))
    assert layer_record(g)[0]["beta"] == pytest.approx(2.0, abs=0.1)


def test_tiny_and_constant_layers_are_skipped_with_a_reason() -> None:
    rec, fit = layer_record(torch.zeros(7))
    assert fit is None and rec["skipped"].startswith("constant layer") and rec["beta"] is None
    rec, fit = layer_record(torch.ones(1))
    assert fit is None and "fewer than 2 entries" in rec["skipped"] and rec["n"] == 1


def test_bad_arguments_raise_config_error(tmp_path: Path) -> None:
    cfg = load_config(None, FAST)
    with pytest.raises(ConfigError, match="clients per round = 7"):
        analyze(cfg, tmp_path, rounds=1, clients=7)
    with pytest.raises(ConfigError, match="kinds"):
        analyze(cfg, tmp_path, rounds=1, kinds=("everything",))
    with pytest.raises(ConfigError, match="unknown law"):
        analyze(cfg, tmp_path, rounds=1, laws=("cauchy",))
    with pytest.raises(ConfigError, match="rounds"):
        analyze(cfg, tmp_path, rounds=0)


def test_cli_json_output(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    args = ["analyze", "--rounds", "1", "--no-plots", "--out", str(out), "--format", "json"]
    for kv in FAST:
        args += ["--set", kv]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout[res.stdout.index("{") :])
    assert data["rounds"] == 1 and data["out_dir"] == str(out)
    assert {(r["layer"], r["kind"]) for r in data["layers"]} == {
        (la, k) for la in ("1.weight", "1.bias", "3.weight", "3.bias") for k in KINDS
    }
    assert set(data["verdict"]) == set(KINDS)
    assert data["figures"] == []
    assert (out / STATS_CSV).exists()


def test_cli_table_output(tmp_path: Path) -> None:
    args = ["analyze", "--rounds", "1", "--no-plots", "--out", str(tmp_path / "t")]
    for kv in FAST:
        args += ["--set", kv]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "median β" in res.stdout and "1.weight" in res.stdout
    assert "client: β < 2 in" in res.stdout


def test_cli_bad_config_is_one_line_exit_2(tmp_path: Path) -> None:
    res = runner.invoke(app, ["analyze", "--set", "clients.lrr=0.1", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2
    assert "did you mean 'clients.lr'" in res.stderr
    assert "Traceback" not in res.output
    missing = runner.invoke(app, ["analyze", str(tmp_path / "nope.toml")])
    assert missing.exit_code == 2 and "config file not found" in missing.stderr


@pytest.mark.parametrize(
    "sampling",
    [
        ["clients.sampling=cyclic", "clients.sampling_options.groups=2"],
        ["clients.sampling=importance", "clients.sampling_options.by=norm"],
        ["clients.sampling=importance", "clients.sampling_options.by=size"],
    ],
    ids=["cyclic", "importance-norm", "importance-size"],
)
def test_cohorts_and_aggregate_match_the_run(sampling: list[str], tmp_path: Path) -> None:
    """analyze draws its cohorts with the run's sampler (not a copy of the uniform draw) and applies the
    run's aggregate (Horvitz-Thompson under importance sampling), so with the default lossless fp32
    channels it follows the same trajectory as ``fedsqueeze run`` on the same config."""
    from fedsqueeze.experiment import run

    cfg = load_config(None, [*FAST, *sampling, "rounds=4", "eval.every=1"])
    ran = run(cfg, tmp_path / "run", plots=False)
    an = analyze(cfg, tmp_path / "an", kinds=("aggregate",), laws=("gaussian",), plots=False)
    rounds = an.summary["per_round"]
    assert [p["clients"] for p in rounds] == [m["clients"] for m in ran.metrics]
    assert len({tuple(m["clients"]) for m in ran.metrics}) > 1  # the cohorts move
    for p, m in zip(rounds, ran.metrics, strict=True):
        assert p["test_loss"] == pytest.approx(m["test_loss"], rel=1e-5, abs=1e-6)
