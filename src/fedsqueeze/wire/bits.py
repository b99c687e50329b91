"""Vectorised bit-level coding used by codec bodies.

* :func:`pack_uint` / :func:`unpack_uint`: fixed width, exactly ``bits`` bits per entry, little-endian
  bit order (entry 0 sits in the lowest bits of byte 0; 4-bit = two entries per byte, 3-bit entries
  straddle bytes). Output length is ``ceil(n * bits / 8)`` bytes.
* :func:`encode_unary` / :func:`decode_unary`: ``q`` one-bits then a zero, MSB-first.
* :func:`write_fields` / :func:`read_fields`: variable-width fields (<= 57 bits each), MSB-first.
* :class:`Reader`: a bounds-checked cursor over a body; every overrun is a ``DecodeError``.

Everything is NumPy array code, no per-element Python loops.
"""

from __future__ import annotations

import struct

import numpy as np
import numpy.typing as npt

from fedsqueeze.errors import DecodeError

U64 = np.uint64


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes that ``count`` entries of ``bits`` bits occupy: ``ceil(count * bits / 8)``."""
    return (count * bits + 7) // 8


def pack_uint(values: npt.NDArray[np.integer], bits: int) -> bytes:
    """Pack non-negative integers ``< 2**bits`` (1 <= bits <= 16) at exactly ``bits`` bits each."""
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be in 1..16, got {bits}")
    n = int(values.size)
    out_len = packed_nbytes(n, bits)
    if n == 0:
        return b""
    if bits == 8:
        return values.astype(np.uint8, copy=False).tobytes()
    if bits == 16:
        return values.astype("<u2", copy=False).tobytes()
    if bits == 1:
        return np.packbits(values.astype(np.uint8, copy=False), bitorder="little").tobytes()
    if bits == 4:
        v = values.astype(np.uint8, copy=False)
        if n % 2:
            v = np.concatenate([v, np.zeros(1, np.uint8)])
        return (v[0::2] | (v[1::2] << 4)).tobytes()[:out_len]
    pad = (-n) % 8
    v = values.astype(U64, copy=False)
    if pad:
        v = np.concatenate([v, np.zeros(pad, U64)])
    v = v.reshape(-1, 8)
    if bits < 8:
        word = v[:, 0].copy()
        for j in range(1, 8):
            word |= v[:, j] << U64(bits * j)
        raw = word.astype("<u8").view(np.uint8).reshape(-1, 8)[:, :bits]
    else:  # 9..15: eight entries = 8*bits <= 120 bits, held in two 64-bit words
        w0 = v[:, 0].copy()
        w1 = v[:, 4].copy()
        for j in range(1, 4):
            w0 |= v[:, j] << U64(bits * j)
            w1 |= v[:, 4 + j] << U64(bits * j)
        half = 4 * bits
        lo = w0 | (w1 << U64(half))
        hi = w1 >> U64(64 - half)
        both = np.stack([lo.astype("<u8"), hi.astype("<u8")], axis=1)
        raw = both.view(np.uint8).reshape(-1, 16)[:, :bits]
    return raw.tobytes()[:out_len]


def unpack_uint(buf: bytes | memoryview, bits: int, count: int) -> npt.NDArray[np.int64]:
    """Inverse of :func:`pack_uint`; ``buf`` must hold exactly ``ceil(count * bits / 8)`` bytes."""
    if not 1 <= bits <= 16:
        raise DecodeError(f"bit width must be in 1..16, got {bits}")
    need = packed_nbytes(count, bits)
    if len(buf) != need:
        raise DecodeError(
            f"packed section of {count} x {bits}-bit entries needs {need} bytes, got {len(buf)}"
        )
    if count == 0:
        return np.zeros(0, np.int64)
    b = np.frombuffer(buf, dtype=np.uint8)
    if bits == 8:
        return b.astype(np.int64)
    if bits == 16:
        return np.frombuffer(buf, dtype="<u2").astype(np.int64)
    if bits == 1:
        return np.unpackbits(b, bitorder="little", count=count).astype(np.int64)
    if bits == 4:
        out = np.empty(2 * b.size, np.int64)
        out[0::2] = b & 0x0F
        out[1::2] = b >> 4
        return out[:count]
    groups = (count + 7) // 8
    padded = np.zeros(groups * bits, np.uint8)
    padded[: b.size] = b
    g = padded.reshape(groups, bits)
    mask = U64((1 << bits) - 1)
    out = np.empty((groups, 8), U64)
    if bits < 8:
        words = np.zeros((groups, 8), np.uint8)
        words[:, :bits] = g
        word = words.view("<u8").reshape(groups)
        for j in range(8):
            out[:, j] = (word >> U64(bits * j)) & mask
    else:
        words = np.zeros((groups, 16), np.uint8)
        words[:, :bits] = g
        two = words.view("<u8").reshape(groups, 2)
        lo, hi = two[:, 0], two[:, 1]
        for j in range(8):
            s = bits * j
            if s == 0:
                out[:, j] = lo & mask
            elif s < 64:
                out[:, j] = ((lo >> U64(s)) | (hi << U64(64 - s))) & mask
            else:
                out[:, j] = (hi >> U64(s - 64)) & mask
    return out.reshape(-1)[:count].astype(np.int64)


def encode_unary(q: npt.NDArray[np.integer]) -> bytes:
    """Each ``q_j >= 0`` as ``q_j`` one-bits followed by a zero-bit, MSB-first, zero-padded."""
    if q.size == 0:
        return b""
    qq = q.astype(np.int64, copy=False)
    total = int(qq.sum()) + qq.size
    bits = np.ones(total, np.uint8)
    bits[np.cumsum(qq + 1) - 1] = 0
    return np.packbits(bits).tobytes()


def decode_unary(buf: bytes | memoryview, count: int) -> tuple[npt.NDArray[np.int64], int]:
    """Read ``count`` unary codes; return them and the number of bytes they used."""
    if count == 0:
        return np.zeros(0, np.int64), 0
    bits = np.unpackbits(np.frombuffer(buf, dtype=np.uint8))
    zeros = np.flatnonzero(bits == 0)
    if zeros.size < count:
        raise DecodeError(f"unary section holds {zeros.size} codes, expected {count}")
    ends = zeros[:count]
    q = np.diff(ends, prepend=-1) - 1
    used = (int(ends[-1]) + 1 + 7) // 8
    return q.astype(np.int64), used


def write_fields(values: npt.NDArray[np.integer], widths: npt.NDArray[np.integer]) -> bytes:
    """Concatenate ``values[j]`` written in ``widths[j]`` bits (0..57), MSB-first, zero-padded."""
    if values.size == 0:
        return b""
    w = widths.astype(np.int64, copy=False)
    if int(w.max(initial=0)) > 57:
        raise ValueError("fields wider than 57 bits are not supported")
    total = int(w.sum())
    if total == 0:
        return b""
    starts = np.cumsum(w) - w
    rep_v = np.repeat(values.astype(np.int64, copy=False), w)
    pos = np.arange(total, dtype=np.int64) - np.repeat(starts, w)
    shift = np.repeat(w, w) - 1 - pos
    bits = ((rep_v >> shift) & 1).astype(np.uint8)
    return np.packbits(bits).tobytes()


def read_fields(buf: bytes | memoryview, widths: npt.NDArray[np.integer]) -> npt.NDArray[np.int64]:
    """Inverse of :func:`write_fields`; ``buf`` must be exactly the padded section."""
    w = widths.astype(np.int64, copy=False)
    total = int(w.sum())
    if len(buf) != (total + 7) // 8:
        raise DecodeError(f"variable-width section needs {(total + 7) // 8} bytes, got {len(buf)}")
    if w.size == 0:
        return np.zeros(0, np.int64)
    if int(w.min()) < 0 or int(w.max()) > 57:
        raise DecodeError("field width outside 0..57")
    starts = np.cumsum(w) - w
    padded = np.zeros(len(buf) + 8, np.uint8)
    padded[: len(buf)] = np.frombuffer(buf, dtype=np.uint8)
    byte0 = starts >> 3
    window = np.zeros(w.size, U64)
    for k in range(8):
        window = (window << U64(8)) | padded[byte0 + k].astype(U64)
    window = window << (starts & 7).astype(U64)
    nz = w > 0
    out = np.zeros(w.size, np.int64)
    out[nz] = (window[nz] >> (U64(64) - w[nz].astype(U64))).astype(np.int64)
    return out


class Reader:
    """Bounds-checked cursor over a body. ``what`` names the section in error messages."""

    def __init__(self, buf: memoryview | bytes, context: str = "body") -> None:
        self.buf = memoryview(buf).cast("B") if not isinstance(buf, memoryview) else buf
        self.pos = 0
        self.context = context

    @property
    def remaining(self) -> int:
        return len(self.buf) - self.pos

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or n > self.remaining:
            raise DecodeError(
                f"{self.context}: {what} needs {n} bytes at offset {self.pos}, only {self.remaining} remain"
            )
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str) -> tuple[int | float, ...]:
        s = struct.Struct("<" + fmt)
        return s.unpack(self.take(s.size, what))

    def u8(self, what: str) -> int:
        return int(self.unpack("B", what)[0])

    def u32(self, what: str) -> int:
        return int(self.unpack("I", what)[0])

    def u64(self, what: str) -> int:
        return int(self.unpack("Q", what)[0])

    def f32(self, what: str) -> float:
        return float(self.unpack("f", what)[0])

    def rest(self) -> memoryview:
        return self.take(self.remaining, "rest")

    def expect_end(self) -> None:
        if self.remaining:
            raise DecodeError(f"{self.context}: {self.remaining} unexpected trailing bytes")
