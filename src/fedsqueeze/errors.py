"""Exception hierarchy: every error fedsqueeze raises on purpose derives from :class:`FedSqueezeError`.

Messages follow one rule: say what was expected, what came, and how to fix it.
"""

from __future__ import annotations


class FedSqueezeError(Exception):
    """Root of all fedsqueeze errors; catch this to handle any of them."""


class ConfigError(FedSqueezeError, ValueError):
    """A configuration, codec spec or parameter is invalid (raised before any work starts)."""


class DecodeError(FedSqueezeError, ValueError):
    """Bytes that should be a fedsqueeze payload are not valid (truncated, corrupted, absurd)."""


class UnsupportedVersion(DecodeError):
    """A payload was written with a wire-format version this build cannot read."""


class UnknownCodec(DecodeError):
    """A payload names a codec id that is not registered in this build."""


class EncodeError(FedSqueezeError, ValueError):
    """A tensor cannot be encoded as asked (non-finite values, unsupported dtype, out of range)."""
