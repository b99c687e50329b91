"""Per-layer statistics of FedAvg model updates over rounds: kurtosis, GenNorm shape, law fits.

:func:`analyze` answers "do the clients' updates look GenNorm, with beta below 2?" (the M22 slides'
question) for any run config. It trains **plain, uncompressed FedAvg** from the config's ``data``,
``model``, ``clients``, ``server`` and ``seed`` settings with its own small loop, and after every
round fits the laws of :func:`fedsqueeze.stats.fit_layer` to every layer (parameter name) of the
round's model differences.

The training loop (the same seed tree as ``fedsqueeze run``)
    partition with ``derive_seed(seed, "partition")``, initial model under
    ``torch.manual_seed(derive_seed(seed, "init"))``; round ``t`` (0-based) draws its cohort with
    the run's sampler (``clients.sampling``, :func:`fedsqueeze.sim.sampling.make_sampler`, seed tree
    ``(seed, "sample", t)``; ``uniform``: ``clients`` distinct clients), trains them with
    :func:`~fedsqueeze.sim.local.train_clients` from the current global model (batch seeds
    ``derive_seed(seed, "train", t, c)``), averages the deltas weighted by sample count (under
    ``importance`` sampling: the run's Horvitz-Thompson sum over its fixed denominator, and the
    sampler observes each aggregated client's update norm, uncompressed here) and applies
    the server step ``x += server.lr * v``, ``v = server.momentum * v + mean_delta``. A client whose
    delta has a NaN/Inf is left out of the average and of the statistics (counted in the round's
    ``rejected`` list). The ``compression``, ``algorithm``, ``attack``, ``privacy`` and ``network``
    sections are **ignored** (listed in ``summary.json["ignored_settings"]`` when not default).

What is fitted (``kind``)
    ``"client"``
        the update of **one** client: the first (lowest id) client sampled in the round. This is
        what M22 fits (each user's ``w_i - w_c`` separately) and the cleanest view of a single law.
    ``"pooled"``
        the updates of all the round's clients concatenated. More entries, but under a skewed
        partition the clients take different numbers of local steps, so their updates have different
        scales and the pool is a *scale mixture*: its kurtosis is inflated and its beta pulled down
        compared with one client. Compare with ``"client"`` before reading beta < 2 into it.
    ``"aggregate"``
        the weighted-mean update the server applies.

Per ``(round, layer, kind)`` record (``stats.jsonl``, one JSON object a line; ``stats.csv``, the same
flat columns, :data:`COLUMNS`): ``n``, ``mean``, ``std``, ``excess_kurtosis`` (of every entry),
``beta`` / ``alpha`` (GenNorm shape and scale -- the slides' ``alpha``; scipy's ``scale``), ``c``
(double-Weibull shape), ``w2_<law>``, ``w2_rel_<law>`` (= ``w2 / std``, comparable across layers),
``loglik_<law>`` (nats per entry), ``best_w2`` / ``best_loglik`` (the winning law), and, with
``pass_rates=True``, Spearman (adjacent entries, ``pairing="neighbours"``) and KS (two contiguous
blocks, ``pairing="blocks"``) pass rates at n = 100 and 3000 (:mod:`fedsqueeze.stats.independence`;
``None`` when the layer is too small). Rounds are numbered from 1 (rounds completed).
A layer with fewer than 2 entries or constant entries is not fitted: its record has ``skipped`` set
to the reason and the statistics empty (``None``; ``stats.csv`` leaves the cell blank). Non-finite
numbers are written as ``null``/blank.

Other outputs in ``out_dir``
    ``summary.json`` (config, per round train loss and test accuracy, per ``(layer, kind)``: rounds
    fitted, median beta, median kurtosis, wins per law by W2 and by log-likelihood; the beta < 2
    verdict per kind; figure paths), ``hist_<layer>.png`` (per layer, the last round's entries of
    every kind, with the fitted densities; log y axis by default), ``beta_vs_round.png`` and
    ``kurtosis_vs_round.png`` (one line per layer, one panel per kind). Figures are drawn on
    Matplotlib's Agg canvas (no ``pyplot``).
"""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsqueeze.errors import ConfigError
from fedsqueeze.experiment.config import RunConfig
from fedsqueeze.experiment.run import evaluate as evaluate_model
from fedsqueeze.sim.sampling import make_sampler
from fedsqueeze.sim.seeds import derive_seed
from fedsqueeze.stats.fit import LAWS, LayerFit, _check_laws, fit_layer
from fedsqueeze.stats.independence import ks_pass_rate, spearman_pass_rate

