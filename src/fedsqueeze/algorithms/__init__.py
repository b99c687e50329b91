"""Federated algorithms on the shared round loop (``fedsqueeze.experiment.run``).

Select one with ``algorithm.name`` (options in ``algorithm.options``): ``fedavg``, ``fedprox``,
``scaffold``, ``fedadam``, ``scaffnew``, ``fedcomloc``, ``ef21``, ``locodl``, ``fetchsgd``. The hooks
they implement are described in :mod:`fedsqueeze.algorithms.base`.
"""

from fedsqueeze.algorithms.base import AlgoContext, Algorithm, ClientMessage, RoundPlan
from fedsqueeze.algorithms.ef21 import EF21
from fedsqueeze.algorithms.fedavg import FedAvg
from fedsqueeze.algorithms.fedopt import FedAdam
from fedsqueeze.algorithms.fedprox import FedProx
from fedsqueeze.algorithms.fetchsgd import FetchSGD
from fedsqueeze.algorithms.locodl import LoCoDL
from fedsqueeze.algorithms.registry import ALGORITHMS, make_algorithm, validate_algorithm
from fedsqueeze.algorithms.scaffnew import FedComLoc, Scaffnew
from fedsqueeze.algorithms.scaffold import Scaffold

__all__ = [
    "ALGORITHMS",
    "EF21",
    "AlgoContext",
    "Algorithm",
    "ClientMessage",
    "FedAdam",
    "FedAvg",
    "FedComLoc",
    "FedProx",
    "FetchSGD",
    "LoCoDL",
    "RoundPlan",
    "Scaffnew",
    "Scaffold",
    "make_algorithm",
    "validate_algorithm",
]
