"""The model zoo: the small networks federated-learning papers train, built by name.

Every model takes a batch ``x`` of shape ``(N, *input_shape)`` and returns logits ``(N, num_classes)``.
None of them has BatchNorm or dropout: BatchNorm's running statistics are buffers that FedAvg does not
average (and that leak per-client data statistics), and both make a client's update depend on more than
its parameters, which batched (``vmap``) client execution relies on. ResNet-18 therefore uses
GroupNorm.

Parameter counts (weights + biases, ``sum(p.numel() for p in model.parameters())``):

=================  ==================  ==========================================================
name               input_shape         parameters
=================  ==================  ==========================================================
``logreg``         (1, 28, 28), 10     7,850
``mlp``            (1, 28, 28), 10     199,210   (784-200-200-10, McMahan et al. 2017 "2NN")
``cnn``            (1, 28, 28), 10     1,663,370 (McMahan et al. 2017 "CNN")
``cifar_cnn``      (3, 32, 32), 10     122,570
``cifar_cnn``      (1, 28, 28), 10     93,322    (the same layers; the FC input follows the shape)
``resnet18_gn``    (3, 32, 32), 10     11,173,962
``lstm``           (80,), 80           819,920   (LEAF Shakespeare, vocab 80)
=================  ==================  ==========================================================
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from fedsqueeze.errors import ConfigError

__all__ = [
    "MODELS",
    "CifarCNN",
    "FedAvgCNN",
    "GroupNormResNet18",
    "ShakespeareLSTM",
    "build_model",
    "count_parameters",
]


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars in ``model`` (what one dense float32 update carries, / 4 bytes)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _image_shape(input_shape: tuple[int, ...], model: str) -> tuple[int, int, int]:
    """``(C, H, W)`` from ``(C, H, W)`` or ``(H, W)`` (one channel)."""
    if len(input_shape) == 2:
        return (1, int(input_shape[0]), int(input_shape[1]))
    if len(input_shape) == 3:
        return (int(input_shape[0]), int(input_shape[1]), int(input_shape[2]))
    raise ConfigError(
        f"model {model!r} needs an image input_shape (C, H, W) or (H, W); got {tuple(input_shape)}. "
        "Use 'mlp' or 'logreg' for flat features"
    )


class _Unflatten(nn.Module):
    """Reshape ``(N, ...)`` to ``(N, C, H, W)`` so image models also accept flattened pixels."""

    def __init__(self, shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.shape)

    def extra_repr(self) -> str:
        return f"shape={self.shape}"


def _logreg(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Multinomial logistic regression: ``Flatten -> Linear(prod(input_shape), num_classes)``."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))


def _mlp(
    input_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...] | list[int] = (200, 200)
) -> nn.Module:
    """Fully connected ReLU network; the default ``hidden=(200, 200)`` is the FedAvg paper's "2NN"."""
    hidden = tuple(int(h) for h in hidden)
    if any(h <= 0 for h in hidden):
        raise ConfigError(f"mlp hidden sizes must be positive integers; got {hidden}")
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class FedAvgCNN(nn.Module):
    """The CNN of McMahan et al. (2017), "Communication-Efficient Learning of Deep Networks from
    Decentralized Data": two 5x5 convolutions (32 and 64 channels, 'same' padding), each followed by
    ReLU and 2x2 max-pooling, a 512-unit ReLU layer and the output layer.

    On 28x28x1 (MNIST/FEMNIST) inputs it has exactly 1,663,370 parameters, the count the paper reports.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        c, h, w = _image_shape(input_shape, "cnn")
        self.unflatten = _Unflatten((c, h, w))
        self.conv1 = nn.Conv2d(c, 32, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=5, padding=2)
        self.fc1 = nn.Linear(64 * (h // 4) * (w // 4), 512)
        self.fc2 = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.unflatten(x)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


class CifarCNN(nn.Module):
    """A small CIFAR CNN (the TensorFlow CNN tutorial's): conv3x3(32) -> pool -> conv3x3(64) -> pool ->
    conv3x3(64) -> FC(64) -> FC(num_classes), ReLU, 'valid' padding.

    The FC input size follows ``input_shape``: 64*4*4 for 32x32 (122,570 parameters with 3 channels) and
    64*3*3 for 28x28 (93,322 parameters with 1 channel), so the same architecture runs on (F)MNIST.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        c, h, w = _image_shape(input_shape, "cifar_cnn")
        self.unflatten = _Unflatten((c, h, w))
        self.conv1 = nn.Conv2d(c, 32, kernel_size=3)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.conv3 = nn.Conv2d(64, 64, kernel_size=3)
        for _ in range(2):  # conv (k=3, valid) then 2x2 pool, twice
            h, w = (h - 2) // 2, (w - 2) // 2
        h, w = h - 2, w - 2
        if h <= 0 or w <= 0:
            raise ConfigError(f"cifar_cnn needs inputs of at least 18x18 pixels; got {tuple(input_shape)}")
        self.fc1 = nn.Linear(64 * h * w, 64)
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.unflatten(x)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.conv3(x))
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


