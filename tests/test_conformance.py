"""The shared conformance harness: every registered codec runs through the same checks.

Round trip (shape, dtype), decode from the bytes alone, declared ``lossless``/``unbiased``
properties (exactly / statistically), determinism for a fixed rng, corrupted and truncated bytes,
and golden payload bytes frozen in ``tests/golden/codecs.json``.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

import fedsqueeze
from codec_cases import CASES
from fedsqueeze.codecs import registry
from fedsqueeze.errors import DecodeError, EncodeError
from fedsqueeze.wire.frame import build_frame, inspect, parse_frame

GOLDEN = Path(__file__).parent / "golden" / "codecs.json"


def golden_input() -> torch.Tensor:
    """Deterministic, RNG-free input for golden payloads (values spread over several scales)."""
    i = torch.arange(200, dtype=torch.float64)
    return (torch.sin(i * 0.37) * (1 + (i % 7)) + 0.01 * torch.cos(i * 1.3)).to(torch.float32)


def rng(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make(spec: str) -> fedsqueeze.Codec:
    return fedsqueeze.parse_spec(spec)


def test_every_registered_codec_is_covered() -> None:
    covered = set()
    for spec in CASES:
        c = make(spec)
        while c is not None:
            covered.add(c.name)
            c = (
                getattr(c, "inner", None) or getattr(c, "values", None)
                if c.name in ("zstd", "ans", "topk", "randk", "threshold")
                else None
            )
    missing = set(registry.names()) - covered
    assert not missing, f"add conformance cases for: {sorted(missing)}"


def test_wire_ids_are_stable() -> None:
    # Frozen: changing a number breaks every payload ever written.
    expected = {
        1: "fp32",
        2: "fp16",
        3: "bf16",
        4: "raw",
        16: "uniform",
        17: "qsgd",
        32: "topk",
        33: "threshold",
        34: "randk",
        48: "zstd",
        64: "lloydmax",
        65: "m22",
        66: "weibull_lloyd",
        67: "tinyscript",
        80: "fp8",
        81: "fp4",
        84: "powersgd",
        88: "countsketch",
        96: "ans",
        97: "budget",
    }
    ids = registry.all_ids()
    for cid, name in expected.items():
        assert ids.get(cid) == name


@pytest.mark.parametrize("spec", CASES)
def test_spec_round_trips(spec: str) -> None:
    c = make(spec)
    assert make(c.spec).spec == c.spec


SHAPES = [(), (0,), (1,), (7,), (3, 5), (2, 3, 4, 5), (1000,)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@pytest.mark.parametrize("spec", CASES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_round_trip_shape_and_dtype(spec: str, shape: tuple[int, ...]) -> None:
    c = make(spec)
    for dtype in DTYPES:
        x = torch.randn(shape, generator=rng(1)).to(dtype)
        payload = c.encode(x, rng=rng(2))
        assert isinstance(payload, bytes)
        y = fedsqueeze.decode(payload)  # module-level: no codec object involved
        assert y.shape == x.shape and y.dtype == x.dtype, spec
        assert torch.equal(c.decode(payload), y)
        h = inspect(payload)
        assert h.shape == tuple(shape) and h.nbytes == len(payload)
        if c.lossless and dtype == torch.float32:
            assert torch.equal(x, y), f"{spec} declares lossless"


@pytest.mark.parametrize("spec", CASES)
def test_reconstruction_is_sane(spec: str) -> None:
    c = make(spec)
    x = torch.randn(5000, generator=rng(3))
    y = fedsqueeze.decode(c.encode(x, rng=rng(4)))
    rel = float((x - y).norm() / x.norm())
    # Sparsifiers without rescaling keep the error below 1; unbiased rescaling (Rand-K, QSGD with
    # few levels) may exceed it, within the codec's variance bound; so may 1-bit min-max
    # quantization, whose two levels are the extremes of the tensor.
    bound = 1.0 + 1e-6
    if c.spec.startswith(("randk", "uniform:1", "countsketch")):
        bound = 4.0
    if "qsgd:s=1," in c.spec:  # QSGD's bound: E rel^2 <= min(d/s^2, sqrt(d)/s) = sqrt(5000) here
        bound = 5000**0.25
    assert rel <= bound, f"{spec}: relative error {rel}"
    if c.lossless:
        assert rel == 0.0


@pytest.mark.parametrize("spec", CASES)
def test_fixed_rng_is_deterministic(spec: str) -> None:
    c = make(spec)
    x = torch.randn(300, generator=rng(5))
    assert c.encode(x, rng=rng(9)) == c.encode(x, rng=rng(9))


def _unbiased_cases() -> list[str]:
    return [s for s in CASES if make(s).unbiased and not make(s).lossless]


def test_some_codecs_claim_unbiasedness() -> None:
    names = {make(s).name for s in _unbiased_cases()}
    assert {"uniform", "qsgd", "randk"} <= names


@pytest.mark.parametrize("spec", _unbiased_cases())
def test_unbiased_claim_holds_statistically(spec: str) -> None:
    """Mean of N decodes vs x, coordinate-wise z-scores with the sample standard deviation."""
    c = make(spec)
    d, n = 40, 2000
    x = torch.randn(d, generator=rng(11))
    g = rng(12)
    draws = torch.stack([fedsqueeze.decode(c.encode(x, rng=g)) for _ in range(n)]).double()
    mean, sd = draws.mean(0), draws.std(0)
    scale = float(x.abs().max())
    z = (mean - x.double()).abs() / (sd / math.sqrt(n)).clamp_min(1e-6 * scale)
    assert float(z.max()) < 5.5, f"{spec}: max z-score {float(z.max()):.2f} (bias suspected)"


@pytest.mark.parametrize("spec", [s for s in CASES if not make(s).unbiased])
def test_biased_codecs_are_really_biased_or_deterministic(spec: str) -> None:
    """A codec that does not claim unbiasedness is still deterministic for a fixed input & rng."""
    c = make(spec)
    x = torch.randn(64, generator=rng(13))
    a = fedsqueeze.decode(c.encode(x, rng=rng(1)))
    b = fedsqueeze.decode(c.encode(x, rng=rng(1)))
    assert torch.equal(a, b)


@pytest.mark.parametrize("spec", CASES)
def test_every_truncation_is_a_decode_error(spec: str) -> None:
    payload = make(spec).encode(torch.randn(64, generator=rng(6)), rng=rng(7))
    for cut in range(len(payload)):
        with pytest.raises(DecodeError):
            fedsqueeze.decode(payload[:cut])
    with pytest.raises(DecodeError):
        fedsqueeze.decode(payload + b"\x00")


@pytest.mark.parametrize("spec", CASES)
def test_single_bit_flips_are_detected(spec: str) -> None:
    payload = make(spec).encode(torch.randn(64, generator=rng(6)), rng=rng(7))
    for pos in range(0, len(payload) * 8, 7):
        bad = bytearray(payload)
        bad[pos // 8] ^= 1 << (pos % 8)
        with pytest.raises(DecodeError):
            fedsqueeze.decode(bytes(bad))


def test_wrong_version_and_unknown_codec() -> None:
    payload = bytearray(make("fp32").encode(torch.ones(3)))
    bad = bytearray(payload)
    bad[4] = 99
    with pytest.raises(fedsqueeze.errors.UnsupportedVersion, match="version 99"):
        fedsqueeze.decode(bytes(bad))
    h, body = parse_frame(bytes(payload))
    with pytest.raises(fedsqueeze.errors.UnknownCodec, match="unknown codec id 999"):
        fedsqueeze.decode(build_frame(999, h.dtype, h.shape, bytes(body)))


def test_absurd_size_is_refused_before_allocation() -> None:
    # A 2**31-entry shape with a tiny body must not allocate 8 GB.
    frame = build_frame(32, torch.float32, (1 << 16, 1 << 15), b"\x00" * 8)
    with pytest.raises(DecodeError, match="decode limit"):
        fedsqueeze.decode(frame)


@pytest.mark.parametrize("spec", [s for s in CASES if s != "raw"])
def test_non_finite_input_is_refused(spec: str) -> None:
    for bad in (float("nan"), float("inf"), float("-inf")):
        x = torch.randn(10)
        x[3] = bad
        with pytest.raises(EncodeError, match="non-finite"):
            make(spec).encode(x)


def test_raw_keeps_non_finite_and_integers() -> None:
    raw = make("raw")
    x = torch.tensor([1.0, float("nan"), float("inf")])
    y = fedsqueeze.decode(raw.encode(x))
    assert torch.equal(torch.isnan(y), torch.isnan(x)) and y[2] == float("inf")
    for t in (
        torch.arange(5, dtype=torch.int64),
        torch.tensor([True, False]),
        torch.arange(3, dtype=torch.uint8),
    ):
        assert torch.equal(fedsqueeze.decode(raw.encode(t)), t)


def test_integer_input_to_lossy_codec_is_refused() -> None:
    with pytest.raises(EncodeError, match="raw"):
        make("uniform:8").encode(torch.arange(10))


# ---------------------------------------------------------------------------- golden bytes
def _golden() -> dict[str, dict[str, str]]:
    return json.loads(GOLDEN.read_text())


def test_golden_file_covers_every_case() -> None:
    assert set(_golden()["cases"]) == set(CASES), "regenerate with tests/golden/make_golden.py"


@pytest.mark.parametrize("spec", CASES)
def test_golden_payload_decodes_identically(spec: str) -> None:
    case = _golden()["cases"][spec]
    y = fedsqueeze.decode(bytes.fromhex(case["payload_hex"]))
    assert hashlib.sha256(y.numpy().tobytes()).hexdigest() == case["decoded_sha256"], (
        f"{spec}: decoding the frozen payload changed (format or decoder change)"
    )


@pytest.mark.parametrize("spec", CASES)
def test_golden_payload_is_reproduced_by_encoder(spec: str) -> None:
    g = _golden()
    c = make(spec)
    if c.stochastic and g["torch_version"] != torch.__version__:
        pytest.skip("stochastic codecs draw from torch's RNG stream, frozen for one torch version")
    payload = c.encode(golden_input(), rng=rng(1234))
    assert payload.hex() == g["cases"][spec]["payload_hex"], (
        f"{spec}: encoder output changed; if the format change is intended, bump FORMAT_VERSION or "
        "the codec's id and regenerate tests/golden/codecs.json"
    )


def test_uniform_refuses_a_range_beyond_float32() -> None:
    x = torch.tensor([-3e38, 3e38, 0.0])
    with pytest.raises(EncodeError, match="float32's range"):
        make("uniform:8").encode(x)
    # per-block scales make it representable
    y = fedsqueeze.decode(make("uniform:8,block=1").encode(x))
    assert torch.equal(y, x)
