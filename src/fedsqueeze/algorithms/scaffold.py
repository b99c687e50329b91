"""SCAFFOLD (Karimireddy, Kale, Mohri, Reddi, Stich, Suresh; "SCAFFOLD: Stochastic Controlled
Averaging for Federated Learning", ICML 2020), option II control variates.

State: a server control variate ``c`` and one ``c_i`` per client (a :class:`VectorStore`; all start
at zero, so ``c = (1/N) Σ_i c_i`` holds throughout). Round with sampled set S, broadcast ``x``,
client learning rate η_l (``clients.lr``), K_i local steps::

    y_i ← y_i − η_l ( g_i(y_i) − c_i + c )        # every local step (grad_hook: g − c_i + c)
    c_i⁺ = c_i − c + (x − y_i) / (K_i η_l)          # option II
    Δy_i = y_i − x ,  Δc_i = c_i⁺ − c_i            # both uploaded
    x ← x + η_g · mean_{i∈S} Δy_i                   # via the loop's aggregator and server.lr/momentum
    c ← c + (1/N) Σ_{i∈S} Δc_i                      # = (|S|/N) · mean Δc_i

Traffic: SCAFFOLD uploads twice the vectors of FedAvg. ``Δy_i`` goes through the uplink channel
(codec + EF as configured); ``Δc_i`` is a second payload encoded with the same uplink codec (no
EF) and its bytes are added to the client's ``uplink_bytes``. The client also sets
``c_i ← c_i + decoded(Δc_i)`` — from its own bytes, so client and server stay consistent — and
only when the server accepted its update (dropped, straggling or rejected clients keep ``c_i``;
the client learning the server's decision is modelled, not charged).
The paper broadcasts ``(x, c)``: ``c`` is a broadcast extra (``Algorithm.broadcast_extras``),
encoded every round with the ``compression.downlink`` codec as a whole vector and charged to every
sampled client's ``downlink_bytes`` (one more fp32-container payload when the downlink is fp32).
Clients use the ``c`` they *decoded* (in the gradient correction and in ``c_i⁺``); the server keeps
its exact ``c``. With a lossless downlink the two are identical; with a lossy one, ``c = mean c_i``
still holds on the server, but the clients' correction carries the downlink's error.

The mean over S uses the loop's aggregator (sample-weighted ``mean`` by default; the paper uses a
plain mean). Local momentum is rejected: option II assumes plain SGD steps. Differential privacy
is rejected too: ``Δc_i`` is a deterministic function of the un-noised ``Δy_i`` (and ``c`` is
broadcast), so noising ``Δy_i`` alone would protect nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from fedsqueeze.algorithms.base import AlgoContext, ClientMessage
from fedsqueeze.algorithms.fedavg import FedAvg
from fedsqueeze.errors import ConfigError
from fedsqueeze.sim.local import GradHook
from fedsqueeze.sim.state import VectorStore

if TYPE_CHECKING:
    from fedsqueeze.experiment.config import RunConfig

DELTA_C = "delta_c"
SERVER_C = "c"


class Scaffold(FedAvg):
    """SCAFFOLD with option-II control variates; Δc_i travels as a second, counted payload."""

    name = "scaffold"
    OPTIONS: ClassVar[dict[str, Any]] = {}

    def __init__(self, ctx: AlgoContext, *, server_lr: float = 1.0, server_momentum: float = 0.0) -> None:
        super().__init__(server_lr=server_lr, server_momentum=server_momentum)
        self.ctx = ctx
        self.c = torch.zeros(ctx.layout.numel)
        # control variates are used as exact corrections: kept in float32 (not state_dtype)
        self.ci = VectorStore("scaffold_ci", dtype=torch.float32, offload_dir=ctx.offload_dir)
        self.c_received: torch.Tensor | None = None  # the clients' decoded copy of c this round

    @classmethod
    def validate(cls, cfg: RunConfig) -> dict[str, Any]:
        o = cls.check_options(cfg.algorithm.options)
        if cfg.clients.momentum:
            raise ConfigError(
                f"clients.momentum = {cfg.clients.momentum}: scaffold (option II) assumes plain local SGD; "
                "set clients.momentum = 0"
            )
        if cfg.privacy.mode != "none":
            raise ConfigError(
                f"scaffold with privacy.mode = {cfg.privacy.mode!r}: DP clips and noises Δy_i only, but "
                "Δc_i = −c − Δy_i/(K η_l) is uploaded un-noised (and c, built from it, is broadcast), which "
                "reveals Δy_i exactly and voids the guarantee; set privacy.mode = 'none'"
            )
        return o

    @classmethod
    def from_config(cls, cfg: RunConfig, ctx: AlgoContext) -> Scaffold:
        cls.validate(cfg)
        return cls(ctx, server_lr=cfg.server.lr, server_momentum=cfg.server.momentum)

    def _ci(self, c: int) -> torch.Tensor:
        v = self.ci.get(c)
        return torch.zeros_like(self.c) if v is None else v

    def broadcast_extras(self, t: int) -> dict[str, torch.Tensor]:
        """``c`` travels down with ``x`` (charged per sampled client by the loop)."""
        return {SERVER_C: self.c}

    def receive_broadcast_extras(self, t: int, decoded: Mapping[str, torch.Tensor]) -> None:
        self.c_received = decoded[SERVER_C]

    def _c_client(self) -> torch.Tensor:
        """The ``c`` clients hold: decoded from the broadcast (the exact ``c`` outside the loop)."""
        return self.c if self.c_received is None else self.c_received

    def grad_hook(self, clients: Sequence[int], starts: Sequence[torch.Tensor]) -> GradHook | None:
        layout = self.ctx.layout
        c_dec = self._c_client()
        corr = [layout.unflatten(c_dec - self._ci(c)) for c in clients]  # c − c_i

        def hook(
            i: int, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]
        ) -> dict[str, torch.Tensor]:
            for n, g in grads.items():
                g.add_(corr[i][n])  # g − c_i + c
            return grads

        return hook

    def client_message(
        self, c: int, t: int, start: torch.Tensor, delta: torch.Tensor, steps: int
    ) -> ClientMessage:
        k = steps
        if k == 0:
            return ClientMessage(delta, {DELTA_C: torch.zeros_like(delta)})
        ci = self._ci(c)
        ci_new = ci - self._c_client() - delta / (k * self.ctx.client_lr)  # (x − y_i) = −delta
        return ClientMessage(delta, {DELTA_C: ci_new - ci})

    def server_update(
        self,
        x: torch.Tensor,
        agg: torch.Tensor,
        *,
        accepted: Sequence[int] = (),
        extras: Mapping[int, Mapping[str, torch.Tensor]] | None = None,
        t: int = 0,
    ) -> torch.Tensor:
        x_new = super().server_update(x, agg)
        extras = extras or {}
        total = torch.zeros_like(self.c)
        for c in accepted:
            dc = extras[c][DELTA_C]
            self.ci.set(c, self._ci(c) + dc)  # the client applies what it encoded (decoded bytes)
            total += dc
        self.c = self.c + total / self.ctx.num_clients
        return x_new

    def stores(self) -> list[VectorStore]:
        return [self.ci]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**super().state_dict(), "scaffold/c": self.c, **self.ci.state_dict()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        self.c = state["scaffold/c"].clone()
        self.ci.load_state_dict(state)
