"""LoCoDL vs Scaffnew on MNIST softmax regression: rounds and measured bytes to a target error.

Communication rounds and *measured* uplink bytes to reach ``‖y − x*‖ ≤ target · ‖x⁰ − x*‖``, through
the real round loop (``fedsqueeze.experiment.run``); results: ``docs/results/locodl_mnist.md``.

    OMP_NUM_THREADS=1 python examples/locodl_mnist_study.py --data-dir /path/to/data \\
        --clients 20 --lam 1.0 --rounds 4000 --max-iters 1800 --out /tmp/locodl_mnist

Problem (LoCoDL's, Condat, Maranjyan, Richtárik, ICLR 2025, arXiv 2403.04348)::

    min_x  (1/n) Σ_i CE_i(x) + (λ/2)‖x‖²        CE_i: client i's mean cross-entropy (logreg, 7,850 params)

Scaffnew with ``weights = "uniform"`` and ``clients.weight_decay = λ`` solves the same problem; LoCoDL
runs with ``clients.weight_decay = λ/2`` and ``g_l2 = λ/2`` (the same objective, with g strongly
convex as its theory assumes). Full local gradients (``clients.batch_size`` = the largest client).

1. ``x*`` by L-BFGS in float64 (uniform mean over clients, same partition and seed as the runs) to a
   gradient norm ≤ ``--xstar-tol``; cached in ``OUT/xstar.pt``.
2. ``L`` = max over clients of the top Hessian eigenvalue of ``CE_i`` (power iteration, float64) at x⁰
   and at x*, plus λ; ``γ = clients.lr = 1/L`` unless ``--gamma`` is given. κ = L/λ is reported.
3. Every (method, p) of the grid runs with a spy on the loop's ``_one_round`` that records the global
   model after every round (LoCoDL: ``y``); a ``progress`` callback stops the run once the error is
   ≤ ``--target`` (or at ``--rounds`` rounds / ``--max-iters`` local iterations). Byte counts are the
   run's own ``cum_uplink_bytes`` / ``cum_downlink_bytes`` metrics (lengths of the serialized payloads).

Methods: ``scaffnew`` (fp32 uplink), ``locodl-fp32``, ``locodl-randk10`` (``randk:10%``),
``locodl-randk1`` (``randk:1%``); Rand-K sends k values + a seed per tensor. ``--grid
METHOD=P1,P2,...`` (repeatable): run only the methods given, with these p (default: every method
with ``DEFAULT_GRID``); plain distributed GD is ``scaffnew`` at p = 1. Local training uses
``clients.engine = "sequential"``: with full batches the ``vmap`` engine pads every client's batch to
``batch_size`` and was slower here.

Output: one JSON line per run (``"kind": "run"``), one per method at its best p (``"kind": "best"``,
the p with the fewest uplink bytes to the target among those that reached it), and
``OUT/locodl_mnist_runs.csv`` (one row per run) + ``OUT/locodl_mnist_trace.csv`` (one row per round).
Compute is bounded two ways: a run stops at ``--max-iters`` local iterations, and (unless
``--no-prune``) once its uplink bytes exceed those of a p of the same method that already reached the
target ("pruned": it cannot be that method's best p). The p values of a method run in the order given,
so list the smallest first: a pruned run then costs at most the incumbent's rounds/p iterations. A
run that stops before the target is reported with ``reached = false`` and, where its error was still
falling, a log-linear extrapolation (``rounds_extrapolated``) from the last third of its trace.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import math
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fedsqueeze.experiment import RunDiverged, config_from_dict, run
from fedsqueeze.experiment.run import _Setup

run_module: Any = importlib.import_module("fedsqueeze.experiment.run")  # for the _one_round spy

METHODS: dict[str, tuple[str, str]] = {  # name -> (algorithm, uplink codec)
    "scaffnew": ("scaffnew", "fp32"),
    "locodl-fp32": ("locodl", "fp32"),
    "locodl-randk10": ("locodl", "randk:10%"),
    "locodl-randk1": ("locodl", "randk:1%"),
}
DEFAULT_GRID: dict[str, list[float]] = {  # run in this order (smallest p first: cheap pruning)
    "scaffnew": [0.05, 0.1, 0.2, 0.4, 1.0],  # p = 1: plain distributed GD
    "locodl-fp32": [0.1, 0.2, 0.4],
    "locodl-randk10": [0.2, 0.3, 0.4, 0.7],
    "locodl-randk1": [1.0],  # compressor-limited at every p ≤ 1 here: its rate grows with p²
}
MB = 1e6


def emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


# ------------------------------------------------------------------------------------ configs
def base_raw(args: argparse.Namespace, batch_size: int) -> dict[str, Any]:
    return {
        "seed": args.seed,
        "rounds": args.rounds,
        "data": {
            "dataset": "mnist",
            "data_dir": args.data_dir,
            "partition": args.partition,
            "alpha": args.alpha,
            "num_clients": args.clients,
        },
        "model": {"name": "logreg"},
        "clients": {"per_round": args.clients, "batch_size": batch_size, "engine": "sequential"},
        "eval": {"every": 10**9},  # only the last round of a run that hits --rounds is evaluated
    }


def method_config(raw: dict[str, Any], method: str, p: float, gamma: float, lam: float) -> Any:
    algo, uplink = METHODS[method]
    r = json.loads(json.dumps(raw))
    r["clients"].update(lr=gamma)
    if algo == "scaffnew":
        r["clients"]["weight_decay"] = lam
        r["algorithm"] = {"name": "scaffnew", "options": {"p": p, "weights": "uniform"}}
    else:  # f_i = CE_i + (λ/4)‖x‖², g = (λ/4)‖y‖²: at consensus (1/n) Σ f_i + g = CE + (λ/2)‖x‖²
        r["clients"]["weight_decay"] = lam / 2
        r["algorithm"] = {"name": "locodl", "options": {"p": p, "g_l2": lam / 2}}
    r["compression"] = {"uplink": uplink, "downlink": "fp32"}
    return config_from_dict(r)


# ------------------------------------------------------------------------------------ problem
class Problem:
    """The uniform-mean softmax-regression objective on the run's own client split (float64)."""

    def __init__(self, setup: _Setup, lam: float) -> None:
        self.lam = lam
        self.layout = setup.layout
        self.x0 = setup.x0.double()
        self.data = [(a.reshape(a.shape[0], -1).double(), b) for a, b in setup.client_data]

    def ce(self, x: torch.Tensor, i: int) -> torch.Tensor:
        p = self.layout.unflatten(x)
        a, b = self.data[i]
        return torch.nn.functional.cross_entropy(a @ p["1.weight"].T + p["1.bias"], b)

    def f(self, x: torch.Tensor) -> torch.Tensor:
        ce = sum(self.ce(x, i) for i in range(len(self.data)))
        return ce / len(self.data) + self.lam / 2 * (x * x).sum()

    def grad_norm(self, x: torch.Tensor) -> float:
        x = x.detach().clone().requires_grad_(True)
        return float(torch.autograd.grad(self.f(x), x)[0].norm())

    def top_hessian_eig(self, x: torch.Tensor, i: int, iters: int = 20) -> float:
        """Largest eigenvalue of ∇²CE_i(x) (power iteration on Hessian-vector products)."""
        v = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
        v /= v.norm()
        lam = 0.0
        for _ in range(iters):
            xx = x.detach().clone().requires_grad_(True)
            (g,) = torch.autograd.grad(self.ce(xx, i), xx, create_graph=True)
            (hv,) = torch.autograd.grad(g @ v, xx)
            lam = float(hv @ v)
            v = hv / hv.norm()
        return lam

    def smoothness(self, x: torch.Tensor) -> float:
        return max(self.top_hessian_eig(x, i) for i in range(len(self.data))) + self.lam

    def solve(self, tol: float, max_outer: int = 60) -> tuple[torch.Tensor, float, int]:
        """x* by L-BFGS (strong Wolfe) from x⁰; returns (x*, ‖∇f(x*)‖, function evaluations)."""
        x = self.x0.clone().requires_grad_(True)
        opt = torch.optim.LBFGS(
            [x],
            max_iter=200,
            history_size=50,
            tolerance_grad=tol / 10,
            tolerance_change=0.0,
            line_search_fn="strong_wolfe",
        )
        evals = 0

        def closure() -> torch.Tensor:
            nonlocal evals
            evals += 1
            opt.zero_grad()
            loss = self.f(x)
            loss.backward()
            return loss

        gnorm = self.grad_norm(x)
        for _ in range(max_outer):
            if gnorm <= tol:
                break
            opt.step(closure)
            new = self.grad_norm(x)
            if new >= gnorm and new > tol:  # stalled (float64 noise floor)
                gnorm = new
                break
            gnorm = new
        return x.detach(), gnorm, evals


