"""Rate-distortion codecs: closed forms vs quadrature, Lloyd–Max tables, TinyScript knobs, fits,
the four codecs through the shared conformance checks, M22 payload sizes, global Top-K and the CLI."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
import torch
from scipy import integrate, stats
from typer.testing import CliRunner

import fedsqueeze
import fedsqueeze.cli.rd_commands
import fedsqueeze.codecs.rd
import test_conformance as tc
from fedsqueeze.cli.main import app
from fedsqueeze.codecs import decode_state_dict
from fedsqueeze.codecs.rd import design as rd
from fedsqueeze.codecs.rd.codecs import (
    M22,
    LloydMax,
    TinyScript,
    WeibullLloyd,
    encode_state_dict_m22,
    global_topk_counts,
)
from fedsqueeze.codecs.registry import all_ids
from fedsqueeze.codecs.sparse import encode_indices
from fedsqueeze.errors import ConfigError, DecodeError, EncodeError
from fedsqueeze.wire.frame import build_frame, header_size

RD_CASES = [
    "lloydmax:3,law=gennorm,M=2",
    "lloydmax:1,law=gaussian,M=0",
    "lloydmax:4,law=dweibull,M=1",
    "m22:10%,bits=2,M=2,law=gennorm",
    "m22:k=5,bits=3,M=0,law=gaussian",
    "m22:25%,bits=1,M=2,law=gennorm > zstd",
    "weibull_lloyd:3",
    "tinyscript:3",
    "tinyscript:8",
]


def law_pdf(family: str, shape: float):  # type: ignore[no-untyped-def]
    s = rd.unit_scale(family, shape)
    return (stats.gennorm(shape, scale=s) if family == "gennorm" else stats.dweibull(shape, scale=s)).pdf


# ---------------------------------------------------------------------------- closed forms
@pytest.mark.parametrize(
    ("law", "shape"),
    [("gennorm", 0.6), ("gennorm", 2.0), ("gennorm", 7.5), ("dweibull", 0.7), ("dweibull", 2.3)],
)
def test_partial_moments_match_quadrature(law: str, shape: float) -> None:
    pdf = law_pdf(law, shape)
    for k in (0.0, 1.0, 2.5, 4.0):
        for a, b in ((0.0, 0.3), (0.2, 1.1), (1.1, 3.0), (2.5, np.inf), (0.0, np.inf)):
            got = float(rd.partial_moment(law, shape, k, a, b))
            ref = integrate.quad(lambda x, k=k: x**k * pdf(x), a, b, limit=200, epsabs=1e-13)[0]
            assert got == pytest.approx(ref, rel=1e-7, abs=1e-12), (law, shape, k, a, b)


def test_unit_variance_scales() -> None:
    for family, shape in (("gennorm", 0.5), ("gennorm", 3.0), ("dweibull", 0.8), ("dweibull", 4.0)):
        assert 2 * float(rd.partial_moment(family, shape, 2, 0, np.inf)) == pytest.approx(1.0, rel=1e-12)
        assert float(rd.partial_moment(family, shape, 0, 0, np.inf)) == pytest.approx(0.5, rel=1e-12)


# ---------------------------------------------------------------------------- Lloyd–Max design
def test_gaussian_mse_matches_classical_lloyd_max_tables() -> None:
    d1 = rd.design("gaussian", None, 0, 1)
    assert np.allclose(d1.centers, [-0.7979, 0.7979], atol=1e-4)
    assert d1.distortion == pytest.approx(1 - 2 / math.pi, abs=1e-9)  # 0.3634
    d2 = rd.design("gaussian", None, 0, 2)
    assert np.allclose(d2.centers, [-1.5104, -0.4528, 0.4528, 1.5104], atol=1e-4)
    assert np.allclose(d2.thresholds, [-0.9816, 0.0, 0.9816], atol=1e-4)
    assert d2.distortion == pytest.approx(0.1175, abs=1e-4)
    d3 = rd.design("gennorm", 2.0, 0, 3)
    assert np.allclose(d3.centers[4:], [0.2451, 0.7560, 1.3439, 2.1519], atol=1e-4)
    assert d3.distortion == pytest.approx(0.03455, abs=1e-5)
    assert d3.mse == d3.distortion
    assert d1.converged and d2.converged and d3.converged


@pytest.mark.parametrize(
    ("law", "M", "expected"),
    [  # algorithms.md §1.6 (positive centres of the unit-variance law)
        ("gaussian", 1, [[1.2533], [0.8292, 1.9204], [0.5293, 1.1144, 1.7246, 2.5291]]),
        ("gaussian", 2, [[1.5958], [1.1389, 2.2428], [0.7930, 1.4145, 2.0343, 2.8346]]),
        ("laplace", 0, [[0.7071], [0.4198, 1.8340], [0.2334, 0.8330, 1.6725, 3.0867]]),
        ("laplace", 2, [[2.1213], [1.4717, 3.6027], [0.9957, 2.0421, 3.2754, 5.1454]]),
    ],
)
def test_weighted_designs_match_reference_table(law: str, M: int, expected: list[list[float]]) -> None:
    for bits, ref in enumerate(expected, start=1):
        d = rd.design(law, None, M, bits)
        assert np.allclose(d.centers[d.levels // 2 :], ref, atol=1e-4), (law, M, bits)
        assert np.allclose(d.centers, -d.centers[::-1])


@pytest.mark.parametrize(
    ("law", "shape", "M", "bits"), [("gennorm", 0.7, 0, 3), ("gennorm", 1.3, 2, 2), ("dweibull", 0.8, 1, 3)]
)
def test_design_is_a_lloyd_fixed_point_and_distortion_matches_quadrature(
    law: str, shape: float, M: float, bits: int
) -> None:
    d = rd.design(law, shape, M, bits)
    pdf = law_pdf(law, shape)
    c = d.centers[d.levels // 2 :]
    edges = np.concatenate(([0.0], d.thresholds[d.levels // 2 :], [np.inf]))
    assert np.allclose(d.thresholds, 0.5 * (d.centers[:-1] + d.centers[1:]))
    dist = 0.0
    for j, cj in enumerate(c):
        a, b = edges[j], edges[j + 1]
        num = integrate.quad(lambda x: x ** (M + 1) * pdf(x), a, b, limit=200)[0]
        den = integrate.quad(lambda x: x**M * pdf(x), a, b, limit=200)[0]
        assert cj == pytest.approx(num / den, rel=1e-7)
        dist += 2 * integrate.quad(lambda x, cj=cj: x**M * (x - cj) ** 2 * pdf(x), a, b, limit=200)[0]
    assert d.distortion == pytest.approx(dist, rel=1e-6)


def test_reference_table_gennorm_07_first_centre_is_not_a_fixed_point() -> None:
    """algorithms.md §1.6 lists 0.1074 as the first centre for β = 0.7; the converged design has a
    lower distortion (checked by quadrature in the test above), so the table's row is unconverged."""
    d = rd.design("gennorm", 0.7, 0, 3)
    assert np.allclose(d.centers[4:], [0.2164, 0.9046, 2.0003, 4.0792], atol=1e-4)
    assert d.distortion < 0.0755


