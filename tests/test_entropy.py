"""The ``ans`` entropy-coding stage: exactness w.r.t. the inner payload, rate vs entropy, hardening.

The shared conformance checks (``test_conformance``) and mutation fuzzing (``test_fuzz``) are run
here on ``ans`` specs by calling their functions directly, until the specs join ``codec_cases``.
"""

from __future__ import annotations

import hashlib
import math
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fedsqueeze
import harness
import test_conformance as conf
import test_fuzz as fuzz
from fedsqueeze.codecs import entropy
from fedsqueeze.codecs.entropy import Ans, entropy_code, inner_payload, symbol_stats
from fedsqueeze.codecs.spec import parse_spec
from fedsqueeze.errors import ConfigError, DecodeError, EncodeError
from fedsqueeze.wire.bits import Reader
from fedsqueeze.wire.frame import build_frame, parse_frame

SPECS = [
    "uniform:4 > ans",
    "uniform:1 > ans",
    "uniform:3,block=64 > ans",
    "uniform:4,stochastic=true > ans",
    "qsgd:s=15,bucket=64 > ans",
    "topk:10% > uniform:4 > ans",
    "threshold:0.5 > uniform:8,stochastic=true > ans",
    "randk:25% > uniform:3 > ans",
    # rate-distortion codecs (issue #5)
    "weibull_lloyd:3 > ans",
    "tinyscript:3 > ans",
    "randk:25% > lloydmax:2,M=1 > ans",
    "threshold:0.5 > weibull_lloyd:3 > ans",
    "m22:k=5,bits=3,M=0,law=gaussian,codebook=send > ans",
]
RD_SPECS = [
    "lloydmax:3 > ans",
    "lloydmax:3,M=2 > ans",
    "lloydmax:1,law=laplace > ans",
    "lloydmax:8,law=dweibull,M=1 > ans",
    "lloydmax:4,codebook=send > ans",
    "weibull_lloyd:2 > ans",
    "tinyscript:2 > ans",
    "tinyscript:8 > ans",
    "m22:10%,bits=3 > ans",
    "m22:k=7,bits=8,M=0,codebook=send > ans",
    "topk:10% > lloydmax:3 > ans",
    "topk:k=3 > tinyscript:4 > ans",
    "randk:10% > weibull_lloyd:3,codebook=send > ans",
]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------- conformance harness
@pytest.mark.parametrize("spec", harness.extra(SPECS))
def test_conformance_harness(spec: str) -> None:
    harness.run_spec_checks(spec, fuzz=False)


def test_unbiasedness_is_inherited() -> None:
    assert parse_spec("uniform:4,stochastic=true > ans").unbiased
    assert not parse_spec("uniform:4 > ans").unbiased
    conf.test_unbiased_claim_holds_statistically("uniform:2,stochastic=true > ans")


@pytest.mark.parametrize("spec", harness.extra(SPECS))
@settings(max_examples=60)
@given(which=st.integers(0, 3), m=fuzz.mutation, seal=st.sampled_from(["none", "crc", "full"]))
def test_mutated_payloads_never_crash(spec: str, which: int, m: tuple, seal: str) -> None:
    buf = fuzz.mutate(fuzz.payloads(spec)[which], m)
    fuzz.check_decode(bytes(buf) if seal == "none" else fuzz.reseal(buf, fix_length=seal == "full"))


# ---------------------------------------------------------------------------- exactness
EXACT_SPECS = [
    *SPECS,
    "uniform:16 > ans",
    "uniform:2 > ans",
    "uniform:8,block=100 > ans",
    "qsgd:s=1,bucket=0 > ans",
    "qsgd:s=255,bucket=128 > ans",
    "topk:1% > uniform:4 > ans",
    "topk:k=3 > qsgd:s=7,bucket=2 > ans",
    "randk:10% > uniform:8,stochastic=true > ans",
    *RD_SPECS,
]


