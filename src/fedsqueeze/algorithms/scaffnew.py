"""Scaffnew / ProxSkip (Mishchenko, Malinovsky, Stich, Richtárik; "ProxSkip: Yes! Local Gradient
Steps Provably Lead to Communication Acceleration! Finally!", ICML 2022) and FedComLoc (Yi,
Meinhardt, Condat, Richtárik; "FedComLoc: Communication-Efficient Distributed Training of Sparse
and Quantized Models", arXiv 2403.09904, TMLR 2025).

Scaffnew, with step size γ = ``clients.lr``, communication probability p, weights w_i (uniform
1/n as in the paper, or sample counts with ``weights = "samples"``) and control variates h_i
(float32, initialised to 0, so Σ_i w_i h_i = 0)::

    every iteration, every client:  x̂_i = x_i − γ ( g_i(x_i) − h_i )      # grad_hook: g − h_i
    shared coin θ ~ Bernoulli(p)  (one coin for all clients, drawn by the server)
    θ = 1 (communicate):  x̄ = Σ_j w_j x̂_j ;  x_i ← x̄ ;  h_i ← h_i + (p/γ)(x_i − x̂_i)
    θ = 0:                x_i ← x̂_i

One *round* of the loop is one communication: the server draws K ~ Geometric(p) (the number of
iterations up to and including the next θ = 1) from the seed tree ``(seed, "scaffnew-coin", t)``,
every client takes exactly K local steps (mini-batches of ``clients.batch_size``; a batch as large
as the client gives full gradients), uploads, and the server averages. The h_i update needs the
model the client *receives*, so it runs at the start of the next round from the decoded broadcast
(``x_i`` below), with the x̂_i the client kept. Metrics: ``local_steps_per_client`` (K),
``communication_rounds`` (= round), ``cum_iterations`` (Σ K, the T of the theory) and
``h_weighted_sum_norm`` = ‖Σ_i w_i h_i‖ (0 up to rounding when averaging is exact; it drifts under
lossy uplink compression with ``h_ref = "local"``, a known weakness of FedComLoc-Com; see
``h_ref`` below). The weighted variant is ProxSkip in
the w-weighted inner product (the prox of the consensus constraint is the weighted mean), so it
converges to the minimiser of Σ_i w_i f_i.

FedComLoc places a compressor C at one of three points (``variant``):

* ``"com"`` — uplink: the client uploads its model through ``compression.uplink``; the server
  averages what it decodes: ``x̄ = Σ_j w_j C(·)``.
* ``"local"`` — the local gradient is taken at the compressed local model:
  ``x̂_i = x_i − γ ( g_i(C(x_i)) − h_i )`` with C = ``local_codec`` (a codec spec), applied at every
  local step (sparse / quantised training). Uses a sequential local loop of its own.
* ``"global"`` — downlink: the server broadcasts through ``compression.downlink``, so
  ``x_i ← C(x̄)``; ``compression.downlink_mode`` must match ``compress`` (``"model"`` sends C(x̄),
  ``"delta"`` sends C(x̄ − replica)).

``compress`` chooses whether the *model* or the model *difference* is compressed on the uplink
(``"model"``: send C(x̂_i); ``"delta"``: send C(x̂_i − x_i), the server adds the decoded mean to
the broadcast model). With a lossless codec both are Scaffnew. Which one the FedComLoc paper uses is
NOT verified (its body and code were not reachable; see the research notes §2.3): we believe
``"model"`` matches the paper's equations as they are usually written (``x̄ = (1/n) Σ C(x̂_j)``,
``x_i = C(x̄)``), which is the default for ``fedcomloc``; Top-K on a model zeroes small weights every
round, on a difference it does not. For ``"local"`` the compressor is always applied to the model.

``h_ref`` chooses the reference of the control-variate update when the uplink is lossy. Write
``u_i`` for what the server rebuilds from client i's payload bytes (``compress = "model"``:
``u_i = C(x̂_i)``; ``"delta"``: ``u_i = x_i + C(x̂_i − x_i)``), so ``x̄ = Σ_j w_j u_j`` (w normalised)::

    h_ref = "local" (default):  h_i ← h_i + (p/γ)(x̄ − x̂_i)
        ⇒ Σ_i w_i h_i  grows by (p/γ)(Σ_i w_i u_i − Σ_i w_i x̂_i) every communication:
          the mean compression error, amplified by p/γ (= 2 at p = 0.2, γ = 0.1)
    h_ref = "sent":             h_i ← h_i + (p/γ)(x̄ − u_i)
        ⇒ Σ_i w_i h_i  grows by (p/γ)(x̄ − Σ_i w_i u_i) = 0 (exactly, up to float rounding)

With ``"local"`` the drift enters every local step as a common bias ``γ Σ_i w_i h_i`` of the mean
iterate; on MNIST with Top-K 10% or uniform 4-bit of the *model* it grows until the run diverges.
With ``"sent"`` the client uses what it sent: it encoded the payload, so it decodes its own bytes
(like error feedback does), and ``Σ w_i h_i = 0`` is kept. This is OUR stabilisation, not verified
to be the FedComLoc paper's update (its body was not reachable; the paper's equations as usually
written match ``"local"``). A lossless uplink makes both identical. ``"sent"`` fixes only the
uplink's drift: the broadcast of ``"global"`` (``x_i ← C(x̄)``) still moves Σ w_i h_i, and so do
dropped clients and stragglers (they keep ``x̂_i``). It needs the server's update to be the decoded
payload, so ``compression.uplink_ef = "ef21"`` is refused.

Pitfalls honoured: the coin is shared; h_i start at 0; rounds ≠ local steps (both reported);
partial participation is not part of Scaffnew (``clients.per_round`` must equal
``data.num_clients``); ``clients.momentum`` must be 0 and ``server.lr``/``server.momentum`` keep
their defaults (the averaging is the prox step). ``clients.epochs``/``max_steps`` are ignored (K
replaces them). Dropped or straggling clients (network model) break Σ w_i h_i = 0; avoid them. A
client whose update was non-finite (rejected by the loop) keeps its h_i and restarts from the model
it receives next round (its x̂_i is discarded), so one bad round does not poison it for good.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F  # noqa: N812

from fedsqueeze.algorithms.base import AlgoContext, Algorithm, ClientMessage, RoundPlan, opt_choice, opt_float
from fedsqueeze.codecs import decode_state_dict
from fedsqueeze.errors import ConfigError, EncodeError
from fedsqueeze.sim.local import GradHook, LocalResult, LocalTrainConfig, client_batches
from fedsqueeze.sim.seeds import np_rng, torch_rng
from fedsqueeze.sim.state import VectorStore

if TYPE_CHECKING:
    from fedsqueeze.channel import ParamLayout
    from fedsqueeze.experiment.config import RunConfig


class Scaffnew(Algorithm):
    """Scaffnew/ProxSkip; the base of :class:`FedComLoc`."""

    name = "scaffnew"
    OPTIONS: ClassVar[dict[str, Any]] = {
        "p": 0.2,
        "compress": "delta",
        "weights": "uniform",
        "h_ref": "local",
    }

    def __init__(
        self,
        ctx: AlgoContext,
        *,
        p: float,
        compress: str = "delta",
        weights: str = "uniform",
        variant: str = "none",
        local_codec: str | None = None,
        h_ref: str = "local",
    ) -> None:
        self.ctx = ctx
        self.p = p
        self.gamma = ctx.client_lr
        self.compress = compress
        self.weights = weights
        self.variant = variant
        self.h_ref = h_ref
        self.h = VectorStore(f"{self.name}_h", dtype=torch.float32, offload_dir=ctx.offload_dir)
        self.xhat = VectorStore(f"{self.name}_xhat", dtype=torch.float32, offload_dir=ctx.offload_dir)
        self.local_mc = None
        if local_codec is not None:
            from fedsqueeze.channel import ModelCodec

            self.local_mc = ModelCodec(local_codec, ctx.layout)
        self._w: dict[int, float] = {}
        self._base: torch.Tensor | None = None
        self._metrics: dict[str, Any] = {}
        self.cum_iterations = 0

    # --------------------------------------------------------------- config
    @classmethod
    def validate(cls, cfg: RunConfig) -> dict[str, Any]:
        o = cls.check_options(cfg.algorithm.options)
        o["p"] = opt_float(o, "p", gt=0.0, le=1.0)
        o["compress"] = opt_choice(o, "compress", ("model", "delta"))
        o["weights"] = opt_choice(o, "weights", ("uniform", "samples"))
        o["h_ref"] = opt_choice(o, "h_ref", ("local", "sent"))
        if o["h_ref"] == "sent" and cfg.compression.uplink_ef == "ef21":
            raise ConfigError(
                f"{cls.name}: algorithm.options.h_ref = 'sent' rebuilds the server's view from the payload "
                "bytes, but with compression.uplink_ef = 'ef21' the server uses its estimate g_i instead; "
                "set uplink_ef = 'none' or h_ref = 'local'"
            )
        n, k = cfg.data.num_clients, cfg.clients_per_round()
        if k != n:
            raise ConfigError(
                f"{cls.name} needs full participation (Scaffnew has no partial participation): "
                f"clients.per_round = {k} but data.num_clients = {n}; set clients.per_round = {n}"
            )
        if cfg.clients.momentum:
            raise ConfigError(
                f"{cls.name}: clients.momentum must be 0 (local steps are plain SGD with γ = clients.lr)"
            )
        if cfg.server.lr != 1.0 or cfg.server.momentum != 0.0:
            raise ConfigError(
                f"{cls.name}: leave server.lr = 1.0 and server.momentum = 0.0 "
                "(the averaging is the prox step)"
            )
        if cfg.algorithm.aggregator != "mean" or cfg.privacy.mode == "central":
            raise ConfigError(
                f"{cls.name}: the averaging must be algorithm.aggregator = 'mean' without central DP"
            )
        return o

    @classmethod
    def from_config(cls, cfg: RunConfig, ctx: AlgoContext) -> Scaffnew:
        return cls(ctx, **cls.validate(cfg))

    # --------------------------------------------------------------- hooks
    def plan_round(self, t: int, local: LocalTrainConfig) -> RoundPlan:
        rng = np_rng(self.ctx.seed, "scaffnew-coin", t)
        k = 1
        while self.p < 1.0 and rng.random() >= self.p:  # one shared coin per iteration
            k += 1
        self.cum_iterations += k
        self._metrics = {
            "local_steps_per_client": k,
            "communication_rounds": t + 1,
            "cum_iterations": self.cum_iterations,
        }
        return RoundPlan(replace(local, epochs=k, max_steps=k), dict(self._metrics))

    def _hvec(self, c: int) -> torch.Tensor:
        v = self.h.get(c)
        return torch.zeros(self.ctx.layout.numel) if v is None else v

    def client_start(self, c: int, t: int, broadcast: torch.Tensor) -> torch.Tensor:
        xhat = self.xhat.get(c)
        if xhat is not None and not bool(torch.isfinite(xhat).all()):
            # its last update was non-finite and rejected: keep h_i, restart from the model received
            self.xhat.discard(c)
            xhat = None
        if xhat is not None:  # the h update of the previous communication, with the model received
            # xhat: x̂_i (h_ref "local") or u_i, the model the server rebuilt from its bytes ("sent")
            self.h.set(c, self._hvec(c) + (self.p / self.gamma) * (broadcast - xhat))
            self.xhat.discard(c)
        self._base = broadcast
        return broadcast

    def grad_hook(self, clients: Sequence[int], starts: Sequence[torch.Tensor]) -> GradHook | None:
        hs = [self.ctx.layout.unflatten(self._hvec(c)) for c in clients]

        def hook(
            i: int, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]
        ) -> dict[str, torch.Tensor]:
            for n, g in grads.items():
                g.sub_(hs[i][n])  # g − h_i
            return grads

        return hook

    def local_train(
        self,
        t: int,
        clients: Sequence[int],
        starts: Sequence[torch.Tensor],
        datasets: Sequence[tuple[torch.Tensor, torch.Tensor]],
        local: LocalTrainConfig,
        seeds: Sequence[int],
    ) -> list[LocalResult] | None:
        if self.variant != "local":
            return None
        assert self.local_mc is not None and self.ctx.model is not None
        model, layout, mc = self.ctx.model, self.ctx.layout, self.local_mc
        out: list[LocalResult] = []
        for c, start, (xd, yd), sd in zip(clients, starts, datasets, seeds, strict=True):
            x = start.clone()
            h = self._hvec(c)
            gen = torch_rng(self.ctx.seed, "local-codec", t, c)
            batches = client_batches(int(yd.shape[0]), local, sd)
            loss_sum, done = 0.0, 0
            for b in batches:
                try:
                    q = mc.decode(mc.encode(x, rng=gen)).requires_grad_(True)  # C(x_i)
                except EncodeError:  # the iterate diverged (NaN/Inf or beyond the codec's range):
                    if done == 0:  # x is still the received model: a codec/config problem (e.g. a
                        raise  # budget below the codec's minimum), not this client's divergence
                    x.fill_(float("nan"))  # send a non-finite delta, which the loop rejects
                    break
                logits = torch.func.functional_call(model, layout.unflatten(q), (xd[b],))
                loss = F.cross_entropy(logits, yd[b])
                (g,) = torch.autograd.grad(loss, q)
                if local.weight_decay:
                    g = g + local.weight_decay * q.detach()
                x.sub_(self.gamma * (g - h))  # x̂_i = x_i − γ (g_i(C(x_i)) − h_i)
                loss_sum += float(loss.detach())
                done += 1
            out.append(
                LocalResult(
                    delta=layout.unflatten(x - start),
                    num_samples=int(yd.shape[0]),
                    steps=done,
                    train_loss=loss_sum / done if done else float("nan"),
                )
            )
        return out

    def client_message(
        self, c: int, t: int, start: torch.Tensor, delta: torch.Tensor, steps: int
    ) -> ClientMessage:
        xhat = start + delta
        self.xhat.set(c, xhat)  # kept by the client for its h update
        return ClientMessage(xhat if self.compress == "model" else delta)

    def client_weight(self, c: int, num_samples: int) -> float:
        w = 1.0 if self.weights == "uniform" else float(num_samples)
        self._w[c] = w
        return w

    def aggregate_payloads(
        self,
        payloads: Mapping[int, bytes],
        weights: Mapping[int, float],
        *,
        denominator: float | None = None,
    ) -> torch.Tensor | None:
        """With ``h_ref = "sent"``: each client replaces its kept x̂_i by u_i, the model rebuilt from
        the bytes it sent (``C(x̂_i)``, or ``x_i + C(x̂_i − x_i)`` under ``compress = "delta"``).
        Always returns None: the loop's weighted mean of the decoded payloads is x̄."""
        if self.h_ref == "sent":
            for c, payload in payloads.items():
                sent = _decode_flat(payload, self.ctx.layout)  # the client decodes its own bytes
                if self.compress == "delta":  # x_i + C(x̂_i − x_i); every client started from x_i
                    assert self._base is not None
                    sent = self._base + sent
                self.xhat.set(c, sent)
        return None

    def server_update(
        self,
        x: torch.Tensor,
        agg: torch.Tensor,
        *,
        accepted: Sequence[int] = (),
        extras: Mapping[int, Mapping[str, torch.Tensor]] | None = None,
        t: int = 0,
    ) -> torch.Tensor:
        if self.compress == "model":
            return agg.clone()  # x̄ = Σ w_j C(x̂_j)
        base = x if self._base is None else self._base
        return base + agg  # x̄ = x_i + Σ w_j C(x̂_j − x_i)

    def round_metrics(self) -> dict[str, Any]:
        total = sum(self._w.values())
        hsum = torch.zeros(self.ctx.layout.numel)
        for c in self.h.clients():
            hsum += (self._w.get(c, 0.0) / total if total else 0.0) * self._hvec(c)
        return {**self._metrics, "h_weighted_sum_norm": float(hsum.norm())}

    # --------------------------------------------------------------- state
    def stores(self) -> list[VectorStore]:
        return [self.h, self.xhat]

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = super().state_dict()
        out[f"{self.name}/cum_iterations"] = torch.tensor([self.cum_iterations], dtype=torch.int64)
        return out

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        self.cum_iterations = int(state[f"{self.name}/cum_iterations"][0])


