"""Codec throughput benchmark: one JSON object per line, with baselines measured in the same run.

Run::

    .venv/bin/python benchmarks/codecs.py                      # defaults, well under 3 minutes
    .venv/bin/python benchmarks/codecs.py --sizes 1000000 --repeats 3 --threads 1
    .venv/bin/python benchmarks/codecs.py --codecs "uniform:8" "topk:1% > uniform:4"

Lines, in order:

* ``{"env": ...}`` -- versions, threads and CPU count, so numbers can be compared across runs.
* per size, baselines: ``{"baseline": "memcpy"}`` (``x.clone()``), ``{"baseline": "torch.topk"}``
  (``torch.topk(x.abs(), k)`` at k = 1 %) and ``{"baseline": "fedsqueeze.topk_indices"}`` (same
  k, exact, ties to the lower index), each with ``ms`` and ``MBps``.
* per (codec spec, size): ``codec, size, encode_ms, decode_ms, encode_MBps, decode_MBps, nbytes,
  ratio, rel_l2_err, repeats``. A spec that does not parse, or fails to encode or decode, gives
  ``{"codec": spec, "skipped": reason}`` instead.
* ``{"summary": ...}`` -- the two targets of the performance issue on the 11 M-entry (ResNet-18
  sized) tensor: Top-1 % encode <= 25 ms, and uniform 8-bit encode+decode >= 2 GB/s.

Units: ``*_ms`` are the median wall-clock milliseconds of ``--repeats`` runs after one warm-up;
``MB`` = 1e6 bytes of float32 *input* (``size * 4`` bytes), so ``MBps = size * 4 / 1e6 / seconds``;
``nbytes = len(payload)`` (header included); ``ratio = size * 4 / nbytes``; encode+decode GB/s is
``size * 4 / (encode_s + decode_s) / 1e9``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

import fedsqueeze
from fedsqueeze.codecs.select import topk_indices

DEFAULT_SIZES = [11_000_000, 1_000_000]  # ResNet-18 has ~11.7 M parameters
DEFAULT_CODECS = [
    "fp32",
    "fp16",
    "bf16",
    "uniform:8",
    "uniform:4",
    "uniform:8,stochastic=true",
    "qsgd:s=15,bucket=512",
    "qsgd:s=15,bucket=512,coding=elias",
    "topk:1%",
    "topk:1% > uniform:4",
    "randk:10%",
    "threshold:2.5",
    "topk:1% > uniform:4 > zstd",
]
TOPK_SPEC = "topk:1%"
UNIFORM8_SPEC = "uniform:8"
TARGET_SIZE = 11_000_000
TARGET_TOPK_MS = 25.0
TARGET_UNIFORM8_GBPS = 2.0
#: A single call slower than this many seconds is repeated fewer times (keeps the run short).
SLOW_CALL_S = 1.0
BUDGET_PER_MEASUREMENT_S = 6.0


def emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any, int]:
    """Median seconds of ``fn()`` over up to ``repeats`` runs after one warm-up; its last result."""
    t0 = time.perf_counter()
    out = fn()
    warm = time.perf_counter() - t0
    if warm > SLOW_CALL_S:
        repeats = max(1, min(repeats, int(BUDGET_PER_MEASUREMENT_S / warm)))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out, repeats


def mbps(size: int, seconds: float) -> float:
    return round(size * 4 / 1e6 / seconds, 1) if seconds > 0 else float("inf")


def bench_baselines(x: torch.Tensor, repeats: int) -> dict[str, float]:
    size = x.numel()
    k = max(1, size // 100)
    results: dict[str, float] = {}
    cases: list[tuple[str, Callable[[], Any], dict[str, Any]]] = [
        ("memcpy", x.clone, {}),
        ("torch.topk", lambda: torch.topk(x.abs(), k).indices, {"k": k}),
        ("fedsqueeze.topk_indices", lambda: topk_indices(x, k), {"k": k}),
    ]
    for name, fn, extra in cases:
        sec, _, reps = timed(fn, repeats)
        results[name] = sec
        emit({"baseline": name, "size": size, **extra, "ms": round(sec * 1e3, 3),
              "MBps": mbps(size, sec), "repeats": reps})  # fmt: skip
    return results


def bench_codec(spec: str, x: torch.Tensor, repeats: int) -> dict[str, Any] | None:
    size = x.numel()
    try:
        codec = fedsqueeze.parse_spec(spec)
    except Exception as exc:  # a codec still being written must not stop the run
        emit({"codec": spec, "skipped": f"parse failed: {type(exc).__name__}: {exc}"})
        return None
    try:
        enc_s, payload, enc_reps = timed(
            lambda: codec.encode(x, rng=torch.Generator().manual_seed(0)), repeats
        )
        dec_s, y, dec_reps = timed(lambda: fedsqueeze.decode(payload), repeats)
    except Exception as exc:
        emit({"codec": spec, "size": size, "skipped": f"{type(exc).__name__}: {exc}"})
        return None
    nbytes = len(payload)
    err = float(torch.linalg.vector_norm(y.float() - x) / torch.linalg.vector_norm(x))
    row = {
        "codec": spec,
        "size": size,
        "encode_ms": round(enc_s * 1e3, 3),
        "decode_ms": round(dec_s * 1e3, 3),
        "encode_MBps": mbps(size, enc_s),
        "decode_MBps": mbps(size, dec_s),
        "nbytes": nbytes,
        "ratio": round(size * 4 / nbytes, 3),
        "rel_l2_err": round(err, 6),
        "repeats": min(enc_reps, dec_reps),
    }
    emit(row)
    return row


def summary(rows: dict[tuple[str, int], dict[str, Any]]) -> dict[str, Any]:
    topk = rows.get((TOPK_SPEC, TARGET_SIZE))
    uni = rows.get((UNIFORM8_SPEC, TARGET_SIZE))
    topk_ms = topk["encode_ms"] if topk else None
    uni_gbps = None
    if uni:
        seconds = (uni["encode_ms"] + uni["decode_ms"]) / 1e3
        uni_gbps = round(TARGET_SIZE * 4 / seconds / 1e9, 3)
    return {
        "size": TARGET_SIZE,
        "topk_1pct_encode_ms": topk_ms,
        "topk_1pct_target_ms": TARGET_TOPK_MS,
        "topk_1pct_met": None if topk_ms is None else topk_ms <= TARGET_TOPK_MS,
        "uniform8_encode_decode_GBps": uni_gbps,
        "uniform8_target_GBps": TARGET_UNIFORM8_GBPS,
        "uniform8_met": None if uni_gbps is None else uni_gbps >= TARGET_UNIFORM8_GBPS,
    }


def _thp_mode() -> str | None:
    """The kernel's transparent-huge-page mode (fresh-memory page faults cost a lot without)."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else text.strip()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)),
                   help="comma-separated sizes in entries (default: %(default)s)")  # fmt: skip
    p.add_argument("--codecs", nargs="+", default=DEFAULT_CODECS, metavar="SPEC",
                   help="codec spec strings, each quoted (default: the issue's list)")  # fmt: skip
    p.add_argument("--repeats", type=int, default=5, help="timed runs after one warm-up (median)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: unchanged)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the N(0, 1) test tensor")
    args = p.parse_args(argv)
    try:
        args.sizes = [int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        p.error(f"--sizes must be comma-separated integers, got {args.sizes!r}")
    if not args.sizes or min(args.sizes) < 1:
        p.error("--sizes needs at least one positive size")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    emit({"env": {
        "fedsqueeze": fedsqueeze.__version__, "torch": torch.__version__, "numpy": np.__version__,
        "python": platform.python_version(), "machine": platform.machine(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "repeats": args.repeats, "transparent_hugepage": _thp_mode(),
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
    }})  # fmt: skip
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for size in args.sizes:
        x = torch.randn(size, generator=torch.Generator().manual_seed(args.seed))
        bench_baselines(x, args.repeats)
        for spec in args.codecs:
            row = bench_codec(spec, x, args.repeats)
            if row is not None:
                rows[(spec, size)] = row
        del x
    emit({"summary": summary(rows)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