__all__ = [
    "COLUMNS",
    "KINDS",
    "AnalysisResult",
    "analyze",
    "layer_record",
    "plot_histograms",
    "plot_over_rounds",
    "summarize",
]

KINDS: tuple[str, ...] = ("client", "pooled", "aggregate")
"""What :func:`analyze` fits per layer and round (module docstring)."""

PASS_RATE_NS: tuple[int, ...] = (100, 3000)

LARGE_LAYER = 1000
"""Layers with at least this many entries count as large in the verdict (M22 quantizes only those;
beta of a 10-entry bias vector is mostly noise)."""

COLUMNS: tuple[str, ...] = (
    "round",
    "layer",
    "kind",
    "client",
    "num_clients",
    "shape",
    "n",
    "n_used",
    "sampled",
    "mean",
    "std",
    "excess_kurtosis",
    "beta",
    "alpha",
    "c",
    *(f"w2_{law}" for law in LAWS),
    *(f"w2_rel_{law}" for law in LAWS),
    *(f"loglik_{law}" for law in LAWS),
    "best_w2",
    "best_loglik",
    *(f"{t}_{n}" for n in PASS_RATE_NS for t in ("spearman", "ks")),
    "skipped",
    "warnings",
    "seconds",
)
"""Columns of ``stats.csv`` (and keys of every ``stats.jsonl`` object), in order."""

STATS_JSONL = "stats.jsonl"
STATS_CSV = "stats.csv"
SUMMARY_JSON = "summary.json"
BETA_PNG = "beta_vs_round.png"
KURTOSIS_PNG = "kurtosis_vs_round.png"

ProgressFn = Callable[[dict[str, Any]], None]


@dataclass
class AnalysisResult:
    """What :func:`analyze` wrote and returned.

    Attributes
    ----------
    out_dir: the output folder.
    records: one dict per ``(round, layer, kind)`` (keys :data:`COLUMNS`), as in ``stats.jsonl``.
    summary: the content of ``summary.json``.
    figures: the PNG files written.
    """

    out_dir: Path
    records: list[dict[str, Any]]
    summary: dict[str, Any]
    figures: list[Path] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ one layer
def _finite(v: float | None) -> float | None:
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def layer_record(
    x: Any,
    laws: Iterable[str] = LAWS,
    *,
    max_samples: int | None = 100_000,
    pass_rates: bool = False,
    pass_trials: int = 20,
    seed: int = 0,
) -> tuple[dict[str, Any], LayerFit | None]:
    """Statistics of one layer's entries as a flat record (the statistics columns of :data:`COLUMNS`).

    Returns ``(record, fit)``; ``fit`` is ``None`` (and ``record["skipped"]`` the reason) for a layer
    with fewer than 2 entries or constant entries. Other bad input raises :class:`StatsError`.
    """
    rec: dict[str, Any] = dict.fromkeys(COLUMNS[3:])
    t0 = time.perf_counter()
    arr = x.detach().reshape(-1) if isinstance(x, torch.Tensor) else np.asarray(x).reshape(-1)
    n = int(arr.shape[0])
    rec["n"] = n
    if n < 2:
        rec["skipped"] = f"fewer than 2 entries ({n})"
        return rec, None
    fit = fit_layer(arr, laws, max_samples=max_samples, seed=seed)
    rec.update(n_used=fit.n_used, sampled=fit.sampled, mean=_finite(fit.mean), std=_finite(fit.std))
    if fit.constant:
        rec["skipped"] = f"constant layer (every entry = {fit.mean:.6g})"
        rec["seconds"] = time.perf_counter() - t0
        return rec, None
    rec["excess_kurtosis"] = _finite(fit.excess_kurtosis)
    warns: list[str] = []
    for law, lf in fit.fits.items():
        rec[f"w2_{law}"] = _finite(lf.w2)
        rec[f"w2_rel_{law}"] = _finite(lf.w2 / fit.std) if fit.std > 0 else None
        rec[f"loglik_{law}"] = _finite(lf.loglik_per_sample)
        warns += [f"{law}: {w}" for w in lf.warnings]
    if "gennorm" in fit.fits:
        p = fit.fits["gennorm"].params
        rec["beta"], rec["alpha"] = _finite(p["beta"]), _finite(p["scale"])
    if "dweibull" in fit.fits:
        rec["c"] = _finite(fit.fits["dweibull"].params["c"])
    rec["best_w2"] = fit.best("w2").law
    rec["best_loglik"] = fit.best("loglik").law
    if pass_rates:
        for m in PASS_RATE_NS:
            if 2 * m > n:
                continue
            rec[f"spearman_{m}"] = spearman_pass_rate(
                arr, n=m, trials=pass_trials, seed=seed, pairing="neighbours"
            ).pass_rate
            rec[f"ks_{m}"] = ks_pass_rate(arr, n=m, trials=pass_trials, seed=seed, pairing="blocks").pass_rate
    rec["warnings"] = "; ".join(warns) or None
    rec["seconds"] = time.perf_counter() - t0
    return rec, fit


