"""Uniform min-max quantization at 1..16 bits per entry, bit-packed exactly.

Each block of ``block`` consecutive entries (the whole tensor when ``block=0``) is mapped to the
integer grid ``0 .. 2**bits - 1`` between its min and max; the receiver gets, per block, ``lo`` and
``step`` as float32 and the packed codes. Deterministic rounding picks the nearest level (biased);
stochastic rounding rounds up with probability equal to the fractional part, so
``E[decode(encode(x))] = x`` exactly (up to float32 rounding of lo and step).

Body::

    bits u8 | flags u8 (bit0 = stochastic) | block u32 | nblocks x (lo f32, step f32) | codes

Size: ``6 + 8 * nblocks + ceil(n * bits / 8)`` bytes plus the frame header. Tune ``bits`` first;
per-block scales (``block=256`` .. ``4096``) help when the tensor mixes scales.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import torch

from fedsqueeze.codecs.base import Codec
from fedsqueeze.codecs.registry import register
from fedsqueeze.codecs.spec import SpecArgs
from fedsqueeze.errors import ConfigError, DecodeError
from fedsqueeze.wire.bits import Reader, pack_uint, packed_nbytes, unpack_uint
from fedsqueeze.wire.frame import FrameHeader

_PARAMS = struct.Struct("<BBI")


@register
class Uniform(Codec):
    """Min-max uniform quantizer (see module docstring)."""

    codec_id = 16
    name = "uniform"

    def __init__(self, bits: int = 8, *, stochastic: bool = False, block: int = 0) -> None:
        if not isinstance(bits, int) or not 1 <= bits <= 16:
            raise ConfigError(f"uniform: bits must be an integer in 1..16, got {bits!r}")
        if not isinstance(block, int) or block < 0:
            raise ConfigError(f"uniform: block must be 0 (whole tensor) or a positive size, got {block!r}")
        self.bits = bits
        self.stochastic = bool(stochastic)
        self.block = block
        self.unbiased = self.stochastic

    @classmethod
    def from_spec(cls, args: SpecArgs, **_: Any) -> Codec:
        bits = args.int("bits", 8, positional=True, lo=1, hi=16)
        stochastic = args.bool("stochastic", False)
        block = args.int("block", 0, lo=0)
        args.finish()
        return cls(bits, stochastic=stochastic, block=block)

    @property
    def spec(self) -> str:
        s = f"uniform:{self.bits}"
        if self.stochastic:
            s += ",stochastic=true"
        if self.block:
            s += f",block={self.block}"
        return s

    def _encode_body(self, flat: torch.Tensor, rng: torch.Generator | None) -> bytes:
        n = flat.numel()
        levels = (1 << self.bits) - 1
        block = self.block if self.block and self.block < n else max(n, 1)
        nblocks = (n + block - 1) // block if n else 0
        head = _PARAMS.pack(self.bits, int(self.stochastic), self.block)
        if n == 0:
            return head
        pad = nblocks * block - n
        x = flat if pad == 0 else torch.cat([flat, flat[-1:].expand(pad)])
        xb = x.view(nblocks, block)
        lo = xb.amin(dim=1)
        hi = xb.amax(dim=1)
        step = ((hi - lo) / levels).to(torch.float32)
        inv = torch.where(step > 0, 1.0 / step, torch.zeros_like(step))
        y = (xb - lo[:, None]) * inv[:, None]
        if self.stochastic:
            y.add_(torch.rand(y.shape, generator=rng, dtype=torch.float32)).floor_()
        else:
            y.round_()
        y.clamp_(0, levels)
        codes = y.view(-1)[:n].to(torch.int32 if self.bits > 8 else torch.uint8).numpy()
        scales = torch.stack([lo, step], dim=1).numpy().astype("<f4").tobytes()
        return head + scales + pack_uint(codes, self.bits)

    @classmethod
    def _decode_body(cls, body: memoryview, header: FrameHeader) -> torch.Tensor:
        r = Reader(body, "uniform body")
        bits, flags, block = r.unpack("BBI", "parameters")
        bits, flags, block = int(bits), int(flags), int(block)
        if not 1 <= bits <= 16 or flags > 1:
            raise DecodeError(f"uniform: invalid parameters bits={bits} flags={flags}")
        n = header.numel
        if n == 0:
            r.expect_end()
            return torch.zeros(0)
        eff = block if block and block < n else n
        nblocks = (n + eff - 1) // eff
        expect = 8 * nblocks + packed_nbytes(n, bits)
        if r.remaining != expect:
            raise DecodeError(
                f"uniform: {n} entries at {bits} bits in {nblocks} block(s) need {expect} body bytes "
                f"after the parameters, got {r.remaining}"
            )
        scales = np.frombuffer(r.take(8 * nblocks, "block scales"), dtype="<f4").reshape(nblocks, 2)
        if not np.isfinite(scales).all():
            raise DecodeError("uniform: block scales contain NaN or Inf")
        codes = unpack_uint(r.rest(), bits, n)
        sc = torch.from_numpy(scales.astype(np.float32))
        c = torch.from_numpy(codes.astype(np.float32))
        pad = nblocks * eff - n
        if pad:
            c = torch.cat([c, torch.zeros(pad)])
        out = sc[:, 0:1] + c.view(nblocks, eff) * sc[:, 1:2]
        return out.reshape(-1)[:n].contiguous()
