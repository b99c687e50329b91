"""Aggregation rules over flat client updates, plain and Byzantine-robust.

Every rule maps the round's decoded client updates ``x_1 … x_n`` (flat float tensors of one
length ``d``) and their weights to one flat tensor, the drop-in replacement for
:meth:`fedsqueeze.algorithms.fedavg.FedAvg.aggregate`::

    agg = make_aggregator("trimmed_mean", beta=0.2)
    delta = agg(decoded_updates, sample_counts, num_byzantine=2)

``num_byzantine`` (``f``) is the number of Byzantine clients the *defence is configured for* among
the ``n`` updates of this call, not the number of attackers actually present: a run that shows how
plain FedAvg breaks passes ``num_byzantine=0`` to ``"mean"`` while the attack is on. Before any work
a rule checks :meth:`Aggregator.tolerates` and raises :class:`~fedsqueeze.errors.ConfigError`
naming ``n`` and ``f`` when its guarantee does not hold; :meth:`Aggregator.require` does the same
check up front (at config time, with ``n = clients.per_round``).

Registry (``AGGREGATORS``), with the condition on ``f`` Byzantine among ``n`` each one tolerates:

* ``mean`` -- weighted mean, identical to ``FedAvg.aggregate``; ``f = 0``.
* ``median`` -- coordinate-wise median (Yin et al., 2018); ``2f < n``.
* ``trimmed_mean`` -- coordinate-wise β-trimmed mean (Yin et al., 2018); ``f ≤ ⌊βn⌋``.
* ``krum``, ``multi_krum`` -- Krum / Multi-Krum (Blanchard et al., 2017); ``n > 2f + 2``.
* ``centered_clipping`` -- CenteredClip (Karimireddy, He, Jaggi, 2021); ``2f < n``.
* ``clipped_differences`` -- clip each update's difference to the previous aggregate, then an
  inner robust rule (Malinovsky, Richtárik, Horváth, Gorbunov, NeurIPS 2024); the inner rule's.
* ``bucketing`` -- average random buckets of ``s`` updates, then an inner rule (Karimireddy, He,
  Jaggi, ICLR 2022); the inner rule's, on ``⌈n/s⌉`` bucket means.

Weights. Only ``mean`` uses the weights (sample counts). The robust rules treat every update
equally: sample counts are self-reported, and a Byzantine client claiming a huge count would
otherwise buy itself a majority. The weights are still validated (one non-negative finite weight
per update, positive sum) so a rule can be swapped for ``mean`` without changing the call.

Memory. The coordinate-wise rules and Krum's distances work on the stacked updates, an ``n × d``
matrix, one *column chunk* at a time (at most ``64 MiB`` of it, in float64 for distances), so the
extra memory stays bounded for big models: 100 clients of ResNet-18 (11 M parameters) would be
4.5 GB stacked at once. Krum's squared distances are accumulated over chunks as
``Σ_chunks torch.cdist(X_c, X_c)²`` (exact: squared Euclidean distance is a sum over coordinates),
in float64 because honest updates are close to each other relative to their norms and the matmul
form of ``cdist`` cancels badly in float32. The distance matrix itself is ``n × n``.

State. ``centered_clipping`` and ``clipped_differences`` keep the previous aggregate as their
reference point and ``bucketing`` a call counter (for its seeded permutations); all expose
``state_dict()/load_state_dict()`` with tensors only (safetensors checkpoints), keys under
``aggregator/``. The other rules are stateless. Inputs must be finite (the round loop already
rejects NaN/Inf updates).
"""

from __future__ import annotations

import difflib
import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import torch

from fedsqueeze.errors import ConfigError
from fedsqueeze.sim.seeds import torch_rng

__all__ = [
    "AGGREGATORS",
    "Aggregator",
    "Bucketing",
    "CenteredClipping",
    "ClippedDifferences",
    "Krum",
    "Mean",
    "Median",
    "MultiKrum",
    "TrimmedMean",
    "clip_to_norm",
    "make_aggregator",
    "pairwise_sq_distances",
]

