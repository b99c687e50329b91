"""Reports: read run directories, compare runs in a table, plot accuracy against bytes and time.

>>> from fedsqueeze.reports import load_run, comparison_table, render_table, plot_comparison
>>> runs = [load_run(p) for p in ["runs/fp32", "runs/top1"]]                # doctest: +SKIP
>>> print(render_table(comparison_table(runs, target_accuracy=0.9, baseline="fp32")))  # doctest: +SKIP
>>> plot_comparison(runs, "sweep.png", x="cum_uplink_mb")                   # doctest: +SKIP

Units: 1 MB = 1e6 bytes everywhere; times named ``modelled_*`` come from :mod:`fedsqueeze.network`.
"""

from fedsqueeze.reports.plots import RUN_PLOT_FILES, X_AXES, plot_comparison, plot_run, series
from fedsqueeze.reports.runs import BYTES_PER_MB, REQUIRED_METRICS, RunRecord, load_run, load_runs
from fedsqueeze.reports.tables import COLUMNS, comparison_table, render_table

__all__ = [
    "BYTES_PER_MB",
    "COLUMNS",
    "REQUIRED_METRICS",
    "RUN_PLOT_FILES",
    "X_AXES",
    "RunRecord",
    "comparison_table",
    "load_run",
    "load_runs",
    "plot_comparison",
    "plot_run",
    "render_table",
    "series",
]
