"""FetchSGD (Rothchild, Panda, Ullah, Ivkin, Stoica, Braverman, Gonzalez, Arora; "FetchSGD:
Communication-Efficient Federated Learning with Sketching", ICML 2020, Algorithm 1).

Clients are stateless: client ``i`` sends the CountSketch ``S(u_i)`` of its whole model difference
``u_i = y_i − x`` (one ``rows x cols`` table; ``compression.uplink = "countsketch:..."`` with
``uplink_scope = "model"``, no error feedback). A CountSketch is linear, so the server combines the
*tables* without unsketching any client, and keeps momentum and error accumulation in sketch space::

    S    = Σ_i w_i S(u_i) / Σ_i w_i  = S(mean_w u_i)   # aggregate_payloads: tables only, no decode
    S_u ← ρ S_u + S                                    # momentum           (ρ = server.momentum)
    S_e ← S_e + η S_u                                  # error accumulation (η = server.lr)
    Δ    = Top-k(U(S_e))                               # k heavy hitters of the median estimates
    S_e ← S_e − S(Δ)                                   # reset="subtract" (Algorithm 1)
    S_u ← S_u − S(Δ_u),  Δ_u = U(S_u) on supp(Δ)       #   momentum masking, in sketch space
    x   ← x + Δ                                        # Δ is k-sparse

``u_i`` already carries the client step (``y_i − x = −η_l Σ g``), hence ``x + Δ`` where the paper
writes ``w − Δ`` for gradients. ``w_i`` are the loop's client weights (sample counts); the paper's
``1/W`` is the equal-weight case. The cohort comes from ``clients.sampling`` = ``uniform``,
``cyclic`` or ``importance`` with ``by = "size"``: then ``w_i`` carry the Horvitz-Thompson factors and
the tables are summed over the cohort's *fixed* denominator D, ``S = Σ_i w_i S(u_i) / D``, the
sketch of the unbiased estimate of the full-participation mean (``by = "norm"`` needs each client's
decoded update norm, which FetchSGD never computes: a ConfigError).
Dropped, straggling and NaN clients are absent from S (the mean is over the accepted clients); a
round with none leaves ``x``, ``S_u`` and ``S_e`` unchanged.

By linearity ``S_e`` is exactly the sketch of the accumulated error ``e = Σ_t η u_t − Σ_t Δ_t``:
nothing is lost, only delayed. ``reset="cells"`` instead zeroes every cell of ``S_u`` and ``S_e``
that a recovered coordinate hashes to, as the authors' code does (it reports that subtracting
``S(Δ)`` made its runs diverge); that also discards the mass of the other coordinates sharing those
cells. Try it when ``subtract`` is unstable (``cols`` too small).

Values of Δ: the sketch's median estimates (one round of communication). The paper's optional
second round, in which clients return exact values at the recovered coordinates, is not
implemented: with momentum and error accumulated in sketch space no party holds the exact
accumulated vector (only each client's current ``u_i``), so that round would not return the
quantity Δ stands for.

What lives where: clients hold nothing across rounds. The server holds two float32 ``rows x cols``
tables, ``S_u`` and ``S_e`` (state keys ``fetchsgd/momentum`` and ``fetchsgd/error``, both in
checkpoints): ``8·rows·cols`` bytes, independent of the number of clients and of ``d``.

Bytes: one client's payload is a container with one countsketch frame, ``31 + 4·rows·cols`` body
bytes plus the frame header and container index (``2·rows·cols`` with ``table=fp16``), whatever
``k`` and ``d``; measured as ``len(payload)``. The downlink carries the k-sparse change of the
model (``downlink_mode = "delta"``; a sparse downlink codec such as ``threshold:1e-12`` makes it
cost O(k) instead of O(d)). The spec's ``k`` (the number of heavy hitters a *decoder* returns) is
unused, since no client payload is decoded; ``algorithm.options.k`` defaults to ``cols // 10``,
the paper's ratio (k = 50,000 with cols = 500,000).

Stability and tuning: ``S_e`` is error feedback with the compressor ``Top-k ∘ U``, which contracts
only while the recovered estimates are accurate, i.e. while the accumulated error has heavy
hitters well above the sketch noise ``≈ ||e||/sqrt(cols)``. With ``reset="subtract"``, ``k`` near
``cols/4`` diverged in our tests (``cols/10`` did not), and like any error feedback with a sparse
update the step must be small against ``k/d``: a coordinate left in ``S_e`` for m rounds comes back
as m rounds' worth of steps. Tune ``cols`` first (bytes and accuracy), keep ``k ≲ cols/10``, then
``server.lr`` and ``server.momentum`` (the paper uses ρ = 0.9 with a matching lower lr); switch to
``reset="cells"`` if ``fetchsgd_error_sketch_norm`` grows without bound. FetchSGD gains over
decoding each client's sketch when the *sum* of the updates has heavy hitters that single
clients' noisy updates hide (``tests/test_fetchsgd.py``); on dense updates of a small model it
moves only ``k`` coordinates a round and per-client decoding can do better at equal bytes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import numpy.typing as npt
import torch

from fedsqueeze.algorithms.base import AlgoContext, Algorithm, opt_choice
from fedsqueeze.channel import MODEL_FRAME
from fedsqueeze.codecs import parse_spec, select
from fedsqueeze.codecs.sketch import GOLDEN, CountSketch, estimate, mix64, parse_payload, row_keys
from fedsqueeze.codecs.spec import parse_number
from fedsqueeze.errors import ConfigError, DecodeError
from fedsqueeze.wire.container import decode_container

if TYPE_CHECKING:
    from fedsqueeze.experiment.config import RunConfig

MOMENTUM_KEY = "fetchsgd/momentum"
ERROR_KEY = "fetchsgd/error"


# ---------------------------------------------------------------------------- sparse sketch math
def hashes_at(
    seed: int, rows: int, cols: int, idx: npt.NDArray[np.int64]
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.float32]]:
    """Buckets ``h_j(i)`` and signs ``s_j(i)`` (``rows x len(idx)``) of arbitrary coordinates, with the
    same hashes as :func:`fedsqueeze.codecs.sketch.sketch` (see that module's docstring)."""
    i1 = idx.astype(np.uint64) + np.uint64(1)
    buckets = np.empty((rows, idx.size), np.intp)
    signs = np.empty((rows, idx.size), np.float32)
    for j, key in enumerate(row_keys(seed, rows)):
        with np.errstate(over="ignore"):
            h = mix64(i1 * GOLDEN + key)
        buckets[j] = ((h >> np.uint64(32)) * np.uint64(cols)) >> np.uint64(32)
        signs[j] = 1 - 2 * (h & np.uint64(1)).astype(np.int8)
    return buckets, signs


def sketch_sparse(
    idx: npt.NDArray[np.int64], values: npt.NDArray[np.float32], rows: int, cols: int, seed: int
) -> npt.NDArray[np.float32]:
    """The ``rows x cols`` table of the vector with ``values`` at ``idx`` (zeros elsewhere), in
    ``O(rows · len(idx))``; equal (to float64 summation order) to ``sketch`` of the dense vector."""
    buckets, signs = hashes_at(seed, rows, cols, idx)
    table = np.zeros((rows, cols), np.float64)
    vals = values.astype(np.float32, copy=False)
    for j in range(rows):
        table[j] = np.bincount(buckets[j], weights=vals * signs[j], minlength=cols)
    return table.astype(np.float32)


def estimate_at(
    table: npt.NDArray[np.float32], idx: npt.NDArray[np.int64], seed: int
) -> npt.NDArray[np.float32]:
    """Median-of-rows estimates at ``idx`` only; bit-equal to ``estimate(table, d, seed)[idx]``."""
    rows, cols = table.shape
    buckets, signs = hashes_at(seed, rows, cols, idx)
    est = np.empty((rows, idx.size), np.float32)
    for j in range(rows):
        np.multiply(table[j, buckets[j]], signs[j], out=est[j])
    mid = rows // 2
    if rows == 1:
        return est[0]
    if rows % 2:
        return np.partition(est, mid, axis=0)[mid]
    part = np.partition(est, (mid - 1, mid), axis=0)
    half = np.float32(0.5)
    return part[mid - 1] * half + part[mid] * half


# ---------------------------------------------------------------------------- algorithm
class FetchSGD(Algorithm):
    """Sketched uplink; momentum and error accumulation in sketch space (module docstring)."""

    name = "fetchsgd"
    #: ``k``: heavy hitters per round, a count or a fraction of the model (``0.01``, ``"1%"``);
    #: None = ``cols // 10``. ``reset``: ``"subtract"`` (paper) or ``"cells"`` (authors' code).
    OPTIONS: ClassVar[dict[str, Any]] = {"k": None, "reset": "subtract"}
    decodes_uplink = False

    def __init__(
        self,
        ctx: AlgoContext,
        codec: CountSketch,
        *,
        lr: float = 1.0,
        momentum: float = 0.0,
        k: int | float | None = None,
        reset: str = "subtract",
    ) -> None:
        if not (np.isfinite(lr) and lr > 0):
            raise ConfigError(f"fetchsgd: server.lr must be a finite number > 0, got {lr!r}")
        if not 0 <= momentum < 1:
            raise ConfigError(f"fetchsgd: server.momentum must be in [0, 1), got {momentum!r}")
        if reset not in ("subtract", "cells"):
            raise ConfigError(f"algorithm.options.reset must be 'subtract' or 'cells', got {reset!r}")
        self.d = ctx.layout.numel
        self.codec = codec
        self.lr, self.momentum, self.reset = float(lr), float(momentum), reset
        self.seed = codec.seed
        self.rows, self.cols, _ = codec.shape_for(self.d)  # the spec's k is the decoder's: unused
        self.k = _resolve_k(_check_k(k), self.d, max(1, self.cols // 10))
        self.s_u = torch.zeros(self.rows, self.cols, dtype=torch.float32)
        self.s_e = torch.zeros(self.rows, self.cols, dtype=torch.float32)
        self._metrics: dict[str, Any] = {}

    # ------------------------------------------------------------------ config
    @classmethod
    def validate(cls, cfg: RunConfig) -> dict[str, Any]:
        o = cls.check_options(cfg.algorithm.options)
        opt_choice(o, "reset", ("subtract", "cells"))
        _check_k(o["k"])
        c = cfg.compression
        if not isinstance(parse_spec(c.uplink), CountSketch):
            raise ConfigError(
                f"fetchsgd sums client sketches: compression.uplink must be a countsketch spec "
                f"(e.g. 'countsketch:cols=10%,k=1%'), got {c.uplink!r}"
            )
        if c.uplink_scope != "model":
            raise ConfigError(
                "fetchsgd sketches the whole update as one vector: set compression.uplink_scope = 'model' "
                f"(got {c.uplink_scope!r}; per-tensor tables make small tensors' estimates useless)"
            )
        if c.uplink_ef != "none":
            raise ConfigError(
                "fetchsgd keeps error accumulation on the server, in sketch space, and clients are "
                f"stateless: set compression.uplink_ef = 'none' (got {c.uplink_ef!r})"
            )
        a = cfg.algorithm
        if a.aggregator != "mean" or a.aggregator_options or a.num_byzantine:
            raise ConfigError(
                "fetchsgd aggregates the sketch tables themselves (a weighted sum, no per-client decode): "
                "set algorithm.aggregator = 'mean' with no aggregator_options and num_byzantine = 0 "
                f"(got {a.aggregator!r}, {dict(a.aggregator_options)}, {a.num_byzantine})"
            )
        if cfg.privacy.mode == "central":
            raise ConfigError(
                "fetchsgd cannot use privacy.mode = 'central': central DP clips each decoded update and "
                "fetchsgd never decodes client updates; use privacy.mode = 'local' or 'none'"
            )
        return o

    @classmethod
    def from_config(cls, cfg: RunConfig, ctx: AlgoContext) -> FetchSGD:
        o = cls.validate(cfg)
        codec = parse_spec(cfg.compression.uplink)
        if not isinstance(codec, CountSketch):  # checked by validate; narrows the type
            raise ConfigError("fetchsgd needs a countsketch uplink")
        return cls(ctx, codec, lr=cfg.server.lr, momentum=cfg.server.momentum, k=o["k"], reset=o["reset"])

    # ------------------------------------------------------------------ server
    def aggregate_payloads(
        self,
        payloads: Mapping[int, bytes],
        weights: Mapping[int, float],
        *,
        denominator: float | None = None,
    ) -> torch.Tensor | None:
        """``S = Σ_i w_i S_i / Σ_i w_i`` over the clients' tables (``/ denominator`` instead when the
        loop gives the importance sampler's fixed one), in float64, rounded once to float32; no
        client is unsketched. A payload whose frame, table shape, ``d`` or hash seed differs from the
        configured spec raises :class:`DecodeError`."""
        if not payloads:
            raise ValueError("fetchsgd: no payloads to aggregate")
        w = np.array([float(weights[c]) for c in payloads], np.float64)
        if not (np.isfinite(w).all() and (w >= 0).all() and w.sum() > 0):
            raise ValueError(f"fetchsgd: client weights must be finite, >= 0 and not all 0, got {w}")
        if denominator is None:
            w /= w.sum()
        elif math.isfinite(denominator) and denominator > 0:
            w /= float(denominator)
        else:
            raise ValueError(f"fetchsgd: denominator must be finite and > 0, got {denominator}")
        total = np.zeros((self.rows, self.cols), np.float64)
        for wi, (c, raw) in zip(w, payloads.items(), strict=True):
            frames = decode_container(raw)
            if list(frames) != [MODEL_FRAME]:
                raise DecodeError(
                    f"fetchsgd: client {c}'s payload has frames {list(frames)[:3]}, expected one "
                    f"{MODEL_FRAME!r} frame (compression.uplink_scope = 'model')"
                )
            p = parse_payload(frames[MODEL_FRAME])
            if (p.rows, p.cols, p.d, p.seed) != (self.rows, self.cols, self.d, self.seed):
                raise DecodeError(
                    f"fetchsgd: client {c}'s sketch has rows={p.rows}, cols={p.cols}, d={p.d}, "
                    f"seed={p.seed}; the server expects {self.rows}, {self.cols}, {self.d}, {self.seed}"
                )
            total += wi * p.table.numpy()
        return torch.from_numpy(total.astype(np.float32))

    def server_update(
        self,
        x: torch.Tensor,
        agg: torch.Tensor,
        *,
        accepted: Sequence[int] = (),
        extras: Mapping[int, Mapping[str, torch.Tensor]] | None = None,
        t: int = 0,
    ) -> torch.Tensor:
        """Momentum and error accumulation on the summed table ``agg``, unsketch, reset, apply Δ."""
        if tuple(agg.shape) != (self.rows, self.cols):
            raise ValueError(
                f"fetchsgd: aggregate has shape {tuple(agg.shape)}, expected ({self.rows}, {self.cols})"
            )
        self.s_u.mul_(self.momentum).add_(agg)
        self.s_e.add_(self.s_u, alpha=self.lr)
        est = estimate(self.s_e, self.d, self.seed)
        idx = select.topk_indices(est, self.k)
        idx = idx[est[idx] != 0]  # a zero estimate recovers nothing
        vals = est[idx]
        local = idx.numpy()
        s_e, s_u = self.s_e.numpy(), self.s_u.numpy()  # views: updated in place
        if self.reset == "cells":
            buckets, _ = hashes_at(self.seed, self.rows, self.cols, local)
            for j in range(self.rows):
                s_e[j, buckets[j]] = 0.0
                s_u[j, buckets[j]] = 0.0
        elif local.size:
            s_e -= sketch_sparse(local, vals.numpy(), self.rows, self.cols, self.seed)
            s_u -= sketch_sparse(local, estimate_at(s_u, local, self.seed), self.rows, self.cols, self.seed)
        delta = torch.zeros_like(x)
        delta[idx] = vals.to(x.dtype)
        self._metrics = {
            "fetchsgd_recovered": int(idx.numel()),
            "fetchsgd_update_norm": float(delta.norm()),
            "fetchsgd_error_sketch_norm": float(self.s_e.norm()),
            "fetchsgd_state_bytes": self.state_nbytes,
        }
        return x + delta

    def round_metrics(self) -> dict[str, Any]:
        out, self._metrics = self._metrics, {}
        return out

    # ------------------------------------------------------------------ state
    @property
    def state_nbytes(self) -> int:
        """Bytes of server state: the two float32 tables."""
        return 2 * 4 * self.rows * self.cols

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {MOMENTUM_KEY: self.s_u.clone(), ERROR_KEY: self.s_e.clone()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        for key in (MOMENTUM_KEY, ERROR_KEY):
            if key not in state:
                raise ConfigError(f"fetchsgd: the checkpoint has no {key!r} (was it written by fetchsgd?)")
            if tuple(state[key].shape) != (self.rows, self.cols):
                raise ConfigError(
                    f"fetchsgd: checkpoint {key!r} has shape {tuple(state[key].shape)}, the configured "
                    f"sketch is ({self.rows}, {self.cols}); resume with the same uplink spec and model"
                )
        self.s_u = state[MOMENTUM_KEY].to(torch.float32).clone()
        self.s_e = state[ERROR_KEY].to(torch.float32).clone()


def _check_k(k: Any) -> int | float | None:
    """``algorithm.options.k`` as a count (int >= 1), a fraction in (0, 1], or None."""
    if k is None:
        return None
    if isinstance(k, str):
        k = parse_number(k, "algorithm.options.k")
    if isinstance(k, bool) or not isinstance(k, int | float):
        raise ConfigError(
            f"algorithm.options.k must be a count (e.g. 100) or a fraction (0.01, '1%'), got {k!r}"
        )
    if isinstance(k, int) and k < 1:
        raise ConfigError(f"algorithm.options.k must be >= 1, got {k}")
    if isinstance(k, float) and not 0 < k <= 1:
        raise ConfigError(f"algorithm.options.k as a fraction must be in (0, 1], got {k}")
    return k


def _resolve_k(k: int | float | None, d: int, default: int) -> int:
    if k is None:
        return max(1, min(d, default))
    if isinstance(k, float):
        return max(1, min(d, round(k * d)))
    if k > d:
        raise ConfigError(f"algorithm.options.k = {k} exceeds the model's {d} parameters")
    return k