_CHUNK_BYTES = 64 * 2**20
"""Upper bound on the stacked column chunk the coordinate-wise rules and Krum materialise."""


# ----------------------------------------------------------------------------------------------
# helpers


def _validate(updates: Sequence[torch.Tensor], weights: Sequence[float]) -> tuple[int, int]:
    """Check the call's inputs; return ``(n, d)``."""
    n = len(updates)
    if n == 0:
        raise ValueError("no client updates to aggregate")
    first = updates[0]
    if first.dim() != 1 or not first.is_floating_point():
        raise ValueError(
            f"updates must be flat floating-point tensors, got shape {tuple(first.shape)} "
            f"dtype {first.dtype}; flatten with the model layout first"
        )
    d = first.numel()
    for i, u in enumerate(updates):
        if u.shape != first.shape or u.dtype != first.dtype:
            raise ValueError(
                f"update {i} has shape {tuple(u.shape)} dtype {u.dtype}, expected "
                f"{tuple(first.shape)} {first.dtype} like update 0"
            )
    if len(weights) != n:
        raise ValueError(f"got {n} updates but {len(weights)} weights; pass one weight per update")
    w = [float(v) for v in weights]
    if any(not math.isfinite(v) or v < 0 for v in w) or sum(w) <= 0:
        raise ValueError(f"weights must be finite, >= 0 and not all zero, got {w}")
    return n, d


