"""Entropy-coding stage ``ans``: the quantization *symbols* of the inner payload, coded with ANS.

``zstd`` compresses an inner frame's bytes blindly; it cannot see that a 4-bit uniform payload is
a stream of 4-bit symbols (it sees bytes holding two symbols each, and 3-bit symbols straddling
bytes). ``ans`` parses the inner payload, takes out the integer codes, and codes them with
asymmetric numeral systems (``constriction``'s ``AnsCoder``, 32-bit words, 24-bit probabilities)
under a categorical model whose exact symbol counts travel in the payload. Everything else of the
inner payload (parameters, scales, norms, law parameters, codebooks, knobs, sparse positions,
Rand-K seed) is kept verbatim, so the receiver rebuilds the *exact* inner payload bytes and decodes
them through the registry: ``decode(ans payload)`` equals ``decode(inner payload)`` bit for bit.

Spec examples::

    uniform:4 > ans                         dense 4-bit codes, entropy-coded
    topk:1% > uniform:4 > ans               Top-K positions as sent by topk (Rice or bitmap),
                                            the values' 4-bit codes entropy-coded
    qsgd:s=15,bucket=512 > ans              QSGD (coding=fixed) sign+level symbols
    randk:10% > uniform:8,stochastic=true > ans
    lloydmax:3,M=2 > ans                    fitted-law Lloyd-Max codes (rate-distortion codecs)
    m22:10%,bits=3 > ans                    M22's kept values; positions verbatim
    topk:10% > lloydmax:3 > ans             Top-K, then Lloyd-Max on the kept values
    tinyscript:4 > ans                      TinyScript's level<<1|sign codes

Which inner codecs have symbols: ``uniform`` (any bits/block/stochastic), ``qsgd`` with
``coding=fixed``, the rate-distortion quantizers ``lloydmax`` / ``weibull_lloyd`` (with or without
``codebook=send``) and ``tinyscript``, ``topk`` / ``threshold`` / ``randk`` whose values use one of
those, and ``m22``. Anything else (``fp32``, ``fp16``, ``qsgd`` with ``coding=elias``, which is
already a variable length code) is refused with a :class:`~fedsqueeze.errors.ConfigError` when the
spec is built: use ``zstd`` for those. A ``budget`` inner (``budget:bits=0.6 > ans``) becomes a
budget policy whose candidates are entropy-coded, so the budget counts the entropy coder's real bytes.

Why it pays for the rate-distortion codecs: a Lloyd-Max quantizer equalises distortion, not cell
probability, so on a peaked law (GenNorm ``β < 2``, typical of gradients) the inner cells are far
likelier than the outer ones, and an ``M > 0`` weighting (M22) pushes levels further into the tails,
which makes the codes *more* skewed. The fixed-width payload spends ``bits`` per code regardless.

Body (little-endian)::

    inner codec id u16                       16 uniform, 17 qsgd, 64 lloydmax, 65 m22,
                                             66 weibull_lloyd, 67 tinyscript,
                                             32 topk, 33 threshold, 34 randk
    if the inner codec is a sparsifier with a nested values frame (32, 33, 34):
        k u32
        topk/threshold: index section        verbatim (``sparse.encode_indices`` layout)
        randk:          seed u64
        value codec id u16                   16, 17, 64, 66 or 67
    value parameters, verbatim (the inner body up to its codes):
        uniform:    bits u8 | flags u8 | block u32 | scales
        qsgd:       s u16 | bucket u32 | coding u8 | norms
        lloydmax, weibull_lloyd:
                    law u8 | bits u8 | shape u16 | M u16 | loc f32 | scale f32 [| codebook]
        m22:        k u32 | index section | the lloydmax parameters above (k symbols)
        tinyscript: bits u8 | scale f32 | knobs
    symbol section, to the end of the body:
        mode u8 = 0 (raw)  | the inner codec's bit-packed codes, verbatim
        mode u8 = 1 (ans)  | lo u16 | span u16 | (span + 1) counts (LEB128 varints, sum = n)
                           | ANS words (u32, little-endian; none when span = 0)

The symbols are ``lo .. lo + span`` (the range that occurs); the model is the categorical
distribution ``count / n`` over that range, as quantized by constriction (``perfect=False``).
The encoder writes whichever mode is smaller for this payload, so an ``ans`` payload is never more
than a few bytes larger than its inner payload (tiny tensors take mode 0). The sparse values
frame's own 22-byte header and its 4-byte length are not sent (they are rebuilt: float32, shape
``(k,)``), which is why ``topk > uniform > ans`` is a little smaller than ``topk > uniform`` even in
raw mode. The model costs ``5 + sum(len(varint(count)))`` bytes, e.g. ~45 bytes for 16 symbols of
a 10^5-entry tensor.

Measured (see ``tests/test_entropy.py``), ANS words vs the empirical entropy ``H`` of the codes:
10^6 symbols of 4-bit min-max-quantized N(0, 1) data, ``H`` = 2.7412 and 2.7412 bits per symbol
(+0.001%; the whole payload, headers, scales and the 41-byte model included, is 2.7418 bits per
entry, vs 4 for ``uniform:4`` and 2.78 for ``uniform:4 > zstd:level=19``); the 10^5 kept values
of ``topk:1% > uniform:4`` on 10^7 entries, ``H`` = 2.2290, coded 2.2294 (+0.02%).

Rate-distortion codecs on 10^6 entries of GenNorm(β = 0.7) (``numpy`` ``default_rng(0)``, the
test's tensor): coded bits per symbol vs ``H``, and the whole payload vs the inner one::

    inner spec              H      coded   (+%)     inner bytes   ans bytes   saved
    lloydmax:3              2.3600 2.3601  +0.002   375,036       295,077     21.3%
    lloydmax:3,M=2          1.3578 1.3579  +0.002   375,036       169,795     54.7%
    weibull_lloyd:3         2.4278 2.4279  +0.001   375,036       303,549     19.1%
    tinyscript:4            2.9370 2.9370  +0.001   500,039       367,208     26.6%
    m22:10%,bits=3 (M=2)    2.2684 2.2688  +0.018    97,001        87,886      9.4%
    topk:10% > lloydmax:3   2.1743 2.1747  +0.018    97,027        86,710     10.6%

(models: 21-43 bytes.) The sparse ones save less of the whole payload because the positions
(~60% of an ``m22:10%`` payload) are kept as sent; on the value codes alone they save 24-28%.

Decoding trusts nothing: ids, mode, alphabet range, counts (sum must equal ``n``, varints must be
canonical), ANS words (whole words, all consumed, coder back in its initial state) and the
histogram of the decoded symbols (must equal the counts) are all checked, and the rebuilt inner
frame then goes through the inner codec's own validating decoder. Every violation is a
:class:`~fedsqueeze.errors.DecodeError`.

The wire format depends on constriction's fixed-point quantization of a categorical model
(``perfect=False``), which constriction documents as stable; golden bytes in the tests catch a
change.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, NoReturn

import constriction
import numpy as np
import numpy.typing as npt
import torch

from fedsqueeze.codecs.base import Codec, decode_body
from fedsqueeze.codecs.qsgd import QSGD
from fedsqueeze.codecs.rd.codecs import (
    M22,
    LloydMax,
    TinyScript,
    WeibullLloyd,
    read_m22_head,
    read_quantizer_head,
    read_tinyscript_head,
)
from fedsqueeze.codecs.registry import codec_class, register
from fedsqueeze.codecs.sparse import RandK, Threshold, TopK, decode_indices
from fedsqueeze.codecs.spec import SpecArgs
from fedsqueeze.codecs.uniform import Uniform, unpack_codes
from fedsqueeze.errors import ConfigError, DecodeError, EncodeError
from fedsqueeze.wire.bits import Reader, pack_uint, packed_nbytes
from fedsqueeze.wire.frame import FrameHeader, build_frame, parse_frame

RAW, ANS = 0, 1
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_ALPHABET = struct.Struct("<HH")
_MAX_VARINT = 5  # 35 bits: more than any count (counts <= numel < 2**32)

_RD_VALUE_IDS = (LloydMax.codec_id, WeibullLloyd.codec_id, TinyScript.codec_id)
#: value codecs: symbols for every entry (n = numel), alone or as a sparsifier's nested values frame
_VALUE_IDS = (Uniform.codec_id, QSGD.codec_id, *_RD_VALUE_IDS)
#: sparsifiers that quantize their kept values inline (no nested frame): n = k symbols
_INLINE_SPARSE_IDS = (M22.codec_id,)
_EXPLICIT_IDS = (TopK.codec_id, Threshold.codec_id)
_SPARSE_IDS = (*_EXPLICIT_IDS, RandK.codec_id)
_SYMBOL_VALUE_CODECS = (Uniform, LloydMax, WeibullLloyd, TinyScript)


# ---------------------------------------------------------------------------- spec-time check
def check_symbol_source(codec: Codec) -> None:
    """Raise :class:`ConfigError` unless ``codec``'s payloads carry fixed-width symbols ``ans`` codes."""
    if isinstance(codec, M22):
        return
    values = getattr(codec, "values", None) if isinstance(codec, (TopK, Threshold, RandK)) else codec
    if isinstance(values, _SYMBOL_VALUE_CODECS):
        return
    if isinstance(values, QSGD):
        if values.coding == "fixed":
            return
        raise ConfigError(
            f"ans: {codec.spec!r} uses qsgd coding=elias, already a variable-length code; use "
            "coding=fixed with ans (ans then entropy-codes the sign+level symbols), or zstd"
        )
    what = values.spec if isinstance(values, Codec) else codec.spec
    raise ConfigError(
        f"ans: entropy-codes quantization symbols, and {what!r} has none; put ans after a "
        "'uniform', 'qsgd' (coding=fixed), 'lloydmax', 'weibull_lloyd' or 'tinyscript' value coder "
        "or after 'm22', e.g. 'topk:1% > uniform:4 > ans' or 'm22:10%,bits=3 > ans', or use "
        "'zstd' for lossless compression of float payloads"
    )