class FedComLoc(Scaffnew):
    """Scaffnew with a compressor on the uplink (``com``), the local model (``local``) or the
    downlink (``global``); see the module docstring."""

    name = "fedcomloc"
    OPTIONS: ClassVar[dict[str, Any]] = {
        **Scaffnew.OPTIONS,
        "compress": "model",
        "variant": "com",
        "local_codec": None,
    }

    @classmethod
    def validate(cls, cfg: RunConfig) -> dict[str, Any]:
        o = super().validate(cfg)
        o["variant"] = opt_choice(o, "variant", ("com", "local", "global"))
        comp = cfg.compression
        if o["variant"] == "local":
            spec = o["local_codec"]
            if not isinstance(spec, str):
                raise ConfigError(
                    "fedcomloc variant 'local' needs algorithm.options.local_codec, a codec spec "
                    "(e.g. 'topk:10%' or 'qsgd:16')"
                )
            from fedsqueeze.codecs import parse_spec

            parse_spec(spec)
        elif o["local_codec"] is not None:
            raise ConfigError(
                f"algorithm.options.local_codec is only used by variant 'local' (variant is {o['variant']!r})"
            )
        if o["variant"] == "com" and comp.uplink == "fp32":
            raise ConfigError(
                "fedcomloc variant 'com' compresses the uplink: set compression.uplink (e.g. 'topk:10%')"
            )
        if o["variant"] == "com" and o["h_ref"] == "local" and comp.uplink not in ("fp32", "raw"):
            warnings.warn(
                "fedcomloc 'com' with a lossy uplink and h_ref = 'local': the control-variate sum drifts by "
                "the compression error every communication and Top-K / 4-bit runs diverged on MNIST; "
                "set algorithm.options.h_ref = 'sent' (see docs/results/mnist_fedcomloc.md)",
                UserWarning,
                stacklevel=2,
            )
        if o["variant"] == "global":
            if comp.downlink == "fp32":
                raise ConfigError(
                    "fedcomloc variant 'global' compresses the broadcast: "
                    "set compression.downlink (e.g. 'topk:10%')"
                )
            if comp.downlink_mode != o["compress"]:
                raise ConfigError(
                    f"fedcomloc variant 'global' with algorithm.options.compress = {o['compress']!r} needs "
                    f"compression.downlink_mode = {o['compress']!r} (got {comp.downlink_mode!r})"
                )
        if comp.uplink_ef != "none" or comp.downlink_ef != "none":
            raise ConfigError(
                f"{cls.name}: error feedback is not part of FedComLoc; set compression.*_ef = 'none'"
            )
        return o


def _decode_flat(payload: bytes, layout: ParamLayout) -> torch.Tensor:
    """The flat float32 vector of a model container payload (``scope`` "tensor" or "model")."""
    from fedsqueeze.channel import MODEL_FRAME

    state = decode_state_dict(payload)
    if list(state) == [MODEL_FRAME]:
        return state[MODEL_FRAME].reshape(-1).to(torch.float32)
    return layout.flatten(state)
