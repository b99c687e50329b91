r"""EF21 (Richtárik, Sokolov, Fatkhullin; "EF21: A New, Simpler, Theoretically Better, and
Practically Faster Error Feedback", NeurIPS 2021) with partial participation, EF21-PP (Fatkhullin,
Sokolov, Gorbunov, Li, Richtárik; "EF21 with Bells & Whistles: Practical Algorithmic Extensions of
Modern Error Feedback", arXiv 2110.03294, 2021).

Client i holds a gradient estimate ``g_i``; the server holds ``g = (1/n) Σ_i g_i`` (n =
``data.num_clients``, every client, sampled or not), a contractive compressor C (``compression.uplink``,
Top-K the textbook choice) and a step size γ (``algorithm.options.stepsize``)::

    x^{t+1}     = x^t − γ g^t                              # server step, broadcast x^{t+1}
    i ∈ S_t:      c_i^t = C( ∇f_i(x^{t+1}) − g_i^t )       # uploaded (the only uplink payload)
                  g_i^{t+1} = g_i^t + c_i^t                 # c_i^t decoded from the bytes
    i ∉ S_t:      g_i^{t+1} = g_i^t                         # EF21-PP: absent clients keep g_i
    server:       g^{t+1} = g^t + (1/n) Σ_{i∈S_t} c_i^t

With full participation (``clients.per_round = data.num_clients``) this is EF21; with fewer clients
per round it is EF21-PP (whichever clients the loop's sampler draws; no reweighting is needed). The
objective is the *uniform* mean ``f = (1/n) Σ_i f_i`` with ``f_i`` the mean cross-entropy over client
i's examples (+ ``(λ/2)‖x‖²`` with λ = ``clients.weight_decay``): the paper's plain 1/n, not FedAvg's
sample-count weights. Under the loop's ordering, round t (0-based) broadcasts ``x``, the sampled
clients send ``C(∇f_i(x) − g_i)``, and the server updates ``g`` and then steps ``x ← x − γ g`` (a
round in which no message is accepted leaves ``x`` and ``g`` unchanged: the loop skips the step).

**Initialisation.** ``g_i^0 = 0`` and ``g^0 = 0``, so a client's first message is ``C(∇f_i(x))``,
the paper's ``g_i^0 = C(∇f_i(x^0))`` (in round 0 for every client under full participation; at its
first participation under PP, a client never sampled counts as ``g_i = 0`` in ``g``). The paper's
alternative, a full-precision first message, is *not* offered: the loop's uplink channel has one
codec, and the only honest way to carry a lossless first round would be a per-message codec in the
loop (not available).

**Gradients** (``gradient``): ``"full"`` (default) is ∇f_i at the broadcast model over all of the
client's examples, computed in chunks of ``clients.batch_size`` (one local "step" per chunk, which
is what the network model charges as compute); ``"minibatch"`` is the gradient of one mini-batch of
``clients.batch_size`` examples drawn from the round's training seed (EF21-SGD flavour, no longer
exact convergence). No local SGD steps are taken: ``clients.lr``, ``epochs``, ``max_steps`` and
``engine`` are unused. Implemented by overriding ``local_train``; its ``LocalResult.delta`` carries
the *gradient* ∇f_i(x), which ``client_message`` turns into the EF21 message.

**What is uploaded and its bytes.** The message ``∇f_i − g_i`` goes through the loop's uplink channel
(``compression.uplink``); the client uploads exactly that payload, so ``uplink_bytes`` is the measured
Top-K payload (k (index, value) pairs per tensor, indices as bitmap or delta+Rice), never dense. No
extra payloads. The downlink is the loop's broadcast (fp32 by default; a lossy downlink means the
gradients are taken at the decoded model, which the EF21 theorem does not cover).

**Both ends agree.** The algorithm receives the accepted clients' payload *bytes*
(``decodes_uplink = False`` and :meth:`EF21.aggregate_payloads`) and decodes each one once: that
decode is what the server adds to ``g`` and what the client, decoding its own payload, adds to
``g_i``. A client's ``g_i`` changes only when the server accepted its message (a dropped,
straggling or NaN client keeps ``g_i``, exactly like an absent one); that the client learns the
server's accept/reject decision is modelled, not charged (a per-client acknowledgement). The
loop's aggregator and the clients' weights are not used: the server step is the paper's plain
``1/n``, whatever the sampler (EF21-PP needs no reweighting: absent clients are represented by
their stale ``g_i``).

**No double error feedback.** EF21 is done here, on gradients, so ``compression.uplink_ef`` must be
``"none"`` (ConfigError otherwise). The channel's own ``uplink_ef = "ef21"`` mode with FedAvg is a
different thing: EF21 on *model differences*, and with partial participation it averages only the
sampled clients' estimates, which is not EF21-PP. Likewise the aggregation must be
``algorithm.aggregator = "mean"`` (robust rules do not produce EF21's estimator ``g``), without
privacy noise and without attacks that rewrite updates (data poisoning, ``label_flip``, is fine);
``server.lr``/``server.momentum`` keep their defaults (γ is ``stepsize``) and ``clients.momentum``
must be 0.

**Step size.** ``stepsize`` is a number > 0, or ``"theory"``: EF21's Theorem 1 (non-convex),
``γ = 1 / (L + L̃ sqrt(β/θ))`` with ``θ = 1 − sqrt(1 − α)`` and ``β = (1 − α) / (1 − sqrt(1 − α))``,
from ``L`` (smoothness of f, required), ``L_tilde`` (``sqrt((1/n) Σ L_i²)``, default ``L``) and the
contraction ``α`` of C (``‖C(x) − x‖² ≤ (1 − α)‖x‖²``): given as ``alpha``, or derived from the
uplink codec -- a lossless codec (``fp32``, or ``zstd`` around one) has α = 1 (γ = 1/L); Top-K with
fp32 values is applied per parameter tensor, so α = min over tensors of ``k_l / d_l`` (= the ratio
when it rounds exactly, e.g. ``topk:10%`` on the 60x10 + 10 logreg gives 60/600 = 1/10 = 0.1), or
over the whole model with ``compression.uplink_scope = "model"`` (one global Top-K, α = k/d).
Other codecs need ``alpha``. The rule is about ``1 / (L (1 + 2/α))`` and conservative (tune upward
first).

*Under partial participation* ``"theory"`` uses ``α_pp = q_min · α``, where ``q_min`` is the smallest
probability, over clients, that a client's message is accepted in a round: the sampler's inclusion
probability (``m/n`` for ``uniform``; ``π_c`` for ``importance`` by size) times ``1 − drop_prob`` of
its network link. Why (our derivation; the bound printed in the EF21-PP paper is not reproduced
here): if client i takes part with probability q_i, independently of the past and of C, an absent
client keeps ``g_i``, i.e. adds the message 0. So EF21-PP *is* EF21 with the per-client compressor
``C_i'(v) = C(v)`` with probability q_i, else 0, and
``E‖C_i'(v) − v‖² = q_i (1−α)‖v‖² + (1−q_i)‖v‖² = (1 − q_i α)‖v‖²``: a contraction with
``α_i = q_i α``. EF21's Theorem 1 needs only this per-client contraction in expectation (the
correlation between clients of one cohort does not enter it), so its step holds with
``α = min_i q_i α``. (Optimising the two Young inequalities of a direct Lyapunov argument over
their free parameters gives the same step numerically, which the tests check.) A cyclic schedule
or a deadline (stragglers) is not a fixed participation probability: give ``participation`` (q_min
in (0, 1]) for those, or a number for ``stepsize``. (Importance sampling by norm is refused for EF21
anyway: the server never decodes a client's update, so there are no norms to learn from.)

**State.** One ``g_i`` per client that ever participated, in a :class:`VectorStore` named
``ef21_g`` (``compression.state_dtype``, on disk with ``compression.state_offload``), plus the
server's ``g`` (float32); both are checkpointed (keys ``ef21_g/<client>`` and ``ef21/g``). Reduced
precision state makes the clients' ``g_i`` approximate while the server's ``g`` accumulates the exact
decoded messages, so ``g = mean g_i`` then holds only up to that rounding.

Metrics per round: ``ef21_g_norm`` (‖g‖ after the round), ``ef21_estimates_held`` (clients holding a
``g_i``), ``ef21_updated_clients`` (|S| accepted this round) and ``ef21_stepsize`` (γ).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F  # noqa: N812

from fedsqueeze.algorithms.base import AlgoContext, Algorithm, ClientMessage, RoundPlan, opt_choice, opt_float
from fedsqueeze.codecs import parse_spec
from fedsqueeze.codecs.base import Codec
from fedsqueeze.codecs.sparse import TopK, _k_for
from fedsqueeze.errors import ConfigError, FedSqueezeError
from fedsqueeze.sim.local import LocalResult, LocalTrainConfig, client_batches
from fedsqueeze.sim.state import VectorStore

if TYPE_CHECKING:
    from fedsqueeze.experiment.config import RunConfig

__all__ = ["EF21", "EF21StateMismatch", "contraction_alpha", "theory_stepsize"]


class EF21StateMismatch(FedSqueezeError):
    """The round loop did not hand EF21 the decoded messages of exactly the accepted clients."""


def theory_stepsize(L: float, L_tilde: float, alpha: float) -> float:
    """EF21 Theorem 1: ``γ = 1 / (L + L̃ sqrt(β/θ))``, ``θ = 1 − sqrt(1−α)``,
    ``β = (1−α) / (1 − sqrt(1−α))``. α = 1 (no compression) gives ``1/L``."""
    for name, v in (("L", L), ("L_tilde", L_tilde)):
        if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
            raise ConfigError(f"theory_stepsize: {name} must be a finite number > 0, got {v!r}")
    if not (isinstance(alpha, int | float) and 0 < alpha <= 1):
        raise ConfigError(f"theory_stepsize: alpha must be in (0, 1], got {alpha!r}")
    s = math.sqrt(1.0 - alpha)
    theta = 1.0 - s
    beta = (1.0 - alpha) / theta
    return 1.0 / (L + L_tilde * math.sqrt(beta / theta))


def _alpha_rule(codec: Codec) -> Callable[[Sequence[int]], float] | None:
    """``numels -> α`` when the contraction of ``codec`` (applied per tensor) is known, else None."""
    while codec.stage == "lossless" and getattr(codec, "inner", None) is not None:
        codec = codec.inner  # type: ignore[attr-defined]
    if codec.lossless:
        return lambda numels: 1.0
    if isinstance(codec, TopK) and codec.values.lossless:
        ratio, k = codec.ratio, codec.k
        return lambda numels: min(_k_for(d, ratio, k) / d for d in numels if d > 0)
    return None


def contraction_alpha(codec: Codec | str, numels: Sequence[int]) -> float | None:
    """The contraction α of ``codec`` applied to each tensor of sizes ``numels`` (the model's
    parameter tensors), or None when it cannot be derived (lossy values, quantisers, Rand-K...)."""
    rule = _alpha_rule(parse_spec(codec) if isinstance(codec, str) else codec)
    return None if rule is None else rule(numels)


class EF21(Algorithm):
    """EF21 / EF21-PP on gradients with a per-client estimate store (see the module docstring)."""

    name = "ef21"
    decodes_uplink: ClassVar[bool] = False  # aggregate_payloads decodes each message once
    OPTIONS: ClassVar[dict[str, Any]] = {
        "stepsize": None,
        "L": None,
        "L_tilde": None,
        "alpha": None,
        "participation": None,
        "gradient": "full",
    }

    def __init__(
        self,
        ctx: AlgoContext,
        *,
        stepsize: float,
        codec: str = "fp32",
        gradient: str = "full",
        alpha: float | None = None,
        scope: str = "tensor",
        theory: tuple[float, float, float, float | None] | None = None,
    ) -> None:
        """``theory = (L, L̃, α, participation)`` when ``stepsize`` came from ``"theory"``:
        :meth:`bind_participation` then rescales it for partial participation."""
        if not (math.isfinite(stepsize) and stepsize > 0):
            raise ConfigError(f"ef21: stepsize must be a finite number > 0, got {stepsize!r}")
        if gradient not in ("full", "minibatch"):
            raise ConfigError(f"ef21: gradient must be 'full' or 'minibatch', got {gradient!r}")
        from fedsqueeze.channel import ModelCodec

        self.ctx = ctx
        self.stepsize = float(stepsize)
        self.gradient = gradient
        self.alpha = alpha
        self.theory = theory
        self.participation: float | None = None  # q_min used by the theory step (None: full)
        # the loop's uplink wire layout (compression.uplink_scope): one frame per tensor or one in all
        self.mc = ModelCodec(codec, ctx.layout, scope=scope)
        self.gi = VectorStore("ef21_g", dtype=ctx.state_dtype, offload_dir=ctx.offload_dir)
        self.g = torch.zeros(ctx.layout.numel)
        self._received: dict[int, torch.Tensor] = {}  # c -> decoded c_i of this round
        self._updated = 0

    # --------------------------------------------------------------- config
    @classmethod
    def validate(cls, cfg: RunConfig) -> dict[str, Any]:
        o = cls.check_options(cfg.algorithm.options)
        step = o["stepsize"]
        if step is None:
            raise ConfigError(
                "ef21 needs algorithm.options.stepsize: a number > 0 (the server step γ), or 'theory' "
                "with algorithm.options.L"
            )
        if step == "theory":
            if o["L"] is None:
                raise ConfigError(
                    "ef21: stepsize = 'theory' needs algorithm.options.L (smoothness constant of f, > 0)"
                )
            o["L"] = opt_float(o, "L", gt=0.0)
            o["L_tilde"] = o["L"] if o["L_tilde"] is None else opt_float(o, "L_tilde", gt=0.0)
            if o["participation"] is not None:
                o["participation"] = opt_float(o, "participation", gt=0.0, le=1.0)
            elif cfg.clients_per_round() < cfg.data.num_clients and cfg.clients.sampling == "cyclic":
                raise ConfigError(
                    f"ef21: stepsize = 'theory' under partial participation needs a fixed probability of "
                    f"taking part; clients.sampling = {cfg.clients.sampling!r} "
                    f"{dict(cfg.clients.sampling_options)} has none: set algorithm.options.participation "
                    "(the smallest per-round participation probability, in (0, 1]) or a number for stepsize"
                )
            elif cfg.network.deadline_s is not None:
                raise ConfigError(
                    "ef21: stepsize = 'theory' with network.deadline_s: stragglers make participation "
                    "depend on link speeds, not a fixed probability; set algorithm.options.participation "
                    "(in (0, 1]) or a number for stepsize"
                )
            if o["alpha"] is not None:
                o["alpha"] = opt_float(o, "alpha", gt=0.0, le=1.0)
            elif _alpha_rule(parse_spec(cfg.compression.uplink)) is None:
                raise ConfigError(
                    f"ef21: cannot derive the contraction alpha of compression.uplink = "
                    f"{cfg.compression.uplink!r} (derived only for lossless codecs and Top-K with fp32 "
                    "values); set algorithm.options.alpha in (0, 1]"
                )
        else:
            if isinstance(step, str):
                raise ConfigError(
                    f"algorithm.options.stepsize must be a number > 0 or 'theory', got {step!r}"
                )
            o["stepsize"] = opt_float(o, "stepsize", gt=0.0)
            for key in ("L", "L_tilde", "alpha", "participation"):
                if o[key] is not None:
                    raise ConfigError(
                        f"algorithm.options.{key} is only used with stepsize = 'theory' "
                        f"(stepsize is {o['stepsize']}); remove it"
                    )
        o["gradient"] = opt_choice(o, "gradient", ("full", "minibatch"))
        cls._check_sections(cfg)
        return o

    @classmethod
    def _check_sections(cls, cfg: RunConfig) -> None:
        comp = cfg.compression
        if comp.uplink_ef != "none":
            raise ConfigError(
                f"ef21 does its own error feedback on gradients: compression.uplink_ef = {comp.uplink_ef!r} "
                "would apply a second one; set compression.uplink_ef = 'none'"
            )
        if cfg.algorithm.aggregator != "mean":
            raise ConfigError(
                f"ef21: algorithm.aggregator = {cfg.algorithm.aggregator!r} does not produce EF21's "
                "estimator g = (1/n) Σ g_i; use 'mean'"
            )
        if cfg.privacy.mode != "none":
            raise ConfigError(
                f"ef21: privacy.mode = {cfg.privacy.mode!r} changes the uploads after the client kept its "
                "g_i (client and server estimates would disagree); set privacy.mode = 'none'"
            )
        if cfg.attack.name != "none":
            from fedsqueeze.algorithms.attacks import ATTACKS

            attack = ATTACKS.get(cfg.attack.name)
            if attack is not None and not attack.poisons_data:
                raise ConfigError(
                    f"ef21: attack {cfg.attack.name!r} rewrites client updates after the client kept its "
                    "g_i; only data-poisoning attacks (label_flip) are supported"
                )
        if cfg.server.lr != 1.0 or cfg.server.momentum != 0.0:
            raise ConfigError(
                "ef21: leave server.lr = 1.0 and server.momentum = 0.0; the server step is "
                "algorithm.options.stepsize"
            )
        if cfg.clients.momentum:
            raise ConfigError("ef21: clients.momentum must be 0 (clients compute gradients, no local SGD)")

    @classmethod
    def from_config(cls, cfg: RunConfig, ctx: AlgoContext) -> EF21:
        from fedsqueeze.channel import ModelCodec

        o = cls.validate(cfg)
        alpha = o["alpha"]
        scope = cfg.compression.uplink_scope
        if o["stepsize"] == "theory":
            if alpha is None:  # per tensor of the wire layout (the whole model with scope = "model")
                wire = ModelCodec(cfg.compression.uplink, ctx.layout, scope=scope).wire
                alpha = contraction_alpha(cfg.compression.uplink, [math.prod(s) for s in wire.shapes])
                assert alpha is not None  # validate() checked that it can be derived
            theory = (o["L"], o["L_tilde"], alpha, o["participation"])
            step = theory_stepsize(o["L"], o["L_tilde"], alpha)  # full participation; see bind_participation
        else:
            theory, step = None, o["stepsize"]
        return cls(
            ctx,
            stepsize=step,
            codec=cfg.compression.uplink,
            gradient=o["gradient"],
            alpha=alpha,
            scope=scope,
            theory=theory,
        )

    def bind_participation(self, accept_prob: Sequence[float] | None) -> None:
        """With ``stepsize = "theory"``: γ from EF21's rule with ``α · q_min`` (module docstring)."""
        if self.theory is None:
            return
        L, L_tilde, alpha, override = self.theory
        if override is not None:
            q_min = override
        elif accept_prob is None:
            raise ConfigError(
                "ef21: stepsize = 'theory' needs a fixed per-round participation probability, which this "
                "run's sampling/network does not have; set algorithm.options.participation"
            )
        else:
            q_min = min(float(q) for q in accept_prob)
            if not q_min > 0:
                raise ConfigError(
                    "ef21: some client can never take part (participation probability 0); the EF21-PP step "
                    "size is undefined"
                )
        self.participation = min(1.0, q_min)
        self.stepsize = theory_stepsize(L, L_tilde, alpha * self.participation)

    # --------------------------------------------------------------- hooks
    def plan_round(self, t: int, local: LocalTrainConfig) -> RoundPlan:
        self._received = {}
        self._updated = 0
        return RoundPlan(local)

    def _gi_of(self, c: int) -> torch.Tensor:
        v = self.gi.get(c)
        return torch.zeros(self.ctx.layout.numel) if v is None else v

    def local_train(
        self,
        t: int,
        clients: Sequence[int],
        starts: Sequence[torch.Tensor],
        datasets: Sequence[tuple[torch.Tensor, torch.Tensor]],
        local: LocalTrainConfig,
        seeds: Sequence[int],
    ) -> list[LocalResult] | None:
        """∇f_i at each client's start model (full or one mini-batch); returned as ``delta``."""
        model, layout = self.ctx.model, self.ctx.layout
        if model is None:
            raise ConfigError("ef21.local_train needs AlgoContext.model (the architecture)")
        out: list[LocalResult] = []
        for start, (xd, yd), sd in zip(starts, datasets, seeds, strict=True):
            n = int(yd.shape[0])
            if self.gradient == "full":
                chunks = list(torch.arange(n).split(local.batch_size)) if n else []
                denom = n
            else:
                one = replace(local, epochs=1, max_steps=1)
                chunks = client_batches(n, one, sd)
                denom = int(chunks[0].numel()) if chunks else 0
            q = start.detach().clone().requires_grad_(True)
            params = layout.unflatten(q)
            grad = torch.zeros_like(q)
            loss_sum = 0.0
            for idx in chunks:
                logits = torch.func.functional_call(model, params, (xd[idx],))
                loss = F.cross_entropy(logits, yd[idx], reduction="sum")
                (gq,) = torch.autograd.grad(loss, q)
                grad += gq
                loss_sum += float(loss.detach())
            if denom:
                grad /= denom
            if local.weight_decay:
                grad += local.weight_decay * start.detach()
            out.append(
                LocalResult(
                    delta=layout.unflatten(grad),
                    num_samples=n,
                    steps=len(chunks),
                    train_loss=loss_sum / denom if denom else float("nan"),
                )
            )
        return out

    def client_message(
        self, c: int, t: int, start: torch.Tensor, delta: torch.Tensor, steps: int
    ) -> ClientMessage:
        """``delta`` is ∇f_i(x) (see ``local_train``); the message is ``∇f_i(x) − g_i``."""
        return ClientMessage(delta - self._gi_of(c))

    def client_weight(self, c: int, num_samples: int) -> float:
        return 1.0  # unused by the server step (plain 1/n); reported as the loop's weight

    def aggregate_payloads(
        self,
        payloads: Mapping[int, bytes],
        weights: Mapping[int, float],
        *,
        denominator: float | None = None,
    ) -> torch.Tensor | None:
        """Decode every accepted message ``c_i`` once; return ``(1/n) Σ_{i∈S} c_i`` (weights unused)."""
        total = torch.zeros(self.ctx.layout.numel)
        self._received = {}
        for c, payload in payloads.items():
            ci = self.mc.decode(payload)
            self._received[c] = ci
            total += ci
        return total / self.ctx.num_clients

    def server_update(
        self,
        x: torch.Tensor,
        agg: torch.Tensor,
        *,
        accepted: Sequence[int] = (),
        extras: Mapping[int, Mapping[str, torch.Tensor]] | None = None,
        t: int = 0,
    ) -> torch.Tensor:
        """``g ← g + agg`` (agg from :meth:`aggregate_payloads`), ``g_i ← g_i + c_i``, ``x − γ g``."""
        if set(accepted) != set(self._received):
            raise EF21StateMismatch(
                f"ef21 round {t}: the accepted clients {sorted(accepted)} are not the ones whose payloads "
                f"were decoded {sorted(self._received)}; the round loop must call aggregate_payloads"
            )
        self.g = self.g + agg  # g += (1/n) Σ_{i∈S} c_i
        for c in accepted:
            self.gi.set(c, self._gi_of(c) + self._received[c])  # g_i += c_i (decoded, same bytes)
        self._updated = len(accepted)
        self._received = {}
        return x - self.stepsize * self.g

    def round_metrics(self) -> dict[str, Any]:
        return {
            "ef21_g_norm": float(self.g.norm()),
            "ef21_estimates_held": len(self.gi.clients()),
            "ef21_updated_clients": self._updated,
            "ef21_stepsize": self.stepsize,
            **({} if self.participation is None else {"ef21_participation": self.participation}),
        }

    # --------------------------------------------------------------- state
    def stores(self) -> list[VectorStore]:
        return [self.gi]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**super().state_dict(), "ef21/g": self.g}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        self.g = state["ef21/g"].to(torch.float32).clone()
