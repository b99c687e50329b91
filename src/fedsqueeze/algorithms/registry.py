"""``algorithm.name`` -> algorithm class; config-time validation and construction."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedsqueeze.algorithms.base import AlgoContext, Algorithm
from fedsqueeze.algorithms.ef21 import EF21
from fedsqueeze.algorithms.fedavg import FedAvg
from fedsqueeze.algorithms.fedopt import FedAdam
from fedsqueeze.algorithms.fedprox import FedProx
from fedsqueeze.algorithms.fetchsgd import FetchSGD
from fedsqueeze.algorithms.locodl import LoCoDL
from fedsqueeze.algorithms.scaffnew import FedComLoc, Scaffnew
from fedsqueeze.algorithms.scaffold import Scaffold
from fedsqueeze.errors import ConfigError

if TYPE_CHECKING:
    from fedsqueeze.experiment.config import RunConfig

ALGORITHMS: dict[str, type[Algorithm]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "scaffold": Scaffold,
    "fedadam": FedAdam,
    "scaffnew": Scaffnew,
    "fedcomloc": FedComLoc,
    "fetchsgd": FetchSGD,
    "ef21": EF21,
    "locodl": LoCoDL,
}


def _cls(name: str) -> type[Algorithm]:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ConfigError(f"unknown algorithm.name {name!r}; expected one of {sorted(ALGORITHMS)}") from None


def validate_algorithm(cfg: RunConfig) -> dict[str, Any]:
    """Check ``cfg.algorithm`` (name, options, constraints on other sections) before any work."""
    return _cls(cfg.algorithm.name).validate(cfg)


def make_algorithm(cfg: RunConfig, ctx: AlgoContext) -> Algorithm:
    """The algorithm object a run uses."""
    return _cls(cfg.algorithm.name).from_config(cfg, ctx)
