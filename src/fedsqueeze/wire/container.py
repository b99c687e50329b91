"""Multi-tensor container: one payload for a whole model update (named frames, order preserved).

Layout (little-endian)::

    b"FSQC" | version u8 | count u32 | count x (name_len u16 | name utf-8 | frame_len u32 | frame)
    | CRC32 u32 of everything before it

Each entry is a complete frame (its own header and CRC), so entries can be inspected one by one.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping

from fedsqueeze.errors import DecodeError, UnsupportedVersion
from fedsqueeze.wire.frame import FrameHeader, inspect

CONTAINER_MAGIC = b"FSQC"
CONTAINER_VERSION = 1
_HEAD = struct.Struct("<4sBI")
_MIN_ENTRY = 2 + 4  # empty name, empty frame length field


def encode_container(frames: Mapping[str, bytes]) -> bytes:
    """Pack named frames into one container payload (names must be unique UTF-8, < 64 KiB)."""
    parts = [_HEAD.pack(CONTAINER_MAGIC, CONTAINER_VERSION, len(frames))]
    for name, frame in frames.items():
        raw = name.encode("utf-8")
        if len(raw) > 0xFFFF:
            raise ValueError(f"tensor name too long ({len(raw)} bytes, max 65535): {name[:40]}...")
        parts.append(struct.pack("<H", len(raw)))
        parts.append(raw)
        parts.append(struct.pack("<I", len(frame)))
        parts.append(bytes(frame))
    body = b"".join(parts)
    return body + struct.pack("<I", zlib.crc32(body))


def decode_container(payload: bytes | bytearray | memoryview) -> dict[str, memoryview]:
    """Split a container into ``{name: frame bytes}`` after checking sizes and the CRC."""
    buf = memoryview(payload).cast("B")
    if len(buf) < _HEAD.size + 4:
        raise DecodeError(f"container too short: need at least {_HEAD.size + 4} bytes, got {len(buf)}")
    magic, version, count = _HEAD.unpack_from(buf, 0)
    if magic != CONTAINER_MAGIC:
        raise DecodeError(
            f"not a fedsqueeze container: expected magic {CONTAINER_MAGIC!r}, got {bytes(magic)!r}"
        )
    if version != CONTAINER_VERSION:
        raise UnsupportedVersion(
            f"container version {version} is not supported (this build reads {CONTAINER_VERSION})"
        )
    (crc,) = struct.unpack_from("<I", buf, len(buf) - 4)
    if zlib.crc32(buf[:-4]) != crc:
        raise DecodeError("container CRC32 mismatch: the payload was corrupted")
    end = len(buf) - 4
    if count * _MIN_ENTRY > end - _HEAD.size:
        raise DecodeError(f"container claims {count} entries but holds only {end} bytes")
    pos = _HEAD.size
    out: dict[str, memoryview] = {}
    for i in range(count):
        if pos + 2 > end:
            raise DecodeError(f"container truncated in the name length of entry {i}")
        (nlen,) = struct.unpack_from("<H", buf, pos)
        pos += 2
        if pos + nlen + 4 > end:
            raise DecodeError(f"container truncated in the name of entry {i}")
        try:
            name = bytes(buf[pos : pos + nlen]).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DecodeError(f"entry {i} name is not valid UTF-8") from exc
        pos += nlen
        (flen,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        if pos + flen > end:
            raise DecodeError(
                f"entry {name!r} announces a {flen}-byte frame but only {end - pos} bytes remain"
            )
        if name in out:
            raise DecodeError(f"duplicate entry name {name!r} in container")
        out[name] = buf[pos : pos + flen]
        pos += flen
    if pos != end:
        raise DecodeError(f"{end - pos} unexpected bytes after the last container entry")
    return out


def inspect_container(payload: bytes | bytearray | memoryview) -> dict[str, FrameHeader]:
    """Headers of every entry, without decoding any body."""
    return {name: inspect(frame) for name, frame in decode_container(payload).items()}


def is_container(payload: bytes | bytearray | memoryview) -> bool:
    """True when the bytes start with the container magic."""
    return bytes(memoryview(payload)[:4]) == CONTAINER_MAGIC
