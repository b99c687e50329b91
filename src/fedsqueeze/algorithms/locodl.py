"""LoCoDL (Condat, Maranjyan, Richtárik; "LoCoDL: Communication-Efficient Distributed Learning with
Local Training and Compression", ICLR 2025, arXiv 2403.04348): Scaffnew-style local training with
an unbiased compressor ``C_i ∈ U(ω)`` on the uplink, for ``min_x (1/n) Σ_i f_i(x) + g(x)``.

The problem is lifted to a consensus over the n client models ``x_i`` and a shared model ``y``
(held identically by the server and every client); clients only ever send a compressed difference
to ``y``. With step size γ = ``clients.lr``, communication probability p, relaxation ρ, a factor χ
of the dual step and the compressor's variance factor ω, every client keeps ``x_i, u_i`` and everyone keeps
``y, v`` (all initialised as ``x_i = y = x⁰``, ``u_i = v = 0``, so ``(1/n) Σ_i u_i + v = 0``)::

    every iteration:   x̂_i = x_i − γ ∇f_i(x_i) + γ u_i        (clients; grad_hook: g − u_i)
                       ŷ   = y   − γ ∇g(y)     + γ v          (everyone; g = (g_l2/2)‖y‖², default 0)
    shared coin θ ~ Bernoulli(p)
    θ = 1:  d_i = C_i(x̂_i − ŷ)                               uplink payload of client i
            d̄   = (1/(2n)) Σ_j d_j                            server (n models x_j + n copies of y)
            x_i ← (1 − ρ) x̂_i + ρ (ŷ + d̄)
            u_i ← u_i + (p χ / (γ (1 + 2ω))) (d̄ − d_i)
            y   ← ŷ + ρ d̄
            v   ← v + (p χ / (γ (1 + 2ω))) d̄
    θ = 0:  x_i ← x̂_i,  y ← ŷ                                (u_i, v unchanged)

With ω = 0, ρ = χ = 1 this is Scaffnew on 2n "clients" (n with f_i, n copies of y with g).

**What was verified, against what** (see the research notes §8.1; the paper body was not reachable
in this session: the stored copies of arxiv.org/html/2403.04348v2 and ar5iv return only the first
~2,000 characters, and no public code of LoCoDL was found):

* From third-party summaries of the paper (ScienceStack's summary of arXiv 2403.04348; a review
  summary of the follow-up BiCoLoR, arXiv 2601.12400): the problem is lifted to a consensus over the
  ``x_i`` and a shared ``y``, only *differences to y* are compressed, compressors are unbiased
  ``U(ω)`` and independent across clients (the analysis uses an average variance ``ω_av``), and the
  method converges linearly in the strongly convex heterogeneous setting. Those structural facts
  are what this module implements.
* NOT verified: every equation above line by line, the factor ``1/(2n)``, the dual step
  ``pχ/(γ(1+2ω))``, and the theorem's parameter conditions. They are a reconstruction from memory.
  What we *did* check (``tests/test_locodl.py``): with the identity codec and with unbiased Rand-K
  (independent masks per client) the iterates converge linearly to the exact minimiser (the fixed
  point property: a wrong sign or constant in the u/v updates, or 1/n for 1/(2n), breaks it; we
  tried), ``(1/n) Σ_i u_i + v`` stays 0 up to rounding — it holds because ``2 d̄`` is exactly the
  mean of the ``d_i`` that move the ``u_i`` — and the round loop matches, round by round, a float64
  transcription of the equations above.
* The abstract's claims, on the equations as implemented (``tests/test_locodl_acceleration.py``, a
  float64 transcription on heterogeneous quadratics): *local training accelerates in κ* -- with
  p = 1/√κ, κ ×16 (100 → 1600) multiplies the communications by 4.25 (√16 = 4) where p = 1 (no
  local training) multiplies them by 15.96; *compression helps* -- with Rand-K (k values + a seed
  per client) the uplink floats to reach 1e-8 at each variant's best p are 0.59x (ω = 9) and 0.50x
  (ω = 29) those of ω = 0 (n = 10, d = 30, κ = 400; no gain at n = 2, where ω_av = ω/2 is large),
  and the best p grows with ω; the recalled rate bounds the measured contraction (measured rates are
  2.0-2.4x faster). Caveat from the same checks: the ``(1 + 2ω)`` of the dual step is cautious there
  (``(1 + ω/2)`` stays stable and needs up to ~3x fewer communications at low p); no factor at all
  diverges. Consistent with a worst-case constant; it does not show the paper's constant.
* Defaults ``ρ = χ = 1/(1 + ω_av)`` with ``ω_av = ω/n`` are also recalled, not verified (they
  satisfy the condition ``2ρ − ρ²(1 + ω_av) − χ ≥ 0`` we recall from the theorem); they give
  Scaffnew's ``ρ = χ = 1`` when ω = 0. So is the rate we recall, ``max(1 − γμ, 1 − p²χ/(1+2ω))``
  per iteration with every f_i *and g* μ-strongly convex: exactness and the constants' placement
  are tested, the rate is not. Tests cannot pin the *size* of the dual step (any positive step has
  the same fixed point); the ``(1 + 2ω)`` factor only affects stability and speed.

What to expect (measured, ``tests/test_locodl.py`` and the issue report; softmax regression on
Synthetic(1,1), n = 10, d = 610, γ = 0.02, ℓ2 weight λ): the lifting halves the effective strong
convexity, so with the same γ LoCoDL needs about twice Scaffnew's iterations (with g = 0 or with λ
split between the f_i and g alike: ``clients.weight_decay = λ/2, g_l2 = λ/2`` solves the same problem
and matches the theory's assumption). ``p`` is the knob to tune first: without compression the best
p is small (the rate is set by γμ until p² ≈ γμ); with compression p must stay above a threshold
that grows with ω (below it the rate is set by the compressor), so the best p *grows* with ω. At
equal p, Rand-K cuts the uplink bytes by its ratio (+ headers); at each variant's best p, on this
small problem, compressed LoCoDL did not beat uncompressed Scaffnew in uplink bytes — the paper's
gains are for large d and n (``ω_av = ω/n`` small) and ill-conditioned problems.

**Integration with the round loop.** One round is one communication: the server draws
``K ~ Geometric(p)`` from ``(seed, "locodl-coin", t)`` and every client takes exactly K local steps
from *its own* ``x_i`` (``clients.batch_size`` ≥ client size gives full gradients), so the
``clients.epochs``/``max_steps`` settings are replaced by K. The uplink payload is ``x̂_i − ŷ``
through ``compression.uplink`` (the compressor C_i; the loop seeds each client's codec separately,
so Rand-K masks are independent). The algorithm reads the payload *bytes*
(:meth:`aggregate_payloads`, ``decodes_uplink = False``): decoding client i's bytes gives the ``d_i``
the server uses *and* the one client i uses in its ``u_i`` update — the same bytes, so both ends
agree exactly.

*The broadcast.* The global model of the loop (evaluated, checkpointed as ``global/x``, broadcast)
is ``y``: the only model the server holds (it never sees an ``x_i``); at the solution every
``x_i = y = x*``. The clients need d̄, and the broadcast of ``y`` carries it:
``y^{t+1} − ŷ^t = ρ d̄^t`` and every client knows ``ŷ^t``. So the downlink is charged one
``compression.downlink`` payload of ``y`` per client per round, what sending d̄ (same size) costs;
d̄ is *not* sent again as an ``Algorithm.broadcast_extras`` vector, which would charge it twice.
LoCoDL compresses the uplink only, so the downlink codec must be lossless (``fp32``, ``fp32 > zstd``
...); a lossy one would give clients a ``y`` that differs from the server's (bidirectional
compression is BiCoLoR, arXiv 2601.12400, not implemented). Because it is lossless, the simulation
applies the clients' updates with the server's d̄ (equal to ``(y^{t+1} − ŷ^t)/ρ``), rather than
recomputing it from the float32 ``y``, whose cancellation would make ``(1/n) Σ u_i + v`` drift.

Options: ``p`` (0.2, in (0, 1]), ``rho``/``chi`` (None → ``1/(1 + ω/n)``; in (0, 1]), ``omega``
(None → read from the uplink codec: 0 for a lossless codec, ``max_t d_t/k_t − 1`` over the coded
tensors for ``randk`` with lossless values; required for other unbiased codecs, e.g. ``qsgd``),
``g_l2`` (0: the server-side term g, ``(g_l2/2)‖y‖²``; it adds to the problem), ``allow_biased``
(False: a biased uplink codec such as ``topk`` is a ConfigError; True runs it, with ``omega``
given, outside the theory). Metrics: ``local_steps_per_client`` (K), ``communication_rounds``,
``cum_iterations`` (Σ K), ``uv_sum_norm`` = ‖(1/n) Σ_i u_i + v‖, ``message_norm`` =
mean_i ‖x̂_i − ŷ‖ (what the clients compress; it tends to 0 at the solution, which is why the
compression error vanishes and the limit is exact) and ``client_spread`` = mean_i ‖x_i − y‖ after
the communication (0 when ρ = 1).

Requirements (ConfigErrors otherwise): full participation with uniform sampling (LoCoDL has no
partial participation), ``clients.momentum = 0``, ``server.lr = 1`` and ``server.momentum = 0``,
``algorithm.aggregator = "mean"`` without central DP, ``compression.uplink_ef = "none"``, a lossless
downlink. Dropped, straggling or NaN clients break the full-participation assumption: such a client
keeps its ``x_i, u_i`` of the round start and d̄ is ``Σ_accepted d_j / (n + n_accepted)`` (they count
as having sent ``d_j = d̄``), which keeps ``(1/n) Σ u_i + v = 0``; avoid them. (That a client
learns whether it was accepted is modelled, not charged: a per-client acknowledgement.)

State: ``x_i`` and ``u_i`` per client (float32 :class:`VectorStore` s ``locodl_x``, ``locodl_u``;
``compression.state_dtype`` is not applied, they are exact corrections; on disk with
``compression.state_offload``), the shared ``y``, ``v`` and ``cum_iterations``: all checkpointed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from fedsqueeze.algorithms.base import AlgoContext, Algorithm, ClientMessage, RoundPlan, opt_float
from fedsqueeze.channel import ModelCodec
from fedsqueeze.codecs import parse_spec
from fedsqueeze.codecs.base import Codec
from fedsqueeze.codecs.lossless import Zstd
from fedsqueeze.codecs.sparse import RandK, _k_for
from fedsqueeze.errors import ConfigError
from fedsqueeze.sim.local import GradHook, LocalTrainConfig
from fedsqueeze.sim.seeds import np_rng
from fedsqueeze.sim.state import VectorStore

if TYPE_CHECKING:
    from fedsqueeze.experiment.config import RunConfig


def _unwrap(codec: Codec) -> Codec:
    """The codec under any lossless (``zstd``) wrappers."""
    while isinstance(codec, Zstd):
        codec = codec.inner
    return codec


def _omega_readable(codec: Codec) -> bool:
    """Whether :func:`codec_omega` can read ω from the codec (lossless, or Rand-K with lossless values)."""
    inner = _unwrap(codec)
    return codec.lossless or (isinstance(inner, RandK) and inner.values.lossless)


def codec_omega(codec: Codec, shapes: Sequence[tuple[int, ...]]) -> float | None:
    """The variance factor ω of ``U(ω)`` (``E‖C(x) − x‖² ≤ ω‖x‖²``) that ``codec`` guarantees on
    every tensor of a wire layout with these ``shapes``, or None when it cannot be read from the codec.

    Identities: a lossless codec has ω = 0; Rand-K keeping ``k`` of ``d`` entries scaled by ``d/k``
    has ω = ``d/k − 1`` (per tensor; the maximum over the tensors is returned).
    """
    if codec.lossless:
        return 0.0
    inner = _unwrap(codec)
    if not (isinstance(inner, RandK) and inner.values.lossless):
        return None
    omega = 0.0
    for shape in shapes:
        d = math.prod(shape)
        if d == 0:
            continue
        k = _k_for(d, inner.ratio, inner.k)  # the codec's own rule for k
        omega = max(omega, d / k - 1.0)
    return omega


class LoCoDL(Algorithm):
    """LoCoDL: local training + unbiased uplink compression of ``x̂_i − ŷ`` (see the module docstring)."""

    name = "locodl"
    OPTIONS: ClassVar[dict[str, Any]] = {
        "p": 0.2,
        "rho": None,
        "chi": None,
        "omega": None,
        "g_l2": 0.0,
        "allow_biased": False,
    }
    decodes_uplink: ClassVar[bool] = False  # aggregate_payloads decodes each client's bytes once

    def __init__(
        self,
        ctx: AlgoContext,
        *,
        p: float,
        omega: float,
        uplink: str = "fp32",
        scope: str = "tensor",
        rho: float | None = None,
        chi: float | None = None,
        g_l2: float = 0.0,
    ) -> None:
        self.ctx = ctx
        self.n = ctx.num_clients
        self.p = p
        self.gamma = ctx.client_lr
        self.omega = omega
        omega_av = omega / self.n
        self.rho = rho if rho is not None else 1.0 / (1.0 + omega_av)
        self.chi = chi if chi is not None else 1.0 / (1.0 + omega_av)
        self.g_l2 = g_l2
        #: the dual step p χ / (γ (1 + 2ω)) of the u_i and v updates
        self.dual_step = p * self.chi / (self.gamma * (1.0 + 2.0 * omega))
        self.mc = ModelCodec(uplink, ctx.layout, scope=scope)  # decodes the clients' payload bytes
        off = ctx.offload_dir
        self.x = VectorStore("locodl_x", dtype=torch.float32, offload_dir=off)  # x_i
        self.u = VectorStore("locodl_u", dtype=torch.float32, offload_dir=off)  # u_i
        self.xhat = VectorStore("locodl_xhat", dtype=torch.float32, offload_dir=off)  # within a round
        self.y: torch.Tensor | None = None  # shared model (= the loop's global model)
        self.v = torch.zeros(ctx.layout.numel)  # shared control variate
        self.k = 1
        self.cum_iterations = 0
        self._yhat: torch.Tensor | None = None
        self._metrics: dict[str, Any] = {}
        self._msg_norms: list[float] = []

    # --------------------------------------------------------------- config
    @classmethod
    def validate(cls, cfg: RunConfig) -> dict[str, Any]:
        o = cls.check_options(cfg.algorithm.options)
        o["p"] = opt_float(o, "p", gt=0.0, le=1.0)
        for key in ("rho", "chi"):
            if o[key] is not None:
                o[key] = opt_float(o, key, gt=0.0, le=1.0)
        if o["omega"] is not None:
            o["omega"] = opt_float(o, "omega", ge=0.0)
        o["g_l2"] = opt_float(o, "g_l2", ge=0.0)
        if not isinstance(o["allow_biased"], bool):
            raise ConfigError(
                f"algorithm.options.allow_biased must be true or false, got {o['allow_biased']!r}"
            )
        n, k = cfg.data.num_clients, cfg.clients_per_round()
        if k != n:
            raise ConfigError(
                f"locodl needs full participation (LoCoDL has no partial participation): "
                f"clients.per_round = {k} but data.num_clients = {n}; set clients.per_round = {n}"
            )
        sampling = getattr(cfg.clients, "sampling", "uniform")
        if sampling != "uniform":
            raise ConfigError(
                f"locodl: clients.sampling must be 'uniform' (every client, every round), got {sampling!r}"
            )
        if cfg.clients.momentum:
            raise ConfigError(
                "locodl: clients.momentum must be 0 (local steps are plain GD/SGD with γ = clients.lr)"
            )
        if cfg.server.lr != 1.0 or cfg.server.momentum != 0.0:
            raise ConfigError(
                "locodl: leave server.lr = 1.0 and server.momentum = 0.0 (the server step is LoCoDL's own)"
            )
        if cfg.algorithm.aggregator != "mean" or cfg.privacy.mode == "central":
            raise ConfigError(
                "locodl: the server averages the d_i itself: algorithm.aggregator = 'mean', no central DP"
            )
        c = cfg.compression
        if c.uplink_ef != "none":
            raise ConfigError(
                f"locodl: compression.uplink_ef must be 'none' (got {c.uplink_ef!r}); LoCoDL's control "
                "variates already handle the compression error of an unbiased uplink codec"
            )
        if not parse_spec(c.downlink).lossless:
            raise ConfigError(
                f"locodl compresses the uplink only: compression.downlink must be lossless (e.g. 'fp32' or "
                f"'fp32 > zstd'), got {c.downlink!r}; a lossy broadcast desynchronises the shared y "
                "(bidirectional compression is BiCoLoR, not implemented)"
            )
        up = parse_spec(c.uplink)
        if not (up.lossless or up.unbiased):
            if not o["allow_biased"]:
                raise ConfigError(
                    f"locodl needs an unbiased uplink codec (C_i ∈ U(ω), e.g. 'randk:10%' or 'qsgd:16'); "
                    f"{c.uplink!r} is biased. Set algorithm.options.allow_biased = true (and omega) to "
                    "run it outside the theory"
                )
            if o["omega"] is None:
                raise ConfigError(
                    f"locodl: a biased uplink codec ({c.uplink!r}) has no ω; set algorithm.options.omega"
                )
        elif o["omega"] is None and not _omega_readable(up):
            raise ConfigError(
                f"locodl: cannot read the variance factor ω of {c.uplink!r} from its spec (only lossless "
                "codecs and 'randk' with fp32 values are read); set algorithm.options.omega"
            )
        return o

    @classmethod
    def from_config(cls, cfg: RunConfig, ctx: AlgoContext) -> LoCoDL:
        o = cls.validate(cfg)
        scope = getattr(cfg.compression, "uplink_scope", "tensor")
        mc = ModelCodec(cfg.compression.uplink, ctx.layout, scope=scope)
        omega = o["omega"]
        if omega is None:
            omega = codec_omega(mc.codec, mc.wire.shapes)
            if omega is None or not math.isfinite(omega):  # unreachable after validate()
                raise ConfigError(f"locodl: set algorithm.options.omega for {cfg.compression.uplink!r}")
        return cls(
            ctx,
            p=o["p"],
            omega=float(omega),
            uplink=cfg.compression.uplink,
            scope=scope,
            rho=o["rho"],
            chi=o["chi"],
            g_l2=o["g_l2"],
        )

    # --------------------------------------------------------------- helpers
    def _zeros(self) -> torch.Tensor:
        return torch.zeros(self.ctx.layout.numel)

    def _u(self, c: int) -> torch.Tensor:
        v = self.u.get(c)
        return self._zeros() if v is None else v

    def yhat(self) -> torch.Tensor:
        """ŷ of this round: K steps ``ŷ = y − γ ∇g(y) + γ v`` from the shared ``y`` (cached per round)."""
        if self._yhat is None:
            if self.y is None:
                raise RuntimeError("locodl: y is not initialised (client_start runs first in a round)")
            y = self.y.clone()
            for _ in range(self.k):
                if self.g_l2:
                    y.mul_(1.0 - self.gamma * self.g_l2)
                y.add_(self.v, alpha=self.gamma)
            self._yhat = y
        return self._yhat

    # --------------------------------------------------------------- hooks
    def plan_round(self, t: int, local: LocalTrainConfig) -> RoundPlan:
        rng = np_rng(self.ctx.seed, "locodl-coin", t)
        k = 1
        while self.p < 1.0 and rng.random() >= self.p:  # one shared coin per iteration
            k += 1
        self.k = k
        self.cum_iterations += k
        self._yhat = None
        self._msg_norms = []
        for c in self.xhat.clients():  # leftovers of a round whose aggregation was skipped
            self.xhat.discard(c)
        self._metrics = {
            "local_steps_per_client": k,
            "communication_rounds": t + 1,
            "cum_iterations": self.cum_iterations,
        }
        return RoundPlan(replace(local, epochs=k, max_steps=k), dict(self._metrics))

    def client_start(self, c: int, t: int, broadcast: torch.Tensor) -> torch.Tensor:
        if self.y is None:  # first round: y⁰ = x⁰, the broadcast model (lossless downlink)
            self.y = broadcast.detach().to(torch.float32).clone()
        x = self.x.get(c)
        return (self.y if x is None else x).clone()  # x_i⁰ = y⁰; clients train from their own x_i

    def grad_hook(self, clients: Sequence[int], starts: Sequence[torch.Tensor]) -> GradHook | None:
        us = [self.ctx.layout.unflatten(self._u(c)) for c in clients]

        def hook(
            i: int, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]
        ) -> dict[str, torch.Tensor]:
            for name, g in grads.items():
                g.sub_(us[i][name])  # ∇f_i − u_i: the step is x − γ∇f_i + γu_i
            return grads

        return hook

    def client_message(
        self, c: int, t: int, start: torch.Tensor, delta: torch.Tensor, steps: int
    ) -> ClientMessage:
        xhat = start + delta
        self.xhat.set(c, xhat)  # kept by the client until d̄ arrives
        msg = xhat - self.yhat()  # the uplink codec turns it into d_i = C_i(x̂_i − ŷ)
        self._msg_norms.append(float(msg.norm()))
        return ClientMessage(msg)

    def client_weight(self, c: int, num_samples: int) -> float:
        return 1.0  # LoCoDL averages uniformly

    def aggregate_payloads(
        self,
        payloads: Mapping[int, bytes],
        weights: Mapping[int, float],
        *,
        denominator: float | None = None,
    ) -> torch.Tensor | None:
        """d̄ from the accepted clients' payload bytes; also each client's ``u_i −= step · d_i``
        (the ``d_i`` it decodes from its own bytes; the ``+ step · d̄`` half is in server_update)."""
        total = torch.zeros(self.ctx.layout.numel, dtype=torch.float64)
        for c, payload in payloads.items():
            d = self.mc.decode(payload)
            self.u.set(c, self._u(c) - self.dual_step * d)
            total += d
        return (total / (self.n + len(payloads))).to(torch.float32)  # = (1/(2n)) Σ d_j with everyone

    def server_update(
        self,
        x: torch.Tensor,
        agg: torch.Tensor,
        *,
        accepted: Sequence[int] = (),
        extras: Mapping[int, Mapping[str, torch.Tensor]] | None = None,
        t: int = 0,
    ) -> torch.Tensor:
        dbar = agg
        yhat = self.yhat()
        target = yhat + dbar  # ŷ + d̄
        for c in accepted:  # the clients' side, with the d̄ the broadcast of y carries
            xhat = self.xhat.get(c)
            if xhat is None:  # unreachable: every accepted client sent a message this round
                raise RuntimeError(f"locodl: no x̂ for client {c}")
            self.x.set(c, (1.0 - self.rho) * xhat + self.rho * target)
            self.u.set(c, self._u(c) + self.dual_step * dbar)
        for c in self.xhat.clients():
            self.xhat.discard(c)  # non-accepted clients keep the x_i of the round start
        self.y = yhat + self.rho * dbar
        self.v = self.v + self.dual_step * dbar
        self._yhat = None
        return self.y.clone()

    def round_metrics(self) -> dict[str, Any]:
        usum = self._zeros()
        for c in self.u.clients():
            usum += self._u(c)
        spread = 0.0
        if self.y is not None:
            cs = self.x.clients()
            for c in cs:
                xc = self.x.get(c)
                assert xc is not None
                spread += float((xc - self.y).norm())
            spread /= max(1, len(cs))
        return {
            **self._metrics,
            "uv_sum_norm": float((usum / self.n + self.v).norm()),
            "message_norm": sum(self._msg_norms) / max(1, len(self._msg_norms)),
            "client_spread": spread,
        }

    # --------------------------------------------------------------- state
    def stores(self) -> list[VectorStore]:
        return [self.x, self.u, self.xhat]

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = super().state_dict()
        if self.y is not None:
            out["locodl/y"] = self.y
        out["locodl/v"] = self.v
        out["locodl/cum_iterations"] = torch.tensor([self.cum_iterations], dtype=torch.int64)
        return out

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        y = state.get("locodl/y")
        self.y = None if y is None else y.clone()
        self.v = state["locodl/v"].clone()
        self.cum_iterations = int(state["locodl/cum_iterations"][0])
        self._yhat = None