@pytest.mark.parametrize("spec", EXACT_SPECS)
@pytest.mark.parametrize("n", [0, 1, 5, 999, 20000])
def test_rebuilds_the_exact_inner_payload(spec: str, n: int) -> None:
    codec = parse_spec(spec)
    assert isinstance(codec, Ans)
    x = torch.randn(n, generator=gen(n)) * 3
    payload = codec.encode(x, rng=gen(7))
    inner = codec.inner.encode(x, rng=gen(7))
    assert inner_payload(payload) == inner
    assert entropy_code(inner) == payload
    assert torch.equal(fedsqueeze.decode(payload), fedsqueeze.decode(inner))
    # never more than a few bytes over the inner payload (raw mode: id + mode byte)
    assert len(payload) <= len(inner) + 3


@pytest.mark.parametrize(
    "x",
    [
        torch.zeros(1000),
        torch.full((64, 8), 2.5),
        torch.tensor([1.0, -1.0] * 500),
        torch.cat([torch.zeros(5000), torch.ones(3)]),
    ],
    ids=["zeros", "constant", "two-levels", "spike"],
)
@pytest.mark.parametrize(
    "spec",
    [
        "uniform:4 > ans",
        "uniform:8 > ans",
        "topk:50% > uniform:3 > ans",
        "lloydmax:3 > ans",
        "lloydmax:2,codebook=send > ans",
        "m22:50%,bits=2 > ans",
        "tinyscript:3 > ans",
    ],
)
def test_degenerate_alphabets(x: torch.Tensor, spec: str) -> None:
    codec = parse_spec(spec)
    payload = codec.encode(x)
    assert inner_payload(payload) == codec.inner.encode(x)  # type: ignore[attr-defined]
    assert torch.equal(fedsqueeze.decode(payload), fedsqueeze.decode(codec.inner.encode(x)))  # type: ignore[attr-defined]


def test_one_symbol_alphabet_costs_no_ans_words() -> None:
    payload = parse_spec("uniform:4 > ans").encode(torch.zeros(100000))
    s = symbol_stats(payload)
    assert (s.mode, s.alphabet, s.coded_bits_per_symbol) == (1, 1, 0.0)
    assert len(payload) < 60


def test_threshold_keeping_nothing() -> None:
    codec = parse_spec("threshold:10 > uniform:4 > ans")
    x = torch.randn(500, generator=gen(1))
    payload = codec.encode(x)
    assert torch.equal(fedsqueeze.decode(payload), torch.zeros(500))
    assert inner_payload(payload) == codec.inner.encode(x)  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------- rate vs entropy
def _check_rate(payload: bytes, n: int) -> entropy.SymbolStats:
    s = symbol_stats(payload)
    assert s.mode == 1 and s.nsymbols == n
    # the ANS words: within 2% of the empirical entropy (plus 64 bits of final coder state)
    assert s.coded_bits_per_symbol <= 1.02 * s.entropy_bits_per_symbol + 64 / n
    # the whole payload: entropy + 2% + model + everything that is not a symbol, nothing more
    non_symbol = s.inner_nbytes - math.ceil(n * _inner_code_bits(payload) / 8)
    assert 8 * len(payload) <= 1.02 * s.entropy_bits_per_symbol * n + 8 * (s.model_nbytes + non_symbol) + 64
    return s


def _inner_code_bits(payload: bytes) -> int:
    h, body = parse_frame(payload)
    cur = entropy._Cursor(Reader(body), h)
    return cur.values_geometry()[1]


def test_rate_dense_4bit_gaussian_1e6() -> None:
    x = torch.randn(10**6, generator=gen(0))
    payload = parse_spec("uniform:4 > ans").encode(x)
    s = _check_rate(payload, 10**6)
    assert 2.70 < s.entropy_bits_per_symbol < 2.80  # 4-bit min-max codes of N(0,1)
    assert s.coded_bits_per_symbol - s.entropy_bits_per_symbol < 1e-3  # measured: +0.00005
    assert s.model_nbytes < 60
    # far below the inner payload (4 bits) and below zstd on the same inner payload
    zstd = parse_spec("uniform:4 > zstd:level=19").encode(x)
    assert len(payload) < 0.70 * s.inner_nbytes
    assert len(payload) < len(zstd)