def test_increasing_m_moves_centres_outward() -> None:
    for law, shape in (("gaussian", None), ("gennorm", 0.8), ("dweibull", 1.2)):
        for bits in (1, 2, 3, 5):
            prev = None
            for M in (0, 0.5, 1, 2, 4):
                pos = rd.design(law, shape, M, bits).centers[1 << (bits - 1) :]
                if prev is not None:
                    assert np.all(pos > prev), (law, shape, bits, M)
                prev = pos


def test_all_supported_designs_are_sane_and_fast() -> None:
    for bits in range(1, 9):
        for law, shape, M in (
            ("gennorm", 0.1, 16),
            ("gennorm", 20.0, 0),
            ("dweibull", 0.1, 0),
            ("dweibull", 20, 16),
        ):
            d = rd.design(law, shape, M, bits)
            assert d.converged and d.centers.size == 1 << bits and np.all(np.diff(d.centers) > 0)
            assert np.all(np.isfinite(d.centers)) and math.isfinite(d.distortion)
            assert d.iterations < 100


def test_design_is_cached_on_rounded_parameters() -> None:
    a = rd.design("gennorm", 1.23412, 1.004, 3)
    before = rd.design_cache_info().hits
    b = rd.design("gennorm", 1.23409, 1.0, 3)
    assert b is a and a.shape == 1.234 and a.M == 1.0
    assert rd.design_cache_info().hits == before + 1
    assert not a.centers.flags.writeable


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("gennorm", 1.0, -0.5, 2), "M must be >= 0"),
        (("gennorm", 1.0, 17, 2), "maximum"),
        (("gennorm", 1.0, 0, 0), "bits"),
        (("gennorm", 1.0, 0, 9), "bits"),
        (("gennorm", 0.0, 0, 2), "positive"),
        (("gennorm", -1.0, 0, 2), "positive"),
        (("dweibull", 0.0, 0, 2), "positive"),
        (("gennorm", 25.0, 0, 2), "outside"),
        (("gennorm", None, 0, 2), "needs its shape"),
        (("gaussian", 3.0, 0, 2), "shape 2"),
        (("gausian", None, 0, 2), "did you mean 'gaussian'"),
    ],
)
def test_design_errors(args: tuple[Any, ...], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        rd.design(*args)


# ---------------------------------------------------------------------------- TinyScript knobs
def test_tinyscript_knobs_are_stationary_and_beat_uniform() -> None:
    c, lam = 0.9, 0.15
    kd = rd.design_knobs(c, lam, 8)
    assert kd.converged and kd.knobs[0] == 0 and kd.knobs[-1] == 1 and np.all(np.diff(kd.knobs) > 0)
    pdf = stats.weibull_min(c, scale=lam).pdf
    q = kd.knobs
    for i in range(1, q.size - 1):
        left = integrate.quad(lambda u, i=i: (u - q[i - 1]) * pdf(u), q[i - 1], q[i], limit=200)[0]
        right = integrate.quad(lambda u, i=i: (q[i + 1] - u) * pdf(u), q[i], q[i + 1], limit=200)[0]
        assert left == pytest.approx(right, rel=1e-6, abs=1e-12)
    uniform = rd.knob_variance(c, lam, np.linspace(0, 1, 8))
    assert kd.variance < 0.7 * uniform
    # V by quadrature on the truncated law
    mass = integrate.quad(pdf, 0, 1)[0]
    v = sum(
        integrate.quad(lambda u, i=i: (q[i + 1] - u) * (u - q[i]) * pdf(u), q[i], q[i + 1], limit=200)[0]
        for i in range(q.size - 1)
    )
    assert kd.variance == pytest.approx(v / mass, rel=1e-6)


@pytest.mark.parametrize("c", [0.1, 0.7, 2.0, 20.0])
def test_tinyscript_knob_design_is_robust(c: float) -> None:
    for lam in (1e-300, 1e-9, 0.05, 1.0, 1e3, 1e30):
        for levels in (3, 16, 128):
            kd = rd.design_knobs(c, lam, levels)
            assert kd.converged and np.all(np.diff(kd.knobs) > 0) and math.isfinite(kd.variance)
            assert kd.variance <= rd.knob_variance(kd.c, kd.lam, np.linspace(0, 1, levels)) * (1 + 1e-9)


# ---------------------------------------------------------------------------- fits
def test_fits_recover_the_shape() -> None:
    rs = np.random.RandomState(0)
    for beta in (0.8, 1.5, 3.0):
        z = stats.gennorm.rvs(beta, scale=2.0, size=40000, random_state=rs)
        fit = rd.fit_gennorm(z)
        assert fit.shape == pytest.approx(beta, rel=0.06)
        assert fit.std == pytest.approx(float(stats.gennorm(beta, scale=2.0).std()), rel=0.03)
    for cc in (0.6, 1.4):
        z = stats.dweibull.rvs(cc, scale=0.5, size=40000, random_state=rs)
        fit = rd.fit_dweibull(z)
        assert fit.shape == pytest.approx(cc, rel=0.05)
        assert fit.std == pytest.approx(float(stats.dweibull(cc, scale=0.5).std()), rel=0.05)
    z = rs.standard_normal(5000)
    for scale in (1e-30, 1e30):  # no overflow in the powers: log-sum-exp throughout
        assert rd.fit_gennorm(z * scale).std == pytest.approx(rd.fit_gennorm(z).std * scale, rel=1e-9)
        assert rd.fit_dweibull(z * scale).shape == rd.fit_dweibull(z).shape
    assert rd.fit_gennorm(np.zeros(5)).std == 0.0
    assert rd.fit_gennorm(rs.randn(100), beta=2.0).shape == 2.0


# ---------------------------------------------------------------------------- codecs: harness
def test_wire_ids_and_names() -> None:
    ids = all_ids()
    assert {64: "lloydmax", 65: "m22", 66: "weibull_lloyd", 67: "tinyscript"}.items() <= ids.items()
    assert M22.stage == "sparsifier" and not M22(0.1).unbiased
    assert TinyScript().unbiased and TinyScript().stochastic
    assert not LloydMax().unbiased and not WeibullLloyd().stochastic


@pytest.mark.parametrize("spec", ["tinyscript:3", "tinyscript:2", "tinyscript:6"])
def test_tinyscript_is_unbiased(spec: str) -> None:
    tc.test_unbiased_claim_holds_statistically(spec)


def _frame(codec_id: int, n: int, body: bytes) -> bytes:
    return build_frame(codec_id, torch.float32, (n,), body)


@pytest.mark.parametrize(
    "body",
    [
        bytes([9, 2])
        + (2000).to_bytes(2, "little")
        + (0).to_bytes(2, "little")
        + bytes(8)
        + bytes(1),  # law 9
        bytes([1, 12]) + (2000).to_bytes(2, "little") + bytes(2) + bytes(8) + bytes(6),  # bits 12
        bytes([1, 2]) + (50).to_bytes(2, "little") + bytes(2) + bytes(8) + bytes(1),  # shape 0.05
        bytes([1, 2])
        + (2000).to_bytes(2, "little")
        + (1700).to_bytes(2, "little")
        + bytes(8)
        + bytes(1),  # M 17
        bytes([1, 2])
        + (2000).to_bytes(2, "little")
        + bytes(2)
        + np.array([0, -1], np.float32).tobytes()
        + bytes(1),
        bytes([1, 2])
        + (2000).to_bytes(2, "little")
        + bytes(2)
        + np.array([np.nan, 1], np.float32).tobytes()
        + bytes(1),
        bytes([1, 2])
        + (2000).to_bytes(2, "little")
        + bytes(2)
        + np.array([0, 3e38], np.float32).tobytes()
        + bytes(1),
        bytes([1, 2])
        + (2000).to_bytes(2, "little")
        + bytes(2)
        + np.array([0, 1], np.float32).tobytes()
        + bytes(2),
    ],
)
def test_lloydmax_decoder_validates_parameters(body: bytes) -> None:
    with pytest.raises(DecodeError):
        fedsqueeze.decode(_frame(64, 4, body))


def test_weibull_lloyd_decoder_pins_law_and_m() -> None:
    good = WeibullLloyd(2).encode(torch.randn(4))
    fedsqueeze.decode(good)
    body = bytearray(good[header_size(1) :])
    body[0] = 1  # gennorm
    with pytest.raises(DecodeError, match="dweibull"):
        fedsqueeze.decode(_frame(66, 4, bytes(body)))


def test_tinyscript_decoder_rejects_unordered_knobs() -> None:
    body = (
        bytes([3]) + np.array([1.0], np.float32).tobytes() + np.array([500, 400], "<u2").tobytes() + bytes(2)
    )
    with pytest.raises(DecodeError, match="strictly increasing"):
        fedsqueeze.decode(_frame(67, 5, body))


def test_constant_and_tiny_tensors_are_exact() -> None:
    for spec in ("lloydmax:2", "weibull_lloyd:2", "tinyscript:3"):
        c = fedsqueeze.parse_spec(spec)
        for x in (torch.full((6,), 0.25), torch.zeros(3), torch.tensor([1.5])):
            assert torch.equal(fedsqueeze.decode(c.encode(x, rng=tc.rng(0))), x), spec


def test_values_beyond_float32_are_refused_and_subnormals_kept() -> None:
    huge = torch.tensor([1e300, -1e300, 1.0], dtype=torch.float64)
    tiny = torch.tensor([1e-44, -1e-44, 0.0])
    for spec in ("lloydmax:2", "m22:50%", "weibull_lloyd:2", "tinyscript:3"):
        c = fedsqueeze.parse_spec(spec)
        with pytest.raises(EncodeError, match="float32"):
            c.encode(huge)
        y = fedsqueeze.decode(c.encode(tiny, rng=tc.rng(0)))
        assert y.shape == tiny.shape and bool(torch.isfinite(y).all())


def test_codec_config_errors() -> None:
    for bad in ("lloydmax:9", "lloydmax:2,law=cauchy", "lloydmax:2,m=-1", "lloydmax:2,law=gaussian,shape=1"):
        with pytest.raises(ConfigError):
            fedsqueeze.parse_spec(bad)
    with pytest.raises(ConfigError, match="quantizes its kept values itself"):
        fedsqueeze.parse_spec("m22:10% > uniform:4")
    with pytest.raises(ConfigError, match="exactly one"):
        fedsqueeze.parse_spec("m22:bits=2")
    with pytest.raises(ConfigError):
        fedsqueeze.parse_spec("tinyscript:1")
    with pytest.raises(ConfigError):
        M22(0.0)


def test_larger_m_reproduces_large_entries_better() -> None:
    x = torch.from_numpy(
        stats.gennorm.rvs(1.0, size=20000, random_state=np.random.RandomState(1)).astype(np.float32)
    )
    big = x.abs() > 2.5 * x.std()
    errs = []
    for M in (0, 2, 4):
        y = fedsqueeze.decode(LloydMax(2, M=M).encode(x))
        errs.append(float((x - y)[big].abs().mean()))
    assert errs[0] > errs[1] > errs[2]


# ---------------------------------------------------------------------------- m22 sizes, global Top-K
@pytest.mark.parametrize(
    ("d", "ratio", "bits"), [(100_000, 0.1, 2), (100_000, 0.01, 3), (5000, 0.3, 1), (2000, 0.6, 4)]
)
def test_m22_payload_size(d: int, ratio: float, bits: int) -> None:
    x = torch.randn(d, generator=tc.rng(3))
    payload = M22(ratio, bits=bits, M=2).encode(x)
    k = round(ratio * d)
    idx = torch.sort(torch.topk(x.abs(), k).indices).values.numpy().astype(np.int64)
    index_nbytes = len(encode_indices(idx, d))
    expect = header_size(1) + 4 + index_nbytes + 14 + math.ceil(k * bits / 8)
    assert len(payload) == expect
    # positions cost no more than Rice's ~log2(1/p) + 2 bits each, or the bitmap
    p = k / d
    assert 8 * index_nbytes <= min(k * (math.log2(1 / p) + 2.5), d) + 64
    y = fedsqueeze.decode(payload)
    assert int((y != 0).sum()) <= k and set(torch.nonzero(y).flatten().tolist()) <= set(idx.tolist())


def test_m22_keeps_signs_and_matches_topk_support() -> None:
    x = torch.randn(3000, generator=tc.rng(4))
    y = fedsqueeze.decode(fedsqueeze.parse_spec("m22:5%,bits=1,M=2").encode(x))
    kept = y != 0
    assert int(kept.sum()) == 150
    assert torch.equal(torch.sign(y[kept]), torch.sign(x[kept]))
    assert float(x[kept].abs().min()) >= float(x[~kept].abs().max())


def test_global_topk_counts_and_state_dict() -> None:
    g = tc.rng(5)
    state = {
        "a": torch.randn(400, generator=g) * 3,
        "b": torch.randn(20, 30, generator=g),
        "n": torch.tensor(7),
        "c": torch.randn(50, generator=g) * 0.01,
    }
    counts = global_topk_counts(state, 0.1)
    total = 400 + 600 + 50
    assert sum(counts.values()) == round(0.1 * total) and counts["n"] == 0
    allv = torch.cat([state[n].flatten().abs() for n in ("a", "b", "c")])
    thr = float(torch.topk(allv, round(0.1 * total)).values[-1])
    for name in ("a", "b", "c"):
        assert counts[name] == int((state[name].abs() >= thr).sum())
    out = decode_state_dict(encode_state_dict_m22(state, 0.1, bits=3, M=2))
    assert torch.equal(out["n"], state["n"])
    for name in ("a", "b", "c"):
        assert out[name].shape == state[name].shape and int((out[name] != 0).sum()) == counts[name]


# ---------------------------------------------------------------------------- CLI
runner = CliRunner()


def test_cli_design_quantizer_json_and_table() -> None:
    res = runner.invoke(app, ["design-quantizer", "--law", "gaussian", "--bits", "2", "--format", "json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert np.allclose(info["centers"], [-1.5104, -0.4528, 0.4528, 1.5104], atol=1e-4)
    assert info["distortion"] == pytest.approx(0.1175, abs=1e-4) and len(info["thresholds"]) == 3
    res = runner.invoke(
        app, ["design-quantizer", "--law", "gennorm", "--beta", "0.7", "--M", "2", "--bits", "3"]
    )
    assert res.exit_code == 0, res.output
    assert "E[|X|^M (X-Q)^2]" in res.output
    res = runner.invoke(
        app, ["design-quantizer", "--law", "dweibull", "--shape", "0.8", "--bits", "1", "-f", "json"]
    )
    assert res.exit_code == 0 and json.loads(res.output)["law"] == "dweibull"


@pytest.mark.parametrize(
    "argv",
    [
        ["--law", "gennorm", "--bits", "2"],
        ["--law", "gennorm", "--beta", "0", "--bits", "2"],
        ["--law", "gaussian", "--M", "-1"],
        ["--law", "gaussian", "--bits", "9"],
        ["--law", "dweibull", "--beta", "1.0"],
    ],
)
def test_cli_design_quantizer_errors(argv: list[str]) -> None:
    res = runner.invoke(app, ["design-quantizer", *argv])
    assert res.exit_code == 2 and "error:" in res.output
