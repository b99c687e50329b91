"""Whole model updates: a ``state_dict`` to one container payload and back.

Floating-point tensors go through the chosen codec; every other tensor (integer counters, bool
masks) goes through the lossless ``raw`` codec, so names, shapes and dtypes all round-trip.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedsqueeze.codecs.base import FLOAT_DTYPES, Codec, decode
from fedsqueeze.codecs.identity import Raw
from fedsqueeze.wire.container import decode_container, encode_container


def encode_state_dict(
    state: Mapping[str, torch.Tensor], codec: Codec, *, rng: torch.Generator | None = None
) -> bytes:
    """Encode every tensor of ``state`` (in order) into one container payload.

    A codec with an ``encode_update(state, *, rng)`` method (the ``budget`` policy) encodes the
    whole update itself, so one byte budget covers the container (names, every frame).
    """
    whole = getattr(codec, "encode_update", None)
    if callable(whole):
        payload: bytes = whole(state, rng=rng)
        return payload
    raw = Raw()
    frames = {
        name: (codec if t.dtype in FLOAT_DTYPES else raw).encode(t, rng=rng) for name, t in state.items()
    }
    return encode_container(frames)


def decode_state_dict(payload: bytes | bytearray | memoryview) -> dict[str, torch.Tensor]:
    """Decode a container into ``{name: tensor}`` with the original shapes and dtypes."""
    return {name: decode(frame) for name, frame in decode_container(payload).items()}
