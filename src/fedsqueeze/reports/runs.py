"""Reading a run directory into a :class:`RunRecord`.

A run directory, as written by :func:`fedsqueeze.experiment.run`, holds:

``config.json``
    the resolved config (a JSON object; the engine nests it under ``"config"`` next to versions);
``metrics.jsonl``
    one JSON object per round with at least the keys in :data:`REQUIRED_METRICS`. ``round`` counts
    completed rounds (1-based); ``test_accuracy``/``test_loss`` are ``null`` on rounds without
    evaluation; ``cum_*_bytes`` and ``modelled_time_s`` are cumulative; ``modelled_time_s`` is
    *modelled* by :mod:`fedsqueeze.network`, ``wall_time_s`` is measured;
``summary.json``
    written when the run ends.

A killed run is still readable: a torn (unparseable) last line of ``metrics.jsonl`` is dropped, and a
missing ``summary.json`` is tolerated; both are recorded in :attr:`RunRecord.notes` (the library never
prints). ``strict=True`` turns both into errors. Everything else that is missing or malformed raises
:class:`~fedsqueeze.errors.ConfigError` naming the file, the line and the problem.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsqueeze.errors import ConfigError

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"

#: Bytes in one MB in every report (decimal, as network bandwidth is quoted).
BYTES_PER_MB = 1_000_000

#: Keys every ``metrics.jsonl`` row must have (values may be ``null`` where noted in the module doc).
REQUIRED_METRICS = (
    "round",
    "test_accuracy",
    "test_loss",
    "uplink_bytes",
    "downlink_bytes",
    "cum_uplink_bytes",
    "cum_downlink_bytes",
    "modelled_time_s",
    "wall_time_s",
)
_NON_NULL = ("uplink_bytes", "downlink_bytes", "cum_uplink_bytes", "cum_downlink_bytes")

#: Columns computed from the stored ones (MB = 1e6 bytes).
DERIVED_COLUMNS = {
    "uplink_mb": "uplink_bytes",
    "downlink_mb": "downlink_bytes",
    "cum_uplink_mb": "cum_uplink_bytes",
    "cum_downlink_mb": "cum_downlink_bytes",
}


@dataclass(frozen=True)
class RunRecord:
    """One run's outputs, validated.

    Attributes
    ----------
    name:
        The run directory's name.
    path:
        The run directory.
    config:
        ``config.json`` as stored.
    metrics:
        The ``metrics.jsonl`` rows in round order (a torn last line already dropped).
    summary:
        ``summary.json`` (``{}`` when missing, see :attr:`notes`).
    label:
        What legends and tables call the run: the ``label`` given to :func:`load_run`, else the
        summary's or config's ``name``, else :attr:`name`.
    notes:
        What was tolerated while reading (torn last line, missing summary, NaN accuracy).
    """

    name: str
    path: Path
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    summary: dict[str, Any]
    label: str
    notes: list[str] = field(default_factory=list)

    @property
    def rounds(self) -> list[int]:
        """The ``round`` of every row."""
        return [int(m["round"]) for m in self.metrics]

    def column(self, key: str) -> list[Any]:
        """One metric across rows; ``*_mb`` columns are the ``*_bytes`` ones divided by 1e6."""
        if key in DERIVED_COLUMNS:
            src = DERIVED_COLUMNS[key]
            return [m[src] / BYTES_PER_MB for m in self.metrics]
        if self.metrics and not all(key in m for m in self.metrics):
            known = sorted({k for m in self.metrics for k in m} | set(DERIVED_COLUMNS))
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"run {self.label!r}: no metric {key!r} in every row{hint} (known: {', '.join(known)})"
            )
        return [m[key] for m in self.metrics]

    def evaluated(self) -> list[dict[str, Any]]:
        """The rows with a ``test_accuracy`` (rounds where the model was evaluated)."""
        return [m for m in self.metrics if m["test_accuracy"] is not None]


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text; is it a fedsqueeze run file?") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _check_row(row: object, where: str, notes: list[str]) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise ConfigError(f"{where}: expected a JSON object per line, got {type(row).__name__}")
    missing = [k for k in REQUIRED_METRICS if k not in row]
    if missing:
        raise ConfigError(f"{where}: missing key(s) {missing}; every row needs {', '.join(REQUIRED_METRICS)}")
    rnd = row["round"]
    if isinstance(rnd, bool) or not isinstance(rnd, int) or rnd < 0:
        raise ConfigError(f"{where}: 'round' must be an integer >= 0, got {rnd!r}")
    for key in _NON_NULL:
        val = row[key]
        if not _is_number(val) or not math.isfinite(val) or val < 0:
            raise ConfigError(f"{where}: {key!r} must be a finite number >= 0, got {val!r}")
    for key in ("test_accuracy", "test_loss", "modelled_time_s", "wall_time_s"):
        val = row[key]
        if val is not None and not _is_number(val):
            raise ConfigError(f"{where}: {key!r} must be a number or null, got {val!r}")
    acc = row["test_accuracy"]
    if acc is not None and not math.isfinite(acc):
        notes.append(f"{where}: test_accuracy is {acc}; treated as not evaluated")
        row = {**row, "test_accuracy": None}
    return row


def _read_metrics(path: Path, notes: list[str], strict: bool) -> list[dict[str, Any]]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        # A kill can also cut a multi-byte character; only the last line may be affected.
        text = raw.decode("utf-8", errors="replace")
    lines = text.split("\n")
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    rows: list[dict[str, Any]] = []
    for pos, (lineno, line) in enumerate(numbered):
        where = f"{path}, line {lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            if pos == len(numbered) - 1 and not strict:
                notes.append(
                    f"{path}: dropped a torn last line (line {lineno}, {len(line)} characters: {exc.msg}); "
                    "the run was probably killed while writing it"
                )
                break
            raise ConfigError(f"{where} is not valid JSON ({exc.msg}); the file is corrupt") from None
        row = _check_row(obj, where, notes)
        if rows and row["round"] <= rows[-1]["round"]:
            raise ConfigError(
                f"{where}: round {row['round']} does not follow round {rows[-1]['round']}; "
                "rounds must increase (was the file appended to by two runs?)"
            )
        rows.append(row)
    return rows


def _pick_label(label: str | None, summary: dict[str, Any], config: dict[str, Any], name: str) -> str:
    if label is not None:
        return str(label)
    nested = config.get("config")
    for cand in (
        summary.get("name"),
        nested.get("name") if isinstance(nested, dict) else None,
        config.get("name"),
    ):
        if isinstance(cand, str) and cand.strip():
            return cand
    return name


def load_run(path: str | Path, *, label: str | None = None, strict: bool = False) -> RunRecord:
    """Read and validate a run directory.

    Parameters
    ----------
    path:
        The run directory (holding ``config.json``, ``metrics.jsonl``, ``summary.json``).
    label:
        Name for legends and tables; default: the run's ``name`` from its summary or config, else the
        directory name.
    strict:
        Refuse a torn last metrics line or a missing ``summary.json`` instead of noting them.

    Raises
    ------
    ConfigError
        The directory or a required file is missing, unreadable or malformed.
    """
    run_dir = Path(path)
    if not run_dir.is_dir():
        what = "does not exist" if not run_dir.exists() else "is not a directory"
        raise ConfigError(f"run directory {run_dir} {what}; pass the folder a run wrote its outputs to")
    for required in (CONFIG_FILE, METRICS_FILE):
        if not (run_dir / required).is_file():
            raise ConfigError(
                f"{run_dir} has no {required}; is it a fedsqueeze run directory? "
                f"(expected {CONFIG_FILE}, {METRICS_FILE} and {SUMMARY_FILE})"
            )
    notes: list[str] = []
    config = _read_json_object(run_dir / CONFIG_FILE)
    metrics = _read_metrics(run_dir / METRICS_FILE, notes, strict)
    summary_path = run_dir / SUMMARY_FILE
    if summary_path.is_file():
        summary = _read_json_object(summary_path)
    elif strict:
        raise ConfigError(f"{run_dir} has no {SUMMARY_FILE}; the run did not finish (strict=True)")
    else:
        summary = {}
        notes.append(f"{run_dir}: no {SUMMARY_FILE}; the run did not finish (killed or still running?)")
    name = run_dir.resolve().name
    return RunRecord(
        name=name,
        path=run_dir,
        config=config,
        metrics=metrics,
        summary=summary,
        label=_pick_label(label, summary, config, name),
        notes=notes,
    )


def load_runs(paths: Iterable[str | Path], *, strict: bool = False) -> list[RunRecord]:
    """:func:`load_run` on each path, in order."""
    return [load_run(p, strict=strict) for p in paths]
