"""``codebook=send`` for the Lloyd–Max codecs (``lloydmax``, ``m22``, ``weibull_lloyd``).

The receiver of a default payload rebuilds the codebook with its own scipy; with ``codebook=send``
the float32 table travels in the payload and the decoder uses it (no design, no scipy), so decoding
is bit-exact across machines. The default wire format is unchanged (golden bytes in
``tests/golden/codecs.json``).
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

import fedsqueeze
from fedsqueeze.codecs.rd import codecs as rdc
from fedsqueeze.codecs.rd import encode_state_dict_m22
from fedsqueeze.codecs.spec import parse_spec
from fedsqueeze.errors import ConfigError, DecodeError
from fedsqueeze.wire.frame import build_frame, parse_frame


def gennorm_sample(n: int, beta: float, seed: int) -> torch.Tensor:
    g = np.random.default_rng(seed)
    mag = g.gamma(1.0 / beta, 1.0, n) ** (1.0 / beta)
    return torch.from_numpy((mag * g.choice([-1.0, 1.0], n)).astype(np.float32))


def _reframe(payload: bytes, body: bytes | bytearray) -> bytes:
    h, _ = parse_frame(payload)
    return build_frame(h.codec_id, h.dtype, h.shape, bytes(body))


# (spec, bits): each is encoded as given and with ",codebook=send"
SENT = [
    ("lloydmax:1,law=gaussian", 1),
    ("lloydmax:3,M=2", 3),
    ("lloydmax:8,law=dweibull,M=1", 8),
    ("weibull_lloyd:3", 3),
    ("m22:10%,bits=2", 2),
    ("m22:k=7,bits=5,M=0,law=laplace", 5),
]


@pytest.mark.parametrize(("spec", "bits"), SENT)
@pytest.mark.parametrize(
    "x",
    [
        gennorm_sample(3000, 0.7, 0),
        torch.randn(5, 40, generator=torch.Generator().manual_seed(1)) * 1e3 + 7,
        torch.full((50,), -2.5),
        torch.zeros(0),
    ],
    ids=["gennorm", "offset", "constant", "empty"],
)
def test_sent_codebook_decodes_like_the_rebuilt_one(spec: str, bits: int, x: torch.Tensor) -> None:
    rebuild = parse_spec(spec)
    send = parse_spec(f"{spec},codebook=send")
    p_rebuild, p_send = rebuild.encode(x), send.encode(x)
    assert len(p_send) == len(p_rebuild) + 4 * 2**bits  # exactly the table, counted in the bytes
    y = fedsqueeze.decode(p_send)
    assert y.shape == x.shape
    assert torch.equal(y, fedsqueeze.decode(p_rebuild))  # same machine: identical values


def test_the_decoder_uses_the_sent_codebook_and_runs_no_design(monkeypatch: pytest.MonkeyPatch) -> None:
    x = gennorm_sample(2000, 0.9, 2)
    p_send = parse_spec("lloydmax:3,codebook=send").encode(x)
    p_rebuild = parse_spec("lloydmax:3").encode(x)
    expected = fedsqueeze.decode(p_rebuild)

    def no_design(*_: object) -> None:
        raise AssertionError("the receiver designed a codebook")

    monkeypatch.setattr(rdc.rd, "design", no_design)  # a receiver whose scipy cannot design at all
    assert torch.equal(fedsqueeze.decode(p_send), expected)
    with pytest.raises(AssertionError, match="designed a codebook"):
        fedsqueeze.decode(p_rebuild)


def test_a_different_sent_table_changes_the_decode() -> None:
    """Stands in for a sender whose scipy rounded a level differently: the receiver follows the
    table in the payload, not its own design."""
    x = gennorm_sample(2000, 0.9, 3)
    payload = parse_spec("lloydmax:2,codebook=send").encode(x)
    body = bytearray(parse_frame(payload)[1])
    table = np.frombuffer(bytes(body[14 : 14 + 16]), "<f4").copy()
    table[3] = np.nextafter(table[3], np.float32(np.inf))  # one ulp up on the top level
    body[14 : 14 + 16] = table.astype("<f4").tobytes()
    y = fedsqueeze.decode(_reframe(payload, body))
    y0 = fedsqueeze.decode(payload)
    top = y0 == y0.max()
    assert bool(top.any())
    assert torch.equal(y[top], torch.full_like(y[top], float(table[3])))
    assert torch.equal(y[~top], y0[~top])


def test_default_wire_format_is_unchanged() -> None:
    x = gennorm_sample(500, 1.2, 4)
    body = parse_frame(parse_spec("lloydmax:3").encode(x))[1]
    assert body[0] == rdc.LAW_IDS["gennorm"]  # no flag
    assert len(body) == 14 + (500 * 3 + 7) // 8
    sent = parse_frame(parse_spec("lloydmax:3,codebook=send").encode(x))[1]
    assert sent[0] == rdc.LAW_IDS["gennorm"] | rdc.CODEBOOK_FLAG
    assert sent[1:14] == body[1:14] and sent[14 + 32 :] == body[14:]  # the table is inserted, nothing else


def test_hostile_codebooks() -> None:
    payload = parse_spec("lloydmax:3,codebook=send").encode(gennorm_sample(400, 0.7, 5))
    body = bytearray(parse_frame(payload)[1])
    bad: dict[str, bytearray] = {}
    for what, level, value in [("nan", 2, float("nan")), ("inf", 7, float("inf")), ("decreasing", 0, 1e9)]:
        b = body.copy()
        b[14 + 4 * level : 18 + 4 * level] = struct.pack("<f", value)
        bad[what] = b
    bad["cut table"] = body[: 14 + 20]
    b = body.copy()
    b[0] &= 0x7F  # flag cleared: the table is read as codes, the length no longer matches
    bad["flag cleared"] = b
    for what, b in bad.items():
        with pytest.raises(DecodeError):
            fedsqueeze.decode(_reframe(payload, b))
            pytest.fail(what)


def test_specs() -> None:
    assert parse_spec("lloydmax:3,codebook=send").spec == "lloydmax:3,law=gennorm,M=0,codebook=send"
    assert parse_spec("lloydmax:3,codebook=rebuild").spec == "lloydmax:3,law=gennorm,M=0"
    assert parse_spec("weibull_lloyd:2,codebook=send").spec == "weibull_lloyd:2,codebook=send"
    s = "m22:10%,bits=2,M=2,law=gennorm,codebook=send"
    assert parse_spec(s).spec == s
    with pytest.raises(ConfigError, match="codebook"):
        parse_spec("lloydmax:3,codebook=yes")
    with pytest.raises(ConfigError, match="codebook"):
        rdc.M22(0.1, codebook="always")
    with pytest.raises(ConfigError, match="codebook"):
        parse_spec("tinyscript:3,codebook=send")  # its knobs always travel


def test_global_m22_with_sent_codebooks() -> None:
    g = torch.Generator().manual_seed(6)
    state = {"w": torch.randn(40, 30, generator=g), "b": torch.randn(30, generator=g), "n": torch.tensor(3)}
    sent = encode_state_dict_m22(state, 0.1, bits=3, codebook="send")
    plain = encode_state_dict_m22(state, 0.1, bits=3)
    ys, yp = fedsqueeze.decode_state_dict(sent), fedsqueeze.decode_state_dict(plain)
    assert all(torch.equal(ys[k], yp[k]) for k in state)
    assert len(sent) == len(plain) + 2 * 4 * 2**3  # one table per float tensor
