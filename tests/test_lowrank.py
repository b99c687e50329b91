"""PowerSGD: exactness on low-rank matrices, rank/error trade-off, warm start, bytes, state, validation."""

from __future__ import annotations

import itertools
import struct

import pytest
import torch

import fedsqueeze
from fedsqueeze.codecs.lowrank import (
    PARAMS_NBYTES,
    PowerSGD,
    PowerSGDState,
    compressed_rank,
    initial_q,
    matrix_shape,
    power_step,
)
from fedsqueeze.errors import ConfigError, DecodeError, EncodeError
from fedsqueeze.wire.frame import build_frame, header_size, parse_frame


def rng(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def decaying(n: int, m: int, seed: int = 0) -> torch.Tensor:
    """A matrix with singular values 0.7**i (so every extra rank helps a known amount)."""
    g = rng(seed)
    u = torch.linalg.qr(torch.randn(n, min(n, m), generator=g)).Q
    v = torch.linalg.qr(torch.randn(m, min(n, m), generator=g)).Q
    s = 0.7 ** torch.arange(min(n, m), dtype=torch.float32)
    return (u * s) @ v.T


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm())


@pytest.mark.parametrize("rank", [3, 5])
def test_exact_recovery_of_a_low_rank_matrix(rank: int) -> None:
    g = rng(1)
    m = torch.randn(60, 3, generator=g) @ torch.randn(3, 40, generator=g)
    y = fedsqueeze.decode(PowerSGD(rank).encode(m, rng=g))
    assert rel_err(m, y) < 1e-5


def test_conv_kernels_are_reshaped_and_recovered() -> None:
    g = rng(2)
    w = (torch.randn(16, 2, generator=g) @ torch.randn(2, 3 * 3 * 3, generator=g)).reshape(16, 3, 3, 3)
    payload = PowerSGD(2).encode(w, rng=g)
    assert matrix_shape(w.shape) == (16, 27)
    assert len(payload) == header_size(4) + PARAMS_NBYTES + 4 * 2 * (16 + 27)
    y = fedsqueeze.decode(payload)
    assert y.shape == w.shape and rel_err(w, y) < 1e-5


def test_error_decreases_with_rank() -> None:
    m = decaying(80, 50)
    errs = [rel_err(m, fedsqueeze.decode(PowerSGD(r).encode(m, rng=rng(3)))) for r in (1, 2, 4, 8, 16)]
    assert all(a > b for a, b in itertools.pairwise(errs)), errs
    best = [float((0.7 ** torch.arange(r, 50)).norm() / (0.7 ** torch.arange(50)).norm()) for r in (1, 16)]
    assert best[0] <= errs[0] and best[1] <= errs[-1]  # never better than the truncated SVD


@pytest.mark.parametrize(("n", "m", "r"), [(30, 20, 1), (100, 7, 3), (64, 64, 8)])
def test_payload_bytes(n: int, m: int, r: int) -> None:
    payload = PowerSGD(r).encode(torch.randn(n, m, generator=rng(4)), rng=rng(5))
    assert len(payload) == header_size(2) + PARAMS_NBYTES + 4 * r * (n + m)


@pytest.mark.parametrize("shape", [(), (1,), (10,), (2, 1, 1), (2, 2), (1, 50), (50, 1), (0, 4), (4, 0)])
def test_vectors_and_tiny_matrices_go_dense_and_exact(shape: tuple[int, ...]) -> None:
    assert compressed_rank(shape, 1) == 0
    x = torch.randn(shape, generator=rng(6))
    payload = PowerSGD(1).encode(x)
    assert len(payload) == header_size(len(shape)) + PARAMS_NBYTES + 4 * x.numel()
    assert torch.equal(fedsqueeze.decode(payload), x)


def test_rank_is_capped_by_the_matrix() -> None:
    assert compressed_rank((10, 40), 64) == 0  # 10 * 50 >= 400: dense is cheaper
    assert compressed_rank((100, 40), 64) == 0
    assert compressed_rank((100, 40), 20) == 20
    assert compressed_rank((100, 400), 64) == 64


