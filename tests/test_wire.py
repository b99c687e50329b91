"""Frame header, container, and bit-packing primitives."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fedsqueeze
from fedsqueeze.errors import DecodeError
from fedsqueeze.wire import decode_container, encode_container, inspect, inspect_container
from fedsqueeze.wire.bits import (
    decode_unary,
    encode_unary,
    pack_uint,
    packed_nbytes,
    read_fields,
    unpack_uint,
    write_fields,
)
from fedsqueeze.wire.frame import build_frame, header_size, parse_frame


def test_header_layout_is_as_documented() -> None:
    payload = build_frame(16, torch.float16, (3, 5), b"abc")
    assert payload[:4] == b"FSQZ" and payload[4] == 1
    assert int.from_bytes(payload[5:7], "little") == 16
    assert payload[7] == 2 and payload[8] == 0 and payload[9] == 2
    assert int.from_bytes(payload[10:14], "little") == 3
    assert int.from_bytes(payload[18:22], "little") == 3  # body length
    assert header_size(2) == 26 and len(payload) == 26 + 3
    h = inspect(payload)
    assert (h.codec_id, h.dtype, h.shape, h.body_nbytes) == (16, torch.float16, (3, 5), 3)
    d = h.to_dict()
    assert d["codec"] == "uniform" and d["nbytes"] == len(payload) and d["dtype"] == "float16"


def test_crc_covers_header_fields() -> None:
    payload = bytearray(build_frame(1, torch.float32, (2,), b"\x00" * 8))
    payload[10] = 3  # shape (2,) -> (3,), CRC not updated
    with pytest.raises(DecodeError, match="CRC32"):
        parse_frame(bytes(payload))


def test_bad_magic_message_says_expected_and_got() -> None:
    with pytest.raises(DecodeError, match=r"expected magic b'FSQZ', got b'PK\\x03\\x04'"):
        parse_frame(b"PK\x03\x04" + b"\x00" * 30)


def test_container_round_trips_a_state_dict() -> None:
    sd = {
        "conv.weight": torch.randn(4, 3, 3, 3),
        "conv.bias": torch.randn(4).to(torch.float16),
        "bn.num_batches_tracked": torch.tensor(7),
        "mask": torch.tensor([True, False, True]),
        "ünïcode.name": torch.randn(2, dtype=torch.float64),
    }
    payload = fedsqueeze.encode_state_dict(sd, fedsqueeze.parse_spec("fp32"))
    out = fedsqueeze.decode_state_dict(payload)
    assert list(out) == list(sd)
    for k in sd:
        assert out[k].dtype == sd[k].dtype and out[k].shape == sd[k].shape
        # fp32 is lossless for float32 and float16 input; float64 is rounded to float32
        expected = sd[k].float().to(sd[k].dtype) if sd[k].dtype == torch.float64 else sd[k]
        assert torch.equal(out[k], expected)
    heads = inspect_container(payload)
    assert heads["bn.num_batches_tracked"].dtype == torch.int64
    assert heads["conv.weight"].shape == (4, 3, 3, 3)


def test_container_lossy_codec_keeps_integer_buffers_exact() -> None:
    sd = {"w": torch.randn(100), "steps": torch.tensor([1, 2, 3])}
    out = fedsqueeze.decode_state_dict(fedsqueeze.encode_state_dict(sd, fedsqueeze.parse_spec("uniform:2")))
    assert torch.equal(out["steps"], sd["steps"]) and not torch.equal(out["w"], sd["w"])


def test_container_errors() -> None:
    good = encode_container({"a": b"x", "b": b"yy"})
    assert set(decode_container(good)) == {"a", "b"}
    with pytest.raises(DecodeError, match="CRC32"):
        decode_container(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(DecodeError, match="too short"):
        decode_container(b"FSQC")
    with pytest.raises(DecodeError, match="magic"):
        decode_container(b"FSQZ" + b"\x00" * 20)


@settings(max_examples=200)
@given(bits=st.integers(1, 16), data=st.data())
def test_pack_unpack_any_width(bits: int, data: st.DataObject) -> None:
    vals = np.array(data.draw(st.lists(st.integers(0, (1 << bits) - 1), max_size=70)), dtype=np.int64)
    packed = pack_uint(vals, bits)
    assert len(packed) == packed_nbytes(vals.size, bits)
    assert np.array_equal(unpack_uint(packed, bits, vals.size), vals)


def test_three_bit_entries_straddle_bytes_lsb_first() -> None:
    vals = np.array([1, 2, 3, 4, 5, 6, 7, 0])
    expected = sum(int(v) << (3 * j) for j, v in enumerate(vals)).to_bytes(3, "little")
    assert pack_uint(vals, 3) == expected
    assert pack_uint(np.array([0xA, 0x5]), 4) == bytes([0x5A])


def test_unpack_rejects_wrong_length() -> None:
    with pytest.raises(DecodeError):
        unpack_uint(b"\x00", 3, 8)


@settings(max_examples=100)
@given(st.lists(st.integers(0, 40), max_size=50))
def test_unary_round_trip(q: list[int]) -> None:
    arr = np.array(q, dtype=np.int64)
    enc = encode_unary(arr)
    dec, used = decode_unary(enc, arr.size)
    assert np.array_equal(dec, arr) and used == len(enc)


@settings(max_examples=100)
@given(st.lists(st.tuples(st.integers(0, 57), st.integers(0, 2**57 - 1)), max_size=40))
def test_variable_fields_round_trip(fields: list[tuple[int, int]]) -> None:
    widths = np.array([w for w, _ in fields], dtype=np.int64)
    vals = np.array([v & ((1 << w) - 1) for w, v in fields], dtype=np.int64)
    assert np.array_equal(read_fields(write_fields(vals, widths), widths), vals)