# ---------------------------------------------------------------------------- codec
@register
class Ans(Codec):
    """Entropy-code the quantization symbols of an inner payload with ANS (lossless stage)."""

    codec_id = 96
    name = "ans"
    stage = "lossless"

    def __init__(self, inner: Codec) -> None:
        check_symbol_source(inner)
        self.inner = inner
        self.lossless = inner.lossless
        self.unbiased = inner.unbiased
        self.stochastic = inner.stochastic

    @classmethod
    def from_spec(cls, args: SpecArgs, inner: Codec | None = None, **_: Any) -> Codec:
        args.finish()
        from fedsqueeze.codecs.budget import Budget

        if isinstance(inner, Budget):  # "budget:... > ans": the budget counts the entropy coder
            return inner.with_ans()
        if inner is None:
            raise ConfigError("ans needs an inner codec, e.g. 'uniform:4 > ans'")
        return cls(inner)

    @property
    def spec(self) -> str:
        return f"{self.inner.spec} > ans"

    def encode(self, x: torch.Tensor, *, rng: torch.Generator | None = None) -> bytes:
        t = self._check_input(x)
        return entropy_code(self.inner.encode(t, rng=rng))

    def _encode_body(self, flat: torch.Tensor, rng: torch.Generator | None) -> bytes:
        raise NotImplementedError  # encode() is overridden: the body is built from the inner payload

    @classmethod
    def _decode_body(cls, body: memoryview, header: FrameHeader) -> torch.Tensor:
        ih, ibody = parse_frame(_rebuild(body, header))
        flat = decode_body(codec_class(ih.codec_id), ibody, ih)
        return flat.to(torch.float32)


