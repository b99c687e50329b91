"""Sparsifiers: Top-K exactness, index coding choice, Rand-K positions, threshold semantics."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import fedsqueeze
from fedsqueeze.codecs.sparse import decode_indices, encode_indices, randk_positions
from fedsqueeze.errors import ConfigError
from fedsqueeze.wire.bits import Reader


def rng(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_topk_keeps_exactly_the_largest_magnitudes() -> None:
    x = torch.randn(10_000, generator=rng(0))
    y = fedsqueeze.decode(fedsqueeze.parse_spec("topk:1%").encode(x))
    kept = torch.nonzero(y).flatten()
    assert kept.numel() == 100
    ref = torch.sort(x.abs(), descending=True, stable=True).indices[:100].sort().values
    assert torch.equal(kept, ref)
    assert torch.equal(y[kept], x[kept])


def test_topk_all_entries_is_lossless() -> None:
    x = torch.randn(333, generator=rng(1))
    assert torch.equal(fedsqueeze.decode(fedsqueeze.parse_spec("topk:100%").encode(x)), x)


def test_topk_ties_go_to_lower_index() -> None:
    x = torch.tensor([1.0, -3.0, 3.0, 0.5, -3.0, 3.0])
    y = fedsqueeze.decode(fedsqueeze.parse_spec("topk:k=2").encode(x))
    assert torch.equal(y, torch.tensor([0.0, -3.0, 3.0, 0.0, 0.0, 0.0]))


@pytest.mark.parametrize("density", [0.001, 0.01, 0.1, 0.3, 0.6])
def test_index_coding_picks_the_smaller_and_round_trips(density: float) -> None:
    d = 50_000
    g = np.random.default_rng(0)
    idx = np.sort(g.choice(d, size=int(d * density), replace=False)).astype(np.int64)
    enc = encode_indices(idx, d)
    bitmap_bytes = 1 + (d + 7) // 8
    assert len(enc) <= bitmap_bytes
    # Rice (after its fixed 6-byte overhead) is within 0.7 bit of the entropy bound d*H(p)/k.
    bits_per_index = (8 * len(enc) - 48) / idx.size
    p = density
    h = -(p * np.log2(p) + (1 - p) * np.log2(1 - p)) / p
    if density <= 0.1:
        assert enc[0] == 1 and bits_per_index < h + 0.7, (bits_per_index, h)
    if density >= 0.6:
        assert enc[0] == 0
    r = Reader(enc)
    assert np.array_equal(decode_indices(r, idx.size, d), idx)
    r.expect_end()


def test_randk_positions_are_a_pure_function_of_the_seed() -> None:
    a = randk_positions(12345, 100_000, 1000)
    assert a.size == 1000 and np.all(np.diff(a) > 0) and a[-1] < 100_000
    assert np.array_equal(a, randk_positions(12345, 100_000, 1000))
    assert not np.array_equal(a, randk_positions(12346, 100_000, 1000))
    # frozen: the receiver must derive the same positions on any platform/version
    assert randk_positions(7, 20, 5).tolist() == [3, 11, 12, 14, 17]
    assert randk_positions(2**62 + 5, 1000, 3).tolist() == [227, 283, 744]


def test_randk_positions_are_roughly_uniform() -> None:
    counts = np.zeros(50)
    for s in range(2000):
        counts[randk_positions(s, 50, 5)] += 1
    expected = 2000 * 5 / 50
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 100, chi2  # 49 dof: mean 49, sd ~10


def test_randk_sends_no_indices() -> None:
    x = torch.randn(100_000, generator=rng(2))
    p = fedsqueeze.parse_spec("randk:1%").encode(x, rng=rng(3))
    # header 22 + k/seed 12 + values frame (4 + 22 + 1000*4)
    assert len(p) == 22 + 12 + 4 + 22 + 4000


def test_threshold_keeps_entries_at_or_above() -> None:
    x = torch.tensor([0.1, -0.5, 0.49, 2.0, -0.7])
    y = fedsqueeze.decode(fedsqueeze.parse_spec("threshold:0.5").encode(x))
    assert torch.equal(y, torch.tensor([0.0, -0.5, 0.0, 2.0, -0.7]))
    z = fedsqueeze.decode(fedsqueeze.parse_spec("threshold:10").encode(x))
    assert torch.equal(z, torch.zeros(5))


def test_top1pct_then_4bit_is_much_smaller_than_topk_alone() -> None:
    x = torch.randn(100_000, generator=rng(4))
    a = len(fedsqueeze.parse_spec("topk:1%").encode(x))
    b = len(fedsqueeze.parse_spec("Top-1% then 4-bit").encode(x))
    assert b < a * 0.55


@pytest.mark.parametrize(
    "spec,msg",
    [
        ("topk:0", "ratio must be in"),
        ("topk:150%", "ratio must be in"),
        ("topk:-1%", "ratio must be in"),
        ("topk", "exactly one of"),
        ("topk:1%,k=3", "exactly one of"),
        ("topk:k=0", "positive"),
        ("randk:2", "ratio must be in"),
        ("threshold:-1", ">= 0"),
        ("threshold:nan", ">= 0"),
        ("uniform:4 > topk:1%", "stages must be"),
        ("topk:1% > randk:1%", "stages must be"),
        ("topk:1% > uniform:4 > zstd > zstd", "at most once"),
        ("topk:1%,rato=3", "did you mean 'ratio'"),
        ("topkk:1%", "did you mean 'topk'"),
        ("uniform:0", "in [1, 16]"),
        ("uniform:17", "in [1, 16]"),
        ("uniform:-3", "in [1, 16]"),
        ("uniform:eight", "an integer"),
        ("", "empty"),
        ("topk:1% >", "empty stage"),
    ],
)
def test_bad_specs_are_clear_config_errors(spec: str, msg: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(msg)):
        fedsqueeze.parse_spec(spec)
