"""Adaptive server optimizers: FedAdam, FedYogi, FedAdagrad (Reddi, Charles, Zaheer, Garrett,
Rush, Konečný, Kumar, McMahan; "Adaptive Federated Optimization", ICLR 2021, Algorithm 2).

Clients run local SGD as in FedAvg; the aggregated difference Δ (the pseudo-gradient, negated) is
fed to an adaptive server step, per coordinate::

    m ← β1 m + (1 − β1) Δ
    v ← β2 v + (1 − β2) Δ²                      # adam
    v ← v − (1 − β2) Δ² sign(v − Δ²)            # yogi
    v ← v + Δ²                                  # adagrad
    x ← x + η m / (√v + τ)

No bias correction (as in the paper). ``m`` starts at 0 and ``v`` at ``τ²`` (the paper requires
``v_{-1} ≥ τ²``). Options: ``optimizer`` ("adam" | "yogi" | "adagrad"), ``lr`` = η (the paper's
best values are around 10^-2..10^-0.5 for Adam; tune it first), ``beta1`` (0.9), ``beta2``
(0.99), ``tau`` = τ (1e-3; the adaptivity floor). ``server.lr`` / ``server.momentum`` must stay
at their defaults (1.0 / 0.0): this optimizer replaces them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from fedsqueeze.algorithms.base import AlgoContext, Algorithm, opt_choice, opt_float
from fedsqueeze.errors import ConfigError

if TYPE_CHECKING:
    from fedsqueeze.experiment.config import RunConfig


class FedAdam(Algorithm):
    """FedAvg clients with an adaptive (Adam/Yogi/Adagrad) server optimizer."""

    name = "fedadam"
    OPTIONS: ClassVar[dict[str, Any]] = {
        "optimizer": "adam",
        "lr": 0.01,
        "beta1": 0.9,
        "beta2": 0.99,
        "tau": 1e-3,
    }

    def __init__(
        self,
        *,
        optimizer: str = "adam",
        lr: float = 0.01,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
    ) -> None:
        self.optimizer = optimizer
        self.lr = lr
        self.beta1 = beta1
        self.beta2 = beta2
        self.tau = tau
        self.m: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    @classmethod
    def validate(cls, cfg: RunConfig) -> dict[str, Any]:
        o = cls.check_options(cfg.algorithm.options)
        o["optimizer"] = opt_choice(o, "optimizer", ("adam", "yogi", "adagrad"))
        o["lr"] = opt_float(o, "lr", gt=0.0)
        o["beta1"] = opt_float(o, "beta1", ge=0.0, lt=1.0)
        o["beta2"] = opt_float(o, "beta2", ge=0.0, lt=1.0)
        o["tau"] = opt_float(o, "tau", gt=0.0)
        if cfg.server.lr != 1.0 or cfg.server.momentum != 0.0:
            raise ConfigError(
                "fedadam replaces the server SGD step: leave server.lr = 1.0 and server.momentum = 0.0 "
                "and set algorithm.options.lr (and beta1, beta2, tau) instead"
            )
        return o

    @classmethod
    def from_config(cls, cfg: RunConfig, ctx: AlgoContext) -> FedAdam:
        return cls(**cls.validate(cfg))

    def server_update(
        self,
        x: torch.Tensor,
        agg: torch.Tensor,
        *,
        accepted: Sequence[int] = (),
        extras: Mapping[int, Mapping[str, torch.Tensor]] | None = None,
        t: int = 0,
    ) -> torch.Tensor:
        if self.m is None or self.v is None:
            self.m = torch.zeros_like(x)
            self.v = torch.full_like(x, self.tau**2)
        sq = agg * agg
        self.m = self.beta1 * self.m + (1 - self.beta1) * agg
        if self.optimizer == "adam":
            self.v = self.beta2 * self.v + (1 - self.beta2) * sq
        elif self.optimizer == "yogi":
            self.v = self.v - (1 - self.beta2) * sq * torch.sign(self.v - sq)
        else:
            self.v = self.v + sq
        return x + self.lr * self.m / (self.v.sqrt() + self.tau)

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.m is None or self.v is None:
            return {}
        return {"fedopt/m": self.m, "fedopt/v": self.v}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.m = state.get("fedopt/m")
        self.v = state.get("fedopt/v")
