"""Property-based mutation tests: decoding never trusts the bytes.

For every codec case, hypothesis mutates valid payloads (truncate, flip bits, overwrite, insert,
delete, splice) and either keeps the frame CRC broken or *re-seals* it (recomputes the CRC over the
mutated header/body) so the codec's body parser itself is attacked. The only acceptable outcomes
are a ``DecodeError`` or a tensor whose shape and dtype match the (mutated) header.
"""

from __future__ import annotations

import struct
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fedsqueeze
from codec_cases import CASES
from fedsqueeze.errors import DecodeError
from fedsqueeze.wire import decode_container
from fedsqueeze.wire.frame import inspect

EXAMPLES_PER_CODEC = 150

_PAYLOADS: dict[str, list[bytes]] = {}


def payloads(spec: str) -> list[bytes]:
    if spec not in _PAYLOADS:
        c = fedsqueeze.parse_spec(spec)
        g = torch.Generator().manual_seed(0)
        xs = [
            torch.randn(97, generator=g),
            torch.randn(4, 8, generator=g) * 5,
            torch.zeros(3),
            torch.randn(2000, generator=g),
        ]
        _PAYLOADS[spec] = [c.encode(x, rng=g) for x in xs]
    return _PAYLOADS[spec]


def reseal(buf: bytearray, fix_length: bool = False) -> bytes:
    """Recompute a frame's CRC after mutation (and, with ``fix_length``, its body length field)
    if the header is still readable, so the mutated body reaches the codec's parser."""
    if len(buf) < 10 or bytes(buf[:4]) != b"FSQZ":
        return bytes(buf)
    ndim = buf[9]
    hs = 10 + 4 * ndim + 8
    if ndim > 8 or len(buf) < hs:
        return bytes(buf)
    if fix_length:
        buf[hs - 8 : hs - 4] = struct.pack("<I", len(buf) - hs)
    crc = zlib.crc32(bytes(buf[hs:]), zlib.crc32(bytes(buf[: hs - 4])))
    buf[hs - 4 : hs] = struct.pack("<I", crc)
    return bytes(buf)


mutation = st.one_of(
    st.tuples(st.just("flip"), st.lists(st.integers(0, 10**6), min_size=1, max_size=8)),
    st.tuples(st.just("set"), st.integers(0, 10**6), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), st.integers(0, 10**6), st.integers(1, 64)),
    st.tuples(st.just("body_len"), st.integers(0, 2**32 - 1)),
)


def mutate(payload: bytes, m: tuple) -> bytearray:  # type: ignore[type-arg]
    buf = bytearray(payload)
    n = len(buf)
    kind = m[0]
    if kind == "flip":
        for p in m[1]:
            bit = p % (8 * n)
            buf[bit // 8] ^= 1 << (bit % 8)
    elif kind == "set":
        pos = m[1] % n
        buf[pos : pos + len(m[2])] = m[2]
    elif kind == "truncate":
        del buf[m[1] % n :]
    elif kind == "insert":
        pos = m[1] % (n + 1)
        buf[pos:pos] = m[2]
    elif kind == "delete":
        pos = m[1] % n
        del buf[pos : pos + m[2]]
    elif kind == "body_len":
        ndim = buf[9]
        off = 10 + 4 * ndim
        buf[off : off + 4] = struct.pack("<I", m[1])
    return buf


def check_decode(data: bytes) -> None:
    try:
        y = fedsqueeze.decode(data)
    except DecodeError:
        return
    h = inspect(data)
    assert tuple(y.shape) == h.shape and y.dtype == h.dtype


@pytest.mark.parametrize("spec", CASES)
@settings(max_examples=EXAMPLES_PER_CODEC)
@given(which=st.integers(0, 3), m=mutation, seal=st.sampled_from(["none", "crc", "full"]))
def test_mutated_payloads_never_crash(spec: str, which: int, m: tuple, seal: str) -> None:  # type: ignore[type-arg]
    buf = mutate(payloads(spec)[which], m)
    data = bytes(buf) if seal == "none" else reseal(buf, fix_length=seal == "full")
    check_decode(data)


@settings(max_examples=300)
@given(m=mutation, do_reseal=st.booleans())
def test_mutated_containers_never_crash(m: tuple, do_reseal: bool) -> None:  # type: ignore[type-arg]
    sd = {"w": torch.randn(4, 4), "b": torch.randn(4), "n": torch.tensor(3)}
    payload = fedsqueeze.encode_state_dict(sd, fedsqueeze.parse_spec("uniform:4"))
    buf = mutate(payload, m) if m[0] != "body_len" else bytearray(payload)
    if do_reseal and len(buf) >= 4:
        buf[-4:] = struct.pack("<I", zlib.crc32(bytes(buf[:-4])))
    try:
        frames = decode_container(bytes(buf))
    except DecodeError:
        return
    for frame in frames.values():
        check_decode(bytes(frame))


@settings(max_examples=200)
@given(data=st.binary(max_size=200))
def test_random_bytes_never_crash(data: bytes) -> None:
    check_decode(data)
    check_decode(reseal(bytearray(b"FSQZ\x01" + data)))
