"""Codec registry: stable wire ids and spec names -> codec classes.

Wire ids are part of the format: never renumber or reuse one. Ranges:
1-15 casts/identity, 16-31 quantizers, 32-47 sparsifiers, 48-63 lossless stages,
64+ reserved for rate-distortion, low-rank and sketching codecs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

from fedsqueeze.errors import UnknownCodec

if TYPE_CHECKING:
    from fedsqueeze.codecs.base import Codec

_BY_ID: dict[int, type[Codec]] = {}
_BY_NAME: dict[str, type[Codec]] = {}

C = TypeVar("C", bound="type[Codec]")


def register(cls: C) -> C:
    """Class decorator: add a codec class under its ``codec_id`` and ``name``."""
    cid = cls.codec_id
    name = cls.name
    if cid in _BY_ID and _BY_ID[cid] is not cls:
        raise RuntimeError(f"codec id {cid} already used by {_BY_ID[cid].__name__}")
    if name in _BY_NAME and _BY_NAME[name] is not cls:
        raise RuntimeError(f"codec name {name!r} already used by {_BY_NAME[name].__name__}")
    _BY_ID[cid] = cls
    _BY_NAME[name] = cls
    return cls


def _ensure_loaded() -> None:
    import fedsqueeze.codecs  # noqa: F401  (registers the built-in codecs)


def codec_class(codec_id: int) -> type[Codec]:
    """Class for a wire id; :class:`~fedsqueeze.errors.UnknownCodec` if none is registered."""
    _ensure_loaded()
    try:
        return _BY_ID[codec_id]
    except KeyError:
        known = ", ".join(f"{i}={c.name}" for i, c in sorted(_BY_ID.items()))
        raise UnknownCodec(
            f"unknown codec id {codec_id}; this build knows {known}. The payload may come from a "
            "newer fedsqueeze or carry a plugin codec that is not installed here"
        ) from None


def codec_name_for_id(codec_id: int) -> str | None:
    """Spec name for a wire id, or None if unknown (used by ``inspect``)."""
    _ensure_loaded()
    cls = _BY_ID.get(codec_id)
    return None if cls is None else cls.name


def class_by_name(name: str) -> type[Codec] | None:
    """Codec class registered under a spec name, or None."""
    _ensure_loaded()
    return _BY_NAME.get(name)


def names() -> list[str]:
    """All registered spec names, sorted."""
    _ensure_loaded()
    return sorted(_BY_NAME)


def all_ids() -> dict[int, str]:
    """``{wire id: spec name}`` for every registered codec."""
    _ensure_loaded()
    return {i: c.name for i, c in sorted(_BY_ID.items())}