# ------------------------------------------------------------------------------------------ training
@dataclass
class _Setup:
    model: torch.nn.Module
    names: list[str]
    shapes: dict[str, tuple[int, ...]]
    client_data: list[tuple[torch.Tensor, torch.Tensor]]
    test: tuple[torch.Tensor, torch.Tensor]


def _setup(cfg: RunConfig) -> _Setup:
    from fedsqueeze.data import load_dataset, partition
    from fedsqueeze.models import build_model

    d = cfg.data
    data = load_dataset(d.dataset, d.data_dir, download=d.download, **d.options)
    parts = partition(
        data.train.y.numpy(),
        d.num_clients,
        d.partition,
        seed=derive_seed(cfg.seed, "partition"),
        alpha=d.alpha,
        shards_per_client=d.shards_per_client,
        natural=data.natural_clients,
        min_size=d.min_client_size,
    )
    torch.manual_seed(derive_seed(cfg.seed, "init"))
    model = build_model(cfg.model.name, data.input_shape, data.num_classes, **cfg.model.options)
    model.eval()
    names = [n for n, _ in model.named_parameters()]
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    client_data = [(data.train.x[p], data.train.y[p]) for p in parts]
    return _Setup(model, names, shapes, client_data, (data.test.x, data.test.y))


def _ignored_settings(cfg: RunConfig) -> list[str]:
    default = RunConfig().to_dict()
    mine = cfg.to_dict()
    return [
        f"{sec}.{k}"
        for sec in ("compression", "algorithm", "attack", "privacy", "network")
        for k, v in mine[sec].items()
        if v != default[sec][k]
    ]


