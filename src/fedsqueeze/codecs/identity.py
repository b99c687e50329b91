"""Casts and identity: ``fp32`` (lossless for float32 input), ``fp16``, ``bf16``, and ``raw``.

``raw`` stores a tensor's bytes verbatim in its own dtype (integers, bools, NaN included); it is how
non-float buffers (e.g. BatchNorm's ``num_batches_tracked``) travel in a model container.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from fedsqueeze.codecs.base import Codec
from fedsqueeze.codecs.registry import register
from fedsqueeze.codecs.spec import SpecArgs
from fedsqueeze.errors import DecodeError, EncodeError
from fedsqueeze.wire.frame import DTYPE_CODES, FrameHeader, build_frame

FP16_MAX = 65504.0


class _Cast(Codec):
    """Dense cast to a narrower float type; one body entry per tensor entry, little-endian."""

    wire_dtype: ClassVar[torch.dtype]
    itemsize: ClassVar[int]

    @classmethod
    def from_spec(cls, args: SpecArgs, **_: Any) -> Codec:
        args.finish()
        return cls()

    def _encode_body(self, flat: torch.Tensor, rng: torch.Generator | None) -> bytes:
        return _to_le_bytes(flat.to(self.wire_dtype))

    @classmethod
    def _decode_body(cls, body: memoryview, header: FrameHeader) -> torch.Tensor:
        need = header.numel * cls.itemsize
        if len(body) != need:
            raise DecodeError(
                f"{cls.name}: body must hold {header.numel} x {cls.itemsize} bytes = {need}, got {len(body)}"
            )
        return _from_le_bytes(body, cls.wire_dtype, header.numel).to(torch.float32)


@register
class Fp32(_Cast):
    """float32 values as they are: lossless for float32 input, 32 bits per entry."""

    codec_id = 1
    name = "fp32"
    wire_dtype = torch.float32
    itemsize = 4
    lossless = True
    unbiased = True
    summable = True


@register
class Fp16(_Cast):
    """IEEE half precision (round to nearest even): 16 bits per entry, |x| <= 65504.

    Values beyond fp16's range are refused (they would become Inf); use ``bf16`` for those.
    """

    codec_id = 2
    name = "fp16"
    wire_dtype = torch.float16
    itemsize = 2

    def _encode_body(self, flat: torch.Tensor, rng: torch.Generator | None) -> bytes:
        if flat.numel() and float(flat.abs().max()) > FP16_MAX:
            raise EncodeError(
                f"fp16: max |x| = {float(flat.abs().max()):.4g} exceeds fp16's range ({FP16_MAX}); "
                "use 'bf16', or scale the tensor"
            )
        return super()._encode_body(flat, rng)


@register
class Bf16(_Cast):
    """bfloat16 (fp32's exponent, 8-bit significand, round to nearest even): 16 bits per entry."""

    codec_id = 3
    name = "bf16"
    wire_dtype = torch.bfloat16
    itemsize = 2


@register
class Raw(Codec):
    """The tensor's own bytes in its own dtype: lossless for every dtype, NaN and Inf included."""

    codec_id = 4
    name = "raw"
    lossless = True
    unbiased = True
    summable = True

    @classmethod
    def from_spec(cls, args: SpecArgs, **_: Any) -> Codec:
        args.finish()
        return cls()

    def encode(self, x: torch.Tensor, *, rng: torch.Generator | None = None) -> bytes:
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(x)
        if not isinstance(x, torch.Tensor):
            raise EncodeError(f"raw: expected a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in DTYPE_CODES:
            raise EncodeError(f"raw: dtype {x.dtype} has no wire code; supported: {list(DTYPE_CODES)}")
        flat = x.detach().reshape(-1).cpu().contiguous()
        return build_frame(self.codec_id, x.dtype, tuple(x.shape), _to_le_bytes(flat))

    def _encode_body(self, flat: torch.Tensor, rng: torch.Generator | None) -> bytes:
        raise NotImplementedError  # encode() is overridden

    @classmethod
    def _decode_body(cls, body: memoryview, header: FrameHeader) -> torch.Tensor:
        item = torch.empty(0, dtype=header.dtype).element_size()
        need = header.numel * item
        if len(body) != need:
            raise DecodeError(f"raw: body must hold {need} bytes for {header.shape}, got {len(body)}")
        return _from_le_bytes(body, header.dtype, header.numel)


def _to_le_bytes(t: torch.Tensor) -> bytes:
    """Little-endian bytes of a contiguous CPU tensor (bf16 via its 16-bit pattern)."""
    if t.dtype == torch.bfloat16:
        arr = t.view(torch.int16).numpy()
    elif t.dtype == torch.bool:
        arr = t.to(torch.uint8).numpy()
    else:
        arr = t.numpy()
    return arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()


def _from_le_bytes(buf: memoryview, dtype: torch.dtype, count: int) -> torch.Tensor:
    if dtype == torch.bfloat16:
        arr = np.frombuffer(buf, dtype="<i2", count=count)
        return torch.from_numpy(arr.astype(np.int16)).view(torch.bfloat16)
    if dtype == torch.bool:
        arr8 = np.frombuffer(buf, dtype=np.uint8, count=count)
        if arr8.size and int(arr8.max()) > 1:
            raise DecodeError("raw: bool tensor body holds bytes other than 0 and 1")
        return torch.from_numpy(arr8.copy()).to(torch.bool)
    np_dtype = torch.empty(0, dtype=dtype).numpy().dtype.newbyteorder("<")
    arr = np.frombuffer(buf, dtype=np_dtype, count=count)
    return torch.from_numpy(arr.astype(arr.dtype.newbyteorder("="), copy=True))
