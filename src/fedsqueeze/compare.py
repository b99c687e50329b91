"""Compare codecs on one tensor by the bytes they really produce (``fedsqueeze compare``).

Every number here is measured, not computed from a formula: ``nbytes`` is ``len(payload)`` of a
real encode (frame header included), and the errors come from decoding those bytes through the
registry, exactly as a receiver would. This redoes the comparison table of the "communication
efficiency" tutorial, whose "compressed sizes" were formulas (``k * 8``,
``numel * (bits // 8 + 1)``) that no byte stream ever had.

Metrics of a :class:`CompareRow` (``x`` the input, ``x̂_r`` the decode of repeat ``r``, ``n`` its
number of entries, ``R`` the number of repeats):

* ``nbytes``: ``len(payload)`` of repeat 0. Deterministic codecs give the same size every repeat;
  codecs whose size depends on their random draw (e.g. variable-length coded QSGD) may differ by a
  few bytes between repeats, and the row keeps repeat 0's size.
* ``ratio = 4 * n / nbytes`` (the fp32 size of the input over the payload size; ``fp32`` itself
  scores slightly below 1 because of the header) and ``bits_per_entry = 8 * nbytes / n``.
* ``mse = ||x - x̂_0||² / n`` and ``rel_error = ||x - x̂_0|| / ||x||`` (repeat 0).
* ``omega = mean_r ||x - x̂_r||² / ||x||²``: the empirical variance constant of the compression
  literature (``E||C(x) - x||² <= omega ||x||²``).
* ``bias = ||mean_r x̂_r - x|| / ||x||``. For an unbiased codec this only measures noise and shrinks
  like ``sqrt(omega / R)``; for a biased one (top-k, deterministic rounding) it stays near
  ``rel_error`` however large ``R`` is. Use ``repeats >= 100`` before reading anything into it.
* ``encode_MBps`` / ``decode_MBps``: ``4 * n / 1e6`` (megabytes of fp32 input) divided by the
  median wall time over the repeats, after untimed warm-up round trips (three for inputs up to
  2**20 entries, one above). Decoding goes through
  :func:`fedsqueeze.codecs.decode` (header lookup included).

Repeat ``r`` passes ``torch.Generator().manual_seed(seed + r)`` as the codec's ``rng``, so a table
is reproducible bit for bit apart from the timings.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from fedsqueeze.codecs import decode, parse_spec
from fedsqueeze.codecs.registry import class_by_name
from fedsqueeze.codecs.spec import _SEP, _split_stage
from fedsqueeze.errors import ConfigError, FedSqueezeError

__all__ = [
    "DEFAULT_SPECS",
    "CompareRow",
    "compare",
    "default_input",
    "load_input",
    "load_tensors",
    "unavailable_codecs",
]

#: The tutorial's seven compressors, each as a real codec, plus a reference row and extras.
#:
#: ========================== =================================================================
#: tutorial                   spec here
#: ========================== =================================================================
#: (reference, not in it)     ``fp32``: the input as it is; ratio just below 1 (frame header)
#: 8-bit Quantization         ``uniform:8`` (min-max, nearest level)
#: 4-bit Quantization         ``uniform:4``
#: Stochastic Quant (QSGD)    ``qsgd:s=255,bucket=0``: QSGD with ``s = 255`` levels of
#:                            ``|x_i| / ||x||_2`` per sign and one bucket for the whole tensor.
#:                            This is the tutorial's ``StochasticQuantizer(levels=256)``, which
#:                            scales by ``levels - 1 = 255``: stochastic rounding, unbiased, and
#:                            "8-bit" only in name (255 magnitudes and a sign need 9 bits at a
#:                            fixed width; the bits/entry column says what the codec really spends).
#: Top-10% / Top-1%           ``topk:10%`` / ``topk:1%``
#: Random-10%                 ``randk:10%`` (indices from a seed, values scaled by d/k)
#: Threshold (0.5)            ``threshold:0.5``
#: extras                     ``uniform:8,stochastic=true``, ``fp16``, ``topk:1% > uniform:8``,
#:                            ``topk:1% > uniform:4``
#: ========================== =================================================================
DEFAULT_SPECS: tuple[str, ...] = (
    "fp32",
    "uniform:8",
    "uniform:4",
    "uniform:8,stochastic=true",
    "qsgd:s=255,bucket=0",
    "topk:10%",
    "topk:1%",
    "randk:10%",
    "threshold:0.5",
    "fp16",
    "topk:1% > uniform:8",
    "topk:1% > uniform:4",
)

_FP32_BYTES = 4
_MB = 1e6
_WARMUPS_SMALL = 3  # untimed round trips per codec for inputs up to _SMALL_NUMEL entries (else 1)
_SMALL_NUMEL = 1 << 20


@dataclass(frozen=True)
class CompareRow:
    """One codec's measured size, error and speed on one input (definitions in the module doc)."""

    codec: str
    nbytes: int
    ratio: float
    bits_per_entry: float
    mse: float
    rel_error: float
    omega: float
    bias: float
    encode_MBps: float  # noqa: N815  (MB/s: the unit is part of the name)
    decode_MBps: float  # noqa: N815

    def to_dict(self) -> dict[str, Any]:
        """Plain ``{field: value}`` dict (JSON-ready) with exactly the dataclass's fields."""
        return asdict(self)