def test_payload_carries_the_seed_of_q0() -> None:
    x = torch.randn(40, 30, generator=rng(7))
    payload = PowerSGD(2).encode(x, rng=rng(8))
    _, body = parse_frame(payload)
    mode, flags, rank, n, m, seed = struct.unpack_from("<BBHIIQ", body)
    assert (mode, flags, rank, n, m) == (1, 0, 2, 40, 30)
    f = power_step(x, initial_q(seed, m, rank))
    p_hat = torch.frombuffer(bytearray(body[PARAMS_NBYTES : PARAMS_NBYTES + 4 * 40 * 2]), dtype=torch.float32)
    assert torch.equal(p_hat.view(40, 2), f.p_hat)
    assert torch.allclose(f.p_hat.T @ f.p_hat, torch.eye(2), atol=1e-5)


def test_initial_q_is_frozen_and_gaussian() -> None:
    # A pure function of (seed, m, r): these numbers must never change (portable SplitMix64 stream).
    assert initial_q(7, 2, 2).flatten().tolist() == pytest.approx(
        [-0.36563238501548767, 0.2590252161026001, -0.50710129737854, -1.0734585523605347], abs=1e-7
    )
    q = initial_q(123, 200, 50)
    assert abs(float(q.mean())) < 0.02 and abs(float(q.std()) - 1) < 0.02
    assert not torch.equal(initial_q(1, 5, 2), initial_q(2, 5, 2))


def test_warm_start_converges_to_the_best_rank_r_approximation() -> None:
    m = decaying(80, 60, seed=9)
    r = 2
    best = float((0.7 ** torch.arange(r, 60)).norm() / (0.7 ** torch.arange(60)).norm())
    state = PowerSGDState(f"powersgd:rank={r}")
    g = rng(10)
    errs = []
    for _ in range(12):
        payload = state.encode("c1", "w", m, rng=g)
        errs.append(rel_err(m, fedsqueeze.decode(payload)))
    assert errs[-1] < errs[0] - 0.01
    assert errs[-1] == pytest.approx(best, rel=1e-3)
    assert all(b <= a + 1e-6 for a, b in itertools.pairwise(errs)), errs
    # A cold codec never improves: every message restarts from a random Q0.
    cold = [rel_err(m, fedsqueeze.decode(PowerSGD(r).encode(m, rng=g))) for _ in range(4)]
    assert min(cold) > errs[-1] + 0.01
    # Warm payloads say so and carry no seed; the receiver still needs nothing but the bytes.
    _, body = parse_frame(payload)
    params = struct.unpack_from("<BBHIIQ", body)
    assert (params[1], params[5]) == (1, 0)


def test_state_is_per_client_and_per_name_and_round_trips() -> None:
    g = rng(11)
    a, b = torch.randn(30, 20, generator=g), torch.randn(30, 20, generator=g)
    state = PowerSGDState(2)
    state.encode(1, "w", a, rng=g)
    state.encode("2", "w", b, rng=g)
    state.encode(1, "bias", torch.randn(20, generator=g), rng=g)  # dense: no Q kept
    assert set(state.state_dict()) == {"q.w/1", "q.w/2"}
    assert state.q(1, "w") is not None and state.q(1, "bias") is None
    assert state.nbytes == 2 * 20 * 2 * 4
    clone = PowerSGDState(2)
    clone.load_state_dict(state.state_dict())
    assert state.encode(1, "w", a, rng=rng(0)) == clone.encode(1, "w", a, rng=rng(0))
    with pytest.raises(ConfigError, match=r"q\."):
        clone.load_state_dict({"w/1": torch.zeros(20, 2)})
    state.reset(1)
    assert set(state.state_dict()) == {"q.w/2"}
    state.reset(name="w")
    assert state.state_dict() == {}


def test_shape_change_needs_a_reset() -> None:
    state = PowerSGDState(2)
    state.encode(0, "w", torch.randn(30, 20, generator=rng(12)))
    with pytest.raises((EncodeError, ConfigError)):
        state.encode(0, "w", torch.randn(30, 25, generator=rng(13)))
    state.reset(0, "w")
    state.encode(0, "w", torch.randn(30, 25, generator=rng(13)))


def test_zero_matrix_then_warm_start_recovers() -> None:
    state = PowerSGDState(1)
    z = torch.zeros(20, 10)
    assert torch.equal(fedsqueeze.decode(state.encode(0, "w", z)), z)  # Q becomes 0 ...
    g = rng(14)
    m = torch.randn(20, 1, generator=g) @ torch.randn(1, 10, generator=g)
    y = fedsqueeze.decode(state.encode(0, "w", m, rng=g))  # ... so this one restarts from random
    assert rel_err(m, y) < 1e-5


