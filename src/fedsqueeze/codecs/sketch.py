"""CountSketch (as used by FetchSGD, Rothchild et al. 2020): a linear, summable sketch of a vector.

A sketch is a table ``S`` of ``rows x cols`` floats. Row ``j`` hashes coordinate ``i`` to a bucket
``h_j(i)`` in ``[0, cols)`` and a sign ``s_j(i)`` in ``{+1, -1}``, and ``S[j, h_j(i)] += s_j(i) x_i``.
Coordinate ``i`` is estimated as the median over rows of ``s_j(i) S[j, h_j(i)]``; the ``k`` heavy
hitters are the ``k`` coordinates with the largest ``|estimate|`` (ties to the lower index). The
sketch is linear, so the server can add the sketches of many clients (:func:`sum_payloads`, no
decoding) and recover the heavy hitters of the *sum* once. The table costs ``4 * rows * cols`` bytes
whatever the vector's length ``d``; the codec is biased (top-k of noisy estimates; pair it with error
feedback, or keep momentum and error in sketch space as FetchSGD does on the server).

Sizing: with ``cols`` around ``10 k`` or more and ``rows = 5``, heavy hitters well above the
``||x||_2 / sqrt(cols)`` noise floor are recovered with estimates close to their values. ``cols``
is the knob to tune first (accuracy and bytes), ``k`` second; more rows cost bytes linearly and
buy little beyond 5.

Hashes (portable: fixed-width 64-bit integer arithmetic only, identical on every platform and for
every NumPy/PyTorch version; all arithmetic mod ``2**64``)::

    mix64(z)   = SplitMix64's output function:  z ^= z >> 30; z *= 0xBF58476D1CE4E5B9;
                                                z ^= z >> 27; z *= 0x94D049BB133111EB; z ^= z >> 31
    key_j      = mix64(mix64(seed) ^ (j + 1))                      row key, j = 0 .. rows - 1
    H_j(i)     = mix64(key_j + (i + 1) * 0x9E3779B97F4A7C15)       the i-th output of a SplitMix64
                                                                   generator seeded with key_j
    h_j(i)     = ((H_j(i) >> 32) * cols) >> 32                     bucket (Lemire's multiply-shift)
    s_j(i)     = +1 if H_j(i) & 1 == 0 else -1                     sign

Every party derives the same hashes from ``(seed, row, i, cols)``: clients must share ``seed``
(a spec parameter, default 42 as in FetchSGD's code, *not* drawn from the rng) for their sketches to
be summable. The table is accumulated in float64 (``np.bincount``) and rounded once to float32.
The median of an even number of rows is the mean of the two middle estimates.

Body (little-endian)::

    flags u8 (bit0 = table in float16) | rows u16 | cols u32 | k u64 | d u64 | seed u64   31 bytes
    table: rows x cols float32 (or float16), row-major

``1 <= rows <= 255``, ``cols >= 1``; ``d`` repeats the header's entry count (checked); ``k <= d`` is
the number of heavy hitters the decoder returns. Size: ``31 + 4 * rows * cols`` bytes
(``2 * rows * cols`` for ``table=fp16``) plus the frame header. Decoding validates every field and
the table's finiteness, and uses memory ``O(d + body)`` (estimates are computed in chunks).

Spec: ``countsketch:cols=10000,k=1%`` with optional ``rows=5``, ``seed=42``, ``table=fp16``.
``cols`` and ``k`` are counts (``cols=10000``, ``k=100``) or fractions of the tensor's size
(``cols=10%``, ``k=0.01``).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from fedsqueeze.codecs import select
from fedsqueeze.codecs.base import Codec
from fedsqueeze.codecs.registry import register
from fedsqueeze.codecs.spec import SpecArgs, parse_number
from fedsqueeze.errors import ConfigError, DecodeError, EncodeError
from fedsqueeze.wire.bits import Reader
from fedsqueeze.wire.frame import FrameHeader, build_frame, parse_frame

_U64 = np.uint64
_M1 = _U64(0xBF58476D1CE4E5B9)
_M2 = _U64(0x94D049BB133111EB)
GOLDEN = _U64(0x9E3779B97F4A7C15)
_PARAMS = struct.Struct("<BHIQQQ")
PARAMS_NBYTES = _PARAMS.size  # 31
FP16_MAX = 65504.0
MAX_ROWS = 255  # the wire field is u16; more rows than this buy nothing and only slow decoding
MAX_COLS = (1 << 32) - 1
_CHUNK = 1 << 18  # coordinates hashed per pass (bounds temporaries to a few MB)


# ---------------------------------------------------------------------------- hashing
def mix64(z: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """SplitMix64's output function (a bijection of 64-bit integers), vectorised."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> _U64(30))) * _M1
        z = (z ^ (z >> _U64(27))) * _M2
    return z ^ (z >> _U64(31))