def _safe_name(layer: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", layer)


def _json_value(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


# ------------------------------------------------------------------------------------------ the API
def analyze(
    config: RunConfig,
    out_dir: str | Path,
    *,
    rounds: int | None = None,
    clients: int | None = None,
    laws: Iterable[str] = LAWS,
    kinds: Sequence[str] = KINDS,
    max_samples: int | None = 100_000,
    pass_rates: bool = False,
    pass_trials: int = 20,
    evaluate: bool = True,
    log_y: bool = True,
    plots: bool = True,
    progress: ProgressFn | None = None,
) -> AnalysisResult:
    """Train plain FedAvg from ``config`` and record per-layer update statistics every round.

    Parameters
    ----------
    config: a validated :class:`RunConfig` (``data``, ``model``, ``clients``, ``server``, ``seed`` are
        used; see the module docstring for what is ignored).
    out_dir: output folder (created); ``stats.jsonl``, ``stats.csv``, ``summary.json`` and PNGs.
    rounds: FedAvg rounds (default ``config.rounds``).
    clients: clients per round (default ``config.clients_per_round()``).
    laws: laws fitted per layer (names of :data:`fedsqueeze.stats.LAWS`); beta needs ``"gennorm"``.
    kinds: which updates to fit, among :data:`KINDS`.
    max_samples: entries the law fits use per layer (a deterministic subsample; moments use all).
    pass_rates: also compute the Spearman/KS pass rates at n = 100 and 3000 (``pass_trials`` trials).
    evaluate: test accuracy and loss of the global model after each round (in ``summary.json``).
    log_y: log y axis of the histograms.
    plots: write the PNG figures.
    progress: called after each round with ``{"round", "rounds", "test_accuracy", "seconds"}``.

    Raises
    ------
    ConfigError
        Bad arguments (before any work), unknown laws/kinds, too many clients per round, missing data.
    """
    from fedsqueeze.sim.local import LocalTrainConfig, train_clients

    if not isinstance(config, RunConfig):
        raise ConfigError(f"config must be a RunConfig (see load_config), got {type(config).__name__}")
    law_names = _check_laws(laws)
    kinds = tuple(dict.fromkeys(kinds))
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ConfigError(f"kinds must be some of {', '.join(KINDS)}, got {list(kinds)!r}")
    n_rounds = config.rounds if rounds is None else rounds
    if isinstance(n_rounds, bool) or not isinstance(n_rounds, int) or n_rounds < 1:
        raise ConfigError(f"rounds must be an integer >= 1, got {rounds!r}")
    per_round = config.clients_per_round() if clients is None else clients
    if isinstance(per_round, bool) or not isinstance(per_round, int) or per_round < 1:
        raise ConfigError(f"clients must be an integer >= 1, got {clients!r}")
    if per_round > config.data.num_clients:
        raise ConfigError(
            f"clients per round = {per_round} but data.num_clients = {config.data.num_clients}; "
            "lower --clients or raise data.num_clients"
        )
    if max_samples is not None and (isinstance(max_samples, bool) or max_samples < 2):
        raise ConfigError(f"max_samples must be an integer >= 2 or None, got {max_samples!r}")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    s = _setup(config)
    n_clients = len(s.client_data)
    if per_round > n_clients:
        raise ConfigError(f"clients per round = {per_round} but the partition has {n_clients} clients")
    x = {n: p.detach().clone().float() for n, p in s.model.named_parameters()}
    velocity = {n: torch.zeros_like(v) for n, v in x.items()}
    c = config.clients
    local_cfg = LocalTrainConfig(
        epochs=c.epochs,
        batch_size=c.batch_size,
        lr=c.lr,
        momentum=c.momentum,
        weight_decay=c.weight_decay,
        max_steps=c.max_steps,
    )
    srv = config.server
    # the run's sampler (fedsqueeze.experiment.run._Setup): same cohorts for the same config and seed;
    # FedAvg's aggregation weights are the sample counts
    sizes = [int(y.shape[0]) for _, y in s.client_data]
    sampler = make_sampler(
        c.sampling,
        c.sampling_options,
        num_clients=n_clients,
        per_round=per_round,
        seed=config.seed,
        sizes=sizes,
        weights=sizes,
    )

    records: list[dict[str, Any]] = []
    round_info: list[dict[str, Any]] = []
    last: dict[tuple[str, str], tuple[torch.Tensor, LayerFit | None]] = {}
    jsonl = (out / STATS_JSONL).open("w", encoding="utf-8")
    try:
        for t in range(n_rounds):
            t0 = time.perf_counter()
            cohort = sampler.sample(t)
            sampled = cohort.clients
            results = train_clients(
                s.model,
                x,
                [s.client_data[i] for i in sampled],
                local_cfg,
                [derive_seed(config.seed, "train", t, i) for i in sampled],
                engine=c.engine,
            )
            ok = [
                (i, r)
                for i, r in zip(sampled, results, strict=True)
                if all(bool(torch.isfinite(d).all()) for d in r.delta.values())
            ]
            rejected = [i for i in sampled if i not in {j for j, _ in ok}]
            agg: dict[str, torch.Tensor] | None = None
            if ok:
                if sampler.observes_norms:  # as the run: the norm of each aggregated client's flat update
                    for i, r in ok:
                        flat = torch.cat([r.delta[n].reshape(-1).float() for n in s.names])
                        sampler.observe(i, float(flat.norm()))
                if cohort.denominator is not None:  # importance: Horvitz-Thompson, fixed denominator
                    weights = [r.num_samples * cohort.factor(i) / cohort.denominator for i, r in ok]
                else:
                    total = float(sum(r.num_samples for _, r in ok))
                    weights = [r.num_samples / total if total > 0 else 1.0 / len(ok) for _, r in ok]
                agg = {
                    n: sum(
                        (w * r.delta[n] for w, (_, r) in zip(weights, ok, strict=True)),
                        torch.zeros_like(x[n]),
                    )
                    for n in s.names
                }
                for n in s.names:
                    velocity[n] = srv.momentum * velocity[n] + agg[n] if srv.momentum else agg[n]
                    x[n] = x[n] + srv.lr * velocity[n]
            acc = loss = None
            if evaluate:
                acc, loss = evaluate_model(s.model, x, s.test[0], s.test[1], config.eval.batch_size)
            losses = [r.train_loss for _, r in ok if math.isfinite(r.train_loss)]

            t_fit = time.perf_counter()
            for layer in s.names:
                for kind in kinds:
                    if not ok:
                        continue
                    if kind == "client":
                        entries, who, k = ok[0][1].delta[layer], ok[0][0], 1
                    elif kind == "pooled":
                        entries = torch.cat([r.delta[layer].reshape(-1) for _, r in ok])
                        who, k = None, len(ok)
                    else:
                        assert agg is not None
                        entries, who, k = agg[layer], None, len(ok)
                    stats, fit = layer_record(
                        entries,
                        law_names,
                        max_samples=max_samples,
                        pass_rates=pass_rates,
                        pass_trials=pass_trials,
                        seed=derive_seed(config.seed, "analyze", t, layer, kind) % 2**32,
                    )
                    rec = {
                        **stats,
                        "round": t + 1,
                        "layer": layer,
                        "kind": kind,
                        "client": who,
                        "num_clients": k,
                        "shape": "x".join(str(d) for d in s.shapes[layer]) or "scalar",
                    }
                    rec = {col: _json_value(rec[col]) for col in COLUMNS}
                    records.append(rec)
                    jsonl.write(json.dumps(rec) + "\n")
                    if t == n_rounds - 1:
                        last[(layer, kind)] = (entries.detach().reshape(-1).clone(), fit)
            jsonl.flush()
            info = {
                "round": t + 1,
                "clients": sampled,
                "rejected": rejected,
                "train_loss": float(np.mean(losses)) if losses else None,
                "test_accuracy": acc,
                "test_loss": _json_value(loss),
                "train_seconds": t_fit - t0,
                "fit_seconds": time.perf_counter() - t_fit,
            }
            round_info.append(info)
            if progress is not None:
                progress(
                    {
                        "round": t + 1,
                        "rounds": n_rounds,
                        "test_accuracy": acc,
                        "seconds": time.perf_counter() - t0,
                    }
                )
    finally:
        jsonl.close()

    _write_csv(out / STATS_CSV, records)
    figures: list[Path] = []
    if plots:
        figures += plot_histograms(last, out, log_y=log_y, round_=n_rounds)
        figures += plot_over_rounds(records, out, kinds)
    summary = summarize(records, kinds)
    summary.update(
        config=config.to_dict(),
        rounds=n_rounds,
        clients_per_round=per_round,
        laws=list(law_names),
        kinds=list(kinds),
        max_samples=max_samples,
        ignored_settings=_ignored_settings(config),
        per_round=round_info,
        final_test_accuracy=round_info[-1]["test_accuracy"] if round_info else None,
        figures=[str(p) for p in figures],
        wall_seconds=time.perf_counter() - t_start,
    )
    (out / SUMMARY_JSON).write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return AnalysisResult(out, records, summary, figures)


# ------------------------------------------------------------------------------------------ outputs
def _write_csv(path: Path, records: list[dict[str, Any]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS))
        w.writeheader()
        for rec in records:
            w.writerow({k: "" if v is None else v for k, v in rec.items()})


def summarize(records: list[dict[str, Any]], kinds: Sequence[str] = KINDS) -> dict[str, Any]:
    """Per ``(layer, kind)`` medians and law wins, and the beta < 2 verdict per kind.

    Returns ``{"layers": [...], "verdict": {kind: {"beta_below_2", "cells", "large_beta_below_2",
    "large_cells", "text"}}}`` (large: layers of at least :data:`LARGE_LAYER` entries); each layer
    entry holds ``layer``, ``kind``, ``rounds`` (fitted), ``skipped`` (rounds not fitted),
    ``median_beta``, ``median_kurtosis``, ``min_beta``, ``max_beta``, ``wins_w2`` and
    ``wins_loglik`` (law -> rounds won).
    """
    layers: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        layers.setdefault((r["layer"], r["kind"]), []).append(r)
    rows = []
    for (layer, kind), recs in layers.items():
        fitted = [r for r in recs if r["skipped"] is None]
        betas = [r["beta"] for r in fitted if r["beta"] is not None]
        kurts = [r["excess_kurtosis"] for r in fitted if r["excess_kurtosis"] is not None]
        wins_w2: dict[str, int] = {}
        wins_ll: dict[str, int] = {}
        for r in fitted:
            if r["best_w2"]:
                wins_w2[r["best_w2"]] = wins_w2.get(r["best_w2"], 0) + 1
            if r["best_loglik"]:
                wins_ll[r["best_loglik"]] = wins_ll.get(r["best_loglik"], 0) + 1
        rows.append(
            {
                "layer": layer,
                "kind": kind,
                "shape": recs[0]["shape"],
                "rounds": len(fitted),
                "skipped": len(recs) - len(fitted),
                "skip_reasons": sorted({r["skipped"] for r in recs if r["skipped"]}),
                "median_beta": statistics.median(betas) if betas else None,
                "min_beta": min(betas) if betas else None,
                "max_beta": max(betas) if betas else None,
                "median_kurtosis": statistics.median(kurts) if kurts else None,
                "wins_w2": dict(sorted(wins_w2.items(), key=lambda kv: -kv[1])),
                "wins_loglik": dict(sorted(wins_ll.items(), key=lambda kv: -kv[1])),
            }
        )
    verdict = {}
    for kind in kinds:
        cells = [r for r in records if r["kind"] == kind and r["beta"] is not None]
        below = sum(1 for r in cells if r["beta"] < 2)
        big = [r for r in cells if r["n"] >= LARGE_LAYER]
        big_below = sum(1 for r in big if r["beta"] < 2)
        verdict[kind] = {
            "beta_below_2": below,
            "cells": len(cells),
            "large_beta_below_2": big_below,
            "large_cells": len(big),
            "text": f"β < 2 in {below} of {len(cells)} (layer, round) cells"
            f" ({big_below} of {len(big)} in layers of >= {LARGE_LAYER} entries)",
        }
    return {"layers": rows, "verdict": verdict}


# ------------------------------------------------------------------------------------------ figures
def _new_figure(ncols: int, width: float = 4.4, height: float = 3.6) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # fixed margins in inches: constrained layout costs seconds per figure on a busy CPU
    w = width * ncols
    fig = Figure(figsize=(w, height), dpi=110)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(
        left=0.75 / w, right=1 - 0.15 / w, bottom=0.6 / height, top=1 - 0.35 / height, wspace=0.32
    )
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


_LAW_STYLE = {"gaussian": "C0", "laplace": "C1", "gennorm": "C3", "dweibull": "C2"}


def plot_histograms(
    last: dict[tuple[str, str], tuple[torch.Tensor, LayerFit | None]],
    out_dir: Path,
    *,
    log_y: bool = True,
    round_: int | None = None,
    bins: int = 120,
    max_points: int = 1_000_000,
) -> list[Path]:
    """Per layer, ``hist_<layer>.png``: one panel per kind, the entries' density and the fitted pdfs.

    With ``log_y`` the y axis is logarithmic and the x range is the entries' full range (the tails
    are the point); otherwise it is the 0.05 %-99.95 % quantile range.
    """
    layers = list(dict.fromkeys(layer for layer, _ in last))
    paths: list[Path] = []
    for layer in layers:
        kinds = [k for (lay, k) in last if lay == layer]
        fig, axes = _new_figure(len(kinds))
        for ax, kind in zip(axes, kinds, strict=True):
            entries, fit = last[(layer, kind)]
            arr = entries.double().numpy()
            if arr.size > max_points:
                arr = np.random.default_rng(0).choice(arr, max_points, replace=False)
            title = f"{layer} [{kind}]" + (f", round {round_}" if round_ else "")
            ax.set_title(title, fontsize=9)
            if fit is None or arr.size < 2 or arr.min() == arr.max():
                ax.text(0.5, 0.5, "not fitted (constant or < 2 entries)", ha="center", transform=ax.transAxes)
                continue
            lo, hi = (
                (float(arr.min()), float(arr.max()))
                if log_y
                else (float(np.quantile(arr, 0.0005)), float(np.quantile(arr, 0.9995)))
            )
            if lo == hi:
                lo, hi = float(arr.min()), float(arr.max())
            heights, _, _ = ax.hist(
                arr,
                bins=bins,
                range=(lo, hi),
                density=True,
                histtype="stepfilled",
                color="0.7",
                label=f"n={fit.n}",
            )
            grid = np.linspace(lo, hi, 600)
            for law, lf in fit.fits.items():
                with np.errstate(all="ignore"):
                    pdf = np.asarray(lf.dist().pdf(grid), dtype=np.float64)
                pdf = np.where(np.isfinite(pdf), pdf, np.nan)
                shape = (
                    f" β={lf.params['beta']:.2f}"
                    if law == "gennorm"
                    else (f" c={lf.params['c']:.2f}" if law == "dweibull" else "")
                )
                ax.plot(
                    grid,
                    pdf,
                    color=_LAW_STYLE.get(law),
                    lw=1.2,
                    label=f"{law}{shape} W2/σ={lf.w2 / fit.std:.3f}",
                )
            if log_y:
                ax.set_yscale("log")
                # from about half a count per bin to a little above the tallest bar (a dweibull with
                # c < 1 has an infinite density at loc)
                ax.set_ylim(0.5 * bins / (arr.size * (hi - lo)), 3.0 * float(np.max(heights)))
            ax.set_xlabel(f"update entry (excess kurtosis {fit.excess_kurtosis:.2f})")
            ax.set_ylabel("density")
            ax.legend(fontsize=7, loc="upper right")
            ax.grid(True, alpha=0.3)
        path = out_dir / f"hist_{_safe_name(layer)}.png"
        fig.savefig(path)
        paths.append(path)
    return paths


def plot_over_rounds(
    records: list[dict[str, Any]], out_dir: Path, kinds: Sequence[str] = KINDS
) -> list[Path]:
    """``beta_vs_round.png`` and ``kurtosis_vs_round.png``: one line per layer, one panel per kind."""
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

    paths: list[Path] = []
    kinds = [k for k in kinds if any(r["kind"] == k for r in records)]
    if not kinds:
        return paths
    layers = list(dict.fromkeys(r["layer"] for r in records))
    for key, fname, ylabel in (
        ("beta", BETA_PNG, "GenNorm β (2 = Gaussian, 1 = Laplace)"),
        ("excess_kurtosis", KURTOSIS_PNG, "excess kurtosis (0 = Gaussian, 3 = Laplace)"),
    ):
        fig, axes = _new_figure(len(kinds))
        for ax, kind in zip(axes, kinds, strict=True):
            for i, layer in enumerate(layers):
                pts = [
                    (r["round"], r[key])
                    for r in records
                    if r["kind"] == kind and r["layer"] == layer and r[key] is not None
                ]
                if pts:
                    xs, ys = zip(*pts, strict=True)
                    ax.plot(xs, ys, marker="o", ms=3, lw=1.2, color=f"C{i % 10}", label=layer)
            if key == "beta":
                ax.axhline(2.0, color="k", ls="--", lw=0.8)
                ax.axhline(1.0, color="grey", ls=":", lw=0.8)
                ax.set_yscale("log")
                ax.yaxis.set_major_locator(FixedLocator([0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0]))
                ax.yaxis.set_major_formatter(ScalarFormatter())
                ax.yaxis.set_minor_formatter(NullFormatter())
            else:
                ax.axhline(0.0, color="k", ls="--", lw=0.8)
                ax.axhline(3.0, color="grey", ls=":", lw=0.8)
                ax.set_yscale("symlog", linthresh=1.0)
            ax.set_title(kind, fontsize=10)
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.set_xlabel("round")
            ax.set_ylabel(ylabel, fontsize=8)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=6, loc="best")
        path = out_dir / fname
        fig.savefig(path)
        paths.append(path)
    return paths
