"""QSGD codec: round trips, the quantization grid, statistics, wire-format validation, specs."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch

from fedsqueeze import ConfigError, DecodeError, decode, parse_spec
from fedsqueeze.codecs.qsgd import QSGD
from fedsqueeze.wire.bits import encode_unary, pack_uint, write_fields
from fedsqueeze.wire.frame import build_frame, parse_frame

CODINGS = ("fixed", "elias")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def reseal(payload: bytes, body: bytes) -> bytes:
    """Same header fields, new body, valid CRC: what a buggy or hostile encoder could send."""
    header, _ = parse_frame(payload)
    return build_frame(header.codec_id, header.dtype, header.shape, body)


def body_of(payload: bytes) -> bytes:
    return bytes(parse_frame(payload)[1])


def elias_body(
    s: int,
    bucket: int,
    norms: list[float],
    gaps: list[int],
    levels: list[int],
    signs: list[int] | None = None,
    nnz: int | None = None,
) -> bytes:
    """Hand-build an elias body (no validation), to craft bodies a real encoder never writes."""
    g = np.array(gaps, np.int64)
    lv = np.array(levels, np.int64)
    vals = np.concatenate([g, lv])
    L = np.array([int(v).bit_length() - 1 for v in vals], np.int64)
    unary = encode_unary(L)
    sg = np.array(signs if signs is not None else [0] * len(gaps), np.uint8)
    return b"".join(
        (
            struct.pack("<HIB", s, bucket, 1),
            np.array(norms, "<f4").tobytes(),
            struct.pack("<I", len(gaps) if nnz is None else nnz),
            pack_uint(sg, 1),
            struct.pack("<I", len(unary)),
            unary,
            write_fields(vals - (np.int64(1) << L), L),
        )
    )


# ---------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("coding", CODINGS)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0), (1,), (7,), (513,), (4, 5, 6), (2, 3, 4, 5)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_round_trip_shape_dtype(coding: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    x = torch.randn(shape, generator=gen(1)).to(dtype)
    q = QSGD(4, bucket=16, coding=coding)
    y = decode(q.encode(x, rng=gen(2)))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert q.decode(q.encode(x, rng=gen(2))).shape == x.shape


@pytest.mark.parametrize("coding", CODINGS)
@pytest.mark.parametrize("s,bucket", [(1, 0), (2, 128), (15, 512), (255, 7), (32767, 64)])
def test_values_on_grid(coding: str, s: int, bucket: int) -> None:
    n = 1000
    x = torch.randn(n, generator=gen(3)) * torch.linspace(0.01, 10, n)
    q = QSGD(s, bucket=bucket, coding=coding)
    y = decode(q.encode(x, rng=gen(4))).double()
    eff = bucket if 0 < bucket < n else n
    nb = -(-n // eff)
    xp = torch.cat([x.double(), torch.zeros(nb * eff - n, dtype=torch.float64)])
    norms = xp.view(nb, eff).norm(dim=1).float().double()  # the float32 norm as stored
    per = norms.repeat_interleave(eff)[:n]
    k = y * s / per
    assert torch.all((k - k.round()).abs() < 1e-3)
    assert torch.all(k.round().abs() <= s)
    # sign agrees with x wherever the level is non-zero; the level is floor or ceil of s|x|/norm
    nz = k.round() != 0
    assert torch.equal(torch.sign(y[nz]), torch.sign(x.double()[nz]))
    r = s * x.double().abs() / per
    lev = k.round().abs()
    assert torch.all((lev >= r.floor() - 1e-9) & (lev <= torch.clamp(r.ceil(), max=s) + 1e-9))


def test_level_s_entry_and_single_entry_buckets() -> None:
    # one-entry buckets: |v| = norm, so the level is always s and the value is reproduced exactly
    x = torch.tensor([3.0, -2.5, 0.0, 1e-30, -7.25])
    for coding in CODINGS:
        y = decode(QSGD(3, bucket=1, coding=coding).encode(x, rng=gen()))
        assert torch.equal(y, x)


@pytest.mark.parametrize("coding", CODINGS)
def test_zero_buckets_decode_to_zero(coding: str) -> None:
    x = torch.zeros(100)
    x[50:60] = torch.randn(10, generator=gen())
    y = decode(QSGD(2, bucket=25, coding=coding).encode(x, rng=gen()))
    assert torch.all(y[:50] == 0) and torch.all(y[75:] == 0)
    assert torch.equal(decode(QSGD(coding=coding).encode(torch.zeros(3, 4))), torch.zeros(3, 4))


def test_reproducible_with_generator_and_codings_agree() -> None:
    x = torch.randn(5000, generator=gen(5))
    for coding in CODINGS:
        q = QSGD(3, bucket=256, coding=coding)
        assert q.encode(x, rng=gen(9)) == q.encode(x, rng=gen(9))
        assert q.encode(x, rng=gen(9)) != q.encode(x, rng=gen(10))
    for s in (1, 7, 300):
        a = decode(QSGD(s, bucket=100, coding="fixed").encode(x, rng=gen(11)))
        b = decode(QSGD(s, bucket=100, coding="elias").encode(x, rng=gen(11)))
        assert torch.equal(a, b)


def test_elias_smaller_than_fixed_when_sparse() -> None:
    x = torch.randn(10_000, generator=gen(6))
    for bucket in (0, 512):
        fixed = QSGD(1, bucket=bucket, coding="fixed").encode(x, rng=gen(7))
        elias = QSGD(1, bucket=bucket, coding="elias").encode(x, rng=gen(7))
        assert len(elias) < len(fixed)
    fixed_size = len(body_of(QSGD(1, bucket=512, coding="fixed").encode(x)))
    assert fixed_size == 7 + 4 * 20 + math.ceil(10_000 * 2 / 8)
    assert len(body_of(QSGD(15, bucket=512).encode(x))) == 7 + 4 * 20 + math.ceil(10_000 * 5 / 8)


def test_rejects_non_finite_and_overflowing_norm() -> None:
    from fedsqueeze.errors import EncodeError

    with pytest.raises(EncodeError):
        QSGD().encode(torch.tensor([1.0, float("nan")]))
    with pytest.raises(EncodeError, match="overflows float32"):
        QSGD(bucket=0).encode(torch.full((4,), 3e38))


# ---------------------------------------------------------------------------- statistics
def exact_variance(x: torch.Tensor, s: int, bucket: int) -> torch.Tensor:
    """Per-entry variance (norm/s)^2 tau (1 - tau) of QSGD (x's length a multiple of bucket)."""
    xb = x.double().view(-1, bucket)
    norms = xb.norm(dim=1, keepdim=True).float().double()
    r = s * xb.abs() / norms
    tau = r - r.floor()
    return ((norms / s) ** 2 * tau * (1 - tau)).reshape(-1)


@pytest.mark.parametrize("coding", CODINGS)
def test_unbiased(coding: str) -> None:
    s, bucket, draws = 2, 16, 2000
    x = torch.randn(64, generator=gen(12))
    q = QSGD(s, bucket=bucket, coding=coding)
    g = gen(13)
    total = torch.zeros(64, dtype=torch.float64)
    for _ in range(draws):
        total += decode(q.encode(x, rng=g)).double()
    mean = total / draws
    # the mean of `draws` draws has std sqrt(var / draws) per entry: allow 5 sigma (+ fp32 slack)
    tol = 5 * torch.sqrt(exact_variance(x, s, bucket) / draws) + 1e-5
    assert torch.all((mean - x.double()).abs() <= tol), (mean - x.double()).abs().max()


@pytest.mark.parametrize("s,bucket", [(1, 64), (2, 128), (4, 512), (15, 512), (30, 256)])
def test_variance_bound(s: int, bucket: int) -> None:
    # `reps` copies of x, one per bucket: one encode gives `reps` independent draws of each bucket
    nbuckets, reps = 4, 300
    d = nbuckets * bucket
    x = torch.randn(d, generator=gen(14)) * torch.rand(d, generator=gen(15))
    xr = x.repeat(reps)
    y = decode(QSGD(s, bucket=bucket).encode(xr, rng=gen(16))).double()
    err = ((y - xr.double()) ** 2).view(reps, nbuckets, bucket).sum(dim=2)
    mse = err.mean(dim=0)  # per bucket, E||Q(v) - v||^2
    sq_norm = x.double().view(nbuckets, bucket).pow(2).sum(dim=1)
    bound = min(bucket / s**2, math.sqrt(bucket) / s) * sq_norm
    exact = exact_variance(x, s, bucket).view(nbuckets, bucket).sum(dim=1)
    assert torch.all(exact <= bound)
    assert torch.all(mse <= bound)
    # and the empirical value matches the exact variance (std of the mean <= exact * sqrt(2/reps))
    assert torch.all((mse - exact).abs() <= 6 * exact * math.sqrt(2 / reps) + 1e-9)


# ---------------------------------------------------------------------------- hostile bodies
@pytest.mark.parametrize("coding", CODINGS)
def test_truncated_bodies_raise(coding: str) -> None:
    x = torch.randn(300, generator=gen(17))
    payload = QSGD(3, bucket=64, coding=coding).encode(x, rng=gen(18))
    body = body_of(payload)
    for cut in range(len(body)):
        with pytest.raises(DecodeError):
            decode(reseal(payload, body[:cut]))
    with pytest.raises(DecodeError):
        decode(reseal(payload, body + b"\x00"))
    for cut in (1, 10, len(payload) - 1):
        with pytest.raises(DecodeError):
            decode(payload[:cut])


def test_empty_tensor_body_exact() -> None:
    payload = QSGD(coding="elias").encode(torch.zeros(0))
    assert len(body_of(payload)) == 7
    with pytest.raises(DecodeError, match="parameter bytes only"):
        decode(reseal(payload, body_of(payload) + b"\x00"))


def _fixed_payload() -> tuple[bytes, bytes]:
    x = torch.tensor([1.0, -2.0, 0.5, 0.0, -0.25, 3.0, 0.1, -0.1])
    payload = QSGD(5, bucket=4, coding="fixed").encode(x, rng=gen(19))  # 4-bit codes, 2 norms
    return payload, body_of(payload)


def test_corrupt_parameters() -> None:
    payload, body = _fixed_payload()
    cases = {
        "s must be": struct.pack("<HIB", 0, 4, 0),
        "coding byte": struct.pack("<HIB", 5, 4, 2),
        "allows s <= 32767": struct.pack("<HIB", 40000, 4, 0),
    }
    for msg, params in cases.items():
        with pytest.raises(DecodeError, match=msg):
            decode(reseal(payload, params + body[7:]))
    # another bucket size changes the number of norms, hence the expected section sizes
    with pytest.raises(DecodeError):
        decode(reseal(payload, struct.pack("<HIB", 5, 1, 0) + body[7:]))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_corrupt_norms(bad: float) -> None:
    payload, body = _fixed_payload()
    mutated = body[:7] + struct.pack("<f", bad) + body[11:]
    with pytest.raises(DecodeError, match="finite and >= 0"):
        decode(reseal(payload, mutated))


def test_corrupt_fixed_codes() -> None:
    payload, body = _fixed_payload()
    head = body[:15]
    # s=5 -> codes of 1 + 3 bits; level 7 > s
    codes = np.zeros(8, np.int64)
    codes[0] = 7 << 1
    with pytest.raises(DecodeError, match=r"levels must be in 0\.\.5"):
        decode(reseal(payload, head + pack_uint(codes, 4)))
    codes[0] = 1  # sign bit on a zero level
    with pytest.raises(DecodeError, match="sign bit"):
        decode(reseal(payload, head + pack_uint(codes, 4)))
    # non-zero level in a bucket whose norm is 0
    zero_norm = body[:7] + struct.pack("<f", 0.0) + body[11:15]
    codes[0] = 2
    with pytest.raises(DecodeError, match="norm 0"):
        decode(reseal(payload, zero_norm + pack_uint(codes, 4)))


def test_fixed_padding_bits() -> None:
    x = torch.randn(3, generator=gen())
    payload = QSGD(1, bucket=0, coding="fixed").encode(x, rng=gen())  # 3 x 2 bits in one byte
    body = bytearray(body_of(payload))
    body[-1] |= 0x80
    with pytest.raises(DecodeError, match="padding"):
        decode(reseal(payload, bytes(body)))


def test_crafted_elias_bodies() -> None:
    template = QSGD(5, bucket=0, coding="elias").encode(torch.randn(10, generator=gen()))

    def dec(body: bytes) -> torch.Tensor:
        return decode(reseal(template, body))

    ok = elias_body(5, 0, [2.0], gaps=[1, 3, 6], levels=[5, 1, 2], signs=[0, 1, 0])
    y = dec(ok)
    expect = torch.zeros(10)
    expect[[0, 3, 9]] = torch.tensor([2.0, -0.4, 0.8])
    assert torch.allclose(y, expect)

    cases = [
        ("non-zero count must be <= numel", elias_body(5, 0, [2.0], [1], [1], nnz=11)),
        ("positions must be < numel", elias_body(5, 0, [2.0], [1, 3, 7], [5, 1, 2])),
        ("positions must be < numel", elias_body(5, 0, [2.0], [8, 3], [1, 1])),
        (r"levels must be in 1\.\.5", elias_body(5, 0, [2.0], [1, 2], [1, 7])),
        ("level's Elias-gamma length", elias_body(5, 0, [2.0], [1, 2], [1, 9])),
        ("gap's Elias-gamma length", elias_body(5, 0, [2.0], [16], [1])),
        ("norm 0", elias_body(5, 0, [0.0], [1, 3], [1, 1])),
        ("finite", elias_body(5, 0, [float("nan")], [1], [1])),
    ]
    for msg, body in cases:
        with pytest.raises(DecodeError, match=msg):
            dec(body)

    # nnz claims more codes than the sections hold
    with pytest.raises(DecodeError):
        dec(elias_body(5, 0, [2.0], [1, 3, 6], [5, 1, 2], nnz=4))
    # wrong unary length field, in both directions
    nnz_at = 7 + 4
    ulen_at = nnz_at + 4 + 1
    (ulen,) = struct.unpack_from("<I", ok, ulen_at)
    for wrong in (ulen - 1, ulen + 1, 0, 2**32 - 1):
        bad = bytearray(ok)
        struct.pack_into("<I", bad, ulen_at, wrong)
        with pytest.raises(DecodeError):
            dec(bytes(bad))
    # non-zero padding bits in the signs byte (3 signs used) and trailing bytes
    bad = bytearray(ok)
    bad[nnz_at + 4] |= 0x80
    with pytest.raises(DecodeError, match="padding bits of the signs"):
        dec(bytes(bad))
    with pytest.raises(DecodeError, match="low-bits section"):
        dec(ok + b"\x00")


@pytest.mark.parametrize("coding", CODINGS)
def test_random_mutations_never_crash(coding: str) -> None:
    x = torch.randn(200, generator=gen(20))
    payload = QSGD(3, bucket=50, coding=coding).encode(x, rng=gen(21))
    body = body_of(payload)
    rs = np.random.default_rng(22)
    for _ in range(400):
        b = bytearray(body)
        for _ in range(int(rs.integers(1, 4))):
            i = int(rs.integers(len(b)))
            b[i] ^= 1 << int(rs.integers(8))
        try:
            y = decode(reseal(payload, bytes(b)))
        except DecodeError:
            continue
        assert y.shape == x.shape and bool(torch.isfinite(y).all())


# ---------------------------------------------------------------------------- specs / config
def test_attributes() -> None:
    q = QSGD()
    assert (q.codec_id, q.name, q.stage) == (17, "qsgd", "values")
    assert q.unbiased and q.stochastic and not q.lossless
    assert (q.s, q.bucket, q.coding) == (15, 512, "fixed")


@pytest.mark.parametrize(
    "text,expect",
    [
        ("qsgd", (15, 512, "fixed")),
        ("qsgd:4", (4, 512, "fixed")),
        ("qsgd:s=15,bucket=512,coding=elias", (15, 512, "elias")),
        ("QSGD: s=1, bucket=0, coding=ELIAS", (1, 0, "elias")),
        ("qsgd:65535,coding=elias", (65535, 512, "elias")),
    ],
)
def test_spec_round_trip(text: str, expect: tuple[int, int, str]) -> None:
    q = parse_spec(text)
    assert isinstance(q, QSGD)
    assert (q.s, q.bucket, q.coding) == expect
    again = parse_spec(q.spec)
    assert isinstance(again, QSGD) and again.spec == q.spec
    assert (again.s, again.bucket, again.coding) == expect


@pytest.mark.parametrize(
    "text",
    [
        "qsgd:0",
        "qsgd:s=-1",
        "qsgd:s=65536",
        "qsgd:s=x",
        "qsgd:bucket=-1",
        "qsgd:coding=huffman",
        "qsgd:s=40000",  # fixed coding needs s <= 32767
        "qsgd:4,levels=3",
        "qsgd:4,5",
    ],
)
def test_bad_specs(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_spec(text)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"s": 0},
        {"s": 70000},
        {"s": 2.5},
        {"s": True},
        {"bucket": -1},
        {"bucket": 2**32},
        {"coding": "omega"},
        {"s": 32768, "coding": "fixed"},
    ],
)
def test_bad_constructor(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        QSGD(**kwargs)  # type: ignore[arg-type]
    QSGD(32767, coding="fixed")
    QSGD(65535, coding="elias")
