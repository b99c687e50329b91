"""Teacher/student networks: the cheapest learning problem that yields realistic update statistics.

Following Goldt et al. (NeurIPS 2019), as used in the M22 slides to gather many learning instances:

* the **teacher** is a fixed, randomly initialised MLP;
* inputs are standard Gaussian i.i.d., ``x ~ N(0, I_{d_in})``, drawn fresh every step (online SGD);
* labels are ``y = teacher(x) + noise_std * eps`` with ``eps ~ N(0, I_{d_out})``;
* the **student** (an MLP of the same or another width) is trained by plain SGD on the L2 loss
  ``L = (1 / (2 B)) * sum_b ||student(x_b) - y_b||^2`` over a batch of ``B`` inputs.

Every ``(seed, sizes)`` gives a different but reproducible instance, so thousands of instances cost
a few milliseconds each -- the point of the setup. :meth:`TeacherStudent.generate_updates` yields,
per SGD step, a ``dict`` layer name -> tensor (``"fc1.weight"``, ``"fc1.bias"``, ``"fc2.weight"``,
...), to feed :func:`~fedsqueeze.stats.fit.fit_layer` or the independence checks.

Both networks are ``Linear -> activation -> ... -> Linear`` (no activation after the last layer),
with weights ``N(0, 1/fan_in)`` and zero biases, so outputs are O(1) at any width. The default
activation is Goldt's ``erf(z / sqrt(2))``; ``"relu"`` and ``"tanh"`` are available (ReLU gives
exact zeros in the gradients of dead units).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
import torch
from torch import nn

from fedsqueeze.stats.fit import StatsError

__all__ = ["MLP", "TeacherStudent"]

Activation = Literal["erf", "relu", "tanh"]


def _derive_seed(seed: int, stream: int) -> int:
    """An independent 63-bit seed for one random stream of an instance."""
    return int(np.random.SeedSequence([int(seed), stream]).generate_state(1, dtype=np.uint64)[0] >> 1)


class MLP(nn.Module):
    """``Linear -> act -> ... -> Linear`` through widths ``sizes``; layers named ``fc1, fc2, ...``."""

    def __init__(
        self,
        sizes: Sequence[int],
        activation: Activation,
        generator: torch.Generator,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.activation = activation
        self.names: list[str] = []
        for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
            layer = nn.Linear(fan_in, fan_out, dtype=dtype)
            with torch.no_grad():
                layer.weight.copy_(
                    torch.randn(fan_out, fan_in, generator=generator, dtype=dtype) / math.sqrt(fan_in)
                )
                layer.bias.zero_()
            name = f"fc{i + 1}"
            self.add_module(name, layer)
            self.names.append(name)

    def _act(self, z: torch.Tensor) -> torch.Tensor:
        if self.activation == "erf":
            return torch.erf(z / math.sqrt(2.0))
        if self.activation == "relu":
            return torch.relu(z)
        return torch.tanh(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, name in enumerate(self.names):
            x = getattr(self, name)(x)
            if i < len(self.names) - 1:
                x = self._act(x)
        return x


class TeacherStudent:
    """A fixed random teacher MLP and a student MLP trained online by SGD to imitate it (L2 loss).

    Parameters
    ----------
    d_in, d_out: input and output widths.
    hidden: hidden width(s) of the teacher (an int for one hidden layer, or a sequence).
    seed: seeds the teacher, the student's initialisation and the data/noise stream independently.
    student_hidden: hidden width(s) of the student; default: the teacher's (a realisable problem).
        Wider students are over-parameterised, narrower ones cannot reach zero loss.
    activation: ``"erf"`` (``erf(z/sqrt 2)``, default), ``"relu"`` or ``"tanh"``, for both networks.
    noise_std: std of Gaussian label noise added to the teacher's output.
    dtype: floating dtype of both networks and of the data.

    Attributes
    ----------
    teacher, student: the two :class:`MLP` modules (the teacher has ``requires_grad=False``).
    steps_done: SGD steps taken so far.
    last_loss: training loss of the last step's batch, before its update (``nan`` before any step).
    """

    def __init__(
        self,
        d_in: int,
        hidden: int | Sequence[int],
        d_out: int,
        *,
        seed: int = 0,
        student_hidden: int | Sequence[int] | None = None,
        activation: Activation = "erf",
        noise_std: float = 0.0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        t_hidden = _widths("hidden", hidden)
        s_hidden = t_hidden if student_hidden is None else _widths("student_hidden", student_hidden)
        for name, v in (("d_in", d_in), ("d_out", d_out)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise StatsError(f"{name} must be a positive integer, got {v!r}")
        if activation not in ("erf", "relu", "tanh"):
            raise StatsError(f"activation must be 'erf', 'relu' or 'tanh', got {activation!r}")
        if not (isinstance(noise_std, (int, float)) and math.isfinite(noise_std) and noise_std >= 0):
            raise StatsError(f"noise_std must be a finite number >= 0, got {noise_std!r}")
        if not dtype.is_floating_point:
            raise StatsError(f"dtype must be a floating dtype, got {dtype}")
        self.d_in, self.d_out, self.seed = d_in, d_out, int(seed)
        self.noise_std = float(noise_std)
        self.dtype = dtype
        self.teacher = MLP([d_in, *t_hidden, d_out], activation, _gen(seed, 0), dtype)
        self.teacher.requires_grad_(False)
        self.student = MLP([d_in, *s_hidden, d_out], activation, _gen(seed, 1), dtype)
        self._data = _gen(seed, 2)
        self.steps_done = 0
        self.last_loss = float("nan")

    # ------------------------------------------------------------------ data and loss
    def sample(
        self, batch: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch ``(x, y)``: ``x ~ N(0, I)``, ``y = teacher(x) + noise`` (default: the training stream)."""
        g = self._data if generator is None else generator
        x = torch.randn(batch, self.d_in, generator=g, dtype=self.dtype)
        with torch.no_grad():
            y = self.teacher(x)
            if self.noise_std > 0:
                y = y + self.noise_std * torch.randn(batch, self.d_out, generator=g, dtype=self.dtype)
        return x, y

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """L2 loss ``(1/(2B)) sum_b ||student(x_b) - y_b||^2`` of the student on a batch."""
        return 0.5 * (self.student(x) - y).pow(2).sum(dim=1).mean()

    def test_loss(self, n_samples: int = 4096) -> float:
        """The student's loss on a fixed held-out set (the same ``n_samples`` inputs at every call)."""
        x, y = self.sample(n_samples, _gen(self.seed, 3))
        with torch.no_grad():
            return float(self.loss(x, y))

    # ------------------------------------------------------------------ training
    def generate_updates(
        self, steps: int, batch: int, lr: float, *, kind: Literal["gradient", "update"] = "gradient"
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Train the student ``steps`` SGD steps, yielding each step's per-layer tensors.

        Parameters
        ----------
        steps: SGD steps (each on a fresh batch).
        batch: inputs per step.
        lr: SGD learning rate; the step is ``w <- w - lr * grad``.
        kind: ``"gradient"`` yields the minibatch gradient at the pre-step weights; ``"update"``
            yields the applied change ``w_{t+1} - w_t = -lr * grad``.

        Yields
        ------
        dict[str, torch.Tensor]
            Layer name (``"fc1.weight"``, ``"fc1.bias"``, ...) -> a fresh, detached tensor of that
            parameter's shape. The student has already been updated when a dict is yielded.
        """
        steps = _positive("steps", steps, allow_zero=True)
        batch = _positive("batch", batch)
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise StatsError(f"lr must be a finite number > 0, got {lr!r}")
        if kind not in ("gradient", "update"):
            raise StatsError(f"kind must be 'gradient' or 'update', got {kind!r}")
        params = dict(self.student.named_parameters())
        for _ in range(steps):
            x, y = self.sample(batch)
            loss = self.loss(x, y)
            grads = torch.autograd.grad(loss, list(params.values()))
            out: dict[str, torch.Tensor] = {}
            with torch.no_grad():
                for (name, p), g in zip(params.items(), grads, strict=True):
                    p.sub_(lr * g)
                    out[name] = g.detach().clone() if kind == "gradient" else (-lr * g).detach()
            self.last_loss = float(loss.detach())
            self.steps_done += 1
            yield out


def _gen(seed: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(_derive_seed(seed, stream))


def _positive(name: str, v: int, *, allow_zero: bool = False) -> int:
    lo = 0 if allow_zero else 1
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise StatsError(f"{name} must be an integer >= {lo}, got {v!r}")
    return v


def _widths(name: str, hidden: int | Sequence[int]) -> list[int]:
    widths = [hidden] if isinstance(hidden, int) else list(hidden)
    if any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
        raise StatsError(f"{name} must be a positive int or a sequence of positive ints, got {hidden!r}")
    return [int(w) for w in widths]
