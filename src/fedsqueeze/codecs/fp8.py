"""Scaled 8-bit and 4-bit float casts: ``fp8:e4m3`` (default), ``fp8:e5m2`` and ``fp4`` (E2M1).

Each block of ``block`` consecutive entries (the whole tensor when ``block=0``) gets one float32
scale that maps the block's ``max |x|`` onto the format's largest finite value ``fmax``; every entry
is then rounded to the nearest point of the format's value grid. Tune the format first (e4m3 has
more precision, e5m2 more range), then ``block`` (``32`` .. ``4096``) when a tensor mixes scales.

Value grids (non-negative half; codes with the sign bit set are the negatives, ``-0`` included)
-----------------------------------------------------------------------------------------------
* **e4m3** (OCP FP8 E4M3FN, ``torch.float8_e4m3fn``): 4 exponent bits (bias 7), 3 mantissa bits,
  no infinities. Magnitude codes ``0 .. 0x7E``: code ``c = e << 3 | m`` is ``m / 8 * 2**-6`` when
  ``e = 0`` (subnormals, smallest ``2**-9``) and ``(1 + m / 8) * 2**(e - 7)`` otherwise, up to
  ``fmax = 448``. ``0x7F`` (NaN) is never written and is refused by the decoder.
* **e5m2** (OCP FP8 E5M2, IEEE-like, ``torch.float8_e5m2``): 5 exponent bits (bias 15), 2 mantissa
  bits. Magnitude codes ``0 .. 0x7B``: ``m / 4 * 2**-14`` when ``e = 0`` (smallest ``2**-16``),
  ``(1 + m / 4) * 2**(e - 15)`` otherwise, up to ``fmax = 57344``. Codes ``0x7C .. 0x7F`` (Inf, NaN)
  are never written and are refused.
* **fp4** (OCP MX FP4 E2M1): 2 exponent bits (bias 1), 1 mantissa bit; magnitude codes ``0 .. 7``
  are exactly ``0, 0.5, 1, 1.5, 2, 3, 4, 6`` (``fmax = 6``); sign in bit 3.

In all three the magnitude codes are in increasing order of value, and a code is the format's own
bit pattern (so an fp8 code byte *is* the fp8 number of the scaled value).

Rounding (exactly what the encoder computes)
--------------------------------------------
For a block with ``amax = max |x|`` (float32):

1. ``scale = float32(amax / fmax)`` (IEEE float32 division). Special cases: ``amax = 0`` gives
   ``scale = 0`` (the block decodes to zeros); a scale that underflows to 0 while ``amax > 0`` becomes
   ``2**-149``; a scale whose ``fmax * scale`` would overflow float32 is stepped down one ulp.
2. ``y = float32(x / scale)`` (``x`` itself when ``scale = 0``), clamped to ``[-fmax, fmax]``.
3. The code is the grid point nearest to ``|y|``, **ties to the even code** (the one whose lowest
   mantissa bit is 0, as IEEE round-to-nearest-even), and the sign bit is ``signbit(y)``. With
   ``stochastic=true`` it is instead the grid point just below ``|y|`` or just above, the upper one
   with probability ``(|y| - lo) / (hi - lo)``; so ``E[decode] = x`` up to float32 rounding of the
   scale, and the codec is unbiased.

The decoder returns ``float32(value(code) * scale)``. For fp8 the deterministic rounding uses
``Tensor.to(torch.float8_*)``; fp4, stochastic rounding, and a torch without float8 dtypes use the
exponent/mantissa arithmetic of :func:`round_to_grid`. The tests check both, code for code, against
a brute-force nearest-grid-point search (ties, subnormals, signs).
Unlike OCP MX, whose block scales are powers of two (E8M0), the scales here are full float32, so the
largest entry of every block is represented exactly up to the scale's rounding.

Body (little-endian)::

    format u8 (0 = e4m3, 1 = e5m2, 2 = e2m1) | flags u8 (bit0 = stochastic) | block u32
    nblocks x scale f32                     finite, >= 0, fmax * scale finite in float32
    codes: fp8 one byte per entry; fp4 two entries per byte (``pack_uint`` 4-bit, entry 0 in the low
           nibble, a zero pad nibble when the count is odd)

Size: ``6 + 4 * nblocks + n`` (fp8) or ``6 + 4 * nblocks + ceil(n / 2)`` (fp4) bytes plus the frame
header, with ``nblocks = ceil(n / eff)``, ``eff = block`` if ``0 < block < n`` else ``n``. An empty
tensor's body is the 6 parameter bytes. The decoder refuses NaN/Inf codes, bad scales, a non-zero
code in a block of scale 0, a non-zero pad nibble, and any length mismatch.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
import torch

from fedsqueeze.codecs.base import Codec
from fedsqueeze.codecs.registry import register
from fedsqueeze.codecs.spec import SpecArgs
from fedsqueeze.errors import ConfigError, DecodeError
from fedsqueeze.wire.bits import Reader, pack_uint, packed_nbytes
from fedsqueeze.wire.frame import FrameHeader

_PARAMS = struct.Struct("<BBI")
_F32_MAX = float(np.finfo(np.float32).max)
_F32_TINY = float(np.float32(2.0**-149))


@dataclass(frozen=True)
class FloatFormat:
    """A small float format: its wire number, bit layout and value grid."""

    name: str
    wire: int
    ebits: int
    mbits: int
    bias: int
    max_mag_code: int  # largest finite magnitude code
    torch_dtype: torch.dtype | None

    @property
    def bits(self) -> int:
        return 1 + self.ebits + self.mbits

    @property
    def sign_bit(self) -> int:
        return 1 << (self.ebits + self.mbits)

    def grid(self) -> torch.Tensor:
        """The finite non-negative values, indexed by magnitude code (float32, increasing)."""
        code = torch.arange(self.max_mag_code + 1, dtype=torch.float64)
        e = torch.div(code, 1 << self.mbits, rounding_mode="floor")
        m = code - e * (1 << self.mbits)
        frac = m / (1 << self.mbits)
        sub = frac * 2.0 ** (1 - self.bias)
        norm = (1 + frac) * torch.pow(torch.tensor(2.0, dtype=torch.float64), e - self.bias)
        return torch.where(e == 0, sub, norm).to(torch.float32)

    @property
    def fmax(self) -> float:
        """Largest finite value (448 for e4m3, 57344 for e5m2, 6 for e2m1)."""
        return float(grid(self)[-1])


def _dtype(name: str) -> torch.dtype | None:
    dtype: torch.dtype | None = getattr(torch, name, None)
    return dtype


E4M3 = FloatFormat("e4m3", 0, 4, 3, 7, 0x7E, _dtype("float8_e4m3fn"))
E5M2 = FloatFormat("e5m2", 1, 5, 2, 15, 0x7B, _dtype("float8_e5m2"))
E2M1 = FloatFormat("e2m1", 2, 2, 1, 1, 0x7, None)
FORMATS = {f.wire: f for f in (E4M3, E5M2, E2M1)}

_GRIDS: dict[int, torch.Tensor] = {}
_TABLES: dict[int, npt.NDArray[np.float32]] = {}


def grid(fmt: FloatFormat) -> torch.Tensor:
    """Cached :meth:`FloatFormat.grid` (do not modify the returned tensor)."""
    if fmt.wire not in _GRIDS:
        _GRIDS[fmt.wire] = fmt.grid()
    return _GRIDS[fmt.wire]


def _byte_table(fmt: FloatFormat) -> npt.NDArray[np.float32]:
    """What one code byte decodes to: shape ``(256,)`` for fp8, ``(256, 2)`` (low nibble, high
    nibble) for fp4. NaN marks codes that are not finite values."""
    if fmt.wire not in _TABLES:
        g = grid(fmt).numpy()
        half = np.full(fmt.sign_bit, np.nan, np.float32)
        half[: g.size] = g
        per_code = np.concatenate([half, -half])
        if fmt.bits == 8:
            _TABLES[fmt.wire] = per_code
        else:
            byte = np.arange(256)
            pairs = np.stack([per_code[byte & 15], per_code[byte >> 4]], axis=1)
            _TABLES[fmt.wire] = np.ascontiguousarray(pairs)
    return _TABLES[fmt.wire]


def round_to_grid(
    y: torch.Tensor, fmt: FloatFormat, noise: torch.Tensor | None = None, *, use_torch_cast: bool = True
) -> torch.Tensor:
    """Codes (uint8) of ``y`` (float32, already within ``[-fmax, fmax]``) on ``fmt``'s grid.

    Nearest grid point with ties to the even code, or, when ``noise`` (uniform in ``[0, 1)``, one
    per entry) is given, stochastic rounding between the two neighbouring grid points.

    Without a torch dtype (fp4, stochastic rounding, ``use_torch_cast=False``) the rounding is done
    in one elementwise pass: ``e = max(floor(log2 |y|), emin)`` read from the float32 exponent bits,
    ``s = |y| * 2**(mbits - e)`` (exact: a power of two built from its bits), ``n = round(s)`` (half
    to even) or ``floor(s) + [u < s - floor(s)]``, and ``code = (e - emin) * 2**mbits + n``. That
    formula covers subnormals (``e = emin``, ``n < 2**mbits``) and the carry into the next binade
    (``n = 2**(mbits + 1)``), and ``code`` has the parity of ``n``, so half-to-even on ``n`` is
    ties-to-even-code.
    """
    if noise is None and use_torch_cast and fmt.torch_dtype is not None:
        return y.to(fmt.torch_dtype).view(torch.uint8)
    # NumPy: its int32 shifts and masks run ~10x faster than torch's on CPU.
    yn = y.detach().to(torch.float32).contiguous().numpy()
    bits = yn.view(np.int32)
    e = (bits >> 23) & 0xFF  # biased float32 exponent of |y|
    np.maximum(e, 127 + 1 - fmt.bias, out=e)  # ... at least the format's emin
    s = np.abs(yn)
    s *= ((fmt.mbits + 254 - e) << 23).view(np.float32)  # * 2**(mbits - (e - 127)), exact
    if noise is None:
        np.rint(s, out=s)  # half to even
    else:
        lo = np.floor(s)
        s -= lo
        s = lo + (noise.detach().to(torch.float32).numpy() < s)
    code = ((e - (127 + 1 - fmt.bias)) << fmt.mbits) + s.astype(np.int32)
    code |= ((bits >> 31) & 1) << (fmt.ebits + fmt.mbits)
    return torch.from_numpy(code.astype(np.uint8))


def _block_amax(flat: torch.Tensor, block: int) -> torch.Tensor:
    """``max |x|`` per block, from min and max (no ``abs`` temporary)."""
    n = flat.numel()
    nfull = n // block
    parts = []
    if nfull == 1:
        lo, hi = torch.aminmax(flat[:block])
        parts.append(torch.maximum(-lo, hi).reshape(1))
    elif nfull:
        rows = flat[: nfull * block].view(nfull, block)
        parts.append(torch.maximum(-rows.amin(dim=1), rows.amax(dim=1)))
    if nfull * block < n:
        lo, hi = torch.aminmax(flat[nfull * block :])
        parts.append(torch.maximum(-lo, hi).reshape(1))
    return torch.cat(parts).abs()  # abs: max(-0.0, 0.0) may be -0.0


def _scales(amax: torch.Tensor, fmax: float) -> torch.Tensor:
    """float32 scales ``amax / fmax`` with the special cases of the module docstring."""
    scale = amax / torch.tensor(fmax, dtype=torch.float32)
    scale = torch.where((scale == 0) & (amax > 0), torch.tensor(_F32_TINY), scale)
    over = scale.double() * fmax > _F32_MAX
    if bool(over.any()):
        scale = torch.where(over, torch.nextafter(scale, torch.zeros_like(scale)), scale)
    return scale


def _per_block(
    flat: torch.Tensor, block: int, vec: torch.Tensor, op: str, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``flat`` divided (``op='div'``) or multiplied by one value of ``vec`` per block, into ``out``
    (in place when ``out`` is None)."""
    n = flat.numel()
    nfull = n // block
    dst = flat if out is None else out
    fn = torch.div if op == "div" else torch.mul
    if nfull:
        fn(
            flat[: nfull * block].view(nfull, block),
            vec[:nfull, None],
            out=dst[: nfull * block].view(nfull, block),
        )
    if nfull * block < n:
        fn(flat[nfull * block :], vec[nfull:], out=dst[nfull * block :])
    return dst


