"""Client participation: which clients take part in round ``t`` and how their updates are weighted.

Selected by ``clients.sampling`` (options in ``clients.sampling_options``, checked at config time by
:func:`validate_sampling`). Every draw of round ``t`` comes from the seed tree key
``(seed, "sample", t)``, so a resumed run samples exactly what an uninterrupted one does; a sampler's
learned state (``importance`` by norm) is checkpointed through ``state_dict``/``load_state_dict``.

``uniform`` (default)
    ``m = clients.per_round`` distinct clients uniformly without replacement (bit-identical to the
    loop before samplers existed). Aggregation is the loop's aggregator on the cohort's weights
    ``w_c`` (sample counts for FedAvg), i.e. the self-normalised ``Σ_S w_c Δ_c / Σ_S w_c``.

``importance``
    Fixed-size unequal-probability sampling with **Horvitz-Thompson** reweighting. Sampling scores
    ``s_c`` (``by = "size"``: the client's data size ``n_c``; ``by = "norm"``: ``w_c · u_c`` with
    ``u_c`` the norm of the client's last aggregated update as the server decoded it — the
    variance-minimising choice of Chen, Horváth, Richtárik, "Optimal Client Sampling for Federated
    Learning", TMLR 2022, with stale norms — a client never seen uses the mean of the known norms, or
    ``prior_norm`` when none is known; algorithms that never decode a client's update (``ef21``,
    ``locodl``, ``fetchsgd``) cannot use it) become probabilities with a floor, so every client can
    be drawn::

        q_c = (1 − floor) · s_c / Σ s + floor / N               # q_c ≥ floor / N > 0

    Inclusion probabilities ``π_c = min(1, m q_c)``, the excess of capped clients redistributed over
    the others until ``Σ π_c = m`` (:func:`inclusion_probabilities`). The cohort is drawn by
    *systematic PPS sampling in random order* (Madow 1949; :func:`systematic_sample`): exactly ``m``
    distinct clients, client ``c`` included with probability exactly ``π_c``. The aggregate::

        Δ̂ = Σ_{c∈S} (w_c / π_c) Δ_c / W ,   W = Σ_{all N clients} w_c
        E[Δ̂] = Σ_c π_c (w_c / π_c) Δ_c / W = Σ_c w_c Δ_c / W      # the full-participation mean

    In the loop this is weight ``w_c · f_c`` with ``f_c = m / (N π_c)`` (``f_c = 1`` for uniform
    ``π_c = m/N``) over the fixed denominator ``D = m W / N`` (``Cohort.factors``,
    ``Cohort.denominator``; :func:`weighted_sum`). Why this estimator: the cohort keeps exactly
    ``m`` distinct clients every round, the same compute and byte budget as ``uniform`` (sampling
    with replacement wastes slots on duplicates; Poisson sampling makes the cohort size random),
    and ``π_c`` is exact, so the estimate is unbiased, not just consistent. With ``by = "size"``
    and FedAvg weights, ``w_c/π_c`` is constant: the plain mean of the cohort (Li et al., "On the
    Convergence of FedAvg on Non-IID Data", ICLR 2020, scheme I). Caveats: clients that are dropped,
    straggle or send NaN contribute zero (the denominator stays ``D``: the step shrinks rather than
    being biased towards the fast clients); robust aggregators get the plain weights ``w_c`` (they
    ignore weights anyway; a robust rule is not an unbiased mean); central DP is refused (its
    accountant assumes uniform sampling).

``cyclic``
    The clients are split into ``groups = G`` near-equal groups (a seeded permutation, fixed for the
    run); round ``t`` samples ``min(per_round, |group|)`` clients uniformly from group ``t mod G``,
    or the whole group with ``whole_group = true`` (Cho, Sharma, Joshi et al., "On the Convergence
    of Federated Averaging with Cyclic Client Participation", ICML 2023). Weighting as ``uniform``.

Example::

    [clients]
    per_round = 3
    sampling = "importance"
    sampling_options = { by = "norm", floor = 0.2 }
"""

