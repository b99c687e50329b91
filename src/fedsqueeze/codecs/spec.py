"""Codec spec strings: a short text form of a codec, for the command line and config files.

Grammar (case-insensitive, spaces ignored)::

    spec  := stage ( SEP stage )*          SEP := ">"  |  "->"  |  "then"
    stage := name [ ":" arg ( "," arg )* ]
    arg   := value | key "=" value          value: 8, 0.01, 1%, true/false, e4m3 ...

Stages run left to right on the sender and unwind right to left on the receiver, in this order:
an optional **sparsifier** (``topk``, ``randk``, ``threshold``), then an optional **value coder**
(``fp32``, ``fp16``, ``bf16``, ``uniform``, ``qsgd``) applied to the kept values, then an optional
**lossless** stage (``zstd``). Examples::

    fp16                         half-precision cast
    uniform:8                    8-bit min-max quantization (one scale for the tensor)
    uniform:4,stochastic=true,block=256
    qsgd:s=15,bucket=512,coding=elias
    topk:1%                      keep the 1% largest |x| (values in fp32)
    topk:k=100 > uniform:4       top-100, kept values quantized to 4 bits
    randk:10%                    Rand-K, indices regenerated from a seed, values scaled d/k
    threshold:0.5 > fp16 > zstd
    Top-1% then 4-bit            friendly aliases: "top-P%", "rand-P%", "N-bit", "Nbit"

A **policy** stage first (``budget``, whose class sets ``takes_template``) receives everything
after it as a *template* it sizes to a byte budget, e.g. ``budget:bits=0.6 > m22:bits=2,M=2``
(see :mod:`fedsqueeze.codecs.budget`); the stage-order rule then applies inside the template.
"""

from __future__ import annotations

import difflib
import re

from fedsqueeze.codecs.base import Codec
from fedsqueeze.errors import ConfigError

_SEP = re.compile(r"\s*(?:->|>|\bthen\b)\s*", re.IGNORECASE)
_ALIASES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^top-?(\d[\d.]*%?)$"), r"topk:\1"),
    (re.compile(r"^rand(?:om)?-?(\d[\d.]*%?)$"), r"randk:\1"),
    (re.compile(r"^(\d+)-?bits?$"), r"uniform:\1"),
]


class SpecArgs:
    """Arguments of one stage, consumed by a codec's ``from_spec`` with typed getters.

    Every getter validates and raises :class:`ConfigError` naming the stage and the argument.
    :meth:`finish` rejects anything left over and suggests the nearest known key.
    """

    def __init__(self, stage: str, positional: list[str], keywords: dict[str, str]) -> None:
        self.stage = stage
        self.positional = positional
        self.keywords = keywords
        self.known: list[str] = []

    def _raw(self, key: str, positional: bool) -> str | None:
        self.known.append(key)
        if key in self.keywords:
            return self.keywords.pop(key)
        if positional and self.positional:
            return self.positional.pop(0)
        return None

    def _err(self, key: str, raw: str, expected: str) -> ConfigError:
        return ConfigError(f"codec stage {self.stage!r}: {key}={raw!r} is invalid; expected {expected}")

    def int(
        self,
        key: str,
        default: int | None = None,
        *,
        positional: bool = False,
        lo: int | None = None,
        hi: int | None = None,
    ) -> int:
        raw = self._raw(key, positional)
        if raw is None:
            if default is None:
                raise ConfigError(f"codec stage {self.stage!r} needs {key}=<integer>")
            return default
        try:
            val = int(raw)
        except ValueError:
            raise self._err(key, raw, "an integer") from None
        if (lo is not None and val < lo) or (hi is not None and val > hi):
            raise self._err(key, raw, f"an integer in [{lo}, {hi}]")
        return val

    def float(self, key: str, default: float | None = None, *, positional: bool = False) -> float:
        raw = self._raw(key, positional)
        if raw is None:
            if default is None:
                raise ConfigError(f"codec stage {self.stage!r} needs {key}=<number>")
            return default
        return parse_number(raw, f"codec stage {self.stage!r}: {key}")

    def optional(self, key: str, *, positional: bool = False) -> str | None:
        return self._raw(key, positional)

    def bool(self, key: str, default: bool = False) -> bool:
        raw = self._raw(key, False)
        if raw is None:
            return default
        low = raw.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise self._err(key, raw, "true or false")

    def choice(self, key: str, options: tuple[str, ...], default: str) -> str:
        raw = self._raw(key, False)
        if raw is None:
            return default
        if raw.lower() not in options:
            raise self._err(key, raw, f"one of {', '.join(options)}")
        return raw.lower()

    def finish(self) -> None:
        if self.positional:
            raise ConfigError(f"codec stage {self.stage!r}: unexpected extra argument(s) {self.positional}")
        for key in self.keywords:
            close = difflib.get_close_matches(key, self.known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(self.known)}"
            raise ConfigError(f"codec stage {self.stage!r}: unknown argument {key!r}{hint}")