class _ScaledFloat(Codec):
    """Shared machinery of ``fp8`` and ``fp4`` (see the module docstring)."""

    formats: ClassVar[tuple[FloatFormat, ...]]

    def __init__(self, fmt: FloatFormat, *, block: int = 0, stochastic: bool = False) -> None:
        if fmt not in self.formats:
            raise ConfigError(
                f"{self.name}: format {fmt.name!r} is not one of {', '.join(f.name for f in self.formats)}"
            )
        if isinstance(block, bool) or not isinstance(block, int) or block < 0 or block >= 1 << 32:
            raise ConfigError(
                f"{self.name}: block must be 0 (one scale per tensor) or a positive size, got {block!r}"
            )
        self.fmt = fmt
        self.block = block
        self.stochastic = bool(stochastic)
        self.unbiased = self.stochastic

    def _spec_tail(self) -> str:
        s = f",block={self.block}" if self.block else ""
        return s + (",stochastic=true" if self.stochastic else "")

    def _encode_body(self, flat: torch.Tensor, rng: torch.Generator | None) -> list[bytes]:
        n = flat.numel()
        head = _PARAMS.pack(self.fmt.wire, int(self.stochastic), self.block)
        if n == 0:
            return [head]
        eff = self.block if 0 < self.block < n else n
        fmax = self.fmt.fmax
        scale = _scales(_block_amax(flat, eff), fmax)
        divisor = torch.where(scale > 0, scale, torch.ones_like(scale))
        y = _per_block(flat, eff, divisor, "div", out=torch.empty_like(flat))
        y.clamp_(-fmax, fmax)
        noise = torch.rand(n, generator=rng, dtype=torch.float32) if self.stochastic else None
        codes = round_to_grid(y, self.fmt, noise).numpy()
        packed = codes.tobytes() if self.fmt.bits == 8 else pack_uint(codes, self.fmt.bits)
        return [head, scale.numpy().astype("<f4").tobytes(), packed]

    @classmethod
    def _decode_body(cls, body: memoryview, header: FrameHeader) -> torch.Tensor:
        r = Reader(body, f"{cls.name} body")
        wire, flags, block = (int(v) for v in r.unpack("BBI", "parameters"))
        fmt = FORMATS.get(wire)
        if fmt is None or fmt not in cls.formats:
            names = ", ".join(f"{f.wire} ({f.name})" for f in cls.formats)
            raise DecodeError(f"{cls.name}: unknown format number {wire}; expected {names}")
        if flags > 1:
            raise DecodeError(f"{cls.name}: reserved flag bits set (flags={flags})")
        n = header.numel
        if n == 0:
            r.expect_end()
            return torch.zeros(0)
        eff = block if 0 < block < n else n
        nblocks = (n + eff - 1) // eff
        code_nbytes = packed_nbytes(n, fmt.bits)
        if r.remaining != 4 * nblocks + code_nbytes:
            raise DecodeError(
                f"{cls.name}: {n} entries in {nblocks} block(s) need {4 * nblocks} scale bytes and "
                f"{code_nbytes} code bytes after the parameters, got {r.remaining}"
            )
        scale_np = np.frombuffer(r.take(4 * nblocks, "block scales"), dtype="<f4").astype(np.float32)
        fmax = fmt.fmax
        if not (
            np.isfinite(scale_np).all()
            and not np.signbit(scale_np).any()
            and (scale_np.astype(np.float64) * fmax <= _F32_MAX).all()
        ):
            raise DecodeError(
                f"{cls.name}: block scales must be finite, >= 0 and at most float32 max / {fmax}"
            )
        raw = np.frombuffer(r.rest(), dtype=np.uint8)
        if fmt.bits == 8:
            mags = raw & 0x7F
            if int(mags.max()) > fmt.max_mag_code:
                bad = int(raw[mags > fmt.max_mag_code][0])
                raise DecodeError(f"{cls.name}: code 0x{bad:02x} is not a finite {fmt.name} value (NaN/Inf)")
            out = torch.from_numpy(_byte_table(fmt)[raw])
        else:
            if n % 2 and raw[-1] >> 4:
                raise DecodeError(f"{cls.name}: the padding nibble after the last code must be 0")
            pairs = _byte_table(fmt).view(np.uint64).reshape(256)  # gather 8-byte pairs: 1-D is fast
            out = torch.from_numpy(pairs[raw].view(np.float32)[:n])
        scale = torch.from_numpy(scale_np)
        zero = scale == 0
        if bool(zero.any()):
            nonzero = _block_amax(out, eff) > 0
            if bool((zero & nonzero).any()):
                raise DecodeError(f"{cls.name}: a block with scale 0 holds non-zero codes")
        return _per_block(out, eff, scale, "mul")