def test_rate_top1pct_4bit_1e5_symbols() -> None:
    d = 10**7
    x = torch.randn(d, generator=gen(1))
    payload = parse_spec("topk:1% > uniform:4 > ans").encode(x)
    s = _check_rate(payload, d // 100)
    # values of the two tails: bimodal codes, well under 4 bits
    assert s.entropy_bits_per_symbol < 3.0
    assert s.coded_bits_per_symbol - s.entropy_bits_per_symbol < 2e-3
    assert len(payload) < s.inner_nbytes


def test_rate_qsgd_symbols() -> None:
    x = torch.randn(10**5, generator=gen(2))
    payload = parse_spec("qsgd:s=15,bucket=512 > ans").encode(x, rng=gen(3))
    s = _check_rate(payload, 10**5)
    assert s.coded_bits_per_symbol < 2.0  # fixed coding spends 5 bits


# ---------------------------------------------------------------------------- rate-distortion codecs
def gennorm_sample(n: int, beta: float, seed: int) -> torch.Tensor:
    """``n`` GenNorm(β) draws (unit scale): ``|X| = G**(1/β)`` with ``G ~ Gamma(1/β, 1)``, random sign."""
    g = np.random.default_rng(seed)
    mag = g.gamma(1.0 / beta, 1.0, n) ** (1.0 / beta)
    return torch.from_numpy((mag * g.choice([-1.0, 1.0], n)).astype(np.float32))


@pytest.fixture(scope="module")
def peaked() -> torch.Tensor:
    """10^6 entries of GenNorm(β = 0.7): the tensor behind the "Measured" table in entropy.py."""
    return gennorm_sample(10**6, 0.7, 0)


# inner spec -> (coded symbols, entropy range in bits/symbol, max ans/inner payload size).
# Measured (entropy.py docstring): H 2.3600 / 1.3578 / 2.4278 / 2.9370 / 2.2684 / 2.1743 and
# sizes 0.787 / 0.453 / 0.809 / 0.734 / 0.906 / 0.894 of the inner payload.
RD_RATE = {
    "lloydmax:3": (10**6, (2.35, 2.37), 0.79),
    "lloydmax:3,M=2": (10**6, (1.35, 1.37), 0.46),
    "weibull_lloyd:3": (10**6, (2.42, 2.44), 0.81),
    "tinyscript:4": (10**6, (2.92, 2.95), 0.74),
    "m22:10%,bits=3": (10**5, (2.25, 2.29), 0.91),
    "topk:10% > lloydmax:3": (10**5, (2.16, 2.19), 0.90),
}


@pytest.mark.parametrize("inner", list(RD_RATE))
def test_rate_rd_codecs_on_a_peaked_law(inner: str, peaked: torch.Tensor) -> None:
    nsym, (h_lo, h_hi), max_ratio = RD_RATE[inner]
    codec = parse_spec(f"{inner} > ans")
    payload = codec.encode(peaked, rng=gen(1))
    inner_p = codec.inner.encode(peaked, rng=gen(1))  # type: ignore[attr-defined]
    assert inner_payload(payload) == inner_p
    assert torch.equal(fedsqueeze.decode(payload), fedsqueeze.decode(inner_p))
    s = _check_rate(payload, nsym)  # ANS words within 2% of H (+ final state), payload bound
    assert s.inner_nbytes == len(inner_p)
    assert h_lo < s.entropy_bits_per_symbol < h_hi
    assert s.coded_bits_per_symbol - s.entropy_bits_per_symbol < 1e-3  # measured: <= +0.0004
    assert s.model_nbytes < 50
    assert len(payload) <= max_ratio * len(inner_p)


@pytest.mark.parametrize("inner", ["lloydmax:3", "lloydmax:3,M=2", "tinyscript:4"])
def test_ans_saves_more_the_more_peaked_the_law(inner: str) -> None:
    codec = parse_spec(f"{inner} > ans")
    ratio = {}
    for beta in (0.7, 2.0):
        x = gennorm_sample(10**5, beta, 5)
        ratio[beta] = len(codec.encode(x, rng=gen(1))) / len(codec.inner.encode(x, rng=gen(1)))  # type: ignore[attr-defined]
    # measured: 0.787 vs 0.944, 0.453 vs 0.717, 0.744 vs 0.867
    assert ratio[0.7] < ratio[2.0] - 0.1
    assert ratio[2.0] < 0.97  # even a Gaussian's Lloyd-Max cells are not equiprobable


@pytest.fixture(scope="module")
def rd_payloads() -> dict[str, bytes]:
    x = gennorm_sample(5000, 0.7, 3)
    out = {}
    for inner in [
        "lloydmax:3,M=2",
        "weibull_lloyd:3",
        "m22:10%,bits=3",
        "topk:10% > tinyscript:4",
        "randk:10% > weibull_lloyd:3,codebook=send",
    ]:
        out[inner] = p = parse_spec(f"{inner} > ans").encode(x, rng=gen(2))
        assert symbol_stats(p).mode == 1, inner
    return out


def _prefix_end(payload: bytes) -> int:
    """Offset in the ans body where the symbol section (mode byte) starts."""
    h, body = parse_frame(payload)
    r = Reader(body)
    entropy._Cursor(r, h).values_geometry()
    return r.pos


def _patched(body: bytearray, pos: int, data: bytes) -> bytearray:
    b = body.copy()
    b[pos : pos + len(data)] = data
    return b


def test_hostile_rd_bodies(rd_payloads: dict[str, bytes]) -> None:
    cases: dict[str, tuple[bytes, bytearray]] = {}
    p = rd_payloads["lloydmax:3,M=2"]  # body: id(2) | law bits shape M loc scale (14) | symbols
    b = _body(p)
    cases["unknown law"] = (p, _patched(b, 2, b"\x09"))
    cases["codebook flag, no codebook"] = (p, _patched(b, 2, bytes([b[2] | 0x80])))
    cases["bits 9"] = (p, _patched(b, 3, b"\x09"))
    cases["bits 2: symbols do not fit"] = (p, _patched(b, 3, b"\x02"))
    cases["shape 0"] = (p, _patched(b, 4, b"\x00\x00"))
    cases["scale NaN"] = (p, _patched(b, 12, struct.pack("<f", math.nan)))
    cases["no symbol section"] = (p, b[:16])
    cases["counts cut"] = (p, b[:23])
    p = rd_payloads["weibull_lloyd:3"]
    cases["weibull_lloyd with the gennorm law"] = (p, _patched(_body(p), 2, b"\x01"))
    cases["weibull_lloyd with M=1"] = (p, _patched(_body(p), 6, struct.pack("<H", 100)))
    p = rd_payloads["m22:10%,bits=3"]  # body: id(2) | k u32 | index section | quantizer | symbols
    b = _body(p)
    k = struct.unpack_from("<I", b, 2)[0]
    cases["m22 k > d"] = (p, _patched(b, 2, struct.pack("<I", 5001)))
    cases["m22 k - 1"] = (p, _patched(b, 2, struct.pack("<I", k - 1)))
    cases["m22 k + 1"] = (p, _patched(b, 2, struct.pack("<I", k + 1)))
    p = rd_payloads["topk:10% > tinyscript:4"]
    b = _body(p)
    vid = _prefix_end(p) - (2 + 1 + 4 + 2 * 6)  # value id | bits | scale | 6 knobs | mode
    assert struct.unpack_from("<H", b, vid)[0] == 67
    cases["values fp32"] = (p, _patched(b, vid, struct.pack("<H", 1)))
    cases["values m22"] = (p, _patched(b, vid, struct.pack("<H", 65)))
    cases["values ans"] = (p, _patched(b, vid, struct.pack("<H", 96)))
    cases["tinyscript bits 9"] = (p, _patched(b, vid + 2, b"\x09"))
    cases["tinyscript bits 3"] = (p, _patched(b, vid + 2, b"\x03"))
    cases["tinyscript knobs unordered"] = (p, _patched(b, vid + 7, b"\xff\xff"))
    p = rd_payloads["randk:10% > weibull_lloyd:3,codebook=send"]
    b = _body(p)
    cb = _prefix_end(p) - 32  # the 8 float32 levels just before the mode byte
    cases["codebook NaN"] = (p, _patched(b, cb + 8, struct.pack("<f", math.nan)))
    cases["codebook decreasing"] = (p, _patched(b, cb, struct.pack("<f", 1e30)))
    cases["codebook cut"] = (p, b[: cb + 16])
    for what, (payload, bad) in cases.items():
        with pytest.raises(DecodeError):
            fedsqueeze.decode(_reframe(payload, bad))
            pytest.fail(what)


def test_rd_truncations_and_symbol_flips_are_decode_errors(rd_payloads: dict[str, bytes]) -> None:
    """Every resealed cut of the body, and every bit flip in the model counts and ANS words, is a
    DecodeError. Flips in the verbatim prefix and the symbol range decode or fail, never crash
    (shifting ``lo`` or ``loc`` gives another valid payload; only the frame CRC can catch it)."""
    g = np.random.default_rng(0)
    for spec, payload in rd_payloads.items():
        body = _body(payload)
        h = parse_frame(payload)[0]
        for cut in range(len(body)):
            with pytest.raises(DecodeError):
                fedsqueeze.decode(_reframe(payload, body[:cut]))
                pytest.fail(f"{spec}: cut at {cut}")
        start = _prefix_end(payload) + 5  # after mode u8 | lo u16 | span u16
        for bit in g.choice(8 * (len(body) - start), size=150, replace=False):
            bad = body.copy()
            bad[start + bit // 8] ^= 1 << (bit % 8)
            with pytest.raises(DecodeError):
                fedsqueeze.decode(_reframe(payload, bad))
                pytest.fail(f"{spec}: flip of bit {bit} of the counts/words")
        for bit in g.choice(8 * start, size=min(200, 8 * start), replace=False):
            bad = body.copy()
            bad[bit // 8] ^= 1 << (bit % 8)
            try:
                y = fedsqueeze.decode(_reframe(payload, bad))
            except DecodeError:
                continue
            assert y.shape == h.shape and y.dtype == h.dtype


# ---------------------------------------------------------------------------- golden bytes
_GOLDEN_HEX = (
    "4653515a016000010001e80300005301000021e33238100003000000000065fb43c2defb5f41010000070019326"
    "6c002c1026c32187a052259cfe40525c28e9cddda01811324e580912e632982d5dc71166a90d7e0ec12e6dfd507"
    "1449d4cd7520a513c57cb6bf8329e53c781c20cd21abdbb66a4cff0bf9ca67c3bb5ff097096150985db2b8ece10"
    "59d38ae88cdaf7de13cdc18180b2169f3d2e2ee2f76bdd950ff49079792ba58269905ec854a6d97702ab520c492"
    "4b1b7c757a3fe41b2afc3c978465f449836d8d1933367b7af8d972d0dd9bb6f5777d2a457f0f340566bcede6e8f"
    "b2cf3489519de983496047e4c45887ec3b0a3e4823920393a66462907c48089e7731a74fb2db6488c318ad256ad"
    "1bd72fa7c677d872e64c8d7ab4a669224b940b34ca05da4ff9eafed4c372a3582ede727c60152e7c434de509d50"
    "5a35f4cb650bdc96a08ef3802d988db61fd734474709900792f446a16481d6bf2ec2b766eb75f9e000000"
)
_GOLDEN_DECODED_SHA256 = "3dec170bf206b1814ca1e0839555a07a7ad85597dd251f5562772c19c5634b61"


def _golden_input() -> torch.Tensor:
    i = torch.arange(1000, dtype=torch.float64)
    return (torch.sin(i * 0.37) * (1 + (i % 7)) ** 2 + 0.01 * torch.cos(i * 1.3)).to(torch.float32)


def test_golden_ans_payload() -> None:
    """Frozen ANS-mode payload: catches a change of our format or of constriction's coding."""
    payload = parse_spec("uniform:3 > ans").encode(_golden_input())
    assert symbol_stats(payload).mode == 1
    assert payload.hex() == _GOLDEN_HEX
    y = fedsqueeze.decode(bytes.fromhex(_GOLDEN_HEX))
    assert hashlib.sha256(y.numpy().tobytes()).hexdigest() == _GOLDEN_DECODED_SHA256


_GOLDEN_RD_HEX = (
    "4653515a01600001000158020000650000008ec4120b40000103f800c800934c8a3cf0c7af400103000100e802f001"
    "8ada658914962acdfccd95d5fbd50cd2acf5b6b28320e24b4c0bd344def2ecfc8e00b15ffff9c7cf2d3dc424e522fd7b"
    "e57cd11d6e485c7020b1968ec76656f51f2346de23633a7c2200e01c"
)
_GOLDEN_RD_DECODED_SHA256 = "80790a3797ee50ba7cd259205c089ca8647ff4faef131fb59bccf6890146acb5"


def test_golden_ans_payload_of_a_lloydmax_quantizer() -> None:
    """Frozen ANS-mode ``lloydmax:3,M=2 > ans`` payload on a peaked, RNG-free input (the conformance
    golden cases of the rd codecs under ``ans`` are raw mode on their input)."""
    i = torch.arange(600, dtype=torch.float64)
    x = (torch.sin(i * 0.37) ** 5 * (1 + (i % 7)) + 0.01 * torch.cos(i * 1.3)).to(torch.float32)
    payload = parse_spec("lloydmax:3,M=2 > ans").encode(x)
    assert symbol_stats(payload).mode == 1
    assert payload.hex() == _GOLDEN_RD_HEX
    y = fedsqueeze.decode(bytes.fromhex(_GOLDEN_RD_HEX))
    assert hashlib.sha256(y.numpy().tobytes()).hexdigest() == _GOLDEN_RD_DECODED_SHA256


# ---------------------------------------------------------------------------- configuration
@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("ans", "has none"),
        ("fp32 > ans", "has none"),
        ("fp16 > ans", "has none"),
        ("topk:1% > ans", "has none"),
        ("topk:1% > bf16 > ans", "has none"),
        ("qsgd:s=15,coding=elias > ans", "coding=fixed"),
        ("randk:1% > qsgd:s=3,coding=elias > ans", "coding=fixed"),
        ("uniform:4 > ans:3", "unexpected extra"),
        ("uniform:4 > ans > zstd", "at most once"),
        ("topk:1% > m22:10% > ans", "stages must be"),
        ("m22:10% > lloydmax:3 > ans", "quantizes its kept values itself"),
        ("lloydmax:3,codebook=maybe > ans", "codebook"),
    ],
)
def test_bad_specs(spec: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_spec(spec)


def test_flags_and_ids() -> None:
    c = parse_spec("randk:10% > uniform:4,stochastic=true > ans")
    assert (c.codec_id, c.name, c.stage) == (96, "ans", "lossless")
    assert c.unbiased and c.stochastic and not c.lossless
    assert c.spec == "randk:10% > uniform:4,stochastic=true > ans"


@pytest.mark.parametrize(
    "spec",
    [
        "lloydmax:3,law=gennorm,M=2 > ans",
        "m22:10%,bits=2,M=2,law=gennorm,codebook=send > ans",
        "topk:10% > tinyscript:4 > ans",
        "randk:1% > weibull_lloyd:3 > ans",
    ],
)
def test_rd_specs_are_accepted_and_round_trip(spec: str) -> None:
    c = parse_spec(spec)
    assert isinstance(c, Ans) and c.spec == spec
    assert (c.unbiased, c.stochastic) == (c.inner.unbiased, c.inner.stochastic)


def test_entropy_code_refuses_payloads_without_symbols() -> None:
    with pytest.raises(EncodeError, match="no quantization symbols"):
        entropy_code(parse_spec("fp32").encode(torch.ones(4)))
    with pytest.raises(EncodeError, match="coding=fixed"):
        entropy_code(parse_spec("qsgd:s=3,coding=elias").encode(torch.ones(4)))
    with pytest.raises(EncodeError, match="not a valid frame"):
        entropy_code(b"junk")
    with pytest.raises(DecodeError, match="expected an ans frame"):
        inner_payload(parse_spec("uniform:4").encode(torch.ones(4)))


# ---------------------------------------------------------------------------- hostile bodies
def _body(payload: bytes) -> bytearray:
    return bytearray(parse_frame(payload)[1])


def _reframe(payload: bytes, body: bytes | bytearray) -> bytes:
    h, _ = parse_frame(payload)
    return build_frame(h.codec_id, h.dtype, h.shape, bytes(body))


@pytest.fixture(scope="module")
def dense_payload() -> bytes:
    p = parse_spec("uniform:3 > ans").encode(_golden_input())
    assert symbol_stats(p).mode == 1
    return p


# uniform:3 body: id(2) | params(6) | scales(8) | mode(1) | lo(2) span(2) | counts ... | words
_SYM = 2 + 6 + 8


def _counts_end(body: bytearray) -> int:
    pos = _SYM + 5
    for _ in range(body[_SYM + 3] + 1):
        while body[pos] & 0x80:
            pos += 1
        pos += 1
    return pos


def test_hostile_symbol_sections(dense_payload: bytes) -> None:
    body = _body(dense_payload)
    cases: dict[str, bytearray] = {}
    b = body.copy()
    b[_SYM] = 7
    cases["mode 7"] = b
    b = body.copy()
    b[_SYM + 3 : _SYM + 5] = struct.pack("<H", 8)  # lo + span beyond 3 bits
    cases["span beyond bits"] = b
    b = body.copy()
    b[_SYM + 5] ^= 0x01  # a count changes: sum != n
    cases["counts sum"] = b
    end = _counts_end(body)
    cases["trailing word"] = body + b"\x01\x00\x00\x00"
    cases["half word"] = body + b"\x01"
    cases["no words"] = body[:end]
    b = body.copy()
    b[end + 5] ^= 0x40  # a flipped ANS bit: histogram or final state check fails
    cases["flipped word"] = b
    b = body.copy()
    b[0:2] = struct.pack("<H", Ans.codec_id)  # ans inside ans
    cases["nested ans"] = b
    b = body.copy()
    b[0:2] = struct.pack("<H", 1)  # fp32 has no symbols
    cases["fp32 inner"] = b
    for what, bad in cases.items():
        with pytest.raises(DecodeError):
            fedsqueeze.decode(_reframe(dense_payload, bad))
            pytest.fail(what)


def test_non_canonical_counts_are_refused(dense_payload: bytes) -> None:
    body = _body(dense_payload)
    pos = _SYM + 5  # first count: re-encode it with a redundant zero continuation byte
    v, shift, end = 0, 0, pos
    while True:
        v |= (body[end] & 0x7F) << shift
        shift += 7
        end += 1
        if not body[end - 1] & 0x80:
            break
    bad = body[:pos] + entropy._varints(np.array([v]))[:-1]
    last = entropy._varints(np.array([v]))[-1:]
    bad += bytes([last[0] | 0x80, 0x00]) + body[end:]
    with pytest.raises(DecodeError, match="minimally"):
        fedsqueeze.decode(_reframe(dense_payload, bad))


def test_one_symbol_section_with_words_is_refused() -> None:
    p = parse_spec("uniform:4 > ans").encode(torch.zeros(1000))
    with pytest.raises(DecodeError, match="one-symbol"):
        fedsqueeze.decode(_reframe(p, _body(p) + b"\x01\x00\x00\x00"))


@settings(max_examples=200)
@given(values=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=40))
def test_varints_round_trip(values: list[int]) -> None:
    v = np.array(values, dtype=np.uint64)
    buf = entropy._varints(v) + b"\xff\x00"
    r = Reader(buf)
    assert entropy._read_varints(r, len(values)).tolist() == values
    assert r.remaining == 2
