"""FedAvg (McMahan et al., AISTATS 2017) with a server optimizer (FedAvgM: Hsu et al., 2019).

Round t, sampled clients S_t, client i with n_i examples and decoded model difference Δ_i::

    Δ = Σ_{i∈S_t} n_i Δ_i / Σ_{i∈S_t} n_i          # weighted by sample count
    v ← β v + Δ                                    # server momentum β (0 = plain FedAvg)
    x ← x + η_s v                                  # server learning rate η_s (1 = plain FedAvg)

Δ_i is what the server decoded from the client's payload bytes (after error feedback), never the
client's exact difference. Tune the client learning rate first, then η_s and β.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from fedsqueeze.algorithms.base import AlgoContext, Algorithm
from fedsqueeze.errors import ConfigError

if TYPE_CHECKING:
    from fedsqueeze.experiment.config import RunConfig


class FedAvg(Algorithm):
    """Weighted averaging of client differences plus a momentum server step."""

    name = "fedavg"

    def __init__(self, *, server_lr: float = 1.0, server_momentum: float = 0.0) -> None:
        if server_lr <= 0:
            raise ConfigError(f"server lr must be > 0, got {server_lr}")
        if not 0 <= server_momentum < 1:
            raise ConfigError(f"server momentum must be in [0, 1), got {server_momentum}")
        self.server_lr = server_lr
        self.server_momentum = server_momentum
        self.velocity: torch.Tensor | None = None

    @classmethod
    def from_config(cls, cfg: RunConfig, ctx: AlgoContext) -> FedAvg:
        cls.validate(cfg)
        return cls(server_lr=cfg.server.lr, server_momentum=cfg.server.momentum)

    def aggregate(self, deltas: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
        """Weighted mean of decoded client differences (weights: sample counts)."""
        if not deltas:
            raise ValueError("no client updates to aggregate")
        w = torch.tensor([float(v) for v in weights], dtype=torch.float64)
        w = (w / w.sum()).to(torch.float32)
        out = torch.zeros_like(deltas[0])
        for wi, d in zip(w, deltas, strict=True):
            out.add_(d, alpha=float(wi))
        return out

    def server_update(
        self,
        x: torch.Tensor,
        agg: torch.Tensor,
        *,
        accepted: Sequence[int] = (),
        extras: Mapping[int, Mapping[str, torch.Tensor]] | None = None,
        t: int = 0,
    ) -> torch.Tensor:
        """Apply the aggregated difference to the global model."""
        delta = agg
        if self.server_momentum > 0:
            self.velocity = (
                delta.clone()
                if self.velocity is None
                else self.velocity.mul_(self.server_momentum).add_(delta)
            )
            step = self.velocity
        else:
            step = delta
        return x + self.server_lr * step

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self.velocity is None else {"server/velocity": self.velocity}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.velocity = state.get("server/velocity")
