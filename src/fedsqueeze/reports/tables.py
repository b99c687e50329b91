"""The comparison table: accuracy, bytes and modelled time per run, and reductions vs a baseline.

Each row of :func:`comparison_table` is a plain ``dict`` (JSON-ready) with these keys:

``label``
    the run's label;
``rounds``
    the last recorded ``round`` (rounds completed);
``final_accuracy`` / ``best_accuracy``
    the last / highest evaluated ``test_accuracy`` (``None`` if never evaluated);
``rounds_to_target``
    the ``round`` of the first evaluated row with ``test_accuracy >= target_accuracy`` (rounds are
    1-based counts of completed rounds, so this is the number of rounds it took); ``None`` if never;
``uplink_mb_to_target`` / ``modelled_time_s_to_target``
    cumulative uplink MB (1 MB = 1e6 bytes) and cumulative **modelled** seconds at that round;
``total_uplink_mb`` / ``total_downlink_mb``
    cumulative MB at the last recorded row;
``reduction_vs_baseline``
    with a target: baseline's ``uplink_mb_to_target`` / this run's; without one: baseline's
    ``total_uplink_mb`` / this run's. ``> 1`` means this run sent fewer uplink bytes. ``None`` when
    undefined (no baseline, either side never reached the target, or a zero denominator).

:func:`render_table` turns rows into text: a Rich table, JSON, or Markdown.
"""

from __future__ import annotations

import difflib
import io
import json
import math
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from fedsqueeze.errors import ConfigError
from fedsqueeze.reports.runs import BYTES_PER_MB, RunRecord

#: Row keys, in column order.
COLUMNS = (
    "label",
    "rounds",
    "final_accuracy",
    "best_accuracy",
    "rounds_to_target",
    "uplink_mb_to_target",
    "total_uplink_mb",
    "total_downlink_mb",
    "reduction_vs_baseline",
    "modelled_time_s_to_target",
)

FORMATS = ("table", "json", "markdown")


def _first_reaching(run: RunRecord, target: float) -> dict[str, Any] | None:
    for row in run.evaluated():
        if row["test_accuracy"] >= target:
            return row
    return None


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return num / den


def _row(run: RunRecord, target: float | None) -> dict[str, Any]:
    evals = run.evaluated()
    last = run.metrics[-1] if run.metrics else None
    hit = _first_reaching(run, target) if target is not None else None
    return {
        "label": run.label,
        "rounds": last["round"] if last else 0,
        "final_accuracy": evals[-1]["test_accuracy"] if evals else None,
        "best_accuracy": max(m["test_accuracy"] for m in evals) if evals else None,
        "rounds_to_target": hit["round"] if hit else None,
        "uplink_mb_to_target": hit["cum_uplink_bytes"] / BYTES_PER_MB if hit else None,
        "total_uplink_mb": last["cum_uplink_bytes"] / BYTES_PER_MB if last else 0.0,
        "total_downlink_mb": last["cum_downlink_bytes"] / BYTES_PER_MB if last else 0.0,
        "reduction_vs_baseline": None,
        "modelled_time_s_to_target": hit["modelled_time_s"] if hit else None,
    }


def comparison_table(
    runs: Sequence[RunRecord], *, target_accuracy: float | None = None, baseline: str | None = None
) -> list[dict[str, Any]]:
    """One row per run (keys and meanings in this module's docstring), in the order given.

    Parameters
    ----------
    runs:
        Loaded runs (:func:`~fedsqueeze.reports.load_run`).
    target_accuracy:
        Test accuracy to reach (same scale as the metrics, e.g. ``0.9``); ``None`` for no target.
    baseline:
        Label of the run the reductions are relative to (e.g. the fp32 run); ``None`` for none.

    Raises
    ------
    ConfigError
        ``baseline`` is not exactly one run's label, or ``target_accuracy`` is not finite.
    """
    if target_accuracy is not None and not (
        isinstance(target_accuracy, int | float) and math.isfinite(target_accuracy)
    ):
        raise ConfigError(f"target_accuracy must be a finite number or None, got {target_accuracy!r}")
    rows = [_row(r, target_accuracy) for r in runs]
    if baseline is None:
        return rows
    labels = [r["label"] for r in rows]
    matches = [r for r in rows if r["label"] == baseline]
    if not matches:
        close = difflib.get_close_matches(baseline, labels, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"baseline {baseline!r} is not a run label{hint} (labels: {', '.join(labels)})")
    if len(matches) > 1:
        raise ConfigError(f"baseline {baseline!r} matches {len(matches)} runs; give the runs distinct labels")
    key = "uplink_mb_to_target" if target_accuracy is not None else "total_uplink_mb"
    base_value = matches[0][key]
    for row in rows:
        row["reduction_vs_baseline"] = _ratio(base_value, row[key])
    return rows


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    if "accuracy" in key:
        return f"{value:.4f}"
    if abs(value) >= 1e5:
        return f"{value:,.0f}"
    if "_mb" in key:
        return f"{value:.3f}"
    if key.startswith("reduction"):
        return f"{value:.2f}x"
    if "time_s" in key:
        return f"{value:.2f}" if abs(value) >= 1 else f"{value:.3g}"
    return f"{value:.4g}"


def _keys(rows: Sequence[dict[str, Any]]) -> list[str]:
    keys = [k for k in COLUMNS if any(k in r for r in rows)]
    for r in rows:
        keys.extend(k for k in r if k not in keys)
    return keys


def render_table(rows: Sequence[dict[str, Any]], fmt: str = "table", *, width: int = 200) -> str:
    """Rows as text.

    ``"table"``: a Rich table rendered to plain text (no colour codes) at ``width`` columns;
    ``"json"``: a JSON array, numbers unrounded; ``"markdown"``: a pipe table. Numbers in the table
    and Markdown forms are rounded for reading (accuracy 4 decimals, MB 3 decimals, reductions
    ``1.23x``, seconds 2 decimals); missing values show as ``-``. Print the ``"table"`` string without markup
    interpretation (``Console.print(text, markup=False)`` or plain ``print``).
    """
    if fmt not in FORMATS:
        close = difflib.get_close_matches(str(fmt), FORMATS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown table format {fmt!r}{hint} (valid: {', '.join(FORMATS)})")
    if fmt == "json":
        return json.dumps(list(rows), indent=2)
    keys = _keys(rows)
    if not keys:
        keys = list(COLUMNS)
    cells = [[_fmt(k, r.get(k)) for k in keys] for r in rows]
    if fmt == "markdown":

        def line(items: Sequence[str]) -> str:
            return "| " + " | ".join(s.replace("|", "\\|") for s in items) + " |"

        align = ["---" if k == "label" else "---:" for k in keys]
        return "\n".join([line(keys), line(align), *(line(c) for c in cells)])
    table = Table(title="modelled times from fedsqueeze.network; 1 MB = 1e6 bytes", title_justify="left")
    for k in keys:
        table.add_column(k, justify="left" if k == "label" else "right", overflow="fold")
    for c in cells:
        table.add_row(*(Text(s) for s in c))  # Text: labels are never read as Rich markup
    buf = io.StringIO()
    console = Console(file=buf, width=width, color_system=None, force_terminal=False, highlight=False)
    console.print(table, markup=False)
    return "\n".join(line.rstrip() for line in buf.getvalue().splitlines())
