"""Local-training throughput: fedsqueeze's engines against a plain PyTorch loop, in the same run.

Run::

    .venv/bin/python benchmarks/sim_throughput.py                 # defaults, about a minute on 2 cores
    .venv/bin/python benchmarks/sim_throughput.py --rounds 10 --threads 1 --workloads mlp

Workload (per ``--workloads`` entry): ``--clients`` clients (default 100) holding ``--examples`` (600)
random MNIST-shaped examples each (``(1, 28, 28)`` float32, 10 classes); each round samples
``--per-round`` (10) clients, every sampled client runs E=1 epoch of SGD with B=32 (lr 0.01) from the
global model, and the global model moves by the mean delta (FedAvg), so every round starts elsewhere.
Models: ``mlp`` (784-200-200-10, 199,210 parameters) and ``cnn`` (FedAvg CNN, 1,663,370 parameters).

The three contenders do the same work on the same clients, from the same start, with the same batches:

* ``plain``: the loop one writes by hand -- ``model.load_state_dict(start)``, ``torch.optim.SGD``,
  per client a ``randperm`` from a generator seeded like fedsqueeze's, ``x[idx]`` batches, ``backward``.
* ``sequential``: ``train_clients(..., engine="sequential")``.
* ``vmap``: ``train_clients(..., engine="vmap")``.

Each round runs the three back to back (order rotated every round) after one untimed warm-up round, so
machine noise hits them alike. Lines, in order:

* ``{"env": ...}`` -- versions, threads, CPU count.
* ``{"baseline": "sgemm ..."}`` -- this machine's measured float32 matmul rate (GFLOP/s) right now.
* per (workload, engine): ``updates_per_s`` (sampled clients / median round seconds), ``round_ms``
  (median), ``round_ms_min``, ``gflop_per_round`` (training FLOPs of a round, counted by
  ``torch.utils.flop_counter``), ``achieved_gflops``, ``rounds``, ``max_abs_diff_vs_plain`` (largest
  |delta difference| to the plain loop's over all rounds: the engines do the same arithmetic up to
  float rounding; the sequential engine matches it bit for bit).
* ``{"summary": ...}`` -- per workload ``sequential_over_plain`` and ``vmap_over_plain`` (throughput
  ratios), ``overhead`` = sequential time / plain time - 1, ``matmul_bound_over_plain`` (the speed-up
  over plain an engine would get if the round's FLOPs ran at the sgemm rate with zero other cost: no
  engine can beat it), what ``engine="auto"`` picks, and the targets: framework overhead <= 10 %
  (sequential vs plain) and, for the MLP, vmap >= 4x plain.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

import fedsqueeze
from fedsqueeze.models import build_model, count_parameters
from fedsqueeze.sim import LocalTrainConfig, choose_engine, train_clients

ENGINES = ("plain", "sequential", "vmap")


def plain_train(
    model: torch.nn.Module,
    start: dict[str, torch.Tensor],
    datasets: list[tuple[torch.Tensor, torch.Tensor]],
    cfg: LocalTrainConfig,
    seeds: list[int],
) -> list[dict[str, torch.Tensor]]:
    """The hand-written baseline: load_state_dict + torch.optim.SGD + manual batching, client by client."""
    deltas = []
    for (x, y), seed in zip(datasets, seeds, strict=True):
        model.load_state_dict(start, strict=False)
        opt = torch.optim.SGD(
            model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        gen = torch.Generator().manual_seed(seed)
        n = x.shape[0]
        for _ in range(cfg.epochs):
            perm = torch.randperm(n, generator=gen)
            for i in range(0, n, cfg.batch_size):
                idx = perm[i : i + cfg.batch_size]
                opt.zero_grad()
                loss = F.cross_entropy(model(x[idx]), y[idx])
                loss.backward()
                opt.step()
        deltas.append({k: p.detach() - start[k] for k, p in model.named_parameters()})
    return deltas


def sgemm_gflops(size: int = 1024, repeats: int = 20) -> float:
    """Measured float32 matrix-multiply throughput (GFLOP/s): the ceiling for these workloads."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        ts.append(time.perf_counter() - t0)
    return 2 * size**3 / min(ts) / 1e9


def train_flops_per_example(model: torch.nn.Module, batch: int = 32) -> float:
    """FLOPs of one SGD step's forward + backward, per example (``torch.utils.flop_counter``)."""
    from torch.utils.flop_counter import FlopCounterMode

    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch


