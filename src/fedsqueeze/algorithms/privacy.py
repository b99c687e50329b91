"""Client-level differential privacy for federated rounds: clipping, Gaussian noise, accounting.

The privacy unit is a *client* (all of its data): neighbouring runs differ by one client's whole
dataset, and every guarantee below bounds what the released updates reveal about that.

Two mechanisms, both a Gaussian mechanism on updates clipped to L2 norm ``C`` (``clip_norm``) with
noise standard deviation ``σ·C`` (``σ`` = ``noise_multiplier``, the knob to tune first, then ``C``):

* **Central DP** (:class:`CentralDP`; DP-FedAvg, McMahan, Ramage, Talwar, Zhang, ICLR 2018,
  "Learning differentially private recurrent language models"). A trusted server clips every
  decoded update, sums, adds ``N(0, σ²C² I)`` once and divides by a fixed denominator ``m``
  (the cohort size): ``Δ = (Σ_i clip_C(Δ_i) + N(0, σ²C² I)) / m``, so the noise on the mean has
  standard deviation ``σ C / m`` per coordinate. Adding or removing one client changes the sum by
  at most ``C``; with clients sampled at rate ``q = clients_per_round / num_clients`` for ``T``
  rounds, :func:`compute_epsilon` gives ``ε(σ, q, T, δ)``.
* **Local DP** (:class:`LocalDP`). Each client clips and adds ``N(0, σ²C² I)`` to its *own* update
  before it leaves the device, so no one has to be trusted. Any two datasets of a client give
  clipped updates up to ``2C`` apart, so each participation is a Gaussian mechanism with
  effective multiplier ``σ/2``, and subsampling does not amplify it (the server sees who sent).
  Much more noise for the same ε: the mean of ``m`` locally noised updates has noise ``σ C/√m``.

Order of operations with compression and error feedback (what the round loop must do):

* Local DP, on the client: ``clip → add noise → (error feedback) → encode``. Clipping must happen
  on the client (the server never sees the un-noised update). Everything after the noise --
  the codec, its own randomness, decoding, aggregation -- is *post-processing* and keeps the
  guarantee. Error feedback is the trap: its residual ``corrected − decoded`` is the part of the
  update that was not sent, and if EF runs on the clipped *un-noised* update (noise added after the
  residual is folded in), the residual carries un-noised data into the next round; the next
  payload then depends on past data through a channel the per-round sensitivity bound ``2C``
  does not cover, and the local-DP accounting is void. Run EF on the *noised* update (residual =
  noised-and-corrected − decoded): then every payload is a function of the noised sequence only.
* Central DP, split between client and server: client ``(error feedback) → encode``; server
  ``decode → clip_C (each decoded update) → sum → add noise → divide by m``. The server must clip
  what it actually sums -- the *decoded* update -- because a lossy codec can change the norm (an
  unbiased quantiser can increase it), so client-side clipping alone would not bound the
  sensitivity. EF is fine here: residuals never leave the client, and whatever a client's
  decoded update depends on, its contribution to each round's sum is clipped to ``C``; the RDP
  analysis composes adaptively chosen mechanisms. The server, which sees decoded updates before
  noise, is trusted; the released model and broadcasts are post-processing.
* Weights: both mechanisms average *uniformly* with a fixed denominator. Sample-count weights
  are data-dependent and would scale one client's influence beyond ``C``.
* Robust aggregation: the accounting holds for the noised *mean* only; a median or Krum over
  clipped updates has a different sensitivity and is not covered.

Accounting uses Opacus's Rényi-DP accountant (``opacus.accountants.RDPAccountant`` analysis:
Mironov, Talwar, Zhang 2019, "Rényi differential privacy of the sampled Gaussian mechanism", with
the RDP → (ε, δ) conversion of Balle et al. 2020). It assumes *Poisson* sampling of clients at rate
``q``; the round loop samples a fixed number uniformly without replacement, for which the same
number is the usual approximation (as in McMahan et al. 2018), not a proof. Opacus is imported
lazily, so importing this module stays cheap.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fedsqueeze.algorithms.aggregators import clip_to_norm
from fedsqueeze.errors import ConfigError

__all__ = [
    "RDP_ORDERS",
    "CentralDP",
    "DPAccountant",
    "LocalDP",
    "PrivacySpent",
    "clip_update",
    "compute_epsilon",
    "gaussian_noise",
    "noise_multiplier_for",
]

RDP_ORDERS: tuple[float, ...] = (
    tuple(1 + x / 10.0 for x in range(1, 100))
    + tuple(float(a) for a in range(12, 64))
    + (64.0, 80.0, 96.0, 128.0, 192.0, 256.0, 512.0, 1024.0)
)
"""Rényi orders searched for the best (ε, δ) conversion: Opacus's defaults plus larger orders,
which matter for large σ or q = 1 (local DP)."""


@dataclass(frozen=True)
class PrivacySpent:
    """An (ε, δ) guarantee and what it was computed for."""

    epsilon: float
    delta: float
    best_order: float
    """The Rényi order α at which the conversion to (ε, δ) was tightest."""
    noise_multiplier: float
    sample_rate: float
    steps: int
    accountant: str = "rdp"


# ----------------------------------------------------------------------------------------------
# mechanisms


def _check_clip_noise(clip_norm: float, noise_multiplier: float) -> tuple[float, float]:
    clip_norm, noise_multiplier = float(clip_norm), float(noise_multiplier)
    if not math.isfinite(clip_norm) or clip_norm <= 0:
        raise ConfigError(f"clip_norm C (an L2 norm) must be finite and > 0, got {clip_norm}")
    if not math.isfinite(noise_multiplier) or noise_multiplier < 0:
        raise ConfigError(
            f"noise_multiplier σ (noise std / clip_norm) must be finite and >= 0, got {noise_multiplier}"
        )
    return clip_norm, noise_multiplier


def clip_update(update: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """``min(1, C/‖u‖) · u``: a new tensor with L2 norm ≤ ``clip_norm`` (unchanged if already)."""
    if not math.isfinite(clip_norm) or clip_norm <= 0:
        raise ConfigError(f"clip_norm must be finite and > 0, got {clip_norm}")
    return clip_to_norm(update, float(clip_norm))


def gaussian_noise(like: torch.Tensor, std: float, *, generator: torch.Generator) -> torch.Tensor:
    """``N(0, std² I)`` shaped and typed like ``like`` (drawn in float32 from ``generator``)."""
    return (torch.randn(like.shape, generator=generator, dtype=torch.float32) * std).to(like.dtype)


@dataclass(frozen=True)
class LocalDP:
    """Local DP: each client releases ``clip_C(u) + N(0, σ²C² I)`` (see the module docstring for
    where it goes relative to error feedback and encoding)."""

    clip_norm: float
    noise_multiplier: float

    def __post_init__(self) -> None:
        _check_clip_noise(self.clip_norm, self.noise_multiplier)

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise on each coordinate of one client's update: ``σ C``."""
        return self.noise_multiplier * self.clip_norm

    def privatize(self, update: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
        """Clip ``update`` to ``C`` and add the client's noise (a new tensor)."""
        clipped = clip_update(update, self.clip_norm)
        if self.noise_multiplier == 0:
            return clipped
        return clipped + gaussian_noise(clipped, self.noise_std, generator=generator)

    def epsilon(self, participations: int, delta: float) -> PrivacySpent:
        """ε after a client took part ``participations`` times: RDP of a Gaussian mechanism with
        sensitivity ``2C`` (any two datasets of the client), i.e. multiplier ``σ/2``, no
        subsampling amplification (``q = 1``)."""
        spent = compute_epsilon(
            noise_multiplier=self.noise_multiplier / 2,
            sample_rate=1.0,
            steps=participations,
            delta=delta,
        )
        return PrivacySpent(
            epsilon=spent.epsilon,
            delta=delta,
            best_order=spent.best_order,
            noise_multiplier=self.noise_multiplier,
            sample_rate=1.0,
            steps=participations,
            accountant="rdp (local, sensitivity 2C)",
        )


@dataclass(frozen=True)
class CentralDP:
    """Central DP (DP-FedAvg): the server clips each decoded update to ``C``, sums, adds
    ``N(0, σ²C² I)`` once and divides by a fixed denominator."""

    clip_norm: float
    noise_multiplier: float

    def __post_init__(self) -> None:
        _check_clip_noise(self.clip_norm, self.noise_multiplier)

    def noise_std(self, denominator: int) -> float:
        """Noise std per coordinate of the *mean*: ``σ C / denominator``."""
        return self.noise_multiplier * self.clip_norm / denominator

    def aggregate(
        self,
        updates: Sequence[torch.Tensor],
        *,
        generator: torch.Generator,
        denominator: int | None = None,
    ) -> torch.Tensor:
        """``(Σ_i clip_C(u_i) + N(0, σ²C² I)) / denominator`` (float32 like the updates).

        ``denominator`` should be the configured cohort size ``clients_per_round`` -- fixed, so it
        does not depend on who took part (McMahan et al. 2018's fixed-denominator estimator); the
        default, ``len(updates)``, equals it when no client dropped out.
        """
        if not updates:
            raise ValueError("no client updates to aggregate")
        m = len(updates) if denominator is None else denominator
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ConfigError(f"denominator must be an int >= 1, got {m!r}")
        total = torch.zeros(updates[0].numel(), dtype=torch.float64)
        for u in updates:
            if u.shape != updates[0].shape:
                raise ValueError(f"updates differ in shape: {tuple(u.shape)} vs {tuple(updates[0].shape)}")
            total += clip_update(u, self.clip_norm).double()
        if self.noise_multiplier > 0:
            total += torch.randn(total.shape, generator=generator, dtype=torch.float64) * (
                self.noise_multiplier * self.clip_norm
            )
        return (total / m).to(updates[0].dtype).reshape(updates[0].shape)

    def epsilon(self, *, sample_rate: float, rounds: int, delta: float) -> PrivacySpent:
        """ε after ``rounds`` rounds with clients sampled at ``sample_rate`` = per_round / num_clients."""
        return compute_epsilon(
            noise_multiplier=self.noise_multiplier, sample_rate=sample_rate, steps=rounds, delta=delta
        )


# ----------------------------------------------------------------------------------------------
# accounting


def _check_accounting(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> None:
    if not math.isfinite(noise_multiplier) or noise_multiplier < 0:
        raise ConfigError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier}")
    if not 0 < sample_rate <= 1:
        raise ConfigError(
            f"sample_rate q (clients_per_round / num_clients) must be in (0, 1], got {sample_rate}"
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ConfigError(f"steps (rounds) must be an int >= 0, got {steps!r}")
    if not 0 < delta < 1:
        raise ConfigError(f"delta must be in (0, 1), typically < 1/num_clients, got {delta}")


def _rdp_epsilon(history: Sequence[tuple[float, float, int]], delta: float) -> tuple[float, float]:
    from opacus.accountants.analysis import rdp as rdp_analysis

    history = [h for h in history if h[2] > 0]
    if not history:
        return 0.0, math.nan
    if any(sigma == 0 for sigma, _, _ in history):
        return math.inf, math.nan
    orders = list(RDP_ORDERS)
    rdp = sum(
        rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders)
        for sigma, q, steps in history
    )
    eps, order = rdp_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(eps), float(order)


def compute_epsilon(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> PrivacySpent:
    """ε for ``steps`` rounds of the sampled Gaussian mechanism (Opacus RDP analysis).

    ``noise_multiplier`` σ = noise std / clip norm; ``sample_rate`` q = clients_per_round /
    num_clients; ``steps`` = rounds; ``δ`` usually below ``1/num_clients``. σ = 0 gives ε = ∞,
    ``steps = 0`` gives ε = 0. ε falls as σ grows and rises with q and T.
    """
    _check_accounting(noise_multiplier, sample_rate, steps, delta)
    eps, order = _rdp_epsilon([(float(noise_multiplier), float(sample_rate), steps)], delta)
    return PrivacySpent(
        epsilon=eps,
        delta=delta,
        best_order=order,
        noise_multiplier=float(noise_multiplier),
        sample_rate=float(sample_rate),
        steps=steps,
    )


def noise_multiplier_for(
    *, target_epsilon: float, delta: float, sample_rate: float, steps: int, tolerance: float = 0.01
) -> float:
    """The smallest σ (to ``tolerance`` in ε) for which ``steps`` rounds at rate ``sample_rate``
    stay within ``(target_epsilon, delta)`` -- Opacus's ``get_noise_multiplier`` with the RDP
    accountant (its default orders, so the result can be slightly conservative here)."""
    _check_accounting(1.0, sample_rate, steps, delta)
    if not math.isfinite(target_epsilon) or target_epsilon <= 0:
        raise ConfigError(f"target_epsilon must be finite and > 0, got {target_epsilon}")
    if steps == 0:
        return 0.0
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        # the bracketing search tries σ far above the answer, where Opacus warns about its orders
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant="rdp",
                epsilon_tolerance=tolerance,
            )
        )


