"""The codec specs every conformance test runs over. A newly registered codec must appear here
(``test_every_registered_codec_is_covered`` fails otherwise)."""

from __future__ import annotations

CASES: list[str] = [
    "fp32",
    "fp16",
    "bf16",
    "raw",
    "uniform:8",
    "uniform:4",
    "uniform:1",
    "uniform:16",
    "uniform:3,block=64",
    "uniform:12,stochastic=true",
    "uniform:8,stochastic=true,block=128",
    "qsgd:s=15,bucket=512",
    "qsgd:s=1,bucket=0,coding=elias",
    "qsgd:s=255,bucket=128,coding=elias",
    "topk:10%",
    "topk:1% > uniform:4",
    "topk:k=5 > fp16",
    "threshold:1.0",
    "threshold:0.5 > uniform:8,stochastic=true",
    "randk:10%",
    "randk:25% > qsgd:s=15,bucket=64",
    "fp32 > zstd",
    "uniform:8 > zstd",
    "topk:10% > uniform:4 > zstd",
]