def default_input(size: int = 10_000, seed: int = 42) -> torch.Tensor:
    """The tutorial's test vector: ``size`` draws of N(0, 1) as float32, from ``seed``."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"input size must be a positive integer, got {size!r}")
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randn(size, generator=gen, dtype=torch.float32)


def compare(x: torch.Tensor, specs: Sequence[str], *, repeats: int = 1, seed: int = 1042) -> list[CompareRow]:
    """Encode ``x`` with each codec spec, decode the bytes, and measure (see the module doc).

    Parameters
    ----------
    x:
        A finite, non-empty, not all-zero floating-point tensor (any shape).
    specs:
        Codec spec strings (grammar in :mod:`fedsqueeze.codecs.spec`); all are parsed before any
        work starts, so a typo in the last one fails fast. A single string counts as one spec.
    repeats:
        Encodes per codec (>= 1). Repeat ``r`` uses ``torch.Generator().manual_seed(seed + r)``.
    seed:
        Base seed of the codec randomness. Do not reuse the seed that generated ``x``:
        ``torch.randn`` and ``torch.rand`` seeded alike read one uniform stream, so the codec's
        noise would be correlated with the input itself (correlation -0.34 between
        ``default_input(10_000, 42)`` and ``torch.rand`` from seed 42). The default, 1042, is the
        input's default seed plus 1000, as in the CLI.

    Returns
    -------
    list[CompareRow]
        One row per spec, in the order given; ``codec`` is the spec string exactly as given.

    Raises
    ------
    ConfigError
        Bad spec, ``repeats < 1``, no specs, or an input that cannot be measured.
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"repeats must be an integer >= 1, got {repeats!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    spec_list = [specs] if isinstance(specs, str) else list(specs)
    if not spec_list:
        raise ConfigError("no codec specs to compare; pass e.g. ['uniform:8', 'topk:1%']")
    xf = _check_input(x)
    codecs = [parse_spec(s) for s in spec_list]

    n = xf.numel()
    norm2 = float(xf.dot(xf))
    input_mb = n * _FP32_BYTES / _MB
    rows: list[CompareRow] = []
    for spec, codec in zip(spec_list, codecs, strict=True):
        # Untimed warm-ups: first calls pay for lazy initialisation that is not the codec's cost.
        for _ in range(_WARMUPS_SMALL if n <= _SMALL_NUMEL else 1):
            decode(codec.encode(x, rng=torch.Generator().manual_seed(seed)))
        nbytes = 0
        err2: list[float] = []
        enc_s: list[float] = []
        dec_s: list[float] = []
        total = torch.zeros(n, dtype=torch.float64)
        for r in range(repeats):
            rng = torch.Generator().manual_seed(seed + r)
            t0 = time.perf_counter()
            payload = codec.encode(x, rng=rng)
            t1 = time.perf_counter()
            xh = decode(payload)
            t2 = time.perf_counter()
            enc_s.append(t1 - t0)
            dec_s.append(t2 - t1)
            if r == 0:
                nbytes = len(payload)
            xh64 = xh.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
            if xh64.numel() != n:
                raise FedSqueezeError(f"codec {spec!r} decoded {xh64.numel()} entries from a {n}-entry input")
            diff = xf - xh64
            err2.append(float(diff.dot(diff)))
            total += xh64
        mean_err = total / repeats - xf
        rows.append(
            CompareRow(
                codec=spec,
                nbytes=nbytes,
                ratio=n * _FP32_BYTES / nbytes,
                bits_per_entry=8 * nbytes / n,
                mse=err2[0] / n,
                rel_error=math.sqrt(err2[0] / norm2),
                omega=statistics.fmean(e / norm2 for e in err2),
                bias=math.sqrt(float(mean_err.dot(mean_err)) / norm2),
                encode_MBps=input_mb / max(statistics.median(enc_s), 1e-9),
                decode_MBps=input_mb / max(statistics.median(dec_s), 1e-9),
            )
        )
    return rows


