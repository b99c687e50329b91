"""Link profiles and network spec strings.

A :class:`LinkProfile` is a *modelled* link: a nominal uplink and downlink bandwidth in bits per
second, a one-way latency in seconds, and optionally a per-round bandwidth jitter and a per-round
dropout probability. Nothing here is measured; every figure the network model derives from a
profile is a **modelled** figure and is named so.

Built-in profiles (:data:`PROFILES`) — **assumptions**, round figures chosen to be typical of each
technology as commonly quoted (ITU/3GPP peak rates discounted to what a phone sees in the field,
public crowd-sourced speed-test medians, usual ping figures). They are *not* measurements and not
worst or best cases; replace them with ``custom:`` links when you have numbers for your own
deployment.

============  ==============  ===============  =================  ===================================
name          uplink          downlink         one-way latency    assumption
============  ==============  ===============  =================  ===================================
``2g``        0.1 Mbit/s      0.2 Mbit/s       300 ms             GSM EDGE, RTT ~600 ms
``3g``        1 Mbit/s        3 Mbit/s         100 ms             UMTS/HSPA, RTT ~200 ms
``4g``        5 Mbit/s        20 Mbit/s        35 ms              LTE, RTT ~70 ms
``5g``        20 Mbit/s       100 Mbit/s       15 ms              5G NR sub-6 GHz, RTT ~30 ms
``wifi``      20 Mbit/s       50 Mbit/s        10 ms              home Wi-Fi behind a consumer ISP
``ethernet``  100 Mbit/s      100 Mbit/s       5 ms               wired office/campus link
``datacenter``  10 Gbit/s     10 Gbit/s        0.25 ms            intra-datacenter, RTT ~0.5 ms
============  ==============  ===============  =================  ===================================

All built-in profiles have ``jitter=0`` and ``drop_prob=0``: variability and dropouts are opt-in,
so a plain ``"4g"`` gives fixed, reproducible times. Add them with overrides, e.g.
``"3g:jitter=0.3,drop=0.05"``.

Spec strings (case-insensitive, spaces ignored), parsed by :func:`parse_network`::

    4g                                   every client on the 4g profile
    4g:jitter=0.3,drop=0.05              4g with lognormal bandwidth jitter and 5% dropouts per round
    mix:2g=0.2,3g=0.3,4g=0.5             heterogeneous: 20% / 30% / 50% of clients (also 20%,30%,50%)
    custom:up=1e6,down=5e6,latency=0.05  your own link (bits/s, bits/s, seconds one-way)
    custom:up=1e6,down=5e6,latency=0.05,jitter=0.2,drop=0.01

Aliases: ``edge`` = 2g, ``umts``/``hspa`` = 3g, ``lte`` = 4g, ``nr`` = 5g, ``wired``/``lan`` =
ethernet, ``dc`` = datacenter.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import Any

from fedsqueeze.errors import ConfigError


@dataclass(frozen=True)
class LinkProfile:
    """One client's modelled network link.

    Attributes
    ----------
    name:
        Profile name (``"4g"``, ``"custom"``, ...).
    uplink_bps, downlink_bps:
        Nominal bandwidth in bits per second, client -> server and server -> client.
    latency_s:
        One-way latency in seconds, paid once per transfer.
    jitter:
        Relative standard deviation of the bandwidth, drawn once per (client, round) from a
        lognormal with mean 1 (``0`` = fixed bandwidth). Because time is ``1 / bandwidth``, the
        *mean* transfer time grows by the factor ``1 + jitter**2`` over the nominal one.
    drop_prob:
        Probability that the client vanishes in a given round (independent across rounds).
    """

    name: str
    uplink_bps: float
    downlink_bps: float
    latency_s: float
    jitter: float = 0.0
    drop_prob: float = 0.0

    def __post_init__(self) -> None:
        for field in ("uplink_bps", "downlink_bps"):
            val = getattr(self, field)
            if not (isinstance(val, int | float) and math.isfinite(val) and val > 0):
                raise ConfigError(f"link {self.name!r}: {field} must be a finite number > 0, got {val!r}")
        for field in ("latency_s", "jitter"):
            val = getattr(self, field)
            if not (isinstance(val, int | float) and math.isfinite(val) and val >= 0):
                raise ConfigError(f"link {self.name!r}: {field} must be a finite number >= 0, got {val!r}")
        p = self.drop_prob
        if not (isinstance(p, int | float) and 0.0 <= p < 1.0):
            raise ConfigError(f"link {self.name!r}: drop_prob must be in [0, 1), got {p!r}")


#: Built-in link profiles (assumptions, see the module docstring for where the numbers come from).
PROFILES: dict[str, LinkProfile] = {
    "2g": LinkProfile("2g", uplink_bps=0.1e6, downlink_bps=0.2e6, latency_s=0.300),
    "3g": LinkProfile("3g", uplink_bps=1e6, downlink_bps=3e6, latency_s=0.100),
    "4g": LinkProfile("4g", uplink_bps=5e6, downlink_bps=20e6, latency_s=0.035),
    "5g": LinkProfile("5g", uplink_bps=20e6, downlink_bps=100e6, latency_s=0.015),
    "wifi": LinkProfile("wifi", uplink_bps=20e6, downlink_bps=50e6, latency_s=0.010),
    "ethernet": LinkProfile("ethernet", uplink_bps=100e6, downlink_bps=100e6, latency_s=0.005),
    "datacenter": LinkProfile("datacenter", uplink_bps=10e9, downlink_bps=10e9, latency_s=0.00025),
}

_ALIASES = {
    "edge": "2g",
    "gsm": "2g",
    "umts": "3g",
    "hspa": "3g",
    "lte": "4g",
    "nr": "5g",
    "wi-fi": "wifi",
    "wlan": "wifi",
    "wired": "ethernet",
    "lan": "ethernet",
    "dc": "datacenter",
}

_OVERRIDE_KEYS = {"jitter": "jitter", "drop": "drop_prob", "drop_prob": "drop_prob"}
_CUSTOM_KEYS = {
    "up": "uplink_bps",
    "down": "downlink_bps",
    "latency": "latency_s",
    "jitter": "jitter",
    "drop": "drop_prob",
    "drop_prob": "drop_prob",
}


@dataclass(frozen=True)
class NetworkSpec:
    """A parsed network spec: which links exist and what fraction of clients gets each.

    Attributes
    ----------
    components:
        ``(profile, fraction)`` pairs; fractions are > 0 and sum to 1 (one pair with fraction 1 for
        a homogeneous network).
    text:
        The spec string it was parsed from (normalised: lower case, no spaces).
    """

    components: tuple[tuple[LinkProfile, float], ...]
    text: str

    def __post_init__(self) -> None:
        if not self.components:
            raise ConfigError("a network spec needs at least one link profile")
        fractions = [f for _, f in self.components]
        if any(not (math.isfinite(f) and f > 0) for f in fractions):
            raise ConfigError(f"network spec {self.text!r}: every fraction must be > 0, got {fractions}")
        if abs(sum(fractions) - 1.0) > 1e-6:
            raise ConfigError(f"network spec {self.text!r}: fractions must sum to 1, got {sum(fractions)}")

    @property
    def homogeneous(self) -> bool:
        """True when every client gets the same link."""
        return len(self.components) == 1

    @classmethod
    def single(cls, profile: LinkProfile) -> NetworkSpec:
        """Every client on ``profile``."""
        return cls(((profile, 1.0),), profile.name)


def _known() -> str:
    return ", ".join([*PROFILES, "mix:...", "custom:..."])


def _profile_by_name(name: str, spec: str) -> LinkProfile:
    key = _ALIASES.get(name, name)
    if key in PROFILES:
        return PROFILES[key]
    close = difflib.get_close_matches(name, [*PROFILES, *_ALIASES, "mix", "custom"], n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"unknown network profile {name!r} in spec {spec!r}{hint} (valid: {_known()})")


def _number(raw: str, what: str, spec: str) -> float:
    txt = raw.strip()
    try:
        val = float(txt[:-1]) / 100.0 if txt.endswith("%") else float(txt)
    except ValueError:
        raise ConfigError(
            f"network spec {spec!r}: {what}={raw!r} is not a number (examples: 0.5, 50%, 1e6)"
        ) from None
    if not math.isfinite(val):
        raise ConfigError(f"network spec {spec!r}: {what}={raw!r} must be finite")
    return val


def _keywords(rest: str, spec: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for arg in rest.split(","):
        if not arg:
            raise ConfigError(f"network spec {spec!r}: empty argument (check the commas)")
        key, eq, val = arg.partition("=")
        if not eq or not key or not val:
            raise ConfigError(f"network spec {spec!r}: expected key=value, got {arg!r}")
        if key in out:
            raise ConfigError(f"network spec {spec!r}: {key!r} given twice")
        out[key] = val
    return out


def _check_keys(keys: dict[str, str], allowed: dict[str, str], spec: str) -> None:
    for key in keys:
        if key not in allowed:
            close = difflib.get_close_matches(key, list(allowed), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"network spec {spec!r}: unknown argument {key!r}{hint} (valid: {', '.join(allowed)})"
            )


def parse_network(spec: str) -> NetworkSpec:
    """Parse a network spec string (grammar in this module's docstring) into a :class:`NetworkSpec`.

    Raises
    ------
    ConfigError
        On an unknown profile (with the nearest valid name), bad syntax, a missing or non-numeric
        value, fractions that are not positive or do not sum to 1, or out-of-range link values.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"empty network spec; use one of {_known()} (e.g. '4g' or 'mix:3g=0.5,4g=0.5')")
    text = spec.strip().lower().replace(" ", "")
    name, colon, rest = text.partition(":")
    if colon and not rest:
        raise ConfigError(f"network spec {spec!r}: nothing after ':'")

    if name == "mix":
        if not rest:
            raise ConfigError(
                f"network spec {spec!r}: 'mix' needs profile=fraction pairs, e.g. mix:3g=0.5,4g=0.5"
            )
        pairs = _keywords(rest, spec)
        components = []
        for pname, raw in pairs.items():
            profile = _profile_by_name(pname, spec)
            frac = _number(raw, pname, spec)
            if frac <= 0:
                raise ConfigError(f"network spec {spec!r}: fraction of {pname!r} must be > 0, got {raw!r}")
            components.append((profile, frac))
        names = [p.name for p, _ in components]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ConfigError(f"network spec {spec!r}: profile(s) {sorted(dup)} listed twice (aliases count)")
        total = sum(f for _, f in components)
        if abs(total - 1.0) > 1e-3:
            raise ConfigError(
                f"network spec {spec!r}: mix fractions must sum to 1 (or 100%), got {total:g}; "
                "fix the fractions so they add up"
            )
        return NetworkSpec(tuple((p, f / total) for p, f in components), text)

    if name == "custom":
        if not rest:
            raise ConfigError(f"network spec {spec!r}: 'custom' needs up=<bps>,down=<bps>[,latency=<s>]")
        kw = _keywords(rest, spec)
        _check_keys(kw, _CUSTOM_KEYS, spec)
        missing = [k for k in ("up", "down") if k not in kw]
        if missing:
            raise ConfigError(
                f"network spec {spec!r}: custom link needs {' and '.join(missing)}=<bits per second>, "
                "e.g. custom:up=1e6,down=5e6,latency=0.05"
            )
        fields = {_CUSTOM_KEYS[k]: _number(v, k, spec) for k, v in kw.items()}
        fields.setdefault("latency_s", 0.0)
        return NetworkSpec.single(LinkProfile(name="custom", **fields))

    profile = _profile_by_name(name, spec)
    if rest:
        kw = _keywords(rest, spec)
        _check_keys(kw, _OVERRIDE_KEYS, spec)
        overrides: dict[str, Any] = {_OVERRIDE_KEYS[k]: _number(v, k, spec) for k, v in kw.items()}
        profile = dataclasses.replace(profile, **overrides)
    return NetworkSpec(((profile, 1.0),), text)
