"""Reports: run loading (killed runs too), the comparison table's numbers, rendering, and plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.image import imread

from fedsqueeze.errors import ConfigError
from fedsqueeze.reports import (
    COLUMNS,
    REQUIRED_METRICS,
    RUN_PLOT_FILES,
    comparison_table,
    load_run,
    load_runs,
    plot_comparison,
    plot_run,
    render_table,
    series,
)

MB = 1_000_000
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _rows(
    accs: list[float | None], up_per_round: int, down_per_round: int, time_per_round: float
) -> list[dict[str, Any]]:
    rows = []
    for i, acc in enumerate(accs):
        t = i + 1
        rows.append(
            {
                "round": t,
                "test_accuracy": acc,
                "test_loss": None if acc is None else 1.0 - acc,
                "uplink_bytes": up_per_round,
                "downlink_bytes": down_per_round,
                "cum_uplink_bytes": up_per_round * t,
                "cum_downlink_bytes": down_per_round * t,
                "modelled_time_s": time_per_round * t,
                "wall_time_s": 0.01 * t,
                "clients": [0, 1],
            }
        )
    return rows


def make_run(
    root: Path,
    dirname: str,
    accs: list[float | None],
    *,
    up: int = MB,
    down: int = 2 * MB,
    time_s: float = 2.0,
    name: str | None = None,
    summary: bool = True,
    tail: str = "",
) -> Path:
    d = root / dirname
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"config": {"name": name or dirname, "rounds": len(accs)}}))
    lines = "".join(json.dumps(r) + "\n" for r in _rows(accs, up, down, time_s))
    (d / "metrics.jsonl").write_text(lines + tail)
    if summary:
        (d / "summary.json").write_text(json.dumps({"name": name or dirname, "status": "completed"}))
    return d


@pytest.fixture
def sweep(tmp_path: Path) -> list[Path]:
    return [
        # fp32: 10 MB up per round, target 0.8 first reached at round 4 (40 MB, 8 modelled s).
        make_run(tmp_path, "fp32", [None, 0.5, None, 0.8, 0.9], up=10 * MB, down=10 * MB, time_s=2.0),
        # top1%: 1 MB up per round, reaches 0.8 at round 2 (2 MB, 1.5 modelled s), then dips.
        make_run(tmp_path, "top1", [0.6, 0.85, 0.7], up=MB, down=10 * MB, time_s=0.75, name="top1%"),
        # 1-bit: never reaches 0.8.
        make_run(tmp_path, "onebit", [0.3, 0.4, 0.79, None], up=MB // 4, down=10 * MB, time_s=0.5),
    ]


# --------------------------------------------------------------------------------------------- load_run
def test_load_run_reads_everything(sweep: list[Path]) -> None:
    run = load_run(sweep[1])
    assert run.name == "top1" and run.label == "top1%" and run.path == sweep[1]
    assert run.config["config"]["rounds"] == 3 and run.summary["status"] == "completed"
    assert run.rounds == [1, 2, 3] and run.notes == []
    assert run.column("cum_uplink_mb") == [1.0, 2.0, 3.0]
    assert run.column("test_accuracy") == [0.6, 0.85, 0.7]
    assert [m["round"] for m in load_run(sweep[0]).evaluated()] == [2, 4, 5]
    with pytest.raises(ConfigError, match="did you mean 'test_accuracy'"):
        run.column("test_acuracy")
    assert [r.label for r in load_runs(sweep)] == ["fp32", "top1%", "onebit"]


def test_label_precedence(tmp_path: Path) -> None:
    d = make_run(tmp_path, "dir", [0.5], name="from-summary")
    assert load_run(d).label == "from-summary"
    assert load_run(d, label="explicit").label == "explicit"
    (d / "summary.json").unlink()
    assert load_run(d).label == "from-summary"  # the config's name
    (d / "config.json").write_text("{}")
    assert load_run(d).label == "dir"


def test_truncated_last_line_is_dropped_and_noted(tmp_path: Path) -> None:
    d = make_run(tmp_path, "killed", [0.5, 0.6, 0.7], tail='{"round": 4, "test_accuracy": 0.8, "upli')
    run = load_run(d)
    assert run.rounds == [1, 2, 3]
    assert len(run.notes) == 1 and "torn last line (line 4" in run.notes[0]
    with pytest.raises(ConfigError, match="line 4 is not valid JSON"):
        load_run(d, strict=True)
    # A torn last line after a blank line, and a cut multi-byte character, are tolerated too.
    d2 = make_run(tmp_path, "killed2", [0.5])
    with (d2 / "metrics.jsonl").open("ab") as f:
        f.write(b'\n{"round": 2, "label": "caf\xc3')
    assert load_run(d2).rounds == [1] and "torn last line (line 3" in load_run(d2).notes[0]


def test_killed_run_without_summary(tmp_path: Path) -> None:
    d = make_run(tmp_path, "running", [0.5, 0.6], summary=False)
    run = load_run(d)
    assert run.summary == {} and any("no summary.json" in n for n in run.notes)
    with pytest.raises(ConfigError, match=r"no summary.json.*strict"):
        load_run(d, strict=True)


def test_corrupt_middle_line_is_an_error(tmp_path: Path) -> None:
    d = make_run(tmp_path, "bad", [0.5, 0.6])
    lines = (d / "metrics.jsonl").read_text().splitlines()
    (d / "metrics.jsonl").write_text(lines[0][:-5] + "\n" + lines[1] + "\n")
    with pytest.raises(ConfigError, match=r"line 1 is not valid JSON.*corrupt"):
        load_run(d)


def test_missing_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_run(tmp_path / "nope")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="is not a directory"):
        load_run(tmp_path / "afile")
    d = make_run(tmp_path, "r", [0.5])
    (d / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"has no config\.json"):
        load_run(d)
    d = make_run(tmp_path, "r2", [0.5])
    (d / "metrics.jsonl").unlink()
    with pytest.raises(ConfigError, match=r"has no metrics\.jsonl"):
        load_run(d)
    d = make_run(tmp_path, "r3", [0.5])
    (d / "summary.json").write_text('{"name": "r3"')
    with pytest.raises(ConfigError, match=r"summary.json is not valid JSON"):
        load_run(d)
    (d / "summary.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must hold a JSON object, got list"):
        load_run(d)
    (d / "summary.json").write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_run(d)


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda r: r.pop("cum_uplink_bytes"), "missing key(s) ['cum_uplink_bytes']"),
        (lambda r: r.update(round="2"), "'round' must be an integer"),
        (lambda r: r.update(round=1), "round 1 does not follow round 1"),
        (lambda r: r.update(uplink_bytes=-1), "'uplink_bytes' must be a finite number >= 0"),
        (lambda r: r.update(test_accuracy="high"), "'test_accuracy' must be a number or null"),
    ],
)
def test_bad_rows(tmp_path: Path, mutate: Any, needle: str) -> None:
    d = make_run(tmp_path, "r", [0.5, 0.6])
    rows = [json.loads(s) for s in (d / "metrics.jsonl").read_text().splitlines()]
    mutate(rows[1])
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ConfigError) as info:
        load_run(d)
    assert needle in str(info.value) and "line 2" in str(info.value)


def test_nan_accuracy_and_loss(tmp_path: Path) -> None:
    d = make_run(tmp_path, "diverged", [0.5, 0.6])
    rows = [json.loads(s) for s in (d / "metrics.jsonl").read_text().splitlines()]
    rows[1]["test_accuracy"] = math.nan
    rows[1]["test_loss"] = math.nan  # a diverged run writes NaN (json allows it)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = load_run(d)
    assert [m["round"] for m in run.evaluated()] == [1]
    assert any("treated as not evaluated" in n for n in run.notes)


def test_required_metrics_contract() -> None:
    assert set(REQUIRED_METRICS) >= {"round", "test_accuracy", "cum_uplink_bytes", "modelled_time_s"}


# --------------------------------------------------------------------------------------------- table
def test_comparison_table_numbers_with_target(sweep: list[Path]) -> None:
    rows = comparison_table(load_runs(sweep), target_accuracy=0.8, baseline="fp32")
    assert [list(r) for r in rows] == [list(COLUMNS)] * 3
    fp32, top1, onebit = rows
    assert fp32 == {
        "label": "fp32",
        "rounds": 5,
        "final_accuracy": 0.9,
        "best_accuracy": 0.9,
        "rounds_to_target": 4,
        "uplink_mb_to_target": 40.0,
        "total_uplink_mb": 50.0,
        "total_downlink_mb": 50.0,
        "reduction_vs_baseline": 1.0,
        "modelled_time_s_to_target": 8.0,
    }
    assert top1 == {
        "label": "top1%",
        "rounds": 3,
        "final_accuracy": 0.7,
        "best_accuracy": 0.85,
        "rounds_to_target": 2,
        "uplink_mb_to_target": 2.0,
        "total_uplink_mb": 3.0,
        "total_downlink_mb": 30.0,
        "reduction_vs_baseline": 20.0,
        "modelled_time_s_to_target": 1.5,
    }
    assert onebit["final_accuracy"] == 0.79 and onebit["best_accuracy"] == 0.79  # last *evaluated*
    assert onebit["rounds_to_target"] is None and onebit["uplink_mb_to_target"] is None
    assert onebit["modelled_time_s_to_target"] is None and onebit["reduction_vs_baseline"] is None
    assert onebit["total_uplink_mb"] == 1.0 and onebit["rounds"] == 4
    # Exactly at the target counts as reaching it; just above the best never does.
    assert comparison_table(load_runs(sweep[:1]), target_accuracy=0.5)[0]["rounds_to_target"] == 2
    assert comparison_table(load_runs(sweep[:1]), target_accuracy=0.9000001)[0]["rounds_to_target"] is None


def test_comparison_table_without_target_uses_totals(sweep: list[Path]) -> None:
    rows = comparison_table(load_runs(sweep), baseline="top1%")
    assert [r["reduction_vs_baseline"] for r in rows] == [3.0 / 50.0, 1.0, 3.0]
    assert all(r["rounds_to_target"] is None for r in rows)
    plain = comparison_table(load_runs(sweep))
    assert all(r["reduction_vs_baseline"] is None for r in plain)


def test_baseline_that_never_reaches_target(sweep: list[Path]) -> None:
    rows = comparison_table(load_runs(sweep), target_accuracy=0.8, baseline="onebit")
    assert all(r["reduction_vs_baseline"] is None for r in rows)


def test_empty_run_in_table(tmp_path: Path) -> None:
    d = make_run(tmp_path, "empty", [])
    base = make_run(tmp_path, "base", [0.5])
    rows = comparison_table(load_runs([base, d]), baseline="base")
    assert rows[1]["final_accuracy"] is None and rows[1]["total_uplink_mb"] == 0.0 and rows[1]["rounds"] == 0
    assert rows[1]["reduction_vs_baseline"] is None  # zero denominator


def test_table_errors(sweep: list[Path], tmp_path: Path) -> None:
    runs = load_runs(sweep)
    with pytest.raises(ConfigError, match="did you mean 'fp32'"):
        comparison_table(runs, baseline="fp3")
    with pytest.raises(ConfigError, match="target_accuracy must be a finite number"):
        comparison_table(runs, target_accuracy=math.nan)
    twin = make_run(tmp_path / "other", "fp32", [0.1])
    with pytest.raises(ConfigError, match="matches 2 runs"):
        comparison_table([*runs, load_run(twin)], baseline="fp32")


# --------------------------------------------------------------------------------------------- render
def test_render_json_round_trips(sweep: list[Path]) -> None:
    rows = comparison_table(load_runs(sweep), target_accuracy=0.8, baseline="fp32")
    assert json.loads(render_table(rows, fmt="json")) == rows


def test_render_markdown(sweep: list[Path]) -> None:
    rows = comparison_table(load_runs(sweep), target_accuracy=0.8, baseline="fp32")
    md = render_table(rows, fmt="markdown").splitlines()
    assert md[0] == "| " + " | ".join(COLUMNS) + " |"
    assert md[1].startswith("| --- | ---: |")
    assert md[3] == "| top1% | 3 | 0.7000 | 0.8500 | 2 | 2.000 | 3.000 | 30.000 | 20.00x | 1.50 |"
    assert md[4].split(" | ")[4:6] == ["-", "-"]


def test_render_rich_table(sweep: list[Path]) -> None:
    runs = load_runs(sweep)
    rows = comparison_table(runs, target_accuracy=0.8, baseline="fp32")
    rows[2]["label"] = "[bold]onebit"  # labels are never read as markup
    text = render_table(rows)
    assert "\x1b[" not in text  # plain text, no colour codes
    assert "modelled" in text and "1 MB = 1e6 bytes" in text
    for needle in ("fp32", "top1%", "[bold]onebit", "20.00x", "40.000", "reduction_vs_baseline"):
        assert needle in text
    assert render_table([], fmt="json") == "[]"
    assert "label" in render_table([])
    with pytest.raises(ConfigError, match="did you mean 'markdown'"):
        render_table(rows, fmt="markdwn")


# --------------------------------------------------------------------------------------------- plots
def _check_png(path: Path) -> np.ndarray:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 500
    return img


def _line_pixels(img: np.ndarray, rgb: tuple[int, int, int]) -> int:
    target = np.array(rgb) / 255.0
    return int((np.abs(img[..., :3] - target).max(axis=-1) < 0.05).sum())


def test_plot_run_writes_three_valid_pngs(sweep: list[Path], tmp_path: Path) -> None:
    run = load_run(sweep[0])
    paths = plot_run(run, tmp_path / "plots", target_accuracy=0.8)
    assert [p.name for p in paths] == list(RUN_PLOT_FILES.values())
    for p in paths:
        img = _check_png(p)
        assert _line_pixels(img, (31, 119, 180)) > 100  # matplotlib's first line colour is drawn
    logged = plot_run(run, tmp_path / "log", log_uplink=True, prefix="fp32_")
    assert [p.name for p in logged][1] == "fp32_accuracy_vs_uplink_mb.png"
    _check_png(logged[1])


def test_series_values(sweep: list[Path], tmp_path: Path) -> None:
    run = load_run(sweep[0])
    assert series(run, "round") == ([2.0, 4.0, 5.0], [0.5, 0.8, 0.9])
    assert series(run, "cum_uplink_mb") == ([20.0, 40.0, 50.0], [0.5, 0.8, 0.9])
    assert series(run, "modelled_time_s") == ([4.0, 8.0, 10.0], [0.5, 0.8, 0.9])
    zero = make_run(tmp_path, "zero", [0.1, 0.2], up=0)
    assert series(load_run(zero), "cum_uplink_mb", log_x=True) == ([], [])
    assert series(load_run(zero), "cum_uplink_mb") == ([0.0, 0.0], [0.1, 0.2])


def test_plot_run_with_nothing_evaluated(tmp_path: Path) -> None:
    d = make_run(tmp_path, "none", [None, None])
    for p in plot_run(load_run(d), tmp_path / "out", log_uplink=True):
        _check_png(p)


def test_plot_comparison(sweep: list[Path], tmp_path: Path) -> None:
    runs = load_runs(sweep)
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44)]  # one line per run
    for x in ("cum_uplink_mb", "round", "modelled_time_s"):
        out = plot_comparison(runs, tmp_path / "cmp" / f"{x}.png", x=x, log_x=x == "cum_uplink_mb")
        assert out == tmp_path / "cmp" / f"{x}.png"
        img = _check_png(out)
        assert all(_line_pixels(img, c) > 50 for c in colours)
    with pytest.raises(ConfigError, match="did you mean 'round'"):
        plot_comparison(runs, tmp_path / "x.png", x="rounds")
    with pytest.raises(ConfigError, match="at least one run"):
        plot_comparison([], tmp_path / "x.png")
    with pytest.raises(ConfigError, match="must end in one of"):
        plot_comparison(runs, tmp_path / "x.jpeg")
