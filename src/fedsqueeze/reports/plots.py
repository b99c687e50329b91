"""Plots of test accuracy against rounds, uplink bytes and modelled time.

Figures are drawn on Matplotlib's Agg canvas through the object API (``Figure`` +
``FigureCanvasAgg``): no display is needed, ``pyplot`` is never imported, and the process-wide
backend is left alone. Only evaluated rounds (``test_accuracy`` not ``null``) are plotted.

x axes (the ``x=`` names of :func:`plot_comparison`):

``"round"``
    rounds completed;
``"cum_uplink_mb"``
    cumulative uplink, 1 MB = 1e6 bytes (what a codec saves shows up here);
``"modelled_time_s"``
    cumulative round time **modelled** by :mod:`fedsqueeze.network` (not measured wall time).

On a log x axis, points with x <= 0 (e.g. a round-0 evaluation before any byte was sent) are left out.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fedsqueeze.errors import ConfigError
from fedsqueeze.reports.runs import BYTES_PER_MB, RunRecord

#: x axis name -> axis label.
X_AXES = {
    "round": "round",
    "cum_uplink_mb": "cumulative uplink (MB, 1 MB = 1e6 bytes)",
    "modelled_time_s": "modelled time (s)",
}
#: File names written by :func:`plot_run`, per x axis.
RUN_PLOT_FILES = {
    "round": "accuracy_vs_round.png",
    "cum_uplink_mb": "accuracy_vs_uplink_mb.png",
    "modelled_time_s": "accuracy_vs_modelled_time.png",
}
_SUFFIXES = (".png", ".pdf", ".svg")
_Y_LABEL = "test accuracy"


def _check_x(x: str) -> None:
    if x not in X_AXES:
        close = difflib.get_close_matches(str(x), list(X_AXES), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown x axis {x!r}{hint} (valid: {', '.join(X_AXES)})")


def _x_value(row: dict[str, Any], x: str) -> float | None:
    if x == "cum_uplink_mb":
        return float(row["cum_uplink_bytes"]) / BYTES_PER_MB
    val = row[x]
    return None if val is None else float(val)


def series(run: RunRecord, x: str, *, log_x: bool = False) -> tuple[list[float], list[float]]:
    """``(xs, accuracies)`` over the run's evaluated rows, for x axis ``x`` (see module docstring).

    Rows without an x value (``modelled_time_s`` null) are skipped, and so are x <= 0 when ``log_x``.
    """
    _check_x(x)
    xs: list[float] = []
    ys: list[float] = []
    for row in run.evaluated():
        xv = _x_value(row, x)
        if xv is None or (log_x and xv <= 0):
            continue
        xs.append(xv)
        ys.append(float(row["test_accuracy"]))
    return xs, ys


def _new_axes() -> tuple[Figure, Axes]:
    fig = Figure(figsize=(6.4, 4.4), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _draw(ax: Axes, xs: list[float], ys: list[float], label: str | None) -> None:
    marker = "o" if len(xs) <= 60 else None
    ax.plot(xs, ys, marker=marker, markersize=3, linewidth=1.5, label=label)


def _decorate(
    ax: Axes, x: str, *, log_x: bool, target_accuracy: float | None, title: str, empty: bool
) -> None:
    ax.set_xlabel(X_AXES[x])
    ax.set_ylabel(_Y_LABEL)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if log_x and not empty:
        ax.set_xscale("log")
    if target_accuracy is not None:
        ax.axhline(
            target_accuracy, color="grey", linestyle="--", linewidth=1, label=f"target {target_accuracy:g}"
        )
    if empty:
        ax.text(0.5, 0.5, "no evaluated rounds to plot", ha="center", va="center", transform=ax.transAxes)


def _out_path(path: str | Path) -> Path:
    out = Path(path)
    if out.suffix.lower() not in _SUFFIXES:
        raise ConfigError(f"plot file {out} must end in one of {', '.join(_SUFFIXES)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def plot_run(
    run: RunRecord,
    out_dir: str | Path,
    *,
    log_uplink: bool = False,
    target_accuracy: float | None = None,
    prefix: str = "",
) -> list[Path]:
    """Write three PNGs for one run and return their paths.

    ``accuracy_vs_round.png``, ``accuracy_vs_uplink_mb.png`` (log x axis with ``log_uplink=True``)
    and ``accuracy_vs_modelled_time.png`` in ``out_dir`` (created if needed), each name preceded by
    ``prefix``. ``target_accuracy`` adds a dashed horizontal line.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for x, fname in RUN_PLOT_FILES.items():
        log_x = log_uplink and x == "cum_uplink_mb"
        xs, ys = series(run, x, log_x=log_x)
        fig, ax = _new_axes()
        _draw(ax, xs, ys, None)
        _decorate(ax, x, log_x=log_x, target_accuracy=target_accuracy, title=run.label, empty=not xs)
        if target_accuracy is not None:
            ax.legend(loc="lower right")
        path = out / f"{prefix}{fname}"
        fig.savefig(path)
        paths.append(path)
    return paths


def plot_comparison(
    runs: Sequence[RunRecord],
    out_path: str | Path,
    x: str = "cum_uplink_mb",
    *,
    log_x: bool = False,
    target_accuracy: float | None = None,
    title: str | None = None,
) -> Path:
    """One figure, one line per run (legend = run label): the sweep plot. Returns ``out_path``.

    ``x`` is ``"cum_uplink_mb"``, ``"round"`` or ``"modelled_time_s"``; ``out_path`` ends in
    ``.png`` (or ``.pdf``/``.svg``); its folder is created if needed.
    """
    _check_x(x)
    if not runs:
        raise ConfigError("plot_comparison needs at least one run")
    path = _out_path(out_path)
    fig, ax = _new_axes()
    any_points = False
    for run in runs:
        xs, ys = series(run, x, log_x=log_x)
        any_points = any_points or bool(xs)
        _draw(ax, xs, ys, run.label)
    default_title = f"test accuracy vs {X_AXES[x].split(' (')[0]}"
    _decorate(
        ax,
        x,
        log_x=log_x,
        target_accuracy=target_accuracy,
        title=title or default_title,
        empty=not any_points,
    )
    ax.legend(loc="best", fontsize="small")
    fig.savefig(path)
    return path