from __future__ import annotations

import difflib
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import numpy.typing as npt
import torch

from fedsqueeze.errors import ConfigError
from fedsqueeze.sim.seeds import np_rng

if TYPE_CHECKING:
    from fedsqueeze.experiment.config import RunConfig

__all__ = [
    "SAMPLERS",
    "ClientSampler",
    "Cohort",
    "CyclicSampler",
    "ImportanceSampler",
    "UniformSampler",
    "inclusion_probabilities",
    "make_sampler",
    "resolve_sampling_options",
    "systematic_sample",
    "validate_sampling",
    "weighted_sum",
]

_CERTAIN = 1.0 - 1e-9
"""Inclusion probabilities at least this are treated as 1 (the client is always in the cohort)."""

# algorithms whose update rule needs every client every round (their own check is per_round == N)
_FULL_PARTICIPATION = ("scaffnew", "fedcomloc")


@dataclass(frozen=True)
class Cohort:
    """The clients of one round and how to weight them.

    Attributes
    ----------
    clients
        Sorted, distinct client ids.
    factors
        Multiplier of each client's aggregation weight ``w_c`` (``1`` for uniform/cyclic).
    denominator
        ``None``: aggregate with the loop's aggregator (self-normalised by the cohort's weights).
        A number ``D``: the unbiased estimate ``Σ_S w_c f_c Δ_c / D`` (:func:`weighted_sum`).
    inclusion
        ``π_c`` of each sampled client (importance sampling), else ``None``.
    """

    clients: list[int]
    factors: dict[int, float] = field(default_factory=dict)
    denominator: float | None = None
    inclusion: dict[int, float] | None = None

    def factor(self, c: int) -> float:
        return self.factors.get(c, 1.0)


class ClientSampler(ABC):
    """Chooses each round's cohort; ``observe`` feeds back what the server learned about a client."""

    name: ClassVar[str]

    def __init__(self, num_clients: int, per_round: int, seed: int) -> None:
        self.num_clients = num_clients
        self.per_round = per_round
        self.seed = seed
        #: whether the loop should report update norms through :meth:`observe`
        self.observes_norms = False

    @abstractmethod
    def sample(self, t: int) -> Cohort:
        """The cohort of round ``t`` (0-based), a pure function of the seed, ``t`` and the state."""

    def observe(self, client: int, norm: float) -> None:
        """The L2 norm of ``client``'s update the server aggregated (default: ignored)."""
        return None

    def static_inclusion(self) -> npt.NDArray[np.float64] | None:
        """Each client's probability of being drawn in any round, when it is the same every round
        and the draws are random (what a convergence theorem's participation probability means);
        None for deterministic schedules (cyclic) or probabilities that change (importance by norm)."""
        return None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors to checkpoint (keys under ``sampler/``; empty for stateless samplers)."""
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned."""
        return None


class UniformSampler(ClientSampler):
    """``per_round`` clients uniformly without replacement (the loop's original draw, bit for bit)."""

    name = "uniform"

    def sample(self, t: int) -> Cohort:
        rng = np_rng(self.seed, "sample", t)
        return Cohort(sorted(int(c) for c in rng.choice(self.num_clients, self.per_round, replace=False)))

    def static_inclusion(self) -> npt.NDArray[np.float64]:
        return np.full(self.num_clients, self.per_round / self.num_clients)


class CyclicSampler(ClientSampler):
    """Round ``t`` draws from group ``t mod G`` of a fixed seeded split (see the module docstring)."""

    name = "cyclic"

    def __init__(
        self, num_clients: int, per_round: int, seed: int, *, groups: int, whole_group: bool = False
    ) -> None:
        super().__init__(num_clients, per_round, seed)
        perm = np_rng(seed, "sample-groups").permutation(num_clients)
        self.groups: list[list[int]] = [sorted(int(c) for c in g) for g in np.array_split(perm, groups)]
        self.whole_group = whole_group

    def group_of_round(self, t: int) -> list[int]:
        return self.groups[t % len(self.groups)]

    def sample(self, t: int) -> Cohort:
        group = self.group_of_round(t)
        if self.whole_group or self.per_round >= len(group):
            return Cohort(list(group))
        rng = np_rng(self.seed, "sample", t)
        return Cohort(sorted(int(group[i]) for i in rng.choice(len(group), self.per_round, replace=False)))


