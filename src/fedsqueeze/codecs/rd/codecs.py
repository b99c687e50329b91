"""Rate-distortion codecs: fitted-law Lloyd–Max (``lloydmax``), M22 (``m22``), the M22 authors'
double-Weibull baseline (``weibull_lloyd``) and TinyScript's unbiased quantizer (``tinyscript``).

All four fit a law (GenNorm or double Weibull: shape and scale, or the scale alone when the shape
is fixed) to the tensor and quantize with a codebook designed on it
(:mod:`fedsqueeze.codecs.rd.design`). The three Lloyd–Max codecs send the law's parameters, not the
codebook: the receiver **rebuilds** the codebook from ``(law, shape, M, bits)`` with the same
deterministic design (cached), so the side information is 14 bytes whatever ``bits`` is. TinyScript
sends its knobs (``2 * (2**(bits-1) - 2)`` bytes) because its design is not needed to decode.

Quantizer section (``lloydmax`` body, ``weibull_lloyd`` body, tail of the ``m22`` body)::

    law u8 (1 = gennorm, 2 = dweibull; | 0x80 = codebook sent) | bits u8 (1..8)
    | shape u16 (β or c, in 1/1000; 100..20000) | M u16 (in 1/100; 0..1600) | loc f32 | scale f32 (>= 0)
    | codebook: 2**bits x f32, only with the 0x80 flag | codes: n x bits, ``pack_uint``

    rebuilt (default):   x_hat = float32(loc + scale * centers)[code],
                         centers = design(law, shape/1000, M/100, bits).centers
    sent (codebook=send): x_hat = codebook[code]   (the same float32 table, computed by the encoder)

``scale`` is the standard deviation of the fitted law (not the sample standard deviation): the
law is fitted by maximum likelihood on ``(x - loc) / rms`` (profile likelihood over the shape with
a closed-form scale, see :func:`~fedsqueeze.codecs.rd.design.fit_gennorm`), and the codebook is
designed for the unit-variance law of that shape. ``loc`` is the mean for ``lloydmax`` and
``weibull_lloyd`` (so ``M`` weighs ``|x - mean|^M``) and exactly 0 for ``m22`` (its kept entries
are the large ones of both signs; a symmetric codebook around 0 keeps every sign and weighs the true
magnitude ``|x|^M``). A constant tensor has ``scale = 0`` and decodes exactly to ``loc``.
Size: ``14 + ceil(n * bits / 8)`` bytes, plus ``4 * 2**bits`` with ``codebook=send``.

Bodies::

    lloydmax, weibull_lloyd:  quantizer section (n = numel)
    m22:         k u32 | index section (``sparse.encode_indices``: bitmap or delta+Rice) |
                 quantizer section (n = k, loc = 0)
    tinyscript:  bits u8 (2..8) | scale f32 (= max|x|) | (L - 2) x knob u16 | codes: n x bits
                 L = 2**(bits-1) magnitude knobs q_0 = 0 < q_1 < ... < q_{L-1} = 1, interior ones
                 sent as q_i = v_i / 65535 (v_i strictly increasing in 1..65534);
                 code = level << 1 | sign (sign 1 = negative); x_hat = ±scale * q_level

``m22`` keeps the ``k`` largest ``|x|`` (ties to the lower index, like ``topk``) and quantizes them
inline, without a nested frame (26 bytes less than ``topk > lloydmax`` per tensor). Its size is
``4 + index section + 14 + ceil(k * bits / 8)`` bytes plus the frame header. For M22's *global*
Top-K over a whole model, use :func:`global_topk_counts` / :func:`encode_state_dict_m22`.

An empty tensor's body is the parameter part alone (14 bytes, or ``5 + 2 (L - 2)`` for
``tinyscript``, whose size is otherwise ``5 + 2 (L - 2) + ceil(n * bits / 8)``).

*Reproducibility.* The encoder designs on exactly the rounded parameters it writes, so both ends use
the same cached codebook. A receiver on another machine recomputes it with its own scipy; the design
is deterministic, but the float32 table ``loc + scale * centers`` differs if that scipy's incomplete
gamma (or its inverse, which seeds the iteration) differs in the last float64 bits *and* that flips a
float32 rounding. ``codebook=send`` (``lloydmax``, ``m22``, ``weibull_lloyd``) removes the risk: the
encoder writes the float32 table it quantized with (``2**bits x 4`` bytes, counted in the payload,
flag ``0x80`` in the law byte) and the receiver decodes with it, running no design and no scipy at
all; on the encoder's machine both forms decode to identical values. The default stays ``rebuild``
(the wire format of payloads without the flag is unchanged): the table is 32 bytes at 3 bits but
1 KiB at 8 bits, negligible for a 10^5-entry tensor (+0.09% at 3 bits) but not for the many small
ones of a model (a 100-entry bias at 3 bits is a 74-byte payload, 106 with the codebook).
Use ``send`` when peers may run different scipy builds and bit-exact agreement matters (e.g. error
feedback whose memory must match the server's decode exactly).

Decoding trusts nothing: law ids, bit widths, shape and ``M`` ranges, finite ``loc``/``scale``,
reconstructions inside float32's range, a sent codebook's values (finite, non-decreasing), strictly
increasing knobs and every section length are checked, and any violation is a
:class:`~fedsqueeze.errors.DecodeError`.

The parts of each body before its codes are read by :func:`read_quantizer_head`,
:func:`read_m22_head` and :func:`read_tinyscript_head`, shared by the decoders and by the ``ans``
entropy stage (which keeps them verbatim and entropy-codes the codes).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from fedsqueeze.codecs import select
from fedsqueeze.codecs.base import FLOAT_DTYPES, Codec
from fedsqueeze.codecs.identity import Raw
from fedsqueeze.codecs.rd import design as rd
from fedsqueeze.codecs.registry import register
from fedsqueeze.codecs.sparse import _fmt_ratio, _k_for, _ratio_or_k, decode_indices, encode_indices
from fedsqueeze.codecs.spec import SpecArgs, parse_number
from fedsqueeze.errors import ConfigError, DecodeError, EncodeError
from fedsqueeze.wire.bits import Reader, pack_uint, packed_nbytes, unpack_uint
from fedsqueeze.wire.container import encode_container
from fedsqueeze.wire.frame import FrameHeader

LAW_IDS: dict[str, int] = {"gennorm": 1, "dweibull": 2}
_FAMILY_BY_ID = {v: k for k, v in LAW_IDS.items()}
_QPARAMS = struct.Struct("<BBHHff")  # law, bits, shape (milli), M (centi), loc, scale: 14 bytes
#: Set in the law byte when the float32 codebook (2**bits x f32) follows the 14 parameter bytes.
CODEBOOK_FLAG = 0x80
#: ``codebook=`` spec values: the receiver rebuilds the codebook (default) or reads it from the payload.
CODEBOOK_MODES = ("rebuild", "send")
_F32_MAX = float(np.finfo(np.float32).max)
_DEFAULT_SHAPE = {"gennorm": 2.0, "dweibull": 1.0}


# ---------------------------------------------------------------------------- quantizer section
@dataclass(frozen=True)
class _Quantizer:
    """What a Lloyd–Max codec is configured with: law family, fixed shape (None = fit), M, bits."""

    family: str
    shape: float | None
    M: float
    bits: int
    send_codebook: bool = False


@dataclass(frozen=True)
class QuantizerHead:
    """The validated parameters of a quantizer section: everything before its codes."""

    family: str
    bits: int
    shape: float
    M: float
    loc: float
    scale: float
    #: the float32 codebook carried by the section (``codebook=send``), else None (rebuilt)
    codebook: npt.NDArray[np.float32] | None


def read_quantizer_head(
    r: Reader, context: str, *, family: str | None = None, M: float | None = None
) -> QuantizerHead:
    """Read and validate a quantizer section's parameters (and codebook, when sent) up to the codes.

    ``family``/``M`` pin what a codec allows; every violation is a :class:`DecodeError`.
    """
    law_byte, bits, shape_milli, m_centi, loc, scale = r.unpack("BBHHff", "quantizer parameters")
    sent = bool(int(law_byte) & CODEBOOK_FLAG)
    law_id = int(law_byte) & ~CODEBOOK_FLAG
    bits, shape_milli, m_centi = int(bits), int(shape_milli), int(m_centi)
    loc, scale = float(loc), float(scale)
    fam = _FAMILY_BY_ID.get(law_id)
    if fam is None:
        raise DecodeError(
            f"{context}: unknown law id {law_id}; expected 1 (gennorm) or 2 (dweibull), "
            f"plus {CODEBOOK_FLAG:#x} when the codebook is sent"
        )
    if family is not None and fam != family:
        raise DecodeError(f"{context}: law {fam!r} where this codec always uses {family!r}")
    if not rd.MIN_BITS <= bits <= rd.MAX_BITS:
        raise DecodeError(f"{context}: bits={bits} outside {rd.MIN_BITS}..{rd.MAX_BITS}")
    shape = shape_milli / 1000.0
    if not rd.MIN_SHAPE <= shape <= rd.MAX_SHAPE:
        raise DecodeError(f"{context}: shape {shape:g} outside [{rd.MIN_SHAPE:g}, {rd.MAX_SHAPE:g}]")
    m_val = m_centi / 100.0
    if m_val > rd.MAX_M or (M is not None and m_val != M):
        raise DecodeError(f"{context}: M={m_val:g} is out of range or not what this codec uses")
    if not (math.isfinite(loc) and math.isfinite(scale)) or scale < 0:
        raise DecodeError(f"{context}: loc={loc!r}, scale={scale!r} must be finite with scale >= 0")
    codebook = None
    if sent:
        raw = r.take(4 << bits, f"codebook of {1 << bits} float32 levels")
        codebook = np.frombuffer(raw, dtype="<f4").astype(np.float32)
        if not np.isfinite(codebook).all() or bool(np.any(np.diff(codebook) < 0)):
            raise DecodeError(f"{context}: the sent codebook must be finite and non-decreasing")
    return QuantizerHead(fam, bits, shape, m_val, loc, scale, codebook)


def _reconstruction_table(family: str, shape: float, M: float, bits: int, loc: float, scale: float) -> Any:
    """``float32(loc + scale * centers)``, computed identically on both ends; None if it overflows."""
    if scale == 0.0:
        return np.full(1 << bits, loc, np.float32)
    centers = rd.design(family, shape, M, bits).centers
    table = np.float64(loc) + np.float64(scale) * centers
    if not np.all(np.abs(table) < _F32_MAX):
        return None
    return table.astype(np.float32)


def _encode_section(
    values: npt.NDArray[np.float32], q: _Quantizer, *, center: bool, context: str
) -> list[bytes]:
    """Fit, design and quantize ``values`` -> ``[params, packed codes]`` (layout in module doc)."""
    n = values.size
    if n == 0:
        shape0 = q.shape if q.shape is not None else _DEFAULT_SHAPE[q.family]
        return [_pack_head(q, shape0, 0.0, 0.0)]
    x = values.astype(np.float64)
    if not np.isfinite(x).all():  # finite float64 input that overflowed the float32 cast
        raise EncodeError(f"{context}: entries beyond float32's range; scale the tensor down")
    loc = float(np.float32(x.mean())) if center else 0.0
    y = x - loc if center else x
    rms = math.sqrt(float(np.mean(y * y)))
    if not math.isfinite(rms):  # only reachable with values near float32's limits
        raise EncodeError(f"{context}: the tensor's spread overflows; scale it down")
    fit = rd.fit_law(q.family, y / rms, q.shape) if rms > 0 else None
    scale = float(np.float32(fit.std * rms)) if fit is not None else 0.0
    if not math.isfinite(scale):
        raise EncodeError(f"{context}: fitted scale {fit.std * rms if fit else 0!r} overflows float32")
    if fit is None or scale == 0.0:  # constant tensor (or a spread below float32's smallest number)
        shape0 = q.shape if q.shape is not None else _DEFAULT_SHAPE[q.family]
        codes = np.zeros(n, np.uint8)
        return [_pack_head(q, shape0, loc, 0.0), pack_uint(codes, q.bits)]
    table = _reconstruction_table(q.family, fit.shape, q.M, q.bits, loc, scale)
    if table is None:
        raise EncodeError(
            f"{context}: the codebook scaled to this tensor exceeds float32's range; scale the tensor down"
        )
    thresholds = rd.design(q.family, fit.shape, q.M, q.bits).thresholds
    z = torch.from_numpy(y / scale)
    codes_t = torch.bucketize(z, torch.tensor(thresholds, dtype=torch.float64))
    codes = codes_t.numpy().astype(np.uint8)
    return [_pack_head(q, fit.shape, loc, scale, table), pack_uint(codes, q.bits)]


def _pack_head(q: _Quantizer, shape: float, loc: float, scale: float, table: Any = None) -> bytes:
    """The 14 parameter bytes, then (``codebook=send``) the float32 table the codes index."""
    law = LAW_IDS[q.family] | (CODEBOOK_FLAG if q.send_codebook else 0)
    params = _QPARAMS.pack(law, q.bits, round(shape * 1000), round(q.M * 100), loc, scale)
    if not q.send_codebook:
        return params
    if table is None:  # scale = 0: every level is loc (no design needed)
        table = _reconstruction_table(q.family, shape, q.M, q.bits, loc, 0.0)
    return params + np.asarray(table, dtype="<f4").tobytes()


def _decode_section(
    r: Reader, n: int, context: str, *, family: str | None = None, M: float | None = None
) -> torch.Tensor:
    """Read a quantizer section of ``n`` values; ``family``/``M`` pin what a codec allows."""
    return _decode_codes(r, n, read_quantizer_head(r, context, family=family, M=M), context)


def _decode_codes(r: Reader, n: int, head: QuantizerHead, context: str) -> torch.Tensor:
    """Read the ``n`` codes after ``head`` and map them through the sent or rebuilt codebook."""
    if n == 0:
        return torch.zeros(0)
    packed = r.take(packed_nbytes(n, head.bits), f"{n} codes of {head.bits} bits")
    table = head.codebook
    if table is None:
        table = _reconstruction_table(head.family, head.shape, head.M, head.bits, head.loc, head.scale)
    if table is None:
        raise DecodeError(f"{context}: loc/scale put the codebook outside float32's range")
    codes = unpack_uint(packed, head.bits, n)
    return torch.from_numpy(table[codes])


def _law_args(args: SpecArgs) -> tuple[str, float | None]:
    law = args.choice("law", tuple(rd.LAWS), "gennorm")
    raw = args.optional("shape")
    shape = None if raw is None else parse_number(raw, f"codec stage {args.stage!r}: shape")
    return law, shape


def _resolve_law(name: str, law: str, shape: float | None) -> tuple[str, str, float | None]:
    """``(law name, family, fixed shape or None = fitted)``; ConfigError names the codec."""
    key = str(law).lower()
    try:
        if key not in rd.LAWS:
            rd.canonical_law(key)  # raises, suggesting the nearest law name
        family, fixed = rd.LAWS[key]
        if fixed is not None:
            rd.canonical_law(key, shape)  # gaussian/laplace with another shape is an error
        elif shape is not None:
            fixed = rd.check_shape(family, shape)
    except ConfigError as exc:
        raise ConfigError(f"{name}: {exc}") from None
    return key, family, fixed


def _law_suffix(law: str, shape: float | None) -> str:
    s = f",law={law}"
    if shape is not None and rd.LAWS[law][1] is None:
        s += f",shape={shape:g}"
    return s


def _send_codebook(name: str, codebook: str) -> bool:
    """``codebook=`` -> whether the float32 codebook travels in the payload (ConfigError names the codec)."""
    if codebook not in CODEBOOK_MODES:
        raise ConfigError(
            f"{name}: codebook={codebook!r} is invalid; expected 'rebuild' (the receiver designs it, "
            "the default) or 'send' (4 * 2**bits bytes in the payload, decoded without scipy)"
        )
    return codebook == "send"


def _codebook_suffix(send: bool) -> str:
    return ",codebook=send" if send else ""


# ---------------------------------------------------------------------------- lloydmax
@register
class LloydMax(Codec):
    """Lloyd–Max quantizer designed on a law fitted to the tensor (module docstring).

    ``bits`` (1..8) first; then ``M`` (0 = MSE; larger values spend levels on large entries) and
    ``law`` (``gennorm`` fits the shape β, ``dweibull`` fits c, ``gaussian``/``laplace`` fix
    β = 2/1; ``shape=`` fixes it for gennorm/dweibull). ``codebook=send`` puts the float32
    codebook in the payload (``4 * 2**bits`` bytes) so the receiver decodes without redesigning it.
    Biased and deterministic. Spec: ``lloydmax:3,law=gennorm,M=2`` (``,codebook=send``).
    """

    codec_id = 64
    name = "lloydmax"

    def __init__(
        self,
        bits: int = 3,
        *,
        law: str = "gennorm",
        shape: float | None = None,
        M: float = 0.0,
        codebook: str = "rebuild",
    ) -> None:
        try:
            self.bits = rd.check_bits(bits)
            self.M = rd.check_m(M)
        except ConfigError as exc:
            raise ConfigError(f"{self.name}: {exc}") from None
        self.law, family, fixed = _resolve_law(self.name, law, shape)
        self.shape = fixed
        self.send_codebook = _send_codebook(self.name, codebook)
        self._q = _Quantizer(family, fixed, self.M, self.bits, self.send_codebook)

    @classmethod
    def from_spec(cls, args: SpecArgs, **_: Any) -> Codec:
        bits = args.int("bits", 3, positional=True, lo=rd.MIN_BITS, hi=rd.MAX_BITS)
        law, shape = _law_args(args)
        m_val = args.float("m", 0.0)
        codebook = args.choice("codebook", CODEBOOK_MODES, "rebuild")
        args.finish()
        return cls(bits, law=law, shape=shape, M=m_val, codebook=codebook)

    @property
    def spec(self) -> str:
        return (
            f"{self.name}:{self.bits}{_law_suffix(self.law, self.shape)},M={self.M:g}"
            f"{_codebook_suffix(self.send_codebook)}"
        )

    def _encode_body(self, flat: torch.Tensor, rng: torch.Generator | None) -> list[bytes]:
        return _encode_section(flat.numpy(), self._q, center=True, context=self.name)

    @classmethod
    def _decode_body(cls, body: memoryview, header: FrameHeader) -> torch.Tensor:
        r = Reader(body, f"{cls.name} body")
        out = _decode_section(r, header.numel, cls.name)
        r.expect_end()
        return out


@register
class WeibullLloyd(Codec):
    """Double-Weibull fit + MSE Lloyd–Max (``M = 0``): the M22 authors' "TinyScript-style" baseline.

    Same body as ``lloydmax`` with the law pinned to ``dweibull`` and ``M`` to 0 (the decoder
    rejects anything else). Not TinyScript's own quantizer, which is ``tinyscript``.
    Spec: ``weibull_lloyd:3`` (``,codebook=send`` as for ``lloydmax``).
    """

    codec_id = 66
    name = "weibull_lloyd"

    def __init__(self, bits: int = 3, *, codebook: str = "rebuild") -> None:
        try:
            self.bits = rd.check_bits(bits)
        except ConfigError as exc:
            raise ConfigError(f"{self.name}: {exc}") from None
        self.send_codebook = _send_codebook(self.name, codebook)
        self._q = _Quantizer("dweibull", None, 0.0, self.bits, self.send_codebook)

    @classmethod
    def from_spec(cls, args: SpecArgs, **_: Any) -> Codec:
        bits = args.int("bits", 3, positional=True, lo=rd.MIN_BITS, hi=rd.MAX_BITS)
        codebook = args.choice("codebook", CODEBOOK_MODES, "rebuild")
        args.finish()
        return cls(bits, codebook=codebook)

    @property
    def spec(self) -> str:
        return f"{self.name}:{self.bits}{_codebook_suffix(self.send_codebook)}"

    def _encode_body(self, flat: torch.Tensor, rng: torch.Generator | None) -> list[bytes]:
        return _encode_section(flat.numpy(), self._q, center=True, context=self.name)

    @classmethod
    def _decode_body(cls, body: memoryview, header: FrameHeader) -> torch.Tensor:
        r = Reader(body, f"{cls.name} body")
        out = _decode_section(r, header.numel, cls.name, family="dweibull", M=0.0)
        r.expect_end()
        return out


# ---------------------------------------------------------------------------- m22
@register
class M22(Codec):
    """M22: Top-K, then a GenNorm-fitted, ``|x|^M``-weighted Lloyd–Max quantizer on the kept values.

    Keep ``k = max(1, round(ratio * d))`` entries (or ``k`` given; ``k = 0`` sends nothing), code
    their positions like ``topk`` and their values at ``bits`` bits. To meet a budget of ``P``
    value bits per coordinate, as the paper does, use ``ratio = P / bits`` (positions cost extra
    and are counted). Biased (pair with error feedback); deterministic. Identity: ``M = 0`` with
    ``law=gaussian`` is Top-K followed by the classical Lloyd–Max quantizer.
    Spec: ``m22:10%,bits=2,M=2`` (defaults ``bits=2``, ``M=2``, ``law=gennorm``; ``codebook=send``
    as for ``lloydmax``).
    """

    codec_id = 65
    name = "m22"
    stage = "sparsifier"

    def __init__(
        self,
        ratio: float | None = None,
        *,
        k: int | None = None,
        bits: int = 2,
        M: float = 2.0,
        law: str = "gennorm",
        shape: float | None = None,
        codebook: str = "rebuild",
    ) -> None:
        if (ratio is None) == (k is None):
            raise ConfigError("m22: give exactly one of a ratio (e.g. 'm22:10%') or k (e.g. 'm22:k=100')")
        if ratio is not None and not (math.isfinite(ratio) and 0.0 < ratio <= 1.0):
            raise ConfigError(f"m22: ratio must be in (0, 1] (e.g. 0.1 or 10%), got {ratio}")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
            raise ConfigError(f"m22: k must be an integer >= 0, got {k!r}")
        try:
            self.bits = rd.check_bits(bits)
            self.M = rd.check_m(M)
        except ConfigError as exc:
            raise ConfigError(f"m22: {exc}") from None
        self.ratio, self.k = ratio, k
        self.law, family, fixed = _resolve_law(self.name, law, shape)
        self.shape = fixed
        self.send_codebook = _send_codebook(self.name, codebook)
        self._q = _Quantizer(family, fixed, self.M, self.bits, self.send_codebook)

    @classmethod
    def from_spec(cls, args: SpecArgs, values: Codec | None = None, **_: Any) -> Codec:
        if values is not None:
            raise ConfigError(
                f"m22 quantizes its kept values itself; drop the value stage '{values.spec}' "
                "(or use 'topk:... > lloydmax:...' for a nested value codec)"
            )
        ratio, k = _ratio_or_k(args, "m22")
        bits = args.int("bits", 2, lo=rd.MIN_BITS, hi=rd.MAX_BITS)
        law, shape = _law_args(args)
        m_val = args.float("m", 2.0)
        codebook = args.choice("codebook", CODEBOOK_MODES, "rebuild")
        args.finish()
        return cls(ratio, k=k, bits=bits, M=m_val, law=law, shape=shape, codebook=codebook)

    @property
    def spec(self) -> str:
        return (
            f"m22:{_fmt_ratio(self.ratio, self.k)},bits={self.bits},M={self.M:g}"
            f"{_law_suffix(self.law, self.shape)}{_codebook_suffix(self.send_codebook)}"
        )

    def _encode_body(self, flat: torch.Tensor, rng: torch.Generator | None) -> list[bytes]:
        d = flat.numel()
        k = _k_for(d, self.ratio, self.k)
        idx = (
            select.topk_indices(flat, k).numpy().astype(np.int64, copy=False) if k else np.zeros(0, np.int64)
        )
        vals = flat.numpy()[idx]
        return [
            struct.pack("<I", k),
            encode_indices(idx, d),
            *_encode_section(vals, self._q, center=False, context=self.name),
        ]

    @classmethod
    def _decode_body(cls, body: memoryview, header: FrameHeader) -> torch.Tensor:
        r = Reader(body, "m22 body")
        d = header.numel
        k, idx, head = read_m22_head(r, d)
        vals = _decode_codes(r, k, head, cls.name)
        r.expect_end()
        out = torch.zeros(d, dtype=torch.float32)
        if k:
            out[torch.from_numpy(idx)] = vals
        return out


def read_m22_head(r: Reader, d: int) -> tuple[int, npt.NDArray[np.int64], QuantizerHead]:
    """Read an ``m22`` body up to its codes: ``(k, kept positions, quantizer head)``."""
    k = r.u32("kept count")
    idx = decode_indices(r, k, d)
    return k, idx, read_quantizer_head(r, M22.name)


def global_topk_counts(
    tensors: Mapping[str, torch.Tensor], ratio: float | None = None, *, k: int | None = None
) -> dict[str, int]:
    """Per-tensor kept counts of one Top-K over all floating-point tensors together (M22's global
    selection): the ``k`` (or ``round(ratio * total)``) largest ``|x|`` of the whole model, ties to
    the earlier tensor and lower index. Non-float tensors get 0 and are not counted in the total.
    """
    names = [n for n, t in tensors.items() if t.dtype in FLOAT_DTYPES]
    if not names:
        return dict.fromkeys(tensors, 0)
    flats = [tensors[n].detach().reshape(-1).to(device="cpu", dtype=torch.float32) for n in names]
    cat = torch.cat(flats)
    if not bool(torch.isfinite(cat).all()):
        raise EncodeError("global_topk_counts: the tensors hold NaN or Inf entries")
    if (ratio is None) == (k is None):
        raise ConfigError("global_topk_counts: give exactly one of ratio or k")
    if ratio is not None and not 0.0 < ratio <= 1.0:
        raise ConfigError(f"global_topk_counts: ratio must be in (0, 1], got {ratio}")
    if k is not None and k < 0:
        raise ConfigError(f"global_topk_counts: k must be >= 0, got {k}")
    total = _k_for(cat.numel(), ratio, k)
    idx = select.topk_indices(cat, total).numpy() if total else np.zeros(0, np.int64)
    bounds = np.cumsum([0] + [f.numel() for f in flats])
    per = np.diff(np.searchsorted(idx, bounds))
    counts = dict.fromkeys(tensors, 0)
    counts.update({n: int(c) for n, c in zip(names, per, strict=True)})
    return counts


def encode_state_dict_m22(
    state: Mapping[str, torch.Tensor],
    ratio: float | None = None,
    *,
    k: int | None = None,
    bits: int = 2,
    M: float = 2.0,
    law: str = "gennorm",
    shape: float | None = None,
    codebook: str = "rebuild",
) -> bytes:
    """A whole model update with M22's *global* Top-K: one container of ``m22`` frames (``k`` per
    tensor from :func:`global_topk_counts`, law fitted per tensor); non-float tensors go ``raw``.
    Decode with :func:`fedsqueeze.codecs.decode_state_dict`.
    """
    counts = global_topk_counts(state, ratio, k=k)
    raw = Raw()
    frames = {}
    for name, t in state.items():
        if t.dtype in FLOAT_DTYPES:
            m22 = M22(k=counts[name], bits=bits, M=M, law=law, shape=shape, codebook=codebook)
            frames[name] = m22.encode(t)
        else:
            frames[name] = raw.encode(t)
    return encode_container(frames)


# ---------------------------------------------------------------------------- tinyscript
_KNOB_ONE = 65535


def read_tinyscript_head(r: Reader) -> tuple[int, float, npt.NDArray[np.int64]]:
    """Read a ``tinyscript`` body up to its codes: ``(bits, scale, knobs 0 .. 65535 as integers)``."""
    bits, scale = r.unpack("Bf", "parameters")
    bits, scale = int(bits), float(scale)
    if not 2 <= bits <= 8:
        raise DecodeError(f"tinyscript: bits={bits} outside 2..8")
    if not math.isfinite(scale) or scale < 0:
        raise DecodeError(f"tinyscript: scale {scale!r} must be finite and >= 0")
    L = 1 << (bits - 1)
    v = np.frombuffer(r.take(2 * (L - 2), "knobs"), dtype="<u2").astype(np.int64)
    full = np.concatenate(([0], v, [_KNOB_ONE]))
    if not np.all(np.diff(full) > 0):
        raise DecodeError("tinyscript: knobs must be strictly increasing inside (0, 1)")
    return bits, scale, full


def _knob_codes(knobs: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
    """Interior knobs in (0, 1) -> strictly increasing integers in 1..65534."""
    m = knobs.size
    if m == 0:
        return np.zeros(0, np.int64)
    i = np.arange(1, m + 1)
    v = np.clip(np.rint(knobs * _KNOB_ONE).astype(np.int64), 1, _KNOB_ONE - 1)
    v = np.minimum(v, _KNOB_ONE - 1 - m + i)
    out: npt.NDArray[np.int64] = np.maximum.accumulate(v - i) + i
    return out


@register
class TinyScript(Codec):
    """TinyScript (Fu et al., ICML 2020): unbiased stochastic rounding on Weibull-optimised knobs.

    Magnitudes ``u = |x| / max|x|`` are fitted with a Weibull law (maximum likelihood; the same as a
    double-Weibull fit of ``x`` with location 0), ``L = 2**(bits-1)`` knobs on ``[0, 1]``
    minimise the expected rounding variance under it (:func:`~fedsqueeze.codecs.rd.design.design_knobs`),
    and each ``u`` rounds to one of its two neighbouring knobs with probabilities that make
    ``E[x_hat] = x``. The sign is a separate bit, so ``bits`` counts it (2..8; ``bits=2`` is
    ternary ``{0, ±max}``). The knobs travel in the payload (the receiver runs no design).
    Spec: ``tinyscript:4``.
    """

    codec_id = 67
    name = "tinyscript"
    unbiased = True
    stochastic = True

    def __init__(self, bits: int = 4) -> None:
        try:
            self.bits = rd.check_bits(bits, 2, 8)
        except ConfigError as exc:
            raise ConfigError(f"{self.name}: {exc} (one of the bits is the sign)") from None

    @classmethod
    def from_spec(cls, args: SpecArgs, **_: Any) -> Codec:
        bits = args.int("bits", 4, positional=True, lo=2, hi=8)
        args.finish()
        return cls(bits)

    @property
    def spec(self) -> str:
        return f"{self.name}:{self.bits}"

    def _encode_body(self, flat: torch.Tensor, rng: torch.Generator | None) -> list[bytes]:
        n = flat.numel()
        L = 1 << (self.bits - 1)
        x = flat.numpy().astype(np.float64)
        amax = float(np.max(np.abs(x))) if n else 0.0
        if not math.isfinite(amax):  # float64 input beyond float32's range
            raise EncodeError(f"{self.name}: entries beyond float32's range; scale the tensor down")
        inner = np.linspace(0.0, 1.0, L)[1:-1]
        if amax > 0:
            u = np.abs(x) / amax
            c, lam = rd.fit_weibull(u)
            c = float(np.clip(c, rd.MIN_SHAPE, rd.MAX_SHAPE))
            inner = np.asarray(rd.design_knobs(c, lam, L).knobs[1:-1])
        vcodes = _knob_codes(inner)
        head = struct.pack("<Bf", self.bits, amax) + vcodes.astype("<u2").tobytes()
        if n == 0:
            return [head]
        knobs = np.concatenate(([0.0], vcodes / _KNOB_ONE, [1.0]))
        if amax == 0:
            return [head, pack_uint(np.zeros(n, np.uint8), self.bits)]
        u = np.abs(x) / amax
        i = np.clip(np.searchsorted(knobs, u, side="right") - 1, 0, L - 2)
        lo, hi = knobs[i], knobs[i + 1]
        p = (u - lo) / (hi - lo)
        draw = torch.rand(n, generator=rng, dtype=torch.float64).numpy()
        level = i + (draw < p)
        sign = (x < 0) & (level > 0)
        codes = (level << 1) | sign.astype(np.int64)
        return [head, pack_uint(codes.astype(np.uint8), self.bits)]

    @classmethod
    def _decode_body(cls, body: memoryview, header: FrameHeader) -> torch.Tensor:
        r = Reader(body, "tinyscript body")
        bits, scale, full = read_tinyscript_head(r)
        n = header.numel
        if n == 0:
            r.expect_end()
            return torch.zeros(0)
        codes = unpack_uint(r.take(packed_nbytes(n, bits), f"{n} codes of {bits} bits"), bits, n)
        r.expect_end()
        table = (np.float64(scale) * (full / _KNOB_ONE)).astype(np.float32)
        mag = table[codes >> 1]
        out = np.where((codes & 1).astype(bool), -mag, mag).astype(np.float32)
        return torch.from_numpy(out)