def _column_chunks(n: int, d: int, itemsize: int) -> Iterator[tuple[int, int]]:
    """Column ranges ``[start, end)`` such that an ``n × (end-start)`` chunk fits ``_CHUNK_BYTES``."""
    width = max(1, _CHUNK_BYTES // max(1, n * itemsize))
    for start in range(0, d, width):
        yield start, min(d, start + width)


def _stack(
    updates: Sequence[torch.Tensor], start: int, end: int, dtype: torch.dtype | None = None
) -> torch.Tensor:
    chunk = torch.stack([u[start:end] for u in updates])
    return chunk if dtype is None else chunk.to(dtype)


def pairwise_sq_distances(updates: Sequence[torch.Tensor]) -> torch.Tensor:
    """Squared Euclidean distances ``‖x_i − x_j‖²`` between all updates, an ``n × n`` float64 matrix.

    Computed with :func:`torch.cdist` over column chunks of the stacked updates (see the module
    docstring for the memory bound) and summed, in float64; the diagonal is exactly zero.
    """
    n, d = len(updates), updates[0].numel()
    out = torch.zeros(n, n, dtype=torch.float64)
    for start, end in _column_chunks(n, d, 8):
        x = _stack(updates, start, end, torch.float64)
        out += torch.cdist(x, x).square_()
    out.fill_diagonal_(0.0)
    return out.clamp_(min=0.0)


def clip_to_norm(x: torch.Tensor, radius: float) -> torch.Tensor:
    """``clip_λ(x) = min(1, λ/‖x‖) · x`` (and ``clip_λ(0) = 0``); a new tensor, L2 norm ≤ ``radius``."""
    norm = float(torch.linalg.vector_norm(x.double()))
    if norm <= radius or norm == 0.0:
        return x.clone()
    return x * (radius / norm)


def _finite_positive(name: str, value: float, what: str) -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a finite number > 0 ({what}), got {value}")
    return value


# ----------------------------------------------------------------------------------------------
# base class


class Aggregator(ABC):
    """An aggregation rule: ``agg(updates, weights, *, num_byzantine=0) -> flat tensor``.

    Subclasses implement :meth:`_aggregate` and :meth:`tolerates`, and state the tolerance
    condition in words in ``requirement`` (used in error messages).
    """

    name: ClassVar[str]
    requirement: ClassVar[str]
    """The condition on ``n`` (updates) and ``f`` (Byzantine) under which the rule's guarantee holds."""
    weighted: ClassVar[bool] = False
    """Whether the rule uses the weights (only ``mean`` does)."""

    def __call__(
        self,
        updates: Sequence[torch.Tensor],
        weights: Sequence[float],
        *,
        num_byzantine: int = 0,
    ) -> torch.Tensor:
        """Aggregate ``updates`` (flat, one length) assuming up to ``num_byzantine`` are Byzantine."""
        n, _ = _validate(updates, weights)
        self.require(n, num_byzantine)
        return self._aggregate(updates, weights, num_byzantine)

    @abstractmethod
    def _aggregate(
        self, updates: Sequence[torch.Tensor], weights: Sequence[float], f: int
    ) -> torch.Tensor: ...

    @abstractmethod
    def tolerates(self, n: int, f: int) -> bool:
        """Whether the rule's robustness guarantee holds for ``f`` Byzantine updates among ``n``."""

    def require(self, n: int, f: int) -> None:
        """Raise :class:`ConfigError` unless :meth:`tolerates` ``(n, f)``; call it at config time too."""
        if isinstance(f, bool) or not isinstance(f, int) or f < 0:
            raise ConfigError(f"num_byzantine must be an integer >= 0, got {f!r}")
        if n < 1:
            raise ConfigError(f"{self.name} needs at least one update, got n={n}")
        if f > n:
            raise ConfigError(f"num_byzantine f={f} exceeds the number of updates n={n}")
        if not self.tolerates(n, f):
            raise ConfigError(
                f"aggregator {self.name!r} cannot tolerate f={f} Byzantine among n={n} updates "
                f"(it needs {self.requirement}); sample more clients per round, lower "
                f"num_byzantine, or pick another aggregator"
            )

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors to checkpoint (empty for stateless rules)."""
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned (no-op for stateless rules)."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


# ----------------------------------------------------------------------------------------------
# mean / median / trimmed mean


class Mean(Aggregator):
    """Weighted mean ``Σ w_i x_i / Σ w_i`` (McMahan et al., AISTATS 2017: FedAvg).

    Bit-for-bit the same arithmetic as :meth:`FedAvg.aggregate`. Not robust: one Byzantine update
    ``x_b`` moves the result by ``w_b/Σw · (x_b − …)`` without bound, hence ``f = 0`` only.
    """

    name = "mean"
    requirement = "f = 0 (a single Byzantine update moves the mean arbitrarily far)"
    weighted = True

    def tolerates(self, n: int, f: int) -> bool:
        return f == 0

    def _aggregate(self, updates: Sequence[torch.Tensor], weights: Sequence[float], f: int) -> torch.Tensor:
        w = torch.tensor([float(v) for v in weights], dtype=torch.float64)
        w = (w / w.sum()).to(torch.float32)
        out = torch.zeros_like(updates[0])
        for wi, u in zip(w, updates, strict=True):
            out.add_(u, alpha=float(wi))
        return out


class Median(Aggregator):
    """Coordinate-wise median (Yin, Chen, Ramchandran, Bartlett, ICML 2018).

    For even ``n`` the two middle values are averaged (``torch.median`` would return the lower one).
    Breakdown point 1/2: tolerates ``2f < n``. Unweighted.
    """

    name = "median"
    requirement = "2f < n (Byzantine updates must be a strict minority)"

    def tolerates(self, n: int, f: int) -> bool:
        return 2 * f < n

    def _aggregate(self, updates: Sequence[torch.Tensor], weights: Sequence[float], f: int) -> torch.Tensor:
        n, d = len(updates), updates[0].numel()
        out = torch.empty_like(updates[0])
        for start, end in _column_chunks(n, d, updates[0].element_size()):
            s = _stack(updates, start, end).sort(dim=0).values
            if n % 2:
                out[start:end] = s[n // 2]
            else:
                out[start:end] = (s[n // 2 - 1].double() + s[n // 2].double()) / 2
        return out


class TrimmedMean(Aggregator):
    """Coordinate-wise β-trimmed mean (Yin, Chen, Ramchandran, Bartlett, ICML 2018).

    Per coordinate, drop the ``k`` largest and ``k`` smallest of the ``n`` values and average the
    remaining ``n − 2k``. With ``beta`` given, ``k = ⌊β n⌋`` (β in [0, 0.5)) and ``f ≤ k`` is
    tolerated; with ``beta=None``, ``k = f`` (trim exactly the assumed Byzantine count) and
    ``2f < n`` is needed. ``beta=0`` is the unweighted mean. Unweighted.
    """

    name = "trimmed_mean"
    requirement = "f <= k = floor(beta * n) trimmed per side (or 2f < n with beta=None)"

    def __init__(self, beta: float | None = None) -> None:
        if beta is not None:
            beta = float(beta)
            if not 0.0 <= beta < 0.5:
                raise ConfigError(
                    f"trimmed_mean beta (fraction trimmed per side) must be in [0, 0.5), got {beta}"
                )
        self.beta = beta

    def trim_count(self, n: int, f: int) -> int:
        """``k``, the number of values dropped at each end per coordinate."""
        return f if self.beta is None else math.floor(self.beta * n + 1e-9)

    def tolerates(self, n: int, f: int) -> bool:
        k = self.trim_count(n, f)
        return f <= k and 2 * k < n

    def _aggregate(self, updates: Sequence[torch.Tensor], weights: Sequence[float], f: int) -> torch.Tensor:
        n, d = len(updates), updates[0].numel()
        k = self.trim_count(n, f)
        out = torch.empty_like(updates[0])
        for start, end in _column_chunks(n, d, updates[0].element_size()):
            s = _stack(updates, start, end)
            if k > 0:
                s = s.sort(dim=0).values[k : n - k]
            out[start:end] = s.sum(dim=0, dtype=torch.float64) / (n - 2 * k)
        return out

    def __repr__(self) -> str:
        return f"TrimmedMean(beta={self.beta})"


# ----------------------------------------------------------------------------------------------
# Krum / Multi-Krum


class MultiKrum(Aggregator):
    """Multi-Krum (Blanchard, El Mhamdi, Guerraoui, Stainer, NeurIPS 2017, "Machine learning with
    adversaries: Byzantine tolerant gradient descent").

    Score of update ``i``: the sum of squared distances to its ``n − f − 2`` nearest other updates.
    Multi-Krum averages (uniformly) the ``m`` updates with the lowest scores, scores computed once
    as in the paper (not the iterated selection of Bulyan); ``m = 1`` is Krum, ``m=None`` means
    ``m = n − f``. Ties go to the lower index. Needs ``n > 2f + 2`` (the paper's ``n ≥ 2f + 3``),
    also when ``f = 0`` (so at least 3 updates). The chosen indices of the last call are in
    ``selected``.
    """

    name = "multi_krum"
    requirement = "n > 2f + 2 (Blanchard et al. 2017)"

    def __init__(self, m: int | None = None) -> None:
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ConfigError(f"multi_krum m (number of updates averaged) must be an int >= 1, got {m!r}")
        self.m = m
        self.selected: list[int] = []

    def tolerates(self, n: int, f: int) -> bool:
        return n > 2 * f + 2

    @staticmethod
    def scores(sq_dist: torch.Tensor, f: int) -> torch.Tensor:
        """Krum scores from an ``n × n`` squared-distance matrix (float64, length ``n``)."""
        n = sq_dist.shape[0]
        d = sq_dist.clone()
        d.fill_diagonal_(math.inf)
        k = n - f - 2
        return d.topk(k, dim=1, largest=False).values.sum(dim=1)

    def _count(self, n: int, f: int) -> int:
        m = n - f if self.m is None else self.m
        if m > n:
            raise ConfigError(f"{self.name} m={m} exceeds the number of updates n={n}; use m <= n - f")
        return m

    def _aggregate(self, updates: Sequence[torch.Tensor], weights: Sequence[float], f: int) -> torch.Tensor:
        n = len(updates)
        m = self._count(n, f)
        sc = self.scores(pairwise_sq_distances(updates), f)
        order = torch.argsort(sc, stable=True)[:m]
        self.selected = sorted(int(i) for i in order)
        if m == 1:
            return updates[self.selected[0]].clone()
        acc = torch.zeros(updates[0].numel(), dtype=torch.float64)
        for i in self.selected:
            acc += updates[i]
        return (acc / m).to(updates[0].dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(m={self.m})"


class Krum(MultiKrum):
    """Krum (Blanchard et al., NeurIPS 2017): the single update with the lowest Krum score.

    See :class:`MultiKrum`; this is ``m = 1``. Needs ``n > 2f + 2``.
    """

    name = "krum"

    def __init__(self) -> None:
        super().__init__(m=1)


# ----------------------------------------------------------------------------------------------
# stateful rules: CenteredClip, clipped differences, bucketing


def _load_reference(
    state: Mapping[str, torch.Tensor], key: str = "aggregator/reference"
) -> torch.Tensor | None:
    ref = state.get(key)
    return None if ref is None else ref.clone()


class CenteredClipping(Aggregator):
    """CenteredClip (Karimireddy, He, Jaggi, ICML 2021, "Learning from history for Byzantine robust
    optimization", Algorithm 2)::

        v ← reference                                   # previous aggregate (state)
        repeat L times:  v ← v + (1/n) Σ_i clip_τ(x_i − v)
        reference ← v                                    # when track_reference (default)

    ``clip_τ(z) = min(1, τ/‖z‖) z``. Each update moves ``v`` by at most ``τ/n``, so ``f`` Byzantine
    updates move it by at most ``L f τ / n`` whatever they send. The paper starts from the previous
    (momentum) aggregate and finds ``L = 1`` enough in practice; its analysis assumes a small
    Byzantine fraction, and ``tolerates`` only checks the breakdown condition ``2f < n``.

    Tune ``tau`` first: it is in the units of an update's L2 norm; around the typical honest
    ``‖x_i − reference‖`` is a reasonable start. ``init`` is the reference used when there is none
    yet (first round, or after :meth:`reset`): ``"zeros"`` (the paper's momentum starts at zero)
    or ``"median"`` (coordinate-wise median of the first round). Unweighted.
    """

    name = "centered_clipping"
    requirement = "2f < n (Byzantine updates must be a strict minority)"

    def __init__(
        self,
        tau: float,
        iterations: int = 1,
        init: str = "zeros",
        track_reference: bool = True,
    ) -> None:
        self.tau = _finite_positive("centered_clipping tau", tau, "the clipping radius, an L2 norm")
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ConfigError(f"centered_clipping iterations (L) must be an int >= 1, got {iterations!r}")
        if init not in ("zeros", "median"):
            raise ConfigError(f"centered_clipping init must be 'zeros' or 'median', got {init!r}")
        self.iterations = iterations
        self.init = init
        self.track_reference = bool(track_reference)
        self.reference: torch.Tensor | None = None

    def tolerates(self, n: int, f: int) -> bool:
        return 2 * f < n

    def reset(self) -> None:
        """Forget the reference; the next call starts from ``init``."""
        self.reference = None

    def _start(self, updates: Sequence[torch.Tensor]) -> torch.Tensor:
        if self.reference is not None:
            if self.reference.shape != updates[0].shape:
                raise ConfigError(
                    f"centered_clipping reference has shape {tuple(self.reference.shape)} but updates "
                    f"have {tuple(updates[0].shape)}; call reset() when the model changes"
                )
            return self.reference.to(torch.float64)
        if self.init == "median":
            return Median()._aggregate(updates, [1.0] * len(updates), 0).to(torch.float64)
        return torch.zeros(updates[0].numel(), dtype=torch.float64)

    def _aggregate(self, updates: Sequence[torch.Tensor], weights: Sequence[float], f: int) -> torch.Tensor:
        n = len(updates)
        v = self._start(updates)
        for _ in range(self.iterations):
            step = torch.zeros_like(v)
            for u in updates:
                z = u.double() - v
                norm = float(torch.linalg.vector_norm(z))
                step.add_(z, alpha=min(1.0, self.tau / norm) if norm > 0 else 1.0)
            v = v + step / n
        out = v.to(updates[0].dtype)
        if self.track_reference:
            self.reference = out.clone()
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self.reference is None else {"aggregator/reference": self.reference}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.reference = _load_reference(state)

    def __repr__(self) -> str:
        return f"CenteredClipping(tau={self.tau}, iterations={self.iterations}, init={self.init!r})"


class ClippedDifferences(Aggregator):
    """Clip each update's difference to a reference, then aggregate robustly (Malinovsky, Richtárik,
    Horváth, Gorbunov, NeurIPS 2024, "Byzantine robustness and partial participation can be achieved
    at once: just clip gradient differences", arXiv:2311.14127).

    What is implemented is the paper's *heuristic extension* (its eq. (10)) of clipping to any
    robust method, with ``g`` the previous aggregate kept as state::

        g_k = g_{k-1} + Agg({ clip_{λ_k}(x_i − g_{k-1}) : i ∈ S_k })        # Agg = ``inner`` rule
        λ_k = clip_multiplier · ‖x_k − x_{k-1}‖                              # the last model step

    (``clip_multiplier`` defaults to 1; the paper tunes it, its Fig. 1 finds convergence not very
    sensitive to it) or a fixed ``clip_radius`` instead of ``λ_k`` (give one of the two).

    With the reference unset (first call, or after :meth:`reset`) the call is an unclipped
    ``Agg({x_i})`` -- the analogue of the paper's rounds with ``c_k = 1``, where a larger cohort
    sends full vectors and no clipping is applied. Since every clipped difference has norm ≤ λ_k
    and the inner rules are bounded, a round in which the Byzantine clients are a *majority of the
    sampled cohort* moves the aggregate by at most ``F_A · λ_k`` (``F_A``: the inner rule's bound
    ``‖Agg(v_1..v_n)‖ ≤ F_A max_i ‖v_i‖``, the paper's Assumption 2.3) -- the point of the method
    under partial participation.

    The model step. The loop should report ``‖x_k − x_{k-1}‖`` with :meth:`observe_step` after its
    server update; without it the step is taken as ``‖g_{k-1}‖``, which equals the model step for
    plain FedAvg (server lr 1, no momentum).

    What differs from the paper, and what is uncertain:

    * The paper's method (Byz-VR-MARINA-PP, Algorithm 1) clips *compressed stochastic gradient
      differences* ``Q(∇f_i(x^{k+1}) − ∇f_i(x^k))`` of a recursive variance-reduced (PAGE/SARAH)
      estimator, whose honest norms are ``≤ L‖x^{k+1} − x^k‖`` by smoothness -- hence
      ``λ = 2L‖x^{k+1} − x^k‖`` in its Theorem 4.1. Here the clipped vectors are the differences
      between decoded FedAvg model differences (pseudo-gradients) and the previous aggregate;
      they also carry client heterogeneity and sampling noise that do not shrink with the step, so
      a small multiplier can clip honest updates and bias the result. The paper proves nothing for
      this FedAvg use (its own NN experiments apply eq. (10) to momentum SGD); tune
      ``clip_multiplier`` (or use ``clip_radius``) per task.
    * The paper applies clipping on the server to decoded vectors (Byzantines may skip it) -- as
      here. Its experiments use coordinate-wise median or RFA *with bucketing* as ``Agg``
      (``inner="bucketing", inner_options={"inner": "median", "bucket_size": 2}``); the default
      here is the plain coordinate-wise median.
    * ``tolerates`` reports the inner rule's condition for the configured ``f``; rounds where the
      actual Byzantine count exceeds it are the ones clipping bounds (not checked, not checkable).

    Unweighted unless the inner rule is ``mean`` (the paper's Byz-VR-MARINA-PP+ variant averages
    the clipped differences).
    """

    name = "clipped_differences"

    def __init__(
        self,
        inner: str = "median",
        inner_options: Mapping[str, Any] | None = None,
        clip_multiplier: float | None = None,
        clip_radius: float | None = None,
    ) -> None:
        if clip_multiplier is not None and clip_radius is not None:
            raise ConfigError(
                "clipped_differences takes clip_multiplier (λ: radius = λ·‖last model step‖) or "
                f"clip_radius (fixed), not both; got clip_multiplier={clip_multiplier}, "
                f"clip_radius={clip_radius}"
            )
        if clip_multiplier is None and clip_radius is None:
            clip_multiplier = 1.0
        if clip_multiplier is not None:
            clip_multiplier = _finite_positive(
                "clipped_differences clip_multiplier", clip_multiplier, "radius / model step norm"
            )
        if clip_radius is not None:
            clip_radius = _finite_positive("clipped_differences clip_radius", clip_radius, "an L2 norm")
        if inner == self.name:
            raise ConfigError("clipped_differences cannot use itself as the inner aggregator")
        self.inner = make_aggregator(inner, **dict(inner_options or {}))
        self.clip_multiplier = clip_multiplier
        self.clip_radius = clip_radius
        self.reference: torch.Tensor | None = None
        self.step_norm: float | None = None
        self.last_radius: float | None = None

    @property
    def requirement(self) -> str:  # type: ignore[override]
        return f"what its inner rule {self.inner.name!r} needs: {self.inner.requirement}"

    @property
    def weighted(self) -> bool:  # type: ignore[override]
        return self.inner.weighted

    def tolerates(self, n: int, f: int) -> bool:
        return self.inner.tolerates(n, f)

    def observe_step(self, step_norm: float) -> None:
        """Report ``‖x_k − x_{k-1}‖``, the norm of the server's last model step (sets the next λ)."""
        step_norm = float(step_norm)
        if not math.isfinite(step_norm) or step_norm < 0:
            raise ValueError(f"step_norm must be finite and >= 0, got {step_norm}")
        self.step_norm = step_norm

    def reset(self) -> None:
        """Forget the reference: the next call is an unclipped inner aggregation."""
        self.reference = None
        self.step_norm = None

    def radius(self) -> float | None:
        """The clipping radius the next call will use (``None``: no reference, no clipping)."""
        if self.reference is None:
            return None
        if self.clip_radius is not None:
            return self.clip_radius
        step = self.step_norm
        if step is None:
            step = float(torch.linalg.vector_norm(self.reference.double()))
        return (self.clip_multiplier or 0.0) * step

    def _aggregate(self, updates: Sequence[torch.Tensor], weights: Sequence[float], f: int) -> torch.Tensor:
        radius = self.radius()
        self.last_radius = radius
        if radius is None or self.reference is None:
            out = self.inner(updates, weights, num_byzantine=f)
        else:
            ref = self.reference
            if ref.shape != updates[0].shape:
                raise ConfigError(
                    f"clipped_differences reference has shape {tuple(ref.shape)} but updates have "
                    f"{tuple(updates[0].shape)}; call reset() when the model changes"
                )
            diffs = [clip_to_norm(u - ref, radius) for u in updates]
            out = ref + self.inner(diffs, weights, num_byzantine=f)
        self.reference = out.clone()
        self.step_norm = None
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"inner/{k}": v for k, v in self.inner.state_dict().items()}
        if self.reference is not None:
            state["aggregator/reference"] = self.reference
        if self.step_norm is not None:
            state["aggregator/step_norm"] = torch.tensor(self.step_norm, dtype=torch.float64)
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.reference = _load_reference(state)
        step = state.get("aggregator/step_norm")
        self.step_norm = None if step is None else float(step)
        self.inner.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("inner/")})

    def __repr__(self) -> str:
        return (
            f"ClippedDifferences(inner={self.inner!r}, clip_multiplier={self.clip_multiplier}, "
            f"clip_radius={self.clip_radius})"
        )


class Bucketing(Aggregator):
    """Bucketing (Karimireddy, He, Jaggi, ICLR 2022, "Byzantine-robust learning on heterogeneous
    datasets via bucketing", Algorithm 1): randomly permute the ``n`` updates, average consecutive
    buckets of ``bucket_size`` (``s``), and apply the ``inner`` rule to the ``⌈n/s⌉`` bucket means.

    Each Byzantine update spoils at most one bucket, so the inner rule sees at most ``f`` bad
    vectors among ``⌈n/s⌉`` (tolerated when the inner rule tolerates that). Reduces the
    heterogeneity the inner rule sees; the paper uses ``s = 2``. The permutation of call ``t``
    comes from the seed tree ``(seed, "bucketing", t)``, and ``t`` is checkpointed, so a resumed
    run draws the same buckets. Unweighted.
    """

    name = "bucketing"

    def __init__(
        self,
        inner: str = "median",
        bucket_size: int = 2,
        seed: int = 0,
        inner_options: Mapping[str, Any] | None = None,
    ) -> None:
        if isinstance(bucket_size, bool) or not isinstance(bucket_size, int) or bucket_size < 1:
            raise ConfigError(f"bucketing bucket_size must be an int >= 1, got {bucket_size!r}")
        self.inner = make_aggregator(inner, **dict(inner_options or {}))
        self.bucket_size = bucket_size
        self.seed = int(seed)
        self.calls = 0

    @property
    def requirement(self) -> str:  # type: ignore[override]
        return (
            f"inner rule {self.inner.name!r} on ceil(n/{self.bucket_size}) bucket means: "
            f"{self.inner.requirement}"
        )

    def tolerates(self, n: int, f: int) -> bool:
        return self.inner.tolerates(math.ceil(n / self.bucket_size), f)

    def _aggregate(self, updates: Sequence[torch.Tensor], weights: Sequence[float], f: int) -> torch.Tensor:
        n, s = len(updates), self.bucket_size
        perm = torch.randperm(n, generator=torch_rng(self.seed, "bucketing", self.calls)).tolist()
        self.calls += 1
        means = []
        for b in range(0, n, s):
            members = perm[b : b + s]
            acc = torch.zeros(updates[0].numel(), dtype=torch.float64)
            for i in members:
                acc += updates[i]
            means.append((acc / len(members)).to(updates[0].dtype))
        return self.inner(means, [1.0] * len(means), num_byzantine=f)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"inner/{k}": v for k, v in self.inner.state_dict().items()}
        state["aggregator/calls"] = torch.tensor(self.calls, dtype=torch.int64)
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        calls = state.get("aggregator/calls")
        self.calls = 0 if calls is None else int(calls)
        self.inner.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("inner/")})

    def __repr__(self) -> str:
        return f"Bucketing(inner={self.inner!r}, bucket_size={self.bucket_size}, seed={self.seed})"