# ---------------------------------------------------------------------------- public helpers
def entropy_code(payload: bytes | bytearray | memoryview) -> bytes:
    """Turn a complete inner payload (uniform, qsgd fixed, an rd quantizer, ``m22``, or a sparsifier
    over a value codec among those) into an ``ans`` payload. :func:`inner_payload` inverts it exactly.

    Raises :class:`~fedsqueeze.errors.EncodeError` for a payload without symbols to code.
    """
    try:
        ih, ibody = parse_frame(payload)
    except DecodeError as exc:
        raise EncodeError(f"ans: the inner payload is not a valid frame ({exc})") from exc
    r = Reader(ibody, "ans: inner body")
    parts: list[bytes | memoryview] = [_U16.pack(ih.codec_id)]
    try:
        if ih.codec_id in (*_VALUE_IDS, *_INLINE_SPARSE_IDS):
            parts += _transcode_values(ih.codec_id, r, ih.numel)
        elif ih.codec_id in _SPARSE_IDS:
            parts += _transcode_sparse(ih.codec_id, r, ih.numel)
        else:
            name = codec_class(ih.codec_id).name
            raise EncodeError(f"ans: a {name!r} payload has no quantization symbols to entropy-code")
    except DecodeError as exc:  # a payload our own codecs never write
        raise EncodeError(f"ans: cannot parse the inner payload ({exc})") from exc
    return build_frame(Ans.codec_id, ih.dtype, ih.shape, parts)


