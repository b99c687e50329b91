"""FedProx (Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith; "Federated Optimization in Heterogeneous
Networks", MLSys 2020).

Client k minimises ``F_k(w) + (mu/2) ||w - w^t||^2`` from the broadcast ``w^t`` with local SGD, so
each local step uses the gradient::

    g = ∇F_k(w; batch) + mu (w - w^t)          # the proximal term, via the loop's grad_hook

Everything else (upload of ``w - w^t``, sample-weighted mean, server step with ``server.lr`` /
``server.momentum``) is FedAvg. ``mu = 0`` is FedAvg exactly. Option: ``mu`` (>= 0; the paper
tunes it in {0.001, 0.01, 0.1, 1}). Inexact local solves (the paper's γ-inexactness and dropping
stragglers' partial work) are not modelled: every client runs the configured local steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from fedsqueeze.algorithms.base import AlgoContext, opt_float
from fedsqueeze.algorithms.fedavg import FedAvg
from fedsqueeze.sim.local import GradHook

if TYPE_CHECKING:
    from fedsqueeze.experiment.config import RunConfig


class FedProx(FedAvg):
    """FedAvg with a proximal term ``mu (w - w_start)`` added to every local gradient."""

    name = "fedprox"
    OPTIONS: ClassVar[dict[str, Any]] = {"mu": 0.01}

    def __init__(self, ctx: AlgoContext, *, mu: float, server_lr: float = 1.0, server_momentum: float = 0.0):
        super().__init__(server_lr=server_lr, server_momentum=server_momentum)
        self.ctx = ctx
        self.mu = mu

    @classmethod
    def validate(cls, cfg: RunConfig) -> dict[str, Any]:
        o = cls.check_options(cfg.algorithm.options)
        o["mu"] = opt_float(o, "mu", ge=0.0)
        return o

    @classmethod
    def from_config(cls, cfg: RunConfig, ctx: AlgoContext) -> FedProx:
        o = cls.validate(cfg)
        return cls(ctx, mu=o["mu"], server_lr=cfg.server.lr, server_momentum=cfg.server.momentum)

    def grad_hook(self, clients: Sequence[int], starts: Sequence[torch.Tensor]) -> GradHook | None:
        if self.mu == 0:
            return None
        per_client = [self.ctx.layout.unflatten(s) for s in starts]
        mu = self.mu

        def hook(
            i: int, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]
        ) -> dict[str, torch.Tensor]:
            w0 = per_client[i]
            for n, g in grads.items():
                g.add_(params[n] - w0[n], alpha=mu)  # g + mu (w - w^t)
            return grads

        return hook