class DPAccountant:
    """Running privacy ledger for a run: :meth:`step` once per round, :meth:`spent` any time.

    Consecutive rounds with the same ``(σ, q)`` are merged, like Opacus's ``RDPAccountant``; the
    ledger is checkpointed as one ``k × 3`` float64 tensor ``(σ, q, rounds)``.
    """

    def __init__(self) -> None:
        self.history: list[tuple[float, float, int]] = []

    def step(self, *, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Record ``steps`` rounds of the sampled Gaussian mechanism with ``(σ, q)``."""
        _check_accounting(noise_multiplier, sample_rate, steps, 0.5)
        sigma, q = float(noise_multiplier), float(sample_rate)
        if self.history and self.history[-1][:2] == (sigma, q):
            self.history[-1] = (sigma, q, self.history[-1][2] + steps)
        else:
            self.history.append((sigma, q, steps))

    @property
    def steps(self) -> int:
        return sum(h[2] for h in self.history)

    def spent(self, delta: float) -> PrivacySpent:
        """The (ε, δ) guarantee for everything recorded so far."""
        _check_accounting(0.0, 1.0, 0, delta)
        eps, order = _rdp_epsilon(self.history, delta)
        last = self.history[-1] if self.history else (math.nan, math.nan, 0)
        return PrivacySpent(
            epsilon=eps,
            delta=delta,
            best_order=order,
            noise_multiplier=last[0],
            sample_rate=last[1],
            steps=self.steps,
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"privacy/history": torch.tensor(self.history, dtype=torch.float64).reshape(-1, 3)}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        rows = state.get("privacy/history")
        self.history = (
            []
            if rows is None
            else [(float(s), float(q), round(float(t))) for s, q, t in rows.reshape(-1, 3).tolist()]
        )