def inner_payload(payload: bytes | bytearray | memoryview) -> bytes:
    """The exact inner payload an ``ans`` payload was made from (its bytes, header and CRC included)."""
    header, body = parse_frame(payload)
    if header.codec_id != Ans.codec_id:
        raise DecodeError(f"ans: expected an ans frame (codec id {Ans.codec_id}), got id {header.codec_id}")
    return _rebuild(body, header)


@dataclass(frozen=True)
class SymbolStats:
    """What the entropy coder achieved on one ``ans`` payload (from its bytes, without decoding)."""

    #: number of coded symbols (entries, or kept entries of a sparse payload)
    nsymbols: int
    #: symbols from the smallest to the largest that occurs (the model's ``span + 1``)
    alphabet: int
    #: 0 = raw (codes stored as packed), 1 = ANS
    mode: int
    #: empirical entropy of the symbols, ``-sum p log2 p`` with ``p = count / n`` (bits per symbol)
    entropy_bits_per_symbol: float
    #: ANS words (or packed codes in raw mode) in bits per symbol, model excluded
    coded_bits_per_symbol: float
    #: mode byte + alphabet range + counts (1 in raw mode: the mode byte)
    model_nbytes: int
    #: whole ``ans`` payload
    payload_nbytes: int
    #: the inner payload it rebuilds to
    inner_nbytes: int


def symbol_stats(payload: bytes | bytearray | memoryview) -> SymbolStats:
    """Read the symbol section of an ``ans`` payload and report bits per symbol against entropy."""
    header, body = parse_frame(payload)
    if header.codec_id != Ans.codec_id:
        raise DecodeError(f"ans: expected an ans frame (codec id {Ans.codec_id}), got id {header.codec_id}")
    r = Reader(body, "ans body")
    n, bits = _Cursor(r, header).values_geometry()
    mode = r.u8("symbol mode")
    start = r.pos - 1
    inner_nbytes = len(inner_payload(payload))
    if mode == RAW:
        codes = r.rest()
        counts = np.bincount(np.asarray(unpack_codes(codes, bits, n)), minlength=1)
        nz = np.flatnonzero(counts)
        alphabet = int(nz[-1] - nz[0] + 1) if n else 0
        coded_bits = 8 * len(codes)
        model_nbytes = 1
    else:
        span = int(r.unpack("HH", "symbol range")[1])
        counts = _read_varints(r, span + 1)
        alphabet = span + 1
        coded_bits = 8 * r.remaining
        model_nbytes = r.pos - start
    p = counts[counts > 0] / max(n, 1)
    return SymbolStats(
        nsymbols=n,
        alphabet=alphabet,
        mode=mode,
        entropy_bits_per_symbol=float(-(p * np.log2(p)).sum()) + 0.0,
        coded_bits_per_symbol=coded_bits / max(n, 1),
        model_nbytes=model_nbytes,
        payload_nbytes=len(payload),
        inner_nbytes=inner_nbytes,
    )