def inclusion_probabilities(q: npt.ArrayLike, m: int) -> npt.NDArray[np.float64]:
    """``π_c = min(1, m q_c)`` with the excess of capped clients spread over the rest, ``Σ π = m``.

    ``q`` must be positive and is normalised here. Clients with ``π_c ≥ 1 − 1e-9`` get exactly 1;
    the others keep ``π_c ∝ q_c`` (scaled so the total is ``m``).
    """
    qq = np.asarray(q, dtype=np.float64)
    n = qq.size
    if not 1 <= m <= n:
        raise ValueError(f"cohort size m={m} must be in [1, {n}]")
    if not (np.all(np.isfinite(qq)) and np.all(qq > 0)):
        raise ValueError("sampling probabilities must be finite and > 0")
    pi = np.zeros(n)
    certain = np.zeros(n, dtype=bool)
    while True:
        rest = ~certain
        k = m - int(certain.sum())
        if k == 0 or not rest.any():
            break
        pi[rest] = k * qq[rest] / qq[rest].sum()
        new = rest & (pi >= _CERTAIN)
        if not new.any():
            break
        certain |= new
        pi[certain] = 1.0
    pi[certain] = 1.0
    return pi


def systematic_sample(pi: npt.ArrayLike, rng: np.random.Generator) -> list[int]:
    """Systematic PPS sample in random order: exactly ``round(Σ π)`` distinct clients, each with
    probability ``π_c`` (clients with ``π_c = 1`` always). Sorted ids.

    The non-certain clients are put in a random order and laid end to end as intervals of length
    ``π_c`` on ``[0, k)``; the points ``u, u + 1, …, u + k − 1`` (``u ~ U[0, 1)``) pick the intervals
    they fall in. An interval shorter than 1 holds at most one point, and holds one with
    probability equal to its length.
    """
    p = np.asarray(pi, dtype=np.float64)
    certain = np.flatnonzero(p >= _CERTAIN)
    rest = np.flatnonzero(p < _CERTAIN)
    chosen = [int(c) for c in certain]
    k = round(float(p[rest].sum())) if rest.size else 0
    order = rng.permutation(rest)
    u = float(rng.random())
    if k > 0:
        cum = np.cumsum(p[order])
        cum *= k / cum[-1]
        cum[-1] = k
        idx = np.searchsorted(cum, u + np.arange(k), side="right")
        chosen += [int(order[i]) for i in np.minimum(idx, order.size - 1)]
    return sorted(chosen)


