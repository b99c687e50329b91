"""Lossless stage: ``zstd`` compresses a complete inner frame (any codec) with Zstandard.

Body::  level u8 | zstd frame of the inner payload (content size always written)

The outer frame repeats the tensor's dtype and shape; the receiver checks that the inner frame
agrees. Decompression is bounded: a zstd frame that announces more than ``16 * numel + 1 MiB``
bytes, or does not announce its size, is rejected before any allocation. zstd is a general-purpose
coder; a true entropy coder for quantization symbols is a separate stage (later work).
"""

from __future__ import annotations

from typing import Any

import torch
import zstandard

from fedsqueeze.codecs.base import Codec, decode_body
from fedsqueeze.codecs.registry import codec_class, register
from fedsqueeze.codecs.spec import SpecArgs
from fedsqueeze.errors import ConfigError, DecodeError
from fedsqueeze.wire.bits import Reader
from fedsqueeze.wire.frame import FrameHeader, build_frame, parse_frame

_SLACK = 1 << 20


@register
class Zstd(Codec):
    """Wrap another codec's payload in Zstandard compression (lossless; inherits the inner flags)."""

    codec_id = 48
    name = "zstd"
    stage = "lossless"

    def __init__(self, inner: Codec, *, level: int = 3) -> None:
        if not -7 <= level <= 22:
            raise ConfigError(f"zstd: level must be in -7..22, got {level}")
        self.inner = inner
        self.level = level
        self.lossless = inner.lossless
        self.unbiased = inner.unbiased
        self.stochastic = inner.stochastic

    @classmethod
    def from_spec(cls, args: SpecArgs, inner: Codec | None = None, **_: Any) -> Codec:
        level = args.int("level", 3, positional=True, lo=-7, hi=22)
        args.finish()
        if inner is None:
            raise ConfigError("zstd needs an inner codec")
        return cls(inner, level=level)

    @property
    def spec(self) -> str:
        return f"{self.inner.spec} > zstd" + (f":level={self.level}" if self.level != 3 else "")

    def encode(self, x: torch.Tensor, *, rng: torch.Generator | None = None) -> bytes:
        t = self._check_input(x)
        inner = self.inner.encode(t, rng=rng)
        comp = zstandard.ZstdCompressor(level=self.level, write_content_size=True).compress(inner)
        return build_frame(self.codec_id, t.dtype, tuple(t.shape), bytes([self.level & 0xFF]) + comp)

    def _encode_body(self, flat: torch.Tensor, rng: torch.Generator | None) -> bytes:
        raise NotImplementedError  # encode() is overridden to keep the inner frame's header

    @classmethod
    def _decode_body(cls, body: memoryview, header: FrameHeader) -> torch.Tensor:
        r = Reader(body, "zstd body")
        r.u8("level")
        comp = bytes(r.rest())
        try:
            params = zstandard.get_frame_parameters(comp)
        except zstandard.ZstdError as exc:
            raise DecodeError(f"zstd: not a valid Zstandard frame ({exc})") from None
        limit = 16 * header.numel + _SLACK
        size = params.content_size
        if size in (zstandard.CONTENTSIZE_UNKNOWN, zstandard.CONTENTSIZE_ERROR) or size > limit:
            raise DecodeError(
                f"zstd: frame announces {size} decompressed bytes; expected a known size <= {limit}"
            )
        try:
            inner = zstandard.ZstdDecompressor().decompress(comp, max_output_size=limit)
        except zstandard.ZstdError as exc:
            raise DecodeError(f"zstd: decompression failed ({exc})") from None
        ih, ibody = parse_frame(inner)
        if ih.shape != header.shape or ih.dtype != header.dtype:
            raise DecodeError(
                f"zstd: inner frame is {ih.dtype}{list(ih.shape)}, outer says "
                f"{header.dtype}{list(header.shape)}"
            )
        icls = codec_class(ih.codec_id)
        if icls is cls:
            raise DecodeError("zstd: nested zstd frames are not allowed")
        flat = decode_body(icls, ibody, ih)
        return flat.to(torch.float32) if flat.is_floating_point() else flat