def test_error_feedback_option_telescopes() -> None:
    state = PowerSGDState(1, error_feedback=True)
    g = rng(15)
    xs = [torch.randn(24, 16, generator=g) for _ in range(5)]
    total = sum(fedsqueeze.decode(state.encode("c", "w", x, rng=g)) for x in xs)
    residual = state.store.lookup("c", "e.w")
    assert residual is not None
    assert torch.allclose(total + residual, torch.stack(xs).sum(0), atol=1e-4)


def test_specs_and_config_errors() -> None:
    assert fedsqueeze.parse_spec("powersgd:rank=4").spec == "powersgd:rank=4"
    assert fedsqueeze.parse_spec("powersgd:2").spec == "powersgd:rank=2"
    assert fedsqueeze.parse_spec("powersgd").spec == "powersgd:rank=1"
    for bad in ("powersgd:rank=0", "powersgd:rank=x", "powersgd:rnak=2"):
        with pytest.raises(ConfigError):
            fedsqueeze.parse_spec(bad)
    with pytest.raises(ConfigError):
        PowerSGDState("fp16")
    c = PowerSGD(2)
    with pytest.raises(EncodeError, match="shape"):
        c.encode_warm(torch.randn(10, 8), torch.randn(8, 3))
    with pytest.raises(EncodeError, match="non-finite"):
        c.encode(torch.full((10, 8), float("nan")))


def _frame(shape: tuple[int, ...], params: tuple[int, ...], values: list[float]) -> bytes:
    body = struct.pack("<BBHIIQ", *params) + struct.pack(f"<{len(values)}f", *values)
    return build_frame(84, torch.float32, shape, body)


@pytest.mark.parametrize(
    ("shape", "params", "values", "match"),
    [
        ((3, 4), (1, 0, 1, 4, 3, 5), [1.0] * 7, "matrix"),  # n, m swapped
        ((3, 4), (1, 0, 0, 3, 4, 5), [], "rank"),
        ((3, 4), (1, 0, 4, 3, 4, 5), [1.0] * 28, "rank"),  # rank > min(n, m)
        ((3, 4), (2, 0, 1, 3, 4, 5), [1.0] * 7, "mode"),
        ((3, 4), (1, 2, 1, 3, 4, 5), [1.0] * 7, "flags"),
        ((3, 4), (1, 1, 1, 3, 4, 5), [1.0] * 7, "flags"),  # warm start with a seed
        ((3, 4), (1, 0, 1, 3, 4, 5), [1.0] * 6, "need"),
        ((3, 4), (1, 0, 1, 3, 4, 5), [1.0] * 6 + [float("nan")], "NaN"),
        ((3, 4), (1, 0, 1, 3, 4, 5), [3e38] * 7, "NaN or Inf"),  # product overflows
        ((12,), (1, 0, 1, 12, 1, 5), [1.0] * 13, "low rank"),
        ((12,), (0, 0, 0, 12, 1, 5), [1.0] * 12, "dense"),
        ((12,), (0, 0, 1, 12, 1, 0), [1.0] * 12, "dense"),
        ((12,), (0, 0, 0, 12, 1, 0), [1.0] * 11, "need"),
        ((12,), (0, 0, 0, 12, 1, 0), [float("inf")] * 12, "NaN or Inf"),
    ],
)
def test_decoder_rejects_inconsistent_bodies(
    shape: tuple[int, ...], params: tuple[int, ...], values: list[float], match: str
) -> None:
    with pytest.raises(DecodeError, match=match):
        fedsqueeze.decode(_frame(shape, params, values))


def test_handmade_low_rank_body_decodes() -> None:
    # P^ = [1, 0, 0]^T, Q = [1, 2, 3, 4]^T: decodes to the outer product.
    y = fedsqueeze.decode(_frame((3, 4), (1, 0, 1, 3, 4, 0), [1, 0, 0, 1, 2, 3, 4]))
    assert y.tolist() == [[1, 2, 3, 4], [0, 0, 0, 0], [0, 0, 0, 0]]


# ---------------------------------------------------------------------------- shared harness
