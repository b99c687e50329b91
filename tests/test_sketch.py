"""CountSketch: portable hashes, linearity, heavy hitters, summing payloads, bytes, validation."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

import fedsqueeze
from fedsqueeze.codecs.sketch import (
    PARAMS_NBYTES,
    CountSketch,
    estimate,
    parse_payload,
    row_hashes,
    row_keys,
    sketch,
    sum_payloads,
    unsketch,
)
from fedsqueeze.errors import ConfigError, DecodeError, EncodeError
from fedsqueeze.wire.frame import build_frame, header_size

MASK = (1 << 64) - 1


def rng(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def py_mix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def py_hash(seed: int, row: int, i: int, cols: int) -> tuple[int, int]:
    """The documented hash, in plain Python integers (the reference for the vectorised one)."""
    key = py_mix64(py_mix64(seed) ^ (row + 1))
    h = py_mix64((key + (i + 1) * 0x9E3779B97F4A7C15) & MASK)
    return ((h >> 32) * cols) >> 32, 1 - 2 * (h & 1)


@pytest.mark.parametrize(("seed", "cols"), [(42, 1000), (0, 7), (2**64 - 1, 2**32 - 1), (123456789, 1)])
def test_hashes_follow_the_documented_formula(seed: int, cols: int) -> None:
    keys = row_keys(seed, 3)
    for row in range(3):
        for start in (0, 5, 2**33):
            bucket, sign = row_hashes(keys[row], start, start + 20, cols)
            ref = [py_hash(seed, row, i, cols) for i in range(start, start + 20)]
            assert bucket.tolist() == [b for b, _ in ref]
            assert sign.tolist() == [float(s) for _, s in ref]


def test_hashes_are_frozen_and_balanced() -> None:
    bucket, sign = row_hashes(row_keys(42, 2)[1], 0, 6, 1000)
    assert bucket.tolist() == [739, 614, 565, 223, 330, 740]
    assert sign.tolist() == [-1.0, -1.0, -1.0, 1.0, 1.0, -1.0]
    bucket, sign = row_hashes(row_keys(7, 1)[0], 0, 100_000, 10)
    assert np.bincount(bucket, minlength=10).min() > 9_500
    assert abs(float(sign.mean())) < 0.01


def test_sketch_is_linear() -> None:
    a, b = torch.randn(5000, generator=rng(1)), torch.randn(5000, generator=rng(2))
    sa, sb, sab = (sketch(v, 5, 300, 9) for v in (a, b, a + b))
    assert sa.shape == (5, 300) and sa.dtype == torch.float32
    assert torch.allclose(sa + sb, sab, atol=1e-4)
    assert torch.allclose(sketch(3 * a, 5, 300, 9), 3 * sa, rtol=1e-6, atol=1e-5)


def test_estimate_is_exact_for_a_single_entry_and_median_of_rows() -> None:
    x = torch.zeros(1000)
    x[123] = -2.5
    for rows in (1, 2, 3, 4):
        est = estimate(sketch(x, rows, 50, 3), 1000, 3)
        assert float(est[123]) == -2.5
    table = torch.tensor([[1.0, 10.0], [2.0, 20.0], [4.0, 40.0]])  # 3 rows: the median of 3
    per_row = []
    for j, key in enumerate(row_keys(5, 3)):
        bucket, sign = row_hashes(key, 0, 1, 2)
        per_row.append(float(table[j, int(bucket[0])]) * float(sign[0]))
    assert float(estimate(table, 1, 5)[0]) == sorted(per_row)[1]


def test_heavy_hitters_are_recovered() -> None:
    d, k = 200_000, 20
    g = rng(3)
    x = torch.randn(d, generator=g) * 0.003  # noise floor per row: 0.003 * sqrt(d / cols) = 0.03
    planted = torch.randperm(d, generator=g)[:k].sort().values
    x[planted] = (torch.rand(k, generator=g) + 1) * torch.where(torch.rand(k, generator=g) < 0.5, -1.0, 1.0)
    hh = unsketch(sketch(x, 5, 2000, 11), d, k, 11)
    assert torch.equal(hh.indices, planted)
    assert torch.allclose(hh.values, x[planted], atol=0.1)
    y = fedsqueeze.decode(CountSketch(2000, k=k, seed=11).encode(x))
    assert torch.equal(y, hh.to_dense())


def test_payload_bytes() -> None:
    for shape, rows, cols, item, spec_table in [((1000,), 5, 300, 4, "fp32"), ((40, 50), 3, 128, 2, "fp16")]:
        c = CountSketch(cols, k=10, rows=rows, table=spec_table)
        payload = c.encode(torch.randn(shape, generator=rng(4)))
        assert len(payload) == header_size(len(shape)) + PARAMS_NBYTES + item * rows * cols
    assert PARAMS_NBYTES == 31
    # Independent of the tensor's size:
    c = CountSketch(100, k=5)
    assert len(c.encode(torch.randn(10))) == len(c.encode(torch.randn(100_000)))


def test_sum_of_payloads_decodes_like_the_sum_of_tables() -> None:
    c = CountSketch(500, k=30, rows=5, seed=17)
    g = rng(5)
    xs = [torch.randn(4000, generator=g) for _ in range(4)]
    payloads = [c.encode(x) for x in xs]
    total = sum_payloads(payloads)
    tables = [parse_payload(p).table.double() for p in payloads]
    ref_table = sum(tables[1:], tables[0]).float()
    assert torch.equal(parse_payload(total).table, ref_table)
    assert torch.equal(fedsqueeze.decode(total), unsketch(ref_table, 4000, 30, 17).to_dense())
    # ... and, up to float rounding of the table, like sketching the sum directly.
    direct = parse_payload(c.encode(sum(xs[1:], xs[0]))).table
    assert torch.allclose(direct, ref_table, atol=1e-4)
    # weights: a weighted mean
    w = [0.1, 0.2, 0.3, 0.4]
    mean_table = parse_payload(sum_payloads(payloads, weights=w)).table
    weighted = torch.stack([wi * t for wi, t in zip(w, tables, strict=True)]).sum(0).float()
    assert torch.allclose(mean_table, weighted, atol=1e-6)


def test_sum_refuses_mismatched_payloads() -> None:
    x = torch.randn(1000, generator=rng(6))
    base = CountSketch(200, k=10, seed=1).encode(x)
    for other, field in [
        (CountSketch(200, k=10, seed=2).encode(x), "seed"),
        (CountSketch(201, k=10, seed=1).encode(x), "cols"),
        (CountSketch(200, k=10, rows=4, seed=1).encode(x), "rows"),
        (CountSketch(200, k=11, seed=1).encode(x), "k"),
        (CountSketch(200, k=10, seed=1, table="fp16").encode(x), "fp16"),
        (CountSketch(200, k=10, seed=1).encode(torch.randn(1001)), "d"),
        (CountSketch(200, k=10, seed=1).encode(x.reshape(10, 100)), "shape"),
        (CountSketch(200, k=10, seed=1).encode(x.double()), "dtype"),
    ]:
        with pytest.raises(ConfigError, match=field):
            sum_payloads([base, other])
    with pytest.raises(ConfigError):
        sum_payloads([])
    with pytest.raises(ConfigError):
        sum_payloads([base, base], weights=[1.0])
    with pytest.raises(DecodeError, match="countsketch"):
        sum_payloads([base, fedsqueeze.parse_spec("fp32").encode(x)])
    with pytest.raises(DecodeError):
        sum_payloads([base, base[:-1]])


def test_fp16_tables() -> None:
    c = CountSketch(64, k=5, table="fp16")
    x = torch.randn(500, generator=rng(7))
    p = parse_payload(c.encode(x))
    assert p.fp16 and torch.equal(p.table, sketch(x, 5, 64, 42).half().float())
    with pytest.raises(EncodeError, match="float16"):
        c.encode(torch.full((10,), 1e5))
    big = c.encode(torch.full((1,), 6e4))
    with pytest.raises(EncodeError, match="float16"):
        sum_payloads([big, big])


def test_specs_counts_and_ratios() -> None:
    c = fedsqueeze.parse_spec("countsketch:cols=10000,k=1%")
    assert isinstance(c, CountSketch) and c.summable and not c.unbiased and not c.stochastic
    assert c.spec == "countsketch:rows=5,cols=10000,k=1%"
    assert c.shape_for(50_000) == (5, 10000, 500)
    c = fedsqueeze.parse_spec("countsketch:rows=3,cols=10%,k=7,seed=9,table=fp16")
    assert isinstance(c, CountSketch)
    assert c.spec == "countsketch:rows=3,cols=10%,k=7,seed=9,table=fp16"
    assert c.shape_for(1000) == (3, 100, 7) and c.shape_for(5) == (3, 1, 5) and c.shape_for(0) == (3, 1, 0)
    assert CountSketch(100, k=0.5).shape_for(10) == (5, 100, 5)
    for bad in (
        "countsketch:k=1%",
        "countsketch:cols=100",
        "countsketch:cols=0,k=1",
        "countsketch:cols=100,k=2.5",
        "countsketch:cols=100,k=1,rows=0",
        "countsketch:cols=100,k=1,table=fp8",
        "countsketch:cols=100,k=1,colz=3",
    ):
        with pytest.raises(ConfigError):
            fedsqueeze.parse_spec(bad)


def _body(flags: int, rows: int, cols: int, k: int, d: int, seed: int, values: list[float]) -> bytes:
    fmt = "e" if flags & 1 else "f"
    return struct.pack("<BHIQQQ", flags, rows, cols, k, d, seed) + struct.pack(
        f"<{len(values)}{fmt}", *values
    )


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (_body(0, 1, 2, 1, 9, 0, [1.0, 2.0]), "d=9"),
        (_body(0, 1, 2, 5, 4, 0, [1.0, 2.0]), "k=5"),
        (_body(0, 0, 2, 1, 4, 0, []), "at least"),
        (_body(0, 1, 0, 1, 4, 0, []), "at least"),
        (_body(2, 1, 2, 1, 4, 0, [1.0, 2.0]), "flag"),
        (_body(0, 1, 2, 1, 4, 0, [1.0]), "needs 8 bytes"),
        (_body(0, 1, 2, 1, 4, 0, [1.0, 2.0, 3.0]), "needs 8 bytes"),
        (_body(0, 1, 2, 1, 4, 0, [1.0, float("nan")]), "NaN"),
        (_body(1, 1, 2, 1, 4, 0, [1.0, float("inf")]), "NaN or Inf"),
        (_body(0, 255, 2**32 - 1, 1, 4, 0, [1.0]), "needs"),  # absurd table, tiny body
        (_body(0, 256, 1, 1, 4, 0, [1.0] * 256), "at most 255 rows"),
    ],
)
def test_decoder_rejects_inconsistent_bodies(body: bytes, match: str) -> None:
    with pytest.raises(DecodeError, match=match):
        fedsqueeze.decode(build_frame(88, torch.float32, (4,), body))


def test_handmade_payload_decodes() -> None:
    # One row, one column: every coordinate's estimate is +-S[0, 0]; k=2 keeps the first two.
    y = fedsqueeze.decode(build_frame(88, torch.float32, (3,), _body(0, 1, 1, 2, 3, 42, [2.0])))
    _, sign = row_hashes(row_keys(42, 1)[0], 0, 3, 1)
    assert y.tolist() == [2.0 * float(sign[0]), 2.0 * float(sign[1]), 0.0]


# ---------------------------------------------------------------------------- shared harness