@register
class Fp8(_ScaledFloat):
    """Per-tensor (or per-block) scaled FP8 cast, E4M3 or E5M2: 8 bits per entry + 32 per block."""

    codec_id = 80
    name = "fp8"
    formats = (E4M3, E5M2)

    def __init__(self, fmt: str | FloatFormat = "e4m3", *, block: int = 0, stochastic: bool = False) -> None:
        if isinstance(fmt, str):
            by_name = {f.name: f for f in self.formats}
            if fmt.lower() not in by_name:
                raise ConfigError(f"fp8: format must be 'e4m3' or 'e5m2', got {fmt!r}")
            fmt = by_name[fmt.lower()]
        super().__init__(fmt, block=block, stochastic=stochastic)

    @classmethod
    def from_spec(cls, args: SpecArgs, **_: Any) -> Codec:
        fmt = args.optional("format", positional=True) or "e4m3"
        block = args.int("block", 0, lo=0, hi=(1 << 32) - 1)
        stochastic = args.bool("stochastic", False)
        args.finish()
        return cls(fmt, block=block, stochastic=stochastic)

    @property
    def spec(self) -> str:
        return f"fp8:{self.fmt.name}{self._spec_tail()}"


@register
class Fp4(_ScaledFloat):
    """Per-tensor (or per-block) scaled FP4 (E2M1) cast: 4 bits per entry + 32 per block."""

    codec_id = 81
    name = "fp4"
    formats = (E2M1,)

    def __init__(self, *, block: int = 0, stochastic: bool = False) -> None:
        super().__init__(E2M1, block=block, stochastic=stochastic)

    @classmethod
    def from_spec(cls, args: SpecArgs, **_: Any) -> Codec:
        fmt = args.optional("format", positional=True)
        if fmt is not None and fmt.lower() != "e2m1":
            raise ConfigError(f"fp4: the only format is e2m1, got {fmt!r}")
        block = args.int("block", 0, lo=0, hi=(1 << 32) - 1)
        stochastic = args.bool("stochastic", False)
        args.finish()
        return cls(block=block, stochastic=stochastic)

    @property
    def spec(self) -> str:
        tail = self._spec_tail()
        return f"fp4:{tail[1:]}" if tail else "fp4"