def xstar_for(args: argparse.Namespace, prob: Problem, out: Path) -> tuple[torch.Tensor, dict[str, Any]]:
    key = {"clients": args.clients, "lam": args.lam, "partition": args.partition, "alpha": args.alpha}
    key["seed"] = args.seed
    # cache: the vector as safetensors, the rest as JSON (nothing is unpickled)
    from safetensors.torch import load_file, save_file

    cache, meta = out / "xstar.safetensors", out / "xstar.json"
    if cache.exists() and meta.exists():
        saved = json.loads(meta.read_text())
        if saved.get("key") == key and saved.get("grad_norm", math.inf) <= args.xstar_tol:
            return load_file(str(cache))["xstar"], saved["info"]
    t0 = time.perf_counter()
    xs, gnorm, evals = prob.solve(args.xstar_tol)
    info = {"grad_norm": gnorm, "lbfgs_evals": evals, "lbfgs_s": round(time.perf_counter() - t0, 1)}
    save_file({"xstar": xs.contiguous()}, str(cache))
    meta.write_text(json.dumps({"key": key, "grad_norm": gnorm, "info": info}))
    return xs, info


# ------------------------------------------------------------------------------------ runs
class _Stop(Exception):
    pass


def tracked(
    cfg: Any,
    run_dir: Path,
    xstar: torch.Tensor,
    x0: torch.Tensor,
    args: argparse.Namespace,
    bound_bytes: float | None = None,
) -> dict[str, Any]:
    """Run ``cfg`` until the target / a cap; return the error trace, the metrics and the algorithm.

    ``bound_bytes``: stop ("pruned") once the cumulative uplink bytes reach it before the target (the
    uplink bytes another p of the same method needed: this p cannot need fewer)."""
    orig = run_module._one_round
    errs: list[float] = []
    metrics: list[dict[str, Any]] = []
    algo: list[Any] = []
    scale = float((x0 - xstar).norm())

    def spy(cfg_: Any, s: Any, *a: Any, **kw: Any) -> dict[str, Any]:
        if not algo:
            algo.append(s.algo)
        rec = orig(cfg_, s, *a, **kw)
        errs.append(float((rec["_x"].double() - xstar).norm()) / scale)
        return rec

    stop = ["round cap"]

    def progress(rec: dict[str, Any]) -> None:
        metrics.append(rec)
        e = errs[-1]
        if not math.isfinite(e) or e > 1e3:
            stop[0] = "diverged"
            raise _Stop
        if e <= args.target:
            stop[0] = "target"
            raise _Stop
        if bound_bytes is not None and rec["cum_uplink_bytes"] >= bound_bytes:
            stop[0] = "pruned"
            raise _Stop
        if rec.get("cum_iterations", rec["round"]) >= args.max_iters:
            stop[0] = "iteration cap"
            raise _Stop

    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_module._one_round = spy
    t0 = time.perf_counter()
    try:
        run(cfg, run_dir, progress=progress, plots=False)
    except _Stop:
        pass
    except RunDiverged:
        stop[0] = "diverged"
    finally:
        run_module._one_round = orig
    return {
        "errs": errs,
        "metrics": metrics,
        "algo": algo[0],
        "stop": stop[0],
        "wall_s": time.perf_counter() - t0,
    }


