"""Frame header: build, parse and inspect single-tensor payloads (layout in ``fedsqueeze.wire``)."""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedsqueeze.errors import DecodeError, UnsupportedVersion

MAGIC = b"FSQZ"
FORMAT_VERSION = 1
MAX_NDIM = 8
_PREFIX = struct.Struct("<4sBHBBB")  # magic, version, codec id, dtype, flags, ndim
_TAIL = struct.Struct("<II")  # body length, crc32

#: Stable dtype numbers written on the wire. Never renumber; only append.
DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 1,
    torch.float16: 2,
    torch.bfloat16: 3,
    torch.float64: 4,
    torch.uint8: 5,
    torch.int8: 6,
    torch.int16: 7,
    torch.int32: 8,
    torch.int64: 9,
    torch.bool: 10,
}
_CODE_TO_DTYPE = {v: k for k, v in DTYPE_CODES.items()}


def max_numel() -> int:
    """Largest tensor (in entries) a decoder will materialise: 2**28 unless ``FEDSQUEEZE_MAX_NUMEL``.

    A header is untrusted input; without this bound a 40-byte payload could ask for a 16 GB tensor.
    """
    raw = os.environ.get("FEDSQUEEZE_MAX_NUMEL")
    if raw is None:
        return 1 << 28
    try:
        return int(raw)
    except ValueError:
        return 1 << 28


def header_size(ndim: int) -> int:
    """Size in bytes of a frame header for a tensor with ``ndim`` dimensions."""
    return _PREFIX.size + 4 * ndim + _TAIL.size


@dataclass(frozen=True)
class FrameHeader:
    """Parsed frame header; ``header_nbytes + body_nbytes`` is the whole frame's size."""

    version: int
    codec_id: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    body_nbytes: int
    crc32: int
    header_nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        """Total frame size in bytes (header + body)."""
        return self.header_nbytes + self.body_nbytes

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly view (dtype as its name, codec id as number and registered name)."""
        from fedsqueeze.codecs.registry import codec_name_for_id

        return {
            "format_version": self.version,
            "codec_id": self.codec_id,
            "codec": codec_name_for_id(self.codec_id),
            "dtype": str(self.dtype).removeprefix("torch."),
            "shape": list(self.shape),
            "numel": self.numel,
            "header_nbytes": self.header_nbytes,
            "body_nbytes": self.body_nbytes,
            "nbytes": self.nbytes,
            "crc32": f"{self.crc32:08x}",
        }


def build_frame(
    codec_id: int, dtype: torch.dtype, shape: tuple[int, ...], body: bytes | Sequence[bytes | memoryview]
) -> bytes:
    """Wrap a codec body (bytes, or a list of parts joined once) in a header.

    The CRC covers the header fields and the body.
    """
    if dtype not in DTYPE_CODES:
        raise ValueError(f"dtype {dtype} has no wire code; supported: {list(DTYPE_CODES)}")
    if len(shape) > MAX_NDIM:
        raise ValueError(f"at most {MAX_NDIM} dimensions are supported, got {len(shape)}")
    parts = [body] if isinstance(body, (bytes, bytearray, memoryview)) else list(body)
    body_len = sum(len(p) for p in parts)
    head = _PREFIX.pack(MAGIC, FORMAT_VERSION, codec_id, DTYPE_CODES[dtype], 0, len(shape))
    head += struct.pack(f"<{len(shape)}I", *shape)
    head += struct.pack("<I", body_len)
    crc = zlib.crc32(head)
    for p in parts:
        crc = zlib.crc32(p, crc)
    return b"".join((head, struct.pack("<I", crc), *parts))


def _read_header(buf: memoryview) -> FrameHeader:
    if len(buf) < _PREFIX.size:
        raise DecodeError(
            f"payload too short: a frame header needs at least {header_size(0)} bytes, got {len(buf)}"
        )
    magic, version, codec_id, dtype_code, flags, ndim = _PREFIX.unpack_from(buf, 0)
    if magic != MAGIC:
        raise DecodeError(f"not a fedsqueeze frame: expected magic {MAGIC!r}, got {bytes(magic)!r}")
    if version != FORMAT_VERSION:
        raise UnsupportedVersion(
            f"frame format version {version} is not supported (this build reads version "
            f"{FORMAT_VERSION}); upgrade fedsqueeze or re-encode with this version"
        )
    if dtype_code not in _CODE_TO_DTYPE:
        raise DecodeError(f"unknown dtype code {dtype_code}; expected one of {sorted(_CODE_TO_DTYPE)}")
    if flags != 0:
        raise DecodeError(f"reserved header flags must be 0, got {flags}")
    if ndim > MAX_NDIM:
        raise DecodeError(f"header claims {ndim} dimensions; at most {MAX_NDIM} are allowed")
    hsize = header_size(ndim)
    if len(buf) < hsize:
        raise DecodeError(f"truncated header: expected {hsize} bytes, got {len(buf)}")
    shape = struct.unpack_from(f"<{ndim}I", buf, _PREFIX.size)
    body_len, crc = _TAIL.unpack_from(buf, _PREFIX.size + 4 * ndim)
    numel = 1
    for s in shape:
        numel *= s
    limit = max_numel()
    if numel > limit:
        raise DecodeError(
            f"header claims shape {tuple(shape)} ({numel} entries), above the decode limit of "
            f"{limit}; set FEDSQUEEZE_MAX_NUMEL if this size is intended"
        )
    return FrameHeader(
        version=version,
        codec_id=codec_id,
        dtype=_CODE_TO_DTYPE[dtype_code],
        shape=tuple(int(s) for s in shape),
        body_nbytes=body_len,
        crc32=crc,
        header_nbytes=hsize,
    )


def parse_frame(payload: bytes | bytearray | memoryview) -> tuple[FrameHeader, memoryview]:
    """Validate a whole frame (sizes, CRC) and return its header and body.

    Raises :class:`~fedsqueeze.errors.DecodeError` on anything malformed, including trailing bytes.
    """
    buf = memoryview(payload).cast("B")
    header = _read_header(buf)
    end = header.header_nbytes + header.body_nbytes
    if len(buf) < end:
        raise DecodeError(
            f"truncated payload: header announces a {header.body_nbytes}-byte body "
            f"({end} bytes in all), got {len(buf)} bytes"
        )
    if len(buf) > end:
        raise DecodeError(f"{len(buf) - end} unexpected trailing bytes after a {end}-byte frame")
    body = buf[header.header_nbytes : end]
    crc = zlib.crc32(body, zlib.crc32(buf[: header.header_nbytes - 4]))
    if crc != header.crc32:
        raise DecodeError(
            f"CRC32 mismatch: header says {header.crc32:08x}, content gives {crc:08x}; "
            "the payload was corrupted in transit or storage"
        )
    return header, body


def inspect(payload: bytes | bytearray | memoryview) -> FrameHeader:
    """Read a frame's header without decoding (and without checking the body's CRC)."""
    return _read_header(memoryview(payload).cast("B"))
