"""Sparsifiers: Top-K, threshold and Rand-K, with cheap index coding and a nested value codec.

Body of ``topk`` and ``threshold`` (explicit positions)::

    k u32 | index method u8 | index section | values_len u32 | values frame

* index method 0, **bitmap**: ``ceil(d/8)`` bytes, bit ``i`` (LSB-first) set when entry ``i`` is kept.
* index method 1, **delta + Rice**: gaps ``g_j = i_j - i_{j-1}`` (``g_0 = i_0 + 1``) coded as
  Golomb-Rice with parameter ``b``: ``b u8 | low bits (k x b bits) | unary_len u32 | unary high parts``.
  The low bits and unary parts sit in separate streams so both ends stay vectorised.
  The encoder tries the ``b`` values near the optimum and keeps the smallest exact size.

The encoder writes whichever of the two is smaller *for this payload*. At density ``p`` Rice costs
about ``log2(1/p) + 1.5`` bits per kept entry, the bitmap ``1/p``; the crossover is near 20-30%.

Body of ``randk``::

    k u32 | seed u64 | values_len u32 | values frame

Rand-K sends no positions: both ends derive the same ``k`` positions from the seed (the ``k``
indices with the smallest SplitMix64 hash of ``seed + i``; a bijective hash, so no ties). Values are
scaled by ``d/k`` before coding, which makes Rand-K unbiased (``omega = d/k - 1``).

The *values frame* is a complete frame (header included, and counted) produced by the value codec
(``fp32`` by default; any ``values``-stage codec such as ``uniform:4`` or ``qsgd``).
Identities: ``topk`` with ``k = d`` and fp32 values is lossless; Top-K is contractive with
``alpha = k/d`` and biased (pair it with error feedback); threshold is biased and its size depends on
the data.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from fedsqueeze.codecs import select
from fedsqueeze.codecs.base import Codec, decode_nested, random_seed
from fedsqueeze.codecs.identity import Fp32
from fedsqueeze.codecs.registry import register
from fedsqueeze.codecs.spec import SpecArgs
from fedsqueeze.errors import ConfigError, DecodeError
from fedsqueeze.wire.bits import (
    Reader,
    decode_unary,
    encode_unary,
    pack_uint,
    packed_nbytes,
    read_fields,
    unpack_uint,
    write_fields,
)
from fedsqueeze.wire.frame import FrameHeader

BITMAP, RICE = 0, 1


# ---------------------------------------------------------------------------- index coding
def _rice_cost_bits(gm1: npt.NDArray[np.int64], b: int) -> int:
    return int(gm1.size * (b + 1) + int((gm1 >> b).sum()))


def encode_indices(idx: npt.NDArray[np.int64], d: int) -> bytes:
    """Sorted unique positions in ``[0, d)`` -> the smaller of bitmap and delta+Rice sections."""
    k = idx.size
    bitmap_nbytes = packed_nbytes(d, 1)
    if k == 0:
        return bytes([RICE, 0]) + struct.pack("<I", 0)
    gaps = np.diff(idx, prepend=-1)
    gm1 = gaps - 1
    mean = float(gm1.mean())
    b0 = int(np.floor(np.log2(mean * 0.69 + 1.0))) if mean > 0 else 0
    cands = [b for b in range(b0 - 2, b0 + 3) if 0 <= b <= 40]
    best_b = min(cands, key=lambda b: _rice_cost_bits(gm1, b))
    low = gm1 & ((1 << best_b) - 1)
    high = gm1 >> best_b
    if best_b == 0:
        low_bytes = b""
    elif best_b <= 16:
        low_bytes = pack_uint(low, best_b)
    else:
        low_bytes = write_fields(low, np.full(k, best_b, np.int64))
    unary = encode_unary(high)
    rice_nbytes = 1 + len(low_bytes) + 4 + len(unary)
    if bitmap_nbytes < rice_nbytes:
        mask = np.zeros(d, np.uint8)
        mask[idx] = 1
        return bytes([BITMAP]) + pack_uint(mask, 1)
    return b"".join((bytes([RICE, best_b]), low_bytes, struct.pack("<I", len(unary)), unary))


def decode_indices(r: Reader, k: int, d: int) -> npt.NDArray[np.int64]:
    """Read an index section written by :func:`encode_indices`; validates everything."""
    if k > d:
        raise DecodeError(f"sparse payload claims k={k} kept entries for a tensor of {d}")
    method = r.u8("index method")
    if method == BITMAP:
        mask = unpack_uint(r.take(packed_nbytes(d, 1), "bitmap"), 1, d)
        idx = np.flatnonzero(mask)
        if idx.size != k:
            raise DecodeError(f"bitmap marks {idx.size} positions, header says k={k}")
        return idx.astype(np.int64)
    if method != RICE:
        raise DecodeError(f"unknown index method {method}; expected 0 (bitmap) or 1 (Rice)")
    b = r.u8("Rice parameter")
    if b > 40:
        raise DecodeError(f"Rice parameter {b} out of range 0..40")
    if b == 0:
        low = np.zeros(k, np.int64)
    elif b <= 16:
        low = unpack_uint(r.take(packed_nbytes(k, b), "Rice low bits"), b, k)
    else:
        low = read_fields(r.take(packed_nbytes(k, b), "Rice low bits"), np.full(k, b, np.int64))
    ulen = r.u32("unary length")
    unary = r.take(ulen, "Rice unary parts")
    high, used = decode_unary(unary, k)
    if used != ulen:
        raise DecodeError(f"Rice unary section has {ulen - used} unused bytes")
    if k and int(high.max()) > d:
        raise DecodeError("Rice gap exceeds the tensor size")
    gaps = (high << b) + low + 1
    idx = np.cumsum(gaps) - 1
    if k and int(idx[-1]) >= d:
        raise DecodeError(f"decoded position {int(idx[-1])} is outside a tensor of {d} entries")
    return idx.astype(np.int64)


# ---------------------------------------------------------------------------- shared parts
def _values_frame(values: torch.Tensor, codec: Codec, rng: torch.Generator | None) -> bytes:
    frame = codec.encode(values, rng=rng)
    return struct.pack("<I", len(frame)) + frame


def _read_values(r: Reader, k: int, context: str) -> torch.Tensor:
    vlen = r.u32("values frame length")
    vh, vals = decode_nested(r.take(vlen, "values frame"), context)
    if vh.shape != (k,):
        raise DecodeError(f"{context}: values frame has shape {vh.shape}, expected ({k},)")
    return vals


def _scatter(d: int, idx: npt.NDArray[np.int64], vals: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(d, dtype=torch.float32)
    if idx.size:
        out[torch.from_numpy(idx)] = vals.to(torch.float32)
    return out


class _Sparsifier(Codec):
    stage = "sparsifier"

    def __init__(self, values: Codec | None) -> None:
        if values is not None and values.stage != "values":
            raise ConfigError(f"{self.name}: values must be coded by a value codec, got {values.spec}")
        self.values: Codec = values if values is not None else Fp32()

    def _values_suffix(self) -> str:
        return "" if isinstance(self.values, Fp32) else f" > {self.values.spec}"

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        return self.values.stochastic


class _Explicit(_Sparsifier):
    """Sparsifiers that send their positions (Top-K, threshold)."""

    def _select(self, flat: torch.Tensor) -> npt.NDArray[np.int64]:
        raise NotImplementedError

    def _encode_body(self, flat: torch.Tensor, rng: torch.Generator | None) -> bytes:
        idx = self._select(flat)
        k, d = idx.size, flat.numel()
        vals = flat[torch.from_numpy(idx)] if k else torch.zeros(0)
        return b"".join((struct.pack("<I", k), encode_indices(idx, d), _values_frame(vals, self.values, rng)))

    @classmethod
    def _decode_body(cls, body: memoryview, header: FrameHeader) -> torch.Tensor:
        r = Reader(body, f"{cls.name} body")
        k = r.u32("kept count")
        d = header.numel
        idx = decode_indices(r, k, d)
        vals = _read_values(r, k, cls.name)
        r.expect_end()
        return _scatter(d, idx, vals)


def _ratio_or_k(args: SpecArgs, name: str) -> tuple[float | None, int | None]:
    k_raw = args.optional("k")
    ratio_raw = args.optional("ratio", positional=True)
    if (k_raw is None) == (ratio_raw is None):
        raise ConfigError(
            f"{name}: give exactly one of a ratio (e.g. '{name}:1%') or k (e.g. '{name}:k=100')"
        )
    if k_raw is not None:
        try:
            return None, int(k_raw)
        except ValueError:
            raise ConfigError(f"{name}: k={k_raw!r} is not an integer") from None
    from fedsqueeze.codecs.spec import parse_number

    return parse_number(str(ratio_raw), f"{name}: ratio"), None


def _check_ratio_k(name: str, ratio: float | None, k: int | None) -> None:
    if (ratio is None) == (k is None):
        raise ConfigError(f"{name}: give exactly one of ratio or k")
    if ratio is not None and not 0.0 < ratio <= 1.0:
        raise ConfigError(f"{name}: ratio must be in (0, 1] (e.g. 0.01 or 1%), got {ratio}")
    if k is not None and k < 1:
        raise ConfigError(f"{name}: k must be a positive integer, got {k}")


def _k_for(d: int, ratio: float | None, k: int | None) -> int:
    if d == 0:
        return 0
    if k is not None:
        return min(k, d)
    assert ratio is not None
    return min(d, max(1, round(ratio * d)))


def _fmt_ratio(ratio: float | None, k: int | None) -> str:
    if k is not None:
        return f"k={k}"
    assert ratio is not None
    pct = ratio * 100
    return f"{pct:g}%"


@register
class TopK(_Explicit):
    """Keep the ``k`` largest-magnitude entries (ties to the lower index). Biased; use with EF.

    ``k = max(1, round(ratio * d))`` when given as a ratio (capped at ``d``). Selection is exact
    (:func:`fedsqueeze.codecs.select.topk_indices`) and fast on CPU.
    """

    codec_id = 32
    name = "topk"

    def __init__(
        self, ratio: float | None = None, *, k: int | None = None, values: Codec | None = None
    ) -> None:
        _check_ratio_k("topk", ratio, k)
        super().__init__(values)
        self.ratio, self.k = ratio, k

    @classmethod
    def from_spec(cls, args: SpecArgs, values: Codec | None = None, **_: Any) -> Codec:
        ratio, k = _ratio_or_k(args, "topk")
        args.finish()
        return cls(ratio, k=k, values=values)

    @property
    def spec(self) -> str:
        return f"topk:{_fmt_ratio(self.ratio, self.k)}{self._values_suffix()}"

    def _select(self, flat: torch.Tensor) -> npt.NDArray[np.int64]:
        k = _k_for(flat.numel(), self.ratio, self.k)
        return select.topk_indices(flat, k).numpy().astype(np.int64, copy=False)


@register
class Threshold(_Explicit):
    """Keep every entry with ``|x| >= threshold``; the count travels in the payload. Biased."""

    codec_id = 33
    name = "threshold"

    def __init__(self, threshold: float, *, values: Codec | None = None) -> None:
        if not np.isfinite(threshold) or threshold < 0:
            raise ConfigError(f"threshold: must be a finite number >= 0, got {threshold}")
        super().__init__(values)
        self.threshold = float(threshold)

    @classmethod
    def from_spec(cls, args: SpecArgs, values: Codec | None = None, **_: Any) -> Codec:
        thr = args.float("threshold", positional=True)
        args.finish()
        return cls(thr, values=values)

    @property
    def spec(self) -> str:
        return f"threshold:{self.threshold:g}{self._values_suffix()}"

    def _select(self, flat: torch.Tensor) -> npt.NDArray[np.int64]:
        return select.threshold_indices(flat, self.threshold).numpy().astype(np.int64, copy=False)


# ---------------------------------------------------------------------------- Rand-K
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(z: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def randk_positions(seed: int, d: int, k: int) -> npt.NDArray[np.int64]:
    """The ``k`` positions of ``[0, d)`` with the smallest ``splitmix64(seed*golden + i)``, sorted.

    A pure function of ``(seed, d, k)`` written with fixed-width integer arithmetic, so sender and
    receiver agree on any platform and any NumPy/PyTorch version. Uniform over k-subsets up to the
    quality of the hash.
    """
    if k == 0:
        return np.zeros(0, np.int64)
    if k >= d:
        return np.arange(d, dtype=np.int64)
    with np.errstate(over="ignore"):
        base = np.uint64(seed) * _GOLDEN
        h = _splitmix64(np.arange(d, dtype=np.uint64) + base)
    # Cheap pre-filter: keep hashes below a cut that expects ~k + 6 sqrt(k) + 64 survivors.
    frac = min(1.0, (k + 6.0 * np.sqrt(k) + 64.0) / d)
    if frac < 1.0:
        cut = np.uint64(int(frac * 2.0**64))
        cand = np.flatnonzero(h < cut)
        if cand.size >= k:
            sel = cand[np.argpartition(h[cand], k - 1)[:k]]
            return np.sort(sel).astype(np.int64)
    sel = np.argpartition(h, k - 1)[:k]
    return np.sort(sel).astype(np.int64)


@register
class RandK(_Sparsifier):
    """Keep ``k`` uniformly random entries scaled by ``d/k``: unbiased, ``omega = d/k - 1``.

    No positions are sent: a 64-bit seed drawn from ``rng`` regenerates them on the receiver.
    """

    codec_id = 34
    name = "randk"

    def __init__(
        self, ratio: float | None = None, *, k: int | None = None, values: Codec | None = None
    ) -> None:
        _check_ratio_k("randk", ratio, k)
        super().__init__(values)
        self.ratio, self.k = ratio, k

    @property
    def unbiased(self) -> bool:  # type: ignore[override]
        return self.values.unbiased

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        return True

    @classmethod
    def from_spec(cls, args: SpecArgs, values: Codec | None = None, **_: Any) -> Codec:
        ratio, k = _ratio_or_k(args, "randk")
        args.finish()
        return cls(ratio, k=k, values=values)

    @property
    def spec(self) -> str:
        return f"randk:{_fmt_ratio(self.ratio, self.k)}{self._values_suffix()}"

    def _encode_body(self, flat: torch.Tensor, rng: torch.Generator | None) -> bytes:
        d = flat.numel()
        k = _k_for(d, self.ratio, self.k)
        seed = random_seed(rng)
        idx = randk_positions(seed, d, k)
        vals = flat[torch.from_numpy(idx)] * (d / k) if k else torch.zeros(0)
        return struct.pack("<IQ", k, seed) + _values_frame(vals, self.values, rng)

    @classmethod
    def _decode_body(cls, body: memoryview, header: FrameHeader) -> torch.Tensor:
        r = Reader(body, "randk body")
        k, seed = r.unpack("IQ", "k and seed")
        k, d = int(k), header.numel
        if k > d:
            raise DecodeError(f"randk: k={k} exceeds the tensor size {d}")
        vals = _read_values(r, k, "randk")
        r.expect_end()
        return _scatter(d, randk_positions(int(seed), d, k), vals)
