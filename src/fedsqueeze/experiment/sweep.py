"""Sweeps: one base config run under several variants (codecs, or any keys), then compared.

A sweep file (TOML)::

    base = "mnist_cnn_dirichlet.toml"     # a run config, relative to this file (or inline [config])
    target_accuracy = 0.98                # for "rounds / uplink MB to reach target"
    baseline = "fp32"                     # the variant the reduction factors are relative to

    [[variant]]
    label = "fp32"
    set = { "compression.uplink" = "fp32" }

    [[variant]]
    label = "top1%>4bit+EF"
    set = { "compression.uplink" = "topk:1% > uniform:4", "compression.uplink_ef" = "ef14" }

Without a sweep file, ``fedsqueeze sweep CONFIG --key compression.uplink --value fp32 --value uniform:8``
builds the variants from one key. With nothing at all, the built-in quickstart runs (digits, MLP).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsqueeze.errors import ConfigError
from fedsqueeze.experiment.config import apply_overrides, config_from_dict, read_config_file
from fedsqueeze.experiment.run import RunDiverged, RunResult, run


@dataclass(frozen=True)
class Variant:
    label: str
    overrides: dict[str, Any]


@dataclass
class SweepSpec:
    base: dict[str, Any]
    variants: list[Variant]
    target_accuracy: float | None = None
    baseline: str | None = None


@dataclass
class SweepResult:
    out_dir: Path
    runs: list[RunResult]
    rows: list[dict[str, Any]]
    plots: list[Path] = field(default_factory=list)


#: The README's first command (``fedsqueeze sweep`` with no argument): a real comparison on the
#: built-in digits data, a few minutes on 2 CPUs. Edit a copy of this file to change it.
QUICKSTART_FILE = Path(__file__).with_name("quickstart_sweep.toml")


def load_sweep(path: str | Path) -> SweepSpec:
    """Read a sweep file (see module docstring); a plain run config gives a one-variant sweep."""
    p = Path(path)
    raw = read_config_file(p)
    if "variant" not in raw and "base" not in raw:
        return SweepSpec(base=raw, variants=[Variant(raw.get("name", p.stem), {})])
    unknown = set(raw) - {"base", "config", "variant", "target_accuracy", "baseline"}
    if unknown:
        raise ConfigError(
            f"{p}: unknown sweep key(s) {sorted(unknown)}; expected base, config, variant, "
            "target_accuracy, baseline"
        )
    if "config" in raw:
        base = raw["config"]
    elif "base" in raw:
        base = read_config_file(p.parent / str(raw["base"]))
    else:
        raise ConfigError(f'{p}: a sweep needs base = "run-config.toml" or an inline [config] table')
    variants = []
    for i, v in enumerate(raw.get("variant", [])):
        if not isinstance(v, Mapping) or "label" not in v:
            raise ConfigError(f"{p}: variant {i + 1} needs a label and a set = {{ ... }} table")
        extra = set(v) - {"label", "set"}
        if extra:
            raise ConfigError(f"{p}: variant {v['label']!r} has unknown key(s) {sorted(extra)}")
        variants.append(Variant(str(v["label"]), dict(v.get("set", {}))))
    if not variants:
        raise ConfigError(f"{p}: no [[variant]] entries")
    labels = [v.label for v in variants]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"{p}: variant labels must be unique, got {labels}")
    return SweepSpec(base, variants, raw.get("target_accuracy"), raw.get("baseline"))


def variants_from_key(key: str, values: Sequence[str]) -> list[Variant]:
    """One variant per value of a single dotted key (labels are the values)."""
    from fedsqueeze.experiment.config import _parse_value

    return [Variant(v, {key: _parse_value(v) if not key.startswith("compression.") else v}) for v in values]


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "run"


def run_sweep(
    spec: SweepSpec,
    out_dir: str | Path,
    *,
    overrides: Sequence[str] = (),
    progress: Callable[[str, dict[str, Any]], None] | None = None,
    on_start: Callable[[str, int], None] | None = None,
) -> SweepResult:
    """Run every variant (validated all first), then build the comparison table and combined plots."""
    from fedsqueeze.reports import comparison_table, load_run, plot_comparison

    out = Path(out_dir)
    base = apply_overrides(spec.base, overrides)
    configs = []
    for v in spec.variants:
        raw = apply_overrides(base, v.overrides)
        raw["name"] = v.label
        configs.append((v, config_from_dict(raw)))  # every variant validated before any run starts
    if spec.baseline is not None and spec.baseline not in [v.label for v in spec.variants]:
        raise ConfigError(f"baseline {spec.baseline!r} is not one of the variant labels")
    results = []
    for v, cfg in configs:
        if on_start is not None:
            on_start(v.label, cfg.rounds)
        cb = (lambda rec, label=v.label: progress(label, rec)) if progress is not None else None
        try:
            results.append(run(cfg, out / _slug(v.label), progress=cb))
        except RunDiverged:
            results.append(RunResult(out / _slug(v.label), [], {}, "diverged"))
    records = [load_run(r.out_dir) for r in results]
    rows = comparison_table(records, target_accuracy=spec.target_accuracy, baseline=spec.baseline)
    plots = [
        plot_comparison(records, out / f"compare_{x}.png", x=x)
        for x in ("round", "cum_uplink_mb", "modelled_time_s")
    ]
    return SweepResult(out, results, rows, plots)