def row_keys(seed: int, rows: int) -> npt.NDArray[np.uint64]:
    """``key_j = mix64(mix64(seed) ^ (j + 1))`` for ``j < rows``."""
    s = mix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=_U64))[0]
    return mix64(np.arange(1, rows + 1, dtype=_U64) ^ s)


def row_hashes(
    key: np.uint64, start: int, stop: int, cols: int
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.float32]]:
    """Buckets ``h_j(i)`` and signs ``s_j(i)`` (float32 +-1) of coordinates ``start <= i < stop``."""
    with np.errstate(over="ignore"):
        i1 = np.arange(start + 1, stop + 1, dtype=_U64)
        h = mix64(i1 * GOLDEN + key)
    bucket = (((h >> _U64(32)) * _U64(cols)) >> _U64(32)).astype(np.intp)
    sign = (1 - 2 * (h & _U64(1)).astype(np.int8)).astype(np.float32)
    return bucket, sign


def _check_shape(rows: int, cols: int) -> None:
    if isinstance(rows, bool) or not isinstance(rows, int) or not 1 <= rows <= MAX_ROWS:
        raise ConfigError(f"countsketch: rows must be an integer in 1..{MAX_ROWS}, got {rows!r}")
    if isinstance(cols, bool) or not isinstance(cols, int) or not 1 <= cols <= MAX_COLS:
        raise ConfigError(f"countsketch: cols must be an integer in 1..{MAX_COLS}, got {cols!r}")


# ---------------------------------------------------------------------------- stateless math
def sketch(x: torch.Tensor, rows: int, cols: int, seed: int) -> torch.Tensor:
    """The ``rows x cols`` float32 CountSketch table of ``x`` (flattened), hashes from ``seed``.

    Linear: ``sketch(a + b) == sketch(a) + sketch(b)`` up to float32 rounding of the table.
    """
    _check_shape(rows, cols)
    flat = x.detach().reshape(-1).to(device="cpu", dtype=torch.float32).contiguous().numpy()
    d = flat.size
    table = np.zeros((rows, cols), np.float64)
    for j, key in enumerate(row_keys(seed, rows)):
        for s in range(0, d, _CHUNK):
            e = min(d, s + _CHUNK)
            bucket, sign = row_hashes(key, s, e, cols)
            table[j] += np.bincount(bucket, weights=flat[s:e] * sign, minlength=cols)
    return torch.from_numpy(table.astype(np.float32))


