"""Scaled fp8 (e4m3, e5m2) and fp4 (e2m1) casts: grids, rounding against brute force, wire layout."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

import fedsqueeze
from fedsqueeze.codecs import fp8
from fedsqueeze.codecs.fp8 import E2M1, E4M3, E5M2, FloatFormat, grid, round_to_grid
from fedsqueeze.errors import ConfigError, DecodeError
from fedsqueeze.wire.frame import build_frame, header_size

FORMATS = [E4M3, E5M2, E2M1]


def rng(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def brute_force_codes(y: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """Nearest grid point by exhaustive search, ties to the even code; sign bit = signbit(y)."""
    g = grid(fmt).double()
    dist = (y.double().abs()[:, None] - g[None, :]).abs()
    best = dist.min(dim=1, keepdim=True).values
    cand = dist == best
    even = (torch.arange(g.numel()) % 2 == 0)[None, :]
    two = cand.sum(dim=1) > 1
    mag = torch.where(two, (cand & even).int().argmax(dim=1), cand.int().argmax(dim=1))
    return (mag + torch.signbit(y).long() * fmt.sign_bit).to(torch.uint8)


def hard_values(fmt: FloatFormat, seed: int = 0) -> torch.Tensor:
    """Grid points, midpoints (ties), their float32 neighbours, log-uniform and uniform values, +-."""
    g = grid(fmt)
    mids = (g[1:] + g[:-1]) / 2
    up, down = torch.full_like(mids, 1e9), torch.zeros_like(mids)
    gen = rng(seed)
    fmax = fmt.fmax
    parts = [
        g,
        mids,
        torch.nextafter(mids, up),
        torch.nextafter(mids, down),
        torch.rand(3000, generator=gen) * fmax,
        torch.exp(torch.empty(3000).uniform_(-25.0, float(np.log(fmax)), generator=gen)).clamp(max=fmax),
        torch.tensor([0.0, -0.0, 1e-30, fmax]),
    ]
    v = torch.cat(parts)
    return torch.cat([v, -v])


def test_grids() -> None:
    assert grid(E2M1).tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert (E4M3.fmax, E5M2.fmax, E2M1.fmax) == (448.0, 57344.0, 6.0)
    assert grid(E4M3)[1] == 2.0**-9 and grid(E5M2)[1] == 2.0**-16
    for fmt in (E4M3, E5M2):  # the analytic grid is the torch dtype's, code for code
        assert fmt.torch_dtype is not None
        codes = torch.arange(fmt.max_mag_code + 1, dtype=torch.uint8)
        assert torch.equal(codes.view(fmt.torch_dtype).float(), grid(fmt))
        assert bool((grid(fmt)[1:] > grid(fmt)[:-1]).all())


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_rounding_matches_brute_force(fmt: FloatFormat) -> None:
    y = hard_values(fmt)
    ref = brute_force_codes(y, fmt)
    assert torch.equal(round_to_grid(y, fmt, use_torch_cast=False), ref)
    assert torch.equal(round_to_grid(y, fmt), ref)  # torch's float8 cast (fp8) agrees bit for bit


def test_ties_go_to_even_code_e2m1() -> None:
    y = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.0, -0.25])
    got = grid(E2M1)[round_to_grid(y, E2M1).long() & 7].tolist()
    assert got == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 4.0, 0.0]


@pytest.mark.parametrize("spec", ["fp8:e4m3", "fp8:e5m2", "fp4", "fp8:e4m3,block=7", "fp4:block=5"])
def test_codec_equals_reference(spec: str) -> None:
    c = fedsqueeze.parse_spec(spec)
    assert isinstance(c, fp8._ScaledFloat)
    x = torch.randn(101, generator=rng(1)) * torch.exp(torch.randn(101, generator=rng(2)) * 3)
    y = fedsqueeze.decode(c.encode(x))
    eff = c.block or x.numel()
    fmax = torch.tensor(c.fmt.fmax, dtype=torch.float32)
    for s in range(0, x.numel(), eff):
        xb = x[s : s + eff]
        scale = xb.abs().max() / fmax
        yb = (xb / scale).clamp(-fmax, fmax)
        ref = grid(c.fmt)[brute_force_codes(yb, c.fmt).long() & (c.fmt.sign_bit - 1)]
        ref = torch.where(torch.signbit(yb), -ref, ref) * scale
        assert torch.equal(y[s : s + eff], ref), spec
        assert float(y[s : s + eff].abs().max()) == pytest.approx(float(xb.abs().max()), rel=1e-6)


@pytest.mark.parametrize(
    ("spec", "per_entry", "nblocks"),
    [("fp8:e4m3", 1.0, 1), ("fp8:e5m2,block=100", 1.0, 10), ("fp4", 0.5, 1), ("fp4:block=64", 0.5, 16)],
)
def test_payload_size(spec: str, per_entry: float, nblocks: int) -> None:
    n = 1000
    payload = fedsqueeze.parse_spec(spec).encode(torch.randn(n, generator=rng(3)))
    assert len(payload) == header_size(1) + 6 + 4 * nblocks + int(np.ceil(n * per_entry))


def test_fp4_wire_layout() -> None:
    # scale = 6 / 6 = 1; codes 6 -> 0b0111, -3 -> 0b1101, 0.5 -> 0b0001, 1 -> 0b0010, low nibble first
    x = torch.tensor([6.0, -3.0, 0.5, 1.0, 2.0])
    payload = fedsqueeze.parse_spec("fp4").encode(x)
    body = payload[header_size(1) :]
    assert body == struct.pack("<BBIf", 2, 0, 0, 1.0) + bytes([0xD7, 0x21, 0x04])
    assert torch.equal(fedsqueeze.decode(payload), x)


def test_fp8_code_bytes_are_the_fp8_numbers() -> None:
    x = torch.tensor([448.0, -1.0, 0.5, 3.0])  # scale 1
    payload = fedsqueeze.parse_spec("fp8:e4m3").encode(x)
    codes = torch.frombuffer(bytearray(payload[-4:]), dtype=torch.uint8)
    assert torch.equal(codes.view(torch.float8_e4m3fn).float(), x)


@pytest.mark.parametrize("spec", ["fp4:stochastic=true", "fp8:e5m2,stochastic=true"])
def test_stochastic_rounding_is_unbiased_and_hits_neighbours(spec: str) -> None:
    c = fedsqueeze.parse_spec(spec)
    assert c.unbiased and c.stochastic
    x = torch.tensor([6.0, 0.3, -1.2, 2.6, 4.9, -0.01, 0.0])
    g = rng(4)
    draws = torch.stack([fedsqueeze.decode(c.encode(x, rng=g)) for _ in range(3000)]).double()
    sd = draws.std(0) / np.sqrt(draws.shape[0])
    assert bool(((draws.mean(0) - x.double()).abs() <= 5 * sd + 1e-6 * x.double().abs()).all())
    if spec.startswith("fp4"):  # only the two grid points around x are ever used
        lo = torch.tensor([6.0, 0.0, -1.5, 2.0, 4.0, -0.5, 0.0])
        hi = torch.tensor([6.0, 0.5, -1.0, 3.0, 6.0, 0.0, 0.0])
        assert bool(((draws >= lo.double()) & (draws <= hi.double())).all())


def test_extreme_scales() -> None:
    for x in (
        torch.zeros(9),
        torch.tensor([1e-45, -1e-45, 0.0]),
        torch.tensor([3.4e38, -3.4e38, 1.0]),
        torch.tensor([-0.0, 5.0]),
        torch.tensor([-0.0, -0.0, 0.0]),
    ):
        for spec in ("fp8:e4m3", "fp8:e5m2", "fp4"):
            y = fedsqueeze.decode(fedsqueeze.parse_spec(spec).encode(x))
            assert bool(torch.isfinite(y).all()), (spec, x)
            assert float(y.abs().max()) == pytest.approx(float(x.abs().max()), rel=1e-6), (spec, x)


def test_per_block_scales_help_mixed_magnitudes() -> None:
    x = torch.cat([torch.randn(256, generator=rng(5)) * 1e-3, torch.randn(256, generator=rng(6)) * 1e3])
    err = {}
    for spec in ("fp8:e4m3", "fp8:e4m3,block=256"):
        y = fedsqueeze.decode(fedsqueeze.parse_spec(spec).encode(x))
        err[spec] = float((y[:256] - x[:256]).norm() / x[:256].norm())
    assert err["fp8:e4m3,block=256"] < 0.05 < err["fp8:e4m3"]


def test_specs() -> None:
    assert fedsqueeze.parse_spec("fp8").spec == "fp8:e4m3"
    assert (
        fedsqueeze.parse_spec("fp8:E5M2,stochastic=true,block=32").spec == "fp8:e5m2,block=32,stochastic=true"
    )
    assert fedsqueeze.parse_spec("fp4:block=32").spec == "fp4:block=32"
    assert fedsqueeze.parse_spec("fp4:e2m1").spec == "fp4"
    assert fedsqueeze.parse_spec("topk:1% > fp4").spec == "topk:1% > fp4"
    for bad in ("fp8:e3m4", "fp4:e4m3", "fp8:block=-1", "fp8:blok=3"):
        with pytest.raises(ConfigError):
            fedsqueeze.parse_spec(bad)


def _frame(codec_id: int, n: int, body: bytes) -> bytes:
    return build_frame(codec_id, torch.float32, (n,), body)


@pytest.mark.parametrize(
    ("codec_id", "n", "body", "match"),
    [
        (80, 2, struct.pack("<BBIf", 0, 0, 0, 1.0) + bytes([1, 0x7F]), "not a finite"),  # e4m3 NaN
        (80, 2, struct.pack("<BBIf", 1, 0, 0, 1.0) + bytes([0xFC, 1]), "not a finite"),  # e5m2 -Inf
        (80, 2, struct.pack("<BBIf", 2, 0, 0, 1.0) + bytes([1]), "format"),  # fp4 format in fp8
        (81, 2, struct.pack("<BBIf", 0, 0, 0, 1.0) + bytes([1, 1]), "format"),  # fp8 format in fp4
        (80, 2, struct.pack("<BBIf", 0, 2, 0, 1.0) + bytes([1, 1]), "flag"),
        (80, 2, struct.pack("<BBIf", 0, 0, 0, float("nan")) + bytes([1, 1]), "scales"),
        (80, 2, struct.pack("<BBIf", 0, 0, 0, -1.0) + bytes([1, 1]), "scales"),
        (80, 2, struct.pack("<BBIf", 0, 0, 0, 3e38) + bytes([1, 1]), "scales"),  # 448 * scale overflows
        (80, 2, struct.pack("<BBIf", 0, 0, 0, 0.0) + bytes([0, 1]), "scale 0"),
        (81, 3, struct.pack("<BBIf", 2, 0, 0, 1.0) + bytes([0x11, 0x21]), "padding"),
        (80, 3, struct.pack("<BBIf", 0, 0, 0, 1.0) + bytes([1, 1]), "need"),  # one code short
        (80, 4, struct.pack("<BBIf", 0, 0, 2, 1.0) + bytes([1, 1, 1, 1]), "need"),  # 2 blocks, 1 scale
        (81, 0, struct.pack("<BBI", 2, 0, 0) + b"\x00", "trailing"),
    ],
)
def test_decoder_rejects_inconsistent_bodies(codec_id: int, n: int, body: bytes, match: str) -> None:
    with pytest.raises(DecodeError, match=match):
        fedsqueeze.decode(_frame(codec_id, n, body))


def test_valid_handmade_bodies_decode() -> None:
    y = fedsqueeze.decode(_frame(80, 2, struct.pack("<BBIf", 0, 0, 0, 2.0) + bytes([0x38, 0x80])))
    assert y.tolist() == [2.0, -0.0]
    y = fedsqueeze.decode(_frame(81, 3, struct.pack("<BBIff", 2, 0, 2, 1.0, 0.0) + bytes([0x8F, 0x00])))
    assert y.tolist() == [-6.0, -0.0, 0.0]


# ---------------------------------------------------------------------------- shared harness
