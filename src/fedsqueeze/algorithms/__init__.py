"""Federated algorithms on the shared round loop (``fedsqueeze.experiment.run``)."""

from fedsqueeze.algorithms.fedavg import FedAvg

__all__ = ["FedAvg"]