# ---------------------------------------------------------------------------- encoder side
def _symbol_prefix(codec_id: int, r: Reader, n: int, ctx: str) -> tuple[bytes, int, int]:
    """Read what precedes the codes of a body with symbols (kept verbatim): parameters, scales,
    knobs or codebook, and ``m22``'s kept count and positions. Return ``(prefix, code width,
    number of codes)``; ``n`` is the number of entries the body describes."""
    if codec_id in _RD_VALUE_IDS or codec_id in _INLINE_SPARSE_IDS:
        start = r.pos
        if codec_id == TinyScript.codec_id:
            bits = read_tinyscript_head(r)[0]
        elif codec_id == M22.codec_id:
            n, _, head = read_m22_head(r, n)
            bits = head.bits
        else:
            pinned = codec_id == WeibullLloyd.codec_id  # weibull_lloyd: dweibull law, M = 0
            name = codec_class(codec_id).name
            head = read_quantizer_head(
                r, name, family="dweibull" if pinned else None, M=0.0 if pinned else None
            )
            bits = head.bits
        return bytes(r.buf[start : r.pos]), bits, n
    prefix, bits = _value_prefix(codec_id, r, n, ctx)
    return prefix, bits, n


def _value_prefix(codec_id: int, r: Reader, n: int, ctx: str) -> tuple[bytes, int]:
    """Read a uniform/qsgd codec's parameters and scales (kept verbatim); return them and the code width."""
    if codec_id == Uniform.codec_id:
        head = r.take(6, "uniform parameters")
        bits, _flags, block = struct.unpack("<BBI", head)
        if not 1 <= bits <= 16:
            raise DecodeError(f"{ctx}: uniform bit width {bits} outside 1..16")
        if n == 0:
            return bytes(head), bits
        eff = block if 0 < block < n else n
        nscales = (n + eff - 1) // eff
        return bytes(head) + bytes(r.take(8 * nscales, "uniform scales")), bits
    if codec_id == QSGD.codec_id:
        head = r.take(7, "qsgd parameters")
        s, bucket, coding = struct.unpack("<HIB", head)
        if coding != 0:
            raise DecodeError(f"{ctx}: qsgd payload uses coding={coding}; ans codes only coding=fixed (0)")
        width = 1 + int(s).bit_length()
        if not 2 <= width <= 16:
            raise DecodeError(f"{ctx}: qsgd s={s} gives a {width}-bit code; expected 2..16")
        if n == 0:
            return bytes(head), width
        eff = bucket if 0 < bucket < n else n
        nscales = (n + eff - 1) // eff
        return bytes(head) + bytes(r.take(4 * nscales, "qsgd norms")), width
    raise DecodeError(f"{ctx}: value codec id {codec_id} has no symbols; expected one of {_VALUE_IDS}")


def _transcode_values(codec_id: int, r: Reader, n: int) -> list[bytes | memoryview]:
    prefix, bits, n = _symbol_prefix(codec_id, r, n, "ans")
    codes = r.rest()
    if len(codes) != packed_nbytes(n, bits):
        raise DecodeError(f"{n} codes at {bits} bits need {packed_nbytes(n, bits)} bytes, got {len(codes)}")
    return [prefix, _encode_symbols(codes, bits, n)]


def _transcode_sparse(codec_id: int, r: Reader, d: int) -> list[bytes | memoryview]:
    start = r.pos
    k = r.u32("kept count")
    if codec_id == RandK.codec_id:
        r.u64("seed")
    else:
        decode_indices(r, k, d)
    head = r.buf[start : r.pos]
    vlen = r.u32("values frame length")
    vh, vbody = parse_frame(r.take(vlen, "values frame"))
    r.expect_end()
    if vh.dtype != torch.float32 or vh.shape != (k,):
        raise DecodeError(f"values frame is {vh.dtype}{list(vh.shape)}, expected float32[{k}]")
    if vh.codec_id not in _VALUE_IDS:
        raise DecodeError(
            f"values frame codec id {vh.codec_id} is not a value codec with symbols ({_VALUE_IDS})"
        )
    vr = Reader(vbody, "ans: values body")
    return [head, _U16.pack(vh.codec_id), *_transcode_values(vh.codec_id, vr, k)]


