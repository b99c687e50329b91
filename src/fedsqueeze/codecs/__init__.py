"""Codecs: tensors to self-describing payloads of real bytes and back.

Use :func:`parse_spec` to build one from a spec string, :func:`decode` to decode any payload, and
:func:`encode_state_dict` / :func:`decode_state_dict` for a whole model update.
"""

from fedsqueeze.codecs import (  # noqa: F401  (registration)
    budget,
    entropy,
    fp8,
    identity,
    lossless,
    lowrank,
    qsgd,
    rd,
    sketch,
    sparse,
    uniform,
)
from fedsqueeze.codecs.base import Codec, decode
from fedsqueeze.codecs.model import decode_state_dict, encode_state_dict
from fedsqueeze.codecs.spec import parse_spec

__all__ = ["Codec", "decode", "decode_state_dict", "encode_state_dict", "parse_spec"]