class _BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.gn1 = nn.GroupNorm(groups, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.gn2 = nn.GroupNorm(groups, planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.GroupNorm(groups, planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.gn1(self.conv1(x)))
        out = self.gn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class GroupNormResNet18(nn.Module):
    """ResNet-18, CIFAR variant (3x3 stride-1 stem, no max-pool), with GroupNorm instead of BatchNorm.

    ``groups`` (default 2, as in Hsieh et al. 2020, "The Non-IID Data Quagmire") is the number of
    GroupNorm groups in every norm layer; it must divide 64. GroupNorm has the same affine parameters as
    BatchNorm, so the count equals the BatchNorm CIFAR ResNet-18's: 11,173,962 for 3x32x32 and 10
    classes (no buffers at all).
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, groups: int = 2) -> None:
        super().__init__()
        c, h, w = _image_shape(input_shape, "resnet18_gn")
        if groups <= 0 or 64 % groups:
            raise ConfigError(f"resnet18_gn groups must divide 64 (e.g. 2 or 32); got {groups}")
        self.unflatten = _Unflatten((c, h, w))
        self.conv1 = nn.Conv2d(c, 64, 3, stride=1, padding=1, bias=False)
        self.gn1 = nn.GroupNorm(groups, 64)
        blocks: list[nn.Module] = []
        in_planes = 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks.append(
                nn.Sequential(
                    _BasicBlock(in_planes, planes, stride, groups), _BasicBlock(planes, planes, 1, groups)
                )
            )
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = blocks
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.gn1(self.conv1(self.unflatten(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


class ShakespeareLSTM(nn.Module):
    """LEAF's next-character model: Embedding(vocab, 8) -> 2-layer LSTM(256) -> Linear(vocab).

    Input: int64 character ids ``(N, T)``; output: logits ``(N, vocab)`` for the character after the
    last time step. ``vocab_size`` defaults to ``num_classes`` (80 for LEAF Shakespeare).
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        vocab_size: int | None = None,
        embed_dim: int = 8,
        hidden_size: int = 256,
        num_layers: int = 2,
    ) -> None:
        super().__init__()
        if len(input_shape) != 1:
            raise ConfigError(
                f"lstm needs input_shape (sequence_length,) of int64 character ids; got {tuple(input_shape)}"
            )
        vocab = num_classes if vocab_size is None else int(vocab_size)
        self.embedding = nn.Embedding(vocab, embed_dim)
        self.lstm = nn.LSTM(embed_dim, hidden_size, num_layers=num_layers, batch_first=True)
        self.fc = nn.Linear(hidden_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embedding(x))
        return self.fc(out[:, -1, :])


ModelFactory = Callable[..., nn.Module]

MODELS: dict[str, ModelFactory] = {
    "logreg": _logreg,
    "mlp": _mlp,
    "cnn": FedAvgCNN,
    "cifar_cnn": CifarCNN,
    "resnet18_gn": GroupNormResNet18,
    "lstm": ShakespeareLSTM,
}
"""Registry ``name -> factory(input_shape, num_classes, **options)``; add entries to register models."""


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, **options: object) -> nn.Module:
    """Build a zoo model by name.

    Parameters
    ----------
    name
        A key of :data:`MODELS`: ``logreg``, ``mlp``, ``cnn``, ``cifar_cnn``, ``resnet18_gn``, ``lstm``.
    input_shape
        Shape of one example, without the batch dimension: ``(C, H, W)`` or ``(H, W)`` for images
        (flat pixels are reshaped inside image models), ``(T,)`` for the LSTM.
    num_classes
        Number of output logits.
    **options
        Model-specific keywords: ``hidden`` (mlp), ``groups`` (resnet18_gn), ``vocab_size``,
        ``embed_dim``, ``hidden_size``, ``num_layers`` (lstm).

    Initialisation uses torch's global RNG: call ``torch.manual_seed`` first for a reproducible model.
    """
    factory = MODELS.get(name)
    if factory is None:
        import difflib

        near = difflib.get_close_matches(name, list(MODELS), n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"unknown model {name!r}; expected one of {sorted(MODELS)}{hint}")
    if num_classes <= 0:
        raise ConfigError(f"num_classes must be a positive integer; got {num_classes}")
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s <= 0 for s in shape):
        raise ConfigError(f"input_shape must be a non-empty tuple of positive sizes; got {input_shape!r}")
    try:
        return factory(shape, int(num_classes), **options)
    except TypeError as exc:
        raise ConfigError(f"bad options for model {name!r}: {exc}") from exc