def first_hit(errs: Sequence[float], tol: float) -> int | None:
    return next((i for i, e in enumerate(errs) if e <= tol), None)


def log_rate(values: Sequence[float], errs: Sequence[float]) -> float | None:
    """Slope of ln(err) against ``values`` (rounds or iterations) over the last third of the trace."""
    m = len(errs)
    lo = (2 * m) // 3
    xs = [float(v) for v in values[lo:]]
    ys = [math.log(e) for e in errs[lo:] if e > 0]
    if len(ys) != len(xs) or len(xs) < 3 or xs[-1] == xs[0]:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((a - mx) ** 2 for a in xs)
    return sum((a - mx) * (b - my) for a, b in zip(xs, ys, strict=True)) / sxx


def summarise(
    method: str, p: float, res: dict[str, Any], args: argparse.Namespace, extra_tols: Sequence[float]
) -> dict[str, Any]:
    errs, mets = res["errs"], res["metrics"]
    algo = res["algo"]
    n = len(mets)
    rounds = list(range(1, n + 1))
    iters = [int(m.get("cum_iterations", m["round"])) for m in mets]
    up_per_round = mets[0]["uplink_bytes"] if mets else 0
    down_per_round = mets[0]["downlink_bytes"] if mets else 0
    row: dict[str, Any] = {
        "kind": "run",
        "method": method,
        "uplink_codec": METHODS[method][1],
        "p": p,
        "gamma": args.gamma_used,
        "lam": args.lam,
        "clients": args.clients,
        "omega": getattr(algo, "omega", 0.0),
        "rho": getattr(algo, "rho", 1.0),
        "chi": getattr(algo, "chi", 1.0),
        "stop": res["stop"],
        "rounds_run": n,
        "iterations_run": iters[-1] if iters else 0,
        "final_rel_err": errs[n - 1] if n else None,
        "uplink_bytes_per_round": up_per_round,
        "downlink_bytes_per_round": down_per_round,
        "wall_s": round(res["wall_s"], 1),
    }
    for tol in [args.target, *extra_tols]:
        tag = f"{tol:g}"
        hit = first_hit(errs[:n], tol)
        if hit is None:
            row[f"reached_{tag}"] = False
            row[f"rounds_{tag}"] = row[f"iterations_{tag}"] = None
            row[f"uplink_MB_{tag}"] = row[f"downlink_MB_{tag}"] = row[f"total_MB_{tag}"] = None
            continue
        m = mets[hit]
        row[f"reached_{tag}"] = True
        row[f"rounds_{tag}"] = hit + 1
        row[f"iterations_{tag}"] = iters[hit]
        row[f"uplink_MB_{tag}"] = m["cum_uplink_bytes"] / MB
        row[f"downlink_MB_{tag}"] = m["cum_downlink_bytes"] / MB
        row[f"total_MB_{tag}"] = (m["cum_uplink_bytes"] + m["cum_downlink_bytes"]) / MB
    slope_r = log_rate(rounds, errs[:n]) if n else None
    slope_i = log_rate(iters, errs[:n]) if n else None
    row["rate_per_round"] = None if slope_r is None else math.exp(slope_r)
    row["rate_per_iteration"] = None if slope_i is None else math.exp(slope_i)
    tag = f"{args.target:g}"
    row["rounds_extrapolated"] = None
    if not row[f"reached_{tag}"] and slope_r is not None and slope_r < 0 and errs[n - 1] > 0:
        est = n + math.log(args.target / errs[n - 1]) / slope_r
        row["rounds_extrapolated"] = math.ceil(est)
        row["uplink_MB_extrapolated"] = math.ceil(est) * up_per_round / MB
    return row