class ImportanceSampler(ClientSampler):
    """Horvitz-Thompson importance sampling by data size or last update norm (module docstring)."""

    name = "importance"

    def __init__(
        self,
        num_clients: int,
        per_round: int,
        seed: int,
        *,
        sizes: Sequence[float],
        weights: Sequence[float],
        by: str = "size",
        floor: float = 0.1,
        prior_norm: float = 1.0,
    ) -> None:
        super().__init__(num_clients, per_round, seed)
        if len(sizes) != num_clients or len(weights) != num_clients:
            raise ValueError(f"need one size and one weight per client ({num_clients})")
        self.sizes = np.asarray(sizes, dtype=np.float64)
        self.weights = np.asarray(weights, dtype=np.float64)
        self.total_weight = float(self.weights.sum())
        if not (np.all(self.weights >= 0) and self.total_weight > 0 and math.isfinite(self.total_weight)):
            raise ValueError("client aggregation weights must be finite, >= 0 and not all zero")
        self.by = by
        self.floor = floor
        self.prior_norm = prior_norm
        self.norms = np.full(num_clients, np.nan)  # last aggregated update norm; NaN = never seen
        self.observes_norms = by == "norm"

    def probabilities(self) -> npt.NDArray[np.float64]:
        """``q_c`` of the next draw (sums to 1, each ``≥ floor / N``)."""
        if self.by == "size":
            score = self.sizes
        else:
            known = self.norms[~np.isnan(self.norms)]
            fill = float(known.mean()) if known.size else self.prior_norm
            score = self.weights * np.where(np.isnan(self.norms), fill, self.norms)
        total = float(score.sum())
        if total > 0 and math.isfinite(total):
            base = score / total
        else:  # every score 0 (e.g. all known updates were zero): uniform
            base = np.full(self.num_clients, 1.0 / self.num_clients)
        return (1.0 - self.floor) * base + self.floor / self.num_clients

    def static_inclusion(self) -> npt.NDArray[np.float64] | None:
        if self.by != "size":
            return None  # by norm: the probabilities follow the observed norms
        return inclusion_probabilities(self.probabilities(), self.per_round)

    def sample(self, t: int) -> Cohort:
        pi = inclusion_probabilities(self.probabilities(), self.per_round)
        clients = systematic_sample(pi, np_rng(self.seed, "sample", t))
        n, m = self.num_clients, self.per_round
        return Cohort(
            clients,
            factors={c: m / (n * float(pi[c])) for c in clients},
            denominator=m * self.total_weight / n,
            inclusion={c: float(pi[c]) for c in clients},
        )

    def observe(self, client: int, norm: float) -> None:
        if self.by == "norm" and math.isfinite(norm):
            self.norms[client] = float(norm)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"sampler/norms": torch.from_numpy(self.norms.copy())} if self.by == "norm" else {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if self.by == "norm":
            v = state["sampler/norms"]
            if v.numel() != self.num_clients:
                raise ValueError(
                    f"checkpointed sampler norms have {v.numel()} entries, expected {self.num_clients}"
                )
            self.norms = v.to(torch.float64).numpy().copy()


def weighted_sum(
    updates: Sequence[torch.Tensor], weights: Sequence[float], denominator: float
) -> torch.Tensor:
    """``Σ_i (w_i / D) x_i`` with a *fixed* denominator ``D`` (the unbiased estimator's; weights in
    float64, accumulation in the updates' dtype, like the ``mean`` aggregator)."""
    if not updates:
        raise ValueError("no client updates to aggregate")
    if not (math.isfinite(denominator) and denominator > 0):
        raise ValueError(f"denominator must be finite and > 0, got {denominator}")
    out = torch.zeros_like(updates[0])
    for w, u in zip(weights, updates, strict=True):
        out.add_(u, alpha=float(w) / float(denominator))
    return out


# ----------------------------------------------------------------------------------------------
# options, validation, construction

SAMPLERS: dict[str, dict[str, Any]] = {
    "uniform": {},
    "importance": {"by": "size", "floor": 0.1, "prior_norm": 1.0},
    "cyclic": {"groups": None, "whole_group": False},
}
"""Sampler name -> its options with defaults (``None``: required)."""


def _opt(key: str) -> str:
    return f"clients.sampling_options.{key}"


def resolve_sampling_options(name: str, options: Mapping[str, Any], num_clients: int) -> dict[str, Any]:
    """Defaults merged with ``options``, every value checked; ConfigErrors name the key."""
    if name not in SAMPLERS:
        close = difflib.get_close_matches(name, list(SAMPLERS), n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown clients.sampling {name!r}; expected one of {sorted(SAMPLERS)}{hint}")
    allowed = SAMPLERS[name]
    for key in options:
        if key not in allowed:
            close = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.5)
            hint = (
                f"; did you mean {_opt(close[0])!r}?"
                if close
                else f"; valid options for {name!r}: {', '.join(allowed) or '(none)'}"
            )
            raise ConfigError(f"unknown option {_opt(key)!r} for clients.sampling = {name!r}{hint}")
    o = {**allowed, **dict(options)}
    if name == "importance":
        if o["by"] not in ("size", "norm"):
            raise ConfigError(f"{_opt('by')} must be 'size' or 'norm', got {o['by']!r}")
        for key, lo_open, hi_open in (("floor", 0.0, 1.0), ("prior_norm", 0.0, math.inf)):
            v = o[key]
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise ConfigError(f"{_opt(key)} must be a finite number, got {v!r}")
            if not lo_open < v < hi_open:
                want = "in (0, 1) (the share of uniform probability every client keeps)"
                raise ConfigError(f"{_opt(key)} must be {want if key == 'floor' else '> 0'}, got {v!r}")
            o[key] = float(v)
    elif name == "cyclic":
        g = o["groups"]
        if g is None:
            raise ConfigError(f"clients.sampling = 'cyclic' needs {_opt('groups')} (an integer >= 1)")
        if isinstance(g, bool) or not isinstance(g, int):
            raise ConfigError(f"{_opt('groups')} must be an integer, got {g!r}")
        if not 1 <= g <= num_clients:
            raise ConfigError(
                f"{_opt('groups')} = {g} must be in [1, data.num_clients = {num_clients}] "
                "(every group needs at least one client)"
            )
        if not isinstance(o["whole_group"], bool):
            raise ConfigError(f"{_opt('whole_group')} must be true or false, got {o['whole_group']!r}")
    return o


def validate_sampling(cfg: RunConfig) -> dict[str, Any]:
    """Config-time check of ``clients.sampling`` and its options against the rest of the config."""
    name = cfg.clients.sampling
    o = resolve_sampling_options(name, cfg.clients.sampling_options, cfg.data.num_clients)
    if name != "uniform" and cfg.privacy.mode == "central":
        raise ConfigError(
            f"privacy.mode = 'central' accounts for uniform client sampling; it cannot be combined with "
            f"clients.sampling = {name!r}"
        )
    if name == "importance" and o["by"] == "norm":
        from fedsqueeze.algorithms.registry import ALGORITHMS

        algo = ALGORITHMS.get(cfg.algorithm.name)
        if algo is not None and not algo.decodes_uplink:
            raise ConfigError(
                f"clients.sampling_options.by = 'norm' learns each client's norm from its decoded update, "
                f"but algorithm {cfg.algorithm.name!r} aggregates the payload bytes itself (no decoded "
                "per-client update): the sampler would never observe a norm; use by = 'size'"
            )
    if name == "cyclic" and o["groups"] > 1 and cfg.algorithm.name in _FULL_PARTICIPATION:
        raise ConfigError(
            f"algorithm {cfg.algorithm.name!r} needs every client every round; clients.sampling = 'cyclic' "
            f"with {_opt('groups')} = {o['groups']} samples one group per round (use groups = 1 or 'uniform')"
        )
    return o


def make_sampler(
    name: str,
    options: Mapping[str, Any],
    *,
    num_clients: int,
    per_round: int,
    seed: int,
    sizes: Sequence[float] | None = None,
    weights: Sequence[float] | None = None,
) -> ClientSampler:
    """Build sampler ``name``. ``sizes`` (data per client) and ``weights`` (aggregation weight per
    client, e.g. ``algo.client_weight(c, n_c)``) are needed by ``importance``."""
    o = resolve_sampling_options(name, options, num_clients)
    if name == "uniform":
        return UniformSampler(num_clients, per_round, seed)
    if name == "cyclic":
        return CyclicSampler(num_clients, per_round, seed, groups=o["groups"], whole_group=o["whole_group"])
    if sizes is None:
        raise ValueError("importance sampling needs the clients' data sizes")
    return ImportanceSampler(
        num_clients,
        per_round,
        seed,
        sizes=sizes,
        weights=sizes if weights is None else weights,
        by=o["by"],
        floor=o["floor"],
        prior_norm=o["prior_norm"],
    )