def estimate(table: torch.Tensor, d: int, seed: int) -> torch.Tensor:
    """Median-of-rows estimate of all ``d`` coordinates (float32), computed in chunks."""
    if table.ndim != 2:
        raise ConfigError(f"countsketch: table must be 2-D (rows, cols), got shape {tuple(table.shape)}")
    rows, cols = table.shape
    _check_shape(rows, cols)
    tab = table.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
    keys = row_keys(seed, rows)
    out = np.empty(d, np.float32)
    chunk = max(4096, _CHUNK // rows)
    mid = rows // 2
    for s in range(0, d, chunk):
        e = min(d, s + chunk)
        est = np.empty((rows, e - s), np.float32)
        for j in range(rows):
            bucket, sign = row_hashes(keys[j], s, e, cols)
            np.multiply(tab[j, bucket], sign, out=est[j])
        if rows == 1:
            out[s:e] = est[0]
        elif rows % 2:
            out[s:e] = np.partition(est, mid, axis=0)[mid]
        else:
            part = np.partition(est, (mid - 1, mid), axis=0)
            half = np.float32(0.5)
            out[s:e] = part[mid - 1] * half + part[mid] * half  # no overflow near float32 max
    return torch.from_numpy(out)


@dataclass(frozen=True)
class HeavyHitters:
    """A ``k``-sparse estimate of a length-``d`` vector: sorted ``indices`` (int64) and ``values``."""

    indices: torch.Tensor
    values: torch.Tensor
    d: int

    def to_dense(self) -> torch.Tensor:
        """The float32 vector of length ``d`` with ``values`` at ``indices`` and zeros elsewhere."""
        out = torch.zeros(self.d, dtype=torch.float32)
        out[self.indices] = self.values
        return out


def unsketch(table: torch.Tensor, d: int, k: int, seed: int) -> HeavyHitters:
    """The ``k`` coordinates with the largest ``|median estimate|`` (ties to the lower index)."""
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= d:
        raise ConfigError(f"countsketch: k must be an integer in 0..d={d}, got {k!r}")
    est = estimate(table, d, seed)
    idx = select.topk_indices(est, k)
    return HeavyHitters(indices=idx, values=est[idx], d=d)


# ---------------------------------------------------------------------------- payloads
@dataclass(frozen=True)
class SketchPayload:
    """A parsed ``countsketch`` payload (what :func:`parse_payload` returns)."""

    header: FrameHeader
    table: torch.Tensor  # (rows, cols) float32
    rows: int
    cols: int
    k: int
    d: int
    seed: int
    fp16: bool

    def unsketch(self) -> HeavyHitters:
        """The payload's heavy hitters (``k`` of them), as the decoder computes them."""
        return unsketch(self.table, self.d, self.k, self.seed)


def _read_body(body: memoryview, header: FrameHeader) -> tuple[int, int, int, int, int, int, torch.Tensor]:
    r = Reader(body, "countsketch body")
    flags, rows, cols, k, d, seed = (int(v) for v in r.unpack("BHIQQQ", "parameters"))
    if flags > 1:
        raise DecodeError(f"countsketch: reserved flag bits set (flags={flags})")
    if not (1 <= rows <= MAX_ROWS and cols >= 1):
        raise DecodeError(
            f"countsketch: table shape {rows} x {cols} must be at least 1 x 1 with at most {MAX_ROWS} rows"
        )
    if d != header.numel:
        raise DecodeError(
            f"countsketch: body says d={d}, the header's shape {header.shape} has {header.numel}"
        )
    if k > d:
        raise DecodeError(f"countsketch: k={k} heavy hitters exceeds d={d}")
    item = 2 if flags else 4
    need = rows * cols * item
    if r.remaining != need:
        raise DecodeError(
            f"countsketch: a {rows} x {cols} table of {item}-byte floats needs {need} bytes, "
            f"got {r.remaining}"
        )
    arr = np.frombuffer(r.rest(), dtype="<f2" if flags else "<f4").astype(np.float32).reshape(rows, cols)
    if not np.isfinite(arr).all():
        raise DecodeError("countsketch: the table holds NaN or Inf")
    return flags, rows, cols, k, d, seed, torch.from_numpy(arr)


def parse_payload(payload: bytes | bytearray | memoryview) -> SketchPayload:
    """Validate a ``countsketch`` frame and return its table and parameters (no unsketching)."""
    header, body = parse_frame(payload)
    if header.codec_id != CountSketch.codec_id:
        raise DecodeError(
            f"expected a countsketch payload (codec id {CountSketch.codec_id}), "
            f"got codec id {header.codec_id}"
        )
    flags, rows, cols, k, d, seed, table = _read_body(body, header)
    return SketchPayload(header, table, rows, cols, k, d, seed, bool(flags))


def _params(flags: int, rows: int, cols: int, k: int, d: int, seed: int) -> bytes:
    return _PARAMS.pack(flags, rows, cols, k, d, seed)


def _table_bytes(table: npt.NDArray[np.float32], fp16: bool, what: str) -> bytes:
    if fp16:
        amax = float(np.abs(table).max(initial=0.0))
        if amax > FP16_MAX:
            raise EncodeError(
                f"countsketch: {what} has |entry| = {amax:.4g} beyond float16's range ({FP16_MAX}); "
                "use float32 tables (drop table=fp16) or scale the input"
            )
        return table.astype("<f2").tobytes()
    return table.astype("<f4").tobytes()


def sum_payloads(
    payloads: Sequence[bytes | bytearray | memoryview], weights: Sequence[float] | None = None
) -> bytes:
    """Add several clients' countsketch payloads into one payload, without unsketching any.

    Every payload must come from the same spec and a tensor of the same shape and dtype (same
    ``rows``, ``cols``, ``k``, ``seed``, table precision); otherwise :class:`ConfigError` names the
    field that differs. The result's table is ``sum_i w_i S_i`` (``w_i = 1`` by default; pass
    ``weights`` for a weighted mean), summed in float64 and rounded once to the table's precision;
    ``decode(sum_payloads(ps)) == unsketch(that table, d, k, seed).to_dense()``. Malformed payloads
    raise :class:`DecodeError`.
    """
    if not payloads:
        raise ConfigError("sum_payloads: give at least one countsketch payload")
    if weights is not None and len(weights) != len(payloads):
        raise ConfigError(f"sum_payloads: {len(weights)} weights for {len(payloads)} payloads")
    first = parse_payload(payloads[0])
    total = np.zeros((first.rows, first.cols), np.float64)
    for i, raw in enumerate(payloads):
        p = first if i == 0 else parse_payload(raw)
        for field in ("rows", "cols", "k", "d", "seed", "fp16"):
            a, b = getattr(first, field), getattr(p, field)
            if a != b:
                raise ConfigError(
                    f"sum_payloads: payload {i} has {field}={b}, payload 0 has {field}={a}; sketches "
                    "sum only when every client uses the same countsketch spec (seed included)"
                )
        if (p.header.shape, p.header.dtype) != (first.header.shape, first.header.dtype):
            raise ConfigError(
                f"sum_payloads: payload {i} holds a tensor of shape {p.header.shape} and dtype "
                f"{p.header.dtype}, payload 0 one of shape {first.header.shape} and dtype "
                f"{first.header.dtype}"
            )
        w = 1.0 if weights is None else float(weights[i])
        if not np.isfinite(w):
            raise ConfigError(f"sum_payloads: weight {i} is not finite ({w!r})")
        total += w * p.table.numpy().astype(np.float64)
    table = total.astype(np.float32)
    if not np.isfinite(table).all():
        raise EncodeError("sum_payloads: the summed table overflows float32")
    body = _params(int(first.fp16), first.rows, first.cols, first.k, first.d, first.seed)
    return build_frame(
        CountSketch.codec_id,
        first.header.dtype,
        first.header.shape,
        [body, _table_bytes(table, first.fp16, "the summed table")],
    )


# ---------------------------------------------------------------------------- codec
def _count_or_ratio(v: int | float, name: str, *, allow_zero: bool) -> None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ConfigError(f"countsketch: {name} must be an int (count) or a float (fraction), got {v!r}")
    if isinstance(v, int):
        if v < (0 if allow_zero else 1):
            raise ConfigError(f"countsketch: {name}={v} must be {'>= 0' if allow_zero else '>= 1'}")
    elif not (0.0 < v <= 1.0):
        raise ConfigError(f"countsketch: {name} as a fraction must be in (0, 1] (e.g. 0.01 or 1%), got {v}")


def _resolve(v: int | float, d: int, lo: int) -> int:
    if isinstance(v, int):
        return v
    return max(lo, round(v * d))


def _fmt(v: int | float) -> str:
    return str(v) if isinstance(v, int) else f"{v * 100:g}%"


def _parse_count_or_ratio(args: SpecArgs, key: str, default: int | float | None) -> int | float:
    raw = args.optional(key)
    if raw is None:
        if default is None:
            raise ConfigError(f"codec stage {args.stage!r} needs {key}=<count or fraction, e.g. 1000 or 1%>")
        return default
    txt = raw.strip()
    if txt.isdigit():
        return int(txt)
    return parse_number(txt, f"codec stage {args.stage!r}: {key}")


@register
class CountSketch(Codec):
    """CountSketch of the flattened tensor; decodes to its ``k`` heavy hitters (see module doc).

    Parameters
    ----------
    cols:
        Columns of the table: an ``int`` count, or a ``float`` fraction of the tensor's size.
    k:
        Heavy hitters the decoder returns: an ``int`` count (capped at ``d``) or a fraction of ``d``.
    rows:
        Rows of the table (independent hashes; the estimate is their median).
    seed:
        Hash seed shared by every client whose sketches are to be summed.
    table:
        ``"fp32"`` or ``"fp16"`` (half the bytes; the table must stay within float16's range).
    """

    codec_id = 88
    name = "countsketch"
    summable = True

    def __init__(
        self, cols: int | float, *, k: int | float, rows: int = 5, seed: int = 42, table: str = "fp32"
    ) -> None:
        _count_or_ratio(cols, "cols", allow_zero=False)
        _count_or_ratio(k, "k", allow_zero=True)
        if isinstance(cols, int):
            _check_shape(rows, cols)
        else:
            _check_shape(rows, 1)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 64:
            raise ConfigError(f"countsketch: seed must be an integer in [0, 2**64), got {seed!r}")
        if table not in ("fp32", "fp16"):
            raise ConfigError(f"countsketch: table must be 'fp32' or 'fp16', got {table!r}")
        self.cols, self.k, self.rows, self.seed, self.table = cols, k, rows, seed, table

    @classmethod
    def from_spec(cls, args: SpecArgs, **_: Any) -> Codec:
        cols = _parse_count_or_ratio(args, "cols", None)
        k = _parse_count_or_ratio(args, "k", None)
        rows = args.int("rows", 5, lo=1, hi=MAX_ROWS)
        seed = args.int("seed", 42, lo=0, hi=(1 << 64) - 1)
        table = args.choice("table", ("fp32", "fp16"), "fp32")
        args.finish()
        return cls(cols, k=k, rows=rows, seed=seed, table=table)

    @property
    def spec(self) -> str:
        s = f"countsketch:rows={self.rows},cols={_fmt(self.cols)},k={_fmt(self.k)}"
        if self.seed != 42:
            s += f",seed={self.seed}"
        if self.table != "fp32":
            s += f",table={self.table}"
        return s

    def shape_for(self, d: int) -> tuple[int, int, int]:
        """``(rows, cols, k)`` this codec uses for a tensor of ``d`` entries."""
        cols = _resolve(self.cols, d, 1)
        if cols > MAX_COLS:
            raise EncodeError(f"countsketch: cols={cols} exceeds {MAX_COLS}")
        return self.rows, cols, min(d, _resolve(self.k, d, 1 if d else 0))

    def _encode_body(self, flat: torch.Tensor, rng: torch.Generator | None) -> list[bytes]:
        d = flat.numel()
        rows, cols, k = self.shape_for(d)
        table = sketch(flat, rows, cols, self.seed).numpy()
        if not np.isfinite(table).all():
            raise EncodeError("countsketch: the table overflows float32; scale the input down")
        fp16 = self.table == "fp16"
        return [_params(int(fp16), rows, cols, k, d, self.seed), _table_bytes(table, fp16, "the table")]

    @classmethod
    def _decode_body(cls, body: memoryview, header: FrameHeader) -> torch.Tensor:
        _, _, _, k, d, seed, table = _read_body(body, header)
        return unsketch(table, d, k, seed).to_dense()