# ------------------------------------------------------------------------------------ main
def parse_grid(items: Sequence[str]) -> dict[str, list[float]]:
    grid = {k: list(v) for k, v in DEFAULT_GRID.items()}
    chosen: dict[str, list[float]] = {}
    for item in items:
        name, _, ps = item.partition("=")
        if name not in METHODS:
            raise SystemExit(f"--grid: unknown method {name!r}; choose from {', '.join(METHODS)}")
        try:
            vals = [float(v) for v in ps.split(",") if v.strip()]
        except ValueError as e:
            raise SystemExit(f"--grid {item!r}: p values must be numbers ({e})") from None
        if not vals or any(not 0 < v <= 1 for v in vals):
            raise SystemExit(f"--grid {item!r}: give p values in (0, 1]")
        chosen[name] = vals
    return chosen if chosen else grid


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None, help="folder holding mnist/ (default: the library's)")
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--lam", type=float, default=1.0, help="ℓ2 weight λ of (λ/2)‖x‖²")
    ap.add_argument("--rounds", type=int, default=4000, help="cap on communication rounds per run")
    ap.add_argument("--max-iters", type=int, default=1800, help="cap on local iterations (Σ K) per run")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--target", type=float, default=1e-4, help="stop at ‖y − x*‖ ≤ target ‖x⁰ − x*‖")
    ap.add_argument("--also", type=float, nargs="*", default=[1e-3], help="extra tolerances reported")
    ap.add_argument("--gamma", type=float, default=None, help="clients.lr (default 1/L, L estimated)")
    ap.add_argument("--partition", default="shards", choices=["shards", "dirichlet", "iid"])
    ap.add_argument("--alpha", type=float, default=0.5, help="Dirichlet α (partition = dirichlet)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--xstar-tol", type=float, default=1e-8, help="‖∇f(x*)‖ for L-BFGS")
    ap.add_argument("--grid", action="append", default=[], help="METHOD=P1,P2,... (repeatable)")
    ap.add_argument("--no-prune", action="store_true", help="run every p to the target or a cap")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    grid = parse_grid(args.grid)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    # the client split, x⁰ and the client sizes come from the loop's own setup
    probe = config_from_dict({**base_raw(args, 1), "algorithm": {"name": "scaffnew", "options": {}}})
    setup = _Setup(probe, out / "setup")
    sizes = [int(y.shape[0]) for _, y in setup.client_data]
    prob = Problem(setup, args.lam)
    t0 = time.perf_counter()
    xstar, xinfo = xstar_for(args, prob, out)
    l_x0, l_xs = prob.smoothness(prob.x0), prob.smoothness(xstar)
    smooth = max(l_x0, l_xs)
    args.gamma_used = args.gamma if args.gamma is not None else 1.0 / smooth
    with torch.no_grad():
        prm = setup.layout.unflatten(xstar.float())
        logits = torch.func.functional_call(setup.model, prm, (setup.data.test.x,))
        acc = float((logits.argmax(1) == setup.data.test.y).float().mean())
    emit(
        {
            "kind": "problem",
            "clients": args.clients,
            "partition": args.partition,
            "client_sizes": [min(sizes), max(sizes)],
            "classes_per_client": sorted({len(set(y.tolist())) for _, y in setup.client_data}),
            "params": int(setup.x0.numel()),
            "lam": args.lam,
            "L_max_client_x0": l_x0,
            "L_max_client_xstar": l_xs,
            "gamma": args.gamma_used,
            "kappa": smooth / args.lam,
            "gamma_mu": args.gamma_used * args.lam,
            "xstar_grad_norm": xinfo["grad_norm"],
            "xstar_norm": float(xstar.norm()),
            "x0_dist": float((prob.x0 - xstar).norm()),
            "xstar_test_accuracy": acc,
            "lbfgs_evals": xinfo["lbfgs_evals"],
            "setup_s": round(time.perf_counter() - t0, 1),
        }
    )
    raw = base_raw(args, max(sizes))
    rows: list[dict[str, Any]] = []
    trace_path = out / "locodl_mnist_trace.csv"
    with trace_path.open("w", newline="") as tf:
        tw = csv.writer(tf)
        tw.writerow(
            ["method", "p", "round", "iterations", "rel_err", "cum_uplink_bytes", "cum_downlink_bytes"]
        )
        for method, ps in grid.items():
            for p in ps:
                cfg = method_config(raw, method, p, args.gamma_used, args.lam)
                tag = f"{args.target:g}"
                done = [r[f"uplink_MB_{tag}"] for r in rows if r["method"] == method and r[f"reached_{tag}"]]
                bound = min(done) * MB if done and not args.no_prune else None
                res = tracked(cfg, out / "runs" / f"{method}_p{p:g}", xstar, prob.x0, args, bound)
                for m, e in zip(res["metrics"], res["errs"], strict=False):
                    tw.writerow(
                        [
                            method,
                            p,
                            m["round"],
                            m.get("cum_iterations", m["round"]),
                            f"{e:.6e}",
                            m["cum_uplink_bytes"],
                            m["cum_downlink_bytes"],
                        ]
                    )
                tf.flush()
                row = summarise(method, p, res, args, args.also)
                rows.append(row)
                emit(row)
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with (out / "locodl_mnist_runs.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    for tol in [args.target, *args.also]:
        tag = f"{tol:g}"
        for method in grid:
            done = [r for r in rows if r["method"] == method and r[f"reached_{tag}"]]
            if not done:
                emit({"kind": "best", "tol": tol, "method": method, "reached": False})
                continue
            b = min(done, key=lambda r: r[f"uplink_MB_{tag}"])
            emit(
                {
                    "kind": "best",
                    "tol": tol,
                    "method": method,
                    "reached": True,
                    "p": b["p"],
                    "rounds": b[f"rounds_{tag}"],
                    "iterations": b[f"iterations_{tag}"],
                    "uplink_MB": b[f"uplink_MB_{tag}"],
                    "total_MB": b[f"total_MB_{tag}"],
                }
            )


if __name__ == "__main__":
    main()