def parse_number(raw: str, what: str) -> float:
    """Parse ``0.01``, ``1e-3`` or ``1%`` into a float."""
    txt = raw.strip()
    try:
        if txt.endswith("%"):
            return float(txt[:-1]) / 100.0
        return float(txt)
    except ValueError:
        raise ConfigError(f"{what}={raw!r} is not a number (examples: 0.01, 1%, 1e-3)") from None


def _split_stage(text: str) -> tuple[str, list[str], dict[str, str]]:
    low = text.strip().lower().replace(" ", "")
    for pat, repl in _ALIASES:
        if pat.match(low):
            low = pat.sub(repl, low)
            break
    name, _, rest = low.partition(":")
    positional: list[str] = []
    keywords: dict[str, str] = {}
    if rest:
        for arg in rest.split(","):
            if not arg:
                raise ConfigError(f"empty argument in codec stage {text!r}")
            if "=" in arg:
                k, _, v = arg.partition("=")
                if k in keywords:
                    raise ConfigError(f"codec stage {text!r}: argument {k!r} given twice")
                keywords[k] = v
            else:
                if keywords:
                    raise ConfigError(f"codec stage {text!r}: positional argument after key=value")
                positional.append(arg)
    return name, positional, keywords


def parse_spec(spec: str) -> Codec:
    """Build a codec from a spec string (grammar in this module's docstring)."""
    from fedsqueeze.codecs.registry import class_by_name, names

    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError("empty codec spec; try e.g. 'uniform:8' or 'topk:1% > uniform:4'")
    stages = [s for s in _SEP.split(spec.strip())]
    if any(not s for s in stages):
        raise ConfigError(f"codec spec {spec!r} has an empty stage (check the '>' separators)")
    built: list[tuple[str, type[Codec], SpecArgs]] = []
    for text in stages:
        name, pos, kw = _split_stage(text)
        cls = class_by_name(name)
        if cls is None:
            close = difflib.get_close_matches(name, names(), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown codec {name!r} in spec {spec!r}{hint} (known: {', '.join(names())})")
        built.append((cls.stage, cls, SpecArgs(text.strip(), pos, kw)))

    if len(built) > 1 and getattr(built[0][1], "takes_template", False):
        # A policy stage (``budget``) owns the rest of the spec as a template it sizes itself.
        return built[0][1].from_spec(built[0][2], template=" > ".join(s.strip() for s in stages[1:]))

    order = {"sparsifier": 0, "values": 1, "lossless": 2}
    kinds = [k for k, _, _ in built]
    ranks = [order[k] for k in kinds]
    if ranks != sorted(ranks) or any(kinds.count(k) > 1 for k in order):
        raise ConfigError(
            f"codec spec {spec!r}: stages must be [sparsifier] > [value coder] > [lossless], "
            f"each at most once, got {' > '.join(kinds)}"
        )
    sparsifier = next(((c, a) for k, c, a in built if k == "sparsifier"), None)
    values = next(((c, a) for k, c, a in built if k == "values"), None)
    lossless = [(c, a) for k, c, a in built if k == "lossless"]

    codec: Codec | None
    value_codec = values[0].from_spec(values[1]) if values else None
    if sparsifier is not None:
        codec = sparsifier[0].from_spec(sparsifier[1], values=value_codec)
    else:
        codec = value_codec
    for lcls, largs in lossless:
        if codec is None:  # "zstd" alone: lossless compression of the fp32 values
            from fedsqueeze.codecs.identity import Fp32

            codec = Fp32()
        codec = lcls.from_spec(largs, inner=codec)
    if codec is None:  # unreachable: the loop above built at least one stage
        raise ConfigError(f"codec spec {spec!r} names no codec")
    return codec