# ----------------------------------------------------------------------------------------------
# registry

AGGREGATORS: dict[str, type[Aggregator]] = {
    cls.name: cls
    for cls in (
        Mean,
        Median,
        TrimmedMean,
        Krum,
        MultiKrum,
        CenteredClipping,
        ClippedDifferences,
        Bucketing,
    )
}
"""Aggregation rules by config name."""


def _suggest(name: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def make_aggregator(name: str, **options: Any) -> Aggregator:
    """Build the aggregation rule ``name`` with its options (unknown names/options -> ConfigError).

    >>> make_aggregator("trimmed_mean", beta=0.1)
    TrimmedMean(beta=0.1)
    """
    cls = AGGREGATORS.get(name)
    if cls is None:
        raise ConfigError(
            f"unknown aggregator {name!r}; expected one of {sorted(AGGREGATORS)}"
            + _suggest(name, list(AGGREGATORS))
        )
    params = {
        p.name: p
        for p in list(inspect.signature(cls.__init__).parameters.values())[1:]
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    for key in options:
        if key not in params:
            accepted = sorted(params) or "none"
            raise ConfigError(
                f"aggregator {name!r} has no option {key!r}; its options: {accepted}"
                + _suggest(key, list(params))
            )
    missing = [k for k, p in params.items() if p.default is p.empty and k not in options]
    if missing:
        raise ConfigError(f"aggregator {name!r} needs option(s) {missing}")
    return cls(**options)
