"""The codec contract: ``encode(tensor, *, rng=None) -> bytes`` and ``decode(bytes) -> tensor``.

A codec is stateless. Everything a receiver needs (scales, indices, seeds, bit widths, shape) is in
the payload, so :func:`decode` needs only the bytes and a registry lookup by the header's codec id.
State that lives across rounds (error-feedback residuals, PowerSGD's Q) belongs to the caller
(see ``fedsqueeze.feedback``).

Non-finite input (NaN or +-Inf) is rejected with :class:`~fedsqueeze.errors.EncodeError` by every
codec except ``raw``, which stores bytes verbatim: a lossy codec fed NaN would otherwise emit a payload
that silently decodes to garbage.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import torch

from fedsqueeze.errors import DecodeError, EncodeError
from fedsqueeze.wire.frame import FrameHeader, build_frame, parse_frame

if TYPE_CHECKING:
    from fedsqueeze.codecs.spec import SpecArgs

Stage = Literal["values", "sparsifier", "lossless"]
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class Codec(ABC):
    """Base class of every codec. Subclasses implement ``_encode_body`` and ``_decode_body``.

    Class attributes
    ----------------
    codec_id: the stable number written in the frame header (never reuse one).
    name: the spec-string name (``"uniform"``, ``"topk"``, ...).
    stage: where it may sit in a chain: ``values`` (dense/value coder), ``sparsifier``, ``lossless``.
    """

    codec_id: ClassVar[int]
    name: ClassVar[str]
    stage: ClassVar[Stage] = "values"
    #: True when decode(encode(x)) == x bit for bit (for float32 input).
    lossless: bool = False
    #: True when E[decode(encode(x, rng))] == x over the codec's own randomness.
    unbiased: bool = False
    #: True when payloads of several clients can be summed without decoding each one.
    summable: bool = False
    #: True when the codec draws random numbers (a ``rng`` makes it reproducible).
    stochastic: bool = False

    # ------------------------------------------------------------------ public API
    def encode(self, x: torch.Tensor, *, rng: torch.Generator | None = None) -> bytes:
        """Encode one tensor into a self-describing payload (header + body)."""
        t = self._check_input(x)
        flat = t.detach().reshape(-1).to(device="cpu", dtype=torch.float32).contiguous()
        body = self._encode_body(flat, rng)
        return build_frame(self.codec_id, t.dtype, tuple(t.shape), body)

    def decode(self, payload: bytes | bytearray | memoryview) -> torch.Tensor:
        """Decode any fedsqueeze frame (the codec is looked up from the payload's header)."""
        return decode(payload)

    @classmethod
    def from_spec(cls, args: SpecArgs, **stages: Any) -> Codec:
        """Build from a parsed spec stage (``values=`` / ``inner=`` carry neighbouring stages)."""
        raise NotImplementedError(f"{cls.__name__} cannot be built from a spec string")

    @property
    def spec(self) -> str:
        """Canonical spec string; ``parse_spec(c.spec)`` rebuilds an equivalent codec."""
        return self.name

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.spec!r} id={self.codec_id}>"

    # ------------------------------------------------------------------ hooks
    @abstractmethod
    def _encode_body(
        self, flat: torch.Tensor, rng: torch.Generator | None
    ) -> bytes | Sequence[bytes | memoryview]:
        """Encode a flat, contiguous float32 CPU tensor into the body (bytes or parts to join)."""

    @classmethod
    @abstractmethod
    def _decode_body(cls, body: memoryview, header: FrameHeader) -> torch.Tensor:
        """Rebuild the flat float32 tensor of ``header.numel`` entries from the body alone."""

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            if isinstance(x, np.ndarray):
                x = torch.from_numpy(x)
            else:
                raise EncodeError(f"{self.name}: expected a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in FLOAT_DTYPES:
            raise EncodeError(
                f"{self.name}: expected a floating-point tensor ({', '.join(map(str, FLOAT_DTYPES))}),"
                f" got {x.dtype}; integer and bool tensors go through the lossless 'raw' codec"
            )
        # Fast path: a finite sum proves every entry finite (NaN/Inf propagate); an overflowing
        # sum of finite values just falls through to the exact (slower) check.
        if x.numel() and not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).sum())
            raise EncodeError(
                f"{self.name}: input has {bad} non-finite entries (NaN or Inf) out of {x.numel()}; "
                "fedsqueeze refuses to encode them (find the diverging client, or clip the update)"
            )
        return x


def decode(payload: bytes | bytearray | memoryview) -> torch.Tensor:
    """Decode any single-tensor frame, whatever codec produced it.

    Raises :class:`~fedsqueeze.errors.DecodeError` (or a subclass) on any malformed input.
    """
    from fedsqueeze.codecs.registry import codec_class

    header, body = parse_frame(payload)
    cls = codec_class(header.codec_id)
    flat = decode_body(cls, body, header)
    return flat.reshape(header.shape).to(header.dtype)


def decode_body(cls: type[Codec], body: memoryview, header: FrameHeader) -> torch.Tensor:
    """Run a codec's body decoder and check that it produced exactly ``header.numel`` entries."""
    try:
        flat = cls._decode_body(body, header)
    except DecodeError:
        raise
    except (ValueError, IndexError, OverflowError, MemoryError, RuntimeError) as exc:
        # A parser bug must still surface as a DecodeError, never as a crash deep in NumPy.
        raise DecodeError(f"{cls.name}: malformed body ({type(exc).__name__}: {exc})") from exc
    if flat.numel() != header.numel:
        raise DecodeError(
            f"{cls.name}: body decodes to {flat.numel()} entries, header shape {header.shape} "
            f"needs {header.numel}"
        )
    return flat


def decode_nested(buf: memoryview, context: str) -> tuple[FrameHeader, torch.Tensor]:
    """Decode a frame embedded inside another codec's body (e.g. the values of a sparse payload)."""
    from fedsqueeze.codecs.registry import codec_class

    header, body = parse_frame(buf)
    cls = codec_class(header.codec_id)
    if cls.stage != "values":
        raise DecodeError(f"{context}: nested frame uses codec {cls.name!r}, which cannot code values")
    return header, decode_body(cls, body, header)


def random_seed(rng: torch.Generator | None) -> int:
    """Draw a 63-bit seed from ``rng`` (or torch's global generator)."""
    return int(torch.randint(0, 2**63 - 1, (1,), generator=rng, dtype=torch.int64).item())
