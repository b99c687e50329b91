"""Federated-learning models by name: :func:`build_model` and the :data:`MODELS` registry."""

from fedsqueeze.models.zoo import (
    MODELS,
    CifarCNN,
    FedAvgCNN,
    GroupNormResNet18,
    ShakespeareLSTM,
    build_model,
    count_parameters,
)

__all__ = [
    "MODELS",
    "CifarCNN",
    "FedAvgCNN",
    "GroupNormResNet18",
    "ShakespeareLSTM",
    "build_model",
    "count_parameters",
]