def _encode_symbols(packed: memoryview, bits: int, n: int) -> bytes:
    """The smaller of the raw section (packed codes verbatim) and the ANS section."""
    raw = bytes([RAW]) + bytes(packed)
    if n == 0:
        return raw
    symbols = np.asarray(unpack_codes(packed, bits, n))
    counts = np.bincount(symbols, minlength=1)
    nz = np.flatnonzero(counts)
    lo, hi = int(nz[0]), int(nz[-1])
    model_counts = counts[lo : hi + 1]
    head = bytes([ANS]) + _ALPHABET.pack(lo, hi - lo) + _varints(model_counts)
    if len(head) >= len(raw):
        return raw
    if hi == lo:  # one symbol: the counts say it all
        return head
    model = _model(model_counts)
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse((symbols - lo).astype(np.int32), model)
    words = coder.get_compressed().astype("<u4").tobytes()
    section = head + words
    return section if len(section) < len(raw) else raw


def _model(counts: npt.NDArray[np.integer]) -> Any:
    return constriction.stream.model.Categorical(counts.astype(np.float64), perfect=False)


def _varints(values: npt.NDArray[np.integer]) -> bytes:
    """LEB128: 7 bits per byte, low group first, high bit set on every byte but a value's last."""
    v = values.astype(np.uint64)
    nbytes = 1 + sum((v >= np.uint64(1 << (7 * j))).astype(np.int64) for j in range(1, _MAX_VARINT))
    shifts = np.arange(_MAX_VARINT, dtype=np.uint64) * np.uint64(7)
    groups = ((v[:, None] >> shifts[None, :]) & np.uint64(0x7F)).astype(np.uint8)
    j = np.arange(_MAX_VARINT)[None, :]
    groups[j < (nbytes[:, None] - 1)] |= 0x80
    return groups[j < nbytes[:, None]].tobytes()


# ---------------------------------------------------------------------------- decoder side
def _read_varints(r: Reader, count: int) -> npt.NDArray[np.int64]:
    """Read ``count`` canonical LEB128 varints (at most 5 bytes each)."""
    window = np.frombuffer(r.buf[r.pos : r.pos + min(r.remaining, _MAX_VARINT * count)], np.uint8)
    ends = np.flatnonzero(window < 0x80)[:count]
    if ends.size < count:
        raise DecodeError(f"ans: model counts section holds {ends.size} complete counts, expected {count}")
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1
    if int(lengths.max()) > _MAX_VARINT:
        raise DecodeError(f"ans: a model count is longer than {_MAX_VARINT} bytes")
    if bool(np.any((window[ends] == 0) & (lengths > 1))):
        raise DecodeError("ans: a model count is not minimally encoded")
    used = window[: int(ends[-1]) + 1]
    pos_in = np.arange(used.size) - np.repeat(starts, lengths)
    weights = (used & 0x7F).astype(np.float64) * np.exp2(7.0 * pos_in)
    values = np.bincount(np.repeat(np.arange(count), lengths), weights=weights, minlength=count)
    r.take(used.size, "model counts")
    return values.astype(np.int64)


def _fail(exc: BaseException) -> NoReturn:
    raise DecodeError(f"ans: the ANS stream is invalid ({type(exc).__name__}: {exc})") from None