def _check_input(x: torch.Tensor) -> torch.Tensor:
    """Validate the input and return it as a flat float64 CPU tensor for the error metrics."""
    if not isinstance(x, torch.Tensor):
        raise ConfigError(f"compare needs a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ConfigError(f"compare needs a floating-point tensor, got dtype {x.dtype}")
    if x.numel() == 0:
        raise ConfigError("compare needs a non-empty tensor, got one with 0 entries")
    xf = x.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(xf).all()):
        raise ConfigError("compare needs finite input; the tensor holds NaN or Inf")
    if float(xf.dot(xf)) == 0.0:
        raise ConfigError("compare needs a non-zero tensor (relative errors divide by ||x||)")
    return xf


# ---------------------------------------------------------------------- inputs from files
_PT_SUFFIXES = (".pt", ".pth")
_ST_SUFFIX = ".safetensors"


def load_tensors(path: str | Path) -> torch.Tensor | dict[str, torch.Tensor]:
    """Load a saved tensor or state_dict without ever running arbitrary pickle code.

    ``.safetensors`` files go through :func:`safetensors.torch.load_file` (always a dict);
    ``.pt`` / ``.pth`` through ``torch.load(..., weights_only=True, map_location="cpu")``, which
    may hold one tensor or a (possibly nested) mapping. Nested mappings are flattened to dotted
    names (``{"model": {"w": t}}`` -> ``{"model.w": t}``); non-tensor values are dropped.

    Raises
    ------
    ConfigError
        Missing or unreadable file, unsupported suffix, or nothing tensor-like inside.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in (*_PT_SUFFIXES, _ST_SUFFIX):
        raise ConfigError(
            f"cannot load {str(p)!r}: expected a .safetensors, .pt or .pth file, got suffix "
            f"{suffix or '(none)'!r}"
        )
    if not p.is_file():
        raise ConfigError(f"input file {str(p)!r} does not exist (or is not a file)")
    try:
        if suffix == _ST_SUFFIX:
            from safetensors.torch import load_file

            obj: Any = load_file(str(p), device="cpu")
        else:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors, zip, unpickler and OS errors all mean "unreadable"
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ConfigError(
            f"cannot read {str(p)!r} as {suffix} ({type(exc).__name__}: {first}); only tensors "
            "and dicts of tensors saved with torch.save or safetensors are accepted"
        ) from exc
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, Mapping):
        flat: dict[str, torch.Tensor] = {}
        _flatten_mapping(obj, "", flat)
        if flat:
            return flat
    raise ConfigError(
        f"{str(p)!r} holds no tensors (found {type(obj).__name__}); save a tensor or a state_dict"
    )


def _flatten_mapping(obj: Mapping[Any, Any], prefix: str, out: dict[str, torch.Tensor]) -> None:
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            out[name] = value
        elif isinstance(value, Mapping):
            _flatten_mapping(value, f"{name}.", out)


def load_input(path: str | Path) -> torch.Tensor:
    """A saved update as one flat float32 vector, ready for :func:`compare`.

    A single floating tensor is flattened. For a state_dict, the floating-point tensors are
    flattened and concatenated in **sorted key order** (so the same update saved as ``.pt`` or as
    ``.safetensors`` gives the same vector); integer and bool buffers (``num_batches_tracked``)
    are skipped. Everything is converted to float32, the reference every ratio is measured against.

    Raises
    ------
    ConfigError
        See :func:`load_tensors`; also when the file holds no floating-point tensor.
    """
    obj = load_tensors(path)
    items = [("", obj)] if isinstance(obj, torch.Tensor) else sorted(obj.items())
    parts = [t.detach().reshape(-1).to(torch.float32) for _, t in items if t.is_floating_point()]
    if not parts or sum(p.numel() for p in parts) == 0:
        raise ConfigError(
            f"{str(path)!r} holds no (non-empty) floating-point tensor to compress; "
            f"found dtypes {sorted({str(t.dtype) for _, t in items})}"
        )
    return torch.cat(parts)


# ---------------------------------------------------------------------- spec availability
def unavailable_codecs(spec: str) -> list[str]:
    """Names in ``spec`` that no registered codec answers to (``[]`` when all are known).

    Lets the CLI run its default table on a build that lacks some codec families (and tests skip
    cleanly), while a spec that names known codecs with wrong arguments still fails loudly.
    """
    missing: list[str] = []
    for text in _SEP.split(spec.strip()):
        if not text:
            continue
        try:
            name = _split_stage(text)[0]
        except ConfigError:
            continue  # malformed arguments: parse_spec will report them properly
        if class_by_name(name) is None:
            missing.append(name)
    return missing