def run_workload(name: str, args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    model = build_model(name, (1, 28, 28), 10)
    gflop_per_round = train_flops_per_example(model) * args.examples * args.per_round / 1e9
    gen = torch.Generator().manual_seed(1)
    n = args.examples
    x_all = torch.randn(args.clients * n, 1, 28, 28, generator=gen)
    y_all = torch.randint(0, 10, (args.clients * n,), generator=gen)
    datasets = [(x_all[i * n : (i + 1) * n], y_all[i * n : (i + 1) * n]) for i in range(args.clients)]
    cfg = LocalTrainConfig(epochs=1, batch_size=32, lr=0.01)
    rng = np.random.default_rng(2)
    global_params = {k: p.detach().clone() for k, p in model.named_parameters()}

    times: dict[str, list[float]] = {e: [] for e in ENGINES}
    max_diff = dict.fromkeys(ENGINES, 0.0)
    for r in range(args.rounds + 1):  # round 0 is the warm-up
        clients = sorted(rng.choice(args.clients, args.per_round, replace=False).tolist())
        data = [datasets[c] for c in clients]
        seeds = [1000 * r + c for c in clients]
        deltas: dict[str, list[dict[str, torch.Tensor]]] = {}
        for pos in range(len(ENGINES)):
            engine = ENGINES[(pos + r) % len(ENGINES)]
            t0 = time.perf_counter()
            if engine == "plain":
                deltas[engine] = plain_train(model, global_params, data, cfg, seeds)
            else:
                res = train_clients(model, global_params, data, cfg, seeds, engine=engine)
                deltas[engine] = [x.delta for x in res]
            dt = time.perf_counter() - t0
            if r > 0:
                times[engine].append(dt)
        for e in ENGINES:
            diff = max(
                float((a[k] - b[k]).abs().max())
                for a, b in zip(deltas[e], deltas["plain"], strict=True)
                for k in a
            )
            max_diff[e] = max(max_diff[e], diff)
        with torch.no_grad():  # FedAvg step (equal weights: every client holds n examples)
            for k in global_params:
                global_params[k] += torch.stack([d[k] for d in deltas["sequential"]]).mean(0)

    out: dict[str, Any] = {
        "params": count_parameters(model),
        "auto": choose_engine(model, datasets[:2]),
        "gflop_per_round": gflop_per_round,
    }
    for e in ENGINES:
        med = statistics.median(times[e])
        line = {
            "workload": name,
            "engine": e,
            "updates_per_s": round(args.per_round / med, 2),
            "round_ms": round(med * 1e3, 2),
            "round_ms_min": round(min(times[e]) * 1e3, 2),
            "gflop_per_round": round(gflop_per_round, 3),
            "achieved_gflops": round(gflop_per_round / med, 1),
            "rounds": args.rounds,
            "clients_per_round": args.per_round,
            "examples_per_client": n,
            "max_abs_diff_vs_plain": diff_fmt(max_diff[e]),
        }
        print(json.dumps(line), flush=True)
        out[e] = med
    return out


def diff_fmt(v: float) -> float:
    return float(f"{v:.3g}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--rounds", type=int, default=5, help="timed rounds per workload (after one warm-up round)"
    )
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch.set_num_threads")
    p.add_argument(
        "--workloads", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn", "logreg", "cifar_cnn"]
    )
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--per-round", type=int, default=10)
    p.add_argument("--examples", type=int, default=600, help="examples per client")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.per_round < 1 or args.per_round > args.clients:
        p.error("need --rounds >= 1 and 1 <= --per-round <= --clients")
    torch.set_num_threads(args.threads)
    env = {
        "fedsqueeze": fedsqueeze.__version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }
    print(json.dumps({"env": env}), flush=True)
    peak = sgemm_gflops()
    print(json.dumps({"baseline": "sgemm 1024x1024 float32", "gflops": round(peak, 1)}), flush=True)
    summary: dict[str, Any] = {}
    for w in args.workloads:
        res = run_workload(w, args)
        seq = res["plain"] / res["sequential"]
        vm = res["plain"] / res["vmap"]
        entry: dict[str, Any] = {
            "params": res["params"],
            "sequential_over_plain": round(seq, 3),
            "vmap_over_plain": round(vm, 3),
            "vmap_over_sequential": round(res["sequential"] / res["vmap"], 3),
            "overhead": round(res["sequential"] / res["plain"] - 1, 3),
            "auto_engine": res["auto"],
            "target_overhead_le_10pct": bool(seq >= 1 / 1.1),
            # best possible speed-up: all FLOPs at the measured sgemm rate, zero other cost
            "matmul_bound_over_plain": round(res["plain"] / (res["gflop_per_round"] / peak), 2),
        }
        if w == "mlp":
            entry["target_vmap_ge_4x_plain"] = bool(vm >= 4.0)
        summary[w] = entry
    print(json.dumps({"summary": summary}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