def _decode_symbols(r: Reader, bits: int, n: int) -> bytes:
    """Read a symbol section; return the inner codec's packed codes."""
    mode = r.u8("symbol mode")
    if mode == RAW:
        return bytes(r.rest())
    if mode != ANS or n == 0:
        raise DecodeError(f"ans: symbol mode {mode} is invalid here (0 = raw, 1 = ans for n > 0 symbols)")
    lo, span = (int(v) for v in r.unpack("HH", "symbol range"))
    if lo + span >= 1 << bits:
        raise DecodeError(f"ans: symbols {lo}..{lo + span} do not fit {bits}-bit codes")
    counts = _read_varints(r, span + 1)
    if int(counts.sum()) != n:
        raise DecodeError(f"ans: model counts sum to {int(counts.sum())}, expected {n} symbols")
    words = r.rest()
    if span == 0:
        if len(words):
            raise DecodeError("ans: a one-symbol alphabet carries no ANS words")
        return pack_uint(np.full(n, lo, np.int64), bits)
    if len(words) == 0 or len(words) % 4:
        raise DecodeError(f"ans: the ANS stream is {len(words)} bytes, expected a positive multiple of 4")
    compressed = np.frombuffer(words, "<u4").astype(np.uint32)
    try:
        coder = constriction.stream.stack.AnsCoder(compressed)
        symbols = coder.decode(_model(counts), n)
        empty = coder.is_empty()
    except Exception as exc:
        _fail(exc)
    except BaseException as exc:  # a Rust panic surfaces as pyo3's PanicException(BaseException)
        if type(exc).__name__ == "PanicException":
            _fail(exc)
        raise
    if not empty:
        raise DecodeError("ans: the ANS stream holds data beyond the announced symbols")
    if not np.array_equal(np.bincount(symbols, minlength=span + 1), counts):
        raise DecodeError("ans: decoded symbols do not match the model counts (corrupted stream)")
    return pack_uint(symbols.astype(np.int64) + lo, bits)


class _Cursor:
    """Walk an ans body up to its symbol section (shared by the decoder and :func:`symbol_stats`)."""

    def __init__(self, r: Reader, header: FrameHeader) -> None:
        self.r = r
        self.header = header
        self.inner_id = int(r.unpack("H", "inner codec id")[0])
        self.sparse_head = b""
        self.value_id = self.inner_id
        self.prefix = b""

    def values_geometry(self) -> tuple[int, int]:
        """Consume the sections before the symbols; return (number of symbols, code width)."""
        r, n = self.r, self.header.numel
        if self.inner_id in _SPARSE_IDS:
            start = r.pos
            k = r.u32("kept count")
            if self.inner_id == RandK.codec_id:
                if k > n:
                    raise DecodeError(f"ans: randk k={k} exceeds the tensor size {n}")
                r.u64("seed")
            else:
                decode_indices(r, k, n)
            self.sparse_head = bytes(r.buf[start : r.pos])
            self.value_id = int(r.unpack("H", "value codec id")[0])
            if self.value_id not in _VALUE_IDS:
                raise DecodeError(
                    f"ans: value codec id {self.value_id} is not a value codec with symbols; "
                    f"expected one of {_VALUE_IDS}"
                )
            n = k
        elif self.inner_id not in (*_VALUE_IDS, *_INLINE_SPARSE_IDS):
            raise DecodeError(
                f"ans: inner codec id {self.inner_id} is not one ans codes "
                f"(expected one of {(*_VALUE_IDS, *_INLINE_SPARSE_IDS, *_SPARSE_IDS)})"
            )
        self.prefix, bits, n = _symbol_prefix(self.value_id, r, n, "ans")
        return n, bits


def _rebuild(body: memoryview, header: FrameHeader) -> bytes:
    r = Reader(body, "ans body")
    cur = _Cursor(r, header)
    n, bits = cur.values_geometry()
    values_body = cur.prefix + _decode_symbols(r, bits, n)
    if cur.inner_id in _SPARSE_IDS:
        vframe = build_frame(cur.value_id, torch.float32, (n,), values_body)
        inner_body = cur.sparse_head + _U32.pack(len(vframe)) + vframe
    else:
        inner_body = values_body
    return build_frame(cur.inner_id, header.dtype, header.shape, inner_body)
