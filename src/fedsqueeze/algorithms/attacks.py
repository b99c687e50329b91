"""Byzantine attacks for simulations: which clients are Byzantine, and what they do.

An attack owns a fixed, seeded subset of the ``num_clients`` clients (``⌊fraction · num_clients⌋``
of them, :meth:`Attack.byzantine_clients`) and, each round, replaces the updates of the sampled
Byzantine clients::

    attack = make_attack("sign_flip", fraction=0.2, seed=cfg.seed)
    updates = attack(updates, client_ids, num_clients=100, round=t)   # honest entries untouched

Everything is a pure function of ``(seed, num_clients, round, client id)`` -- never of the order
the clients are processed in -- through the run's BLAKE2b seed tree
(:mod:`fedsqueeze.sim.seeds`).

Where the loop should apply it. On the clients' raw model differences *before* error feedback and
encoding: a Byzantine client controls what it sends, but it still has to send a valid payload, so
its bytes are produced, measured and decoded like everyone else's. ``alie`` is omniscient: it reads
every update of the round (see :class:`ALIE`).

Registry (``ATTACKS``):

* ``sign_flip`` -- ``−s · u`` (``scale`` s, default 1).
* ``scaled`` -- ``λ · u`` (``scale`` λ, default 10), a boosted/"model replacement" style update.
* ``gaussian`` -- ``u`` replaced by ``N(0, σ² I)`` (``std`` σ, default 1).
* ``alie`` -- "A little is enough" (Baruch, Baruch, Goldberg, NeurIPS 2019): ``μ − z σ``.
* ``label_flip`` -- acts on the client's *data*, not its update: ``poisons_data`` is true and the
  loop passes each Byzantine client's training labels through :meth:`Attack.poison_labels`
  (``y → num_classes − 1 − y``, :func:`flip_labels`) before local training; the update that comes
  out is sent unchanged.
"""

from __future__ import annotations

import difflib
import inspect
import math
from abc import ABC
from collections.abc import Sequence
from statistics import NormalDist
from typing import Any, ClassVar

import torch

from fedsqueeze.errors import ConfigError
from fedsqueeze.sim.seeds import derive_seed, torch_rng

__all__ = [
    "ALIE",
    "ATTACKS",
    "Attack",
    "GaussianAttack",
    "LabelFlip",
    "ScaledAttack",
    "SignFlip",
    "flip_labels",
    "make_attack",
]


def flip_labels(
    y: torch.Tensor, num_classes: int, seed: int = 0, *, flip_fraction: float = 1.0
) -> torch.Tensor:
    """Label flipping: ``y → num_classes − 1 − y`` (a new tensor of ``y``'s dtype).

    With ``flip_fraction < 1`` only ``round(flip_fraction · len(y))`` labels, chosen from ``seed``,
    are flipped; with the default 1 every label is and ``seed`` is unused. Labels must be integers
    in ``[0, num_classes)``.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(f"num_classes must be an int >= 2, got {num_classes!r}")
    if not 0.0 <= flip_fraction <= 1.0:
        raise ConfigError(f"flip_fraction must be in [0, 1], got {flip_fraction}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got dtype {y.dtype}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got range [{int(y.min())}, {int(y.max())}]")
    flipped = (num_classes - 1) - y
    if flip_fraction >= 1.0:
        return flipped
    k = round(flip_fraction * y.numel())
    chosen = torch.randperm(y.numel(), generator=torch_rng(seed, "label_flip"))[:k]
    out = y.clone().reshape(-1)
    out[chosen] = flipped.reshape(-1)[chosen]
    return out.reshape(y.shape)


class Attack(ABC):
    """A Byzantine attack on a fixed seeded subset of the clients.

    Subclasses override :meth:`_corrupt_one` (per-update attacks) or :meth:`_corrupt` (attacks
    that look at the whole round).
    """

    name: ClassVar[str]
    poisons_data: ClassVar[bool] = False
    """True when the attack changes the Byzantine clients' training data (the loop must call
    :meth:`poison_labels` before local training) rather than their updates."""

    def __init__(self, fraction: float, *, seed: int = 0) -> None:
        fraction = float(fraction)
        if not 0.0 <= fraction < 1.0:
            raise ConfigError(
                f"attack fraction (share of all clients that are Byzantine) must be in [0, 1), got {fraction}"
            )
        self.fraction = fraction
        self.seed = int(seed)
        self._byzantine: dict[int, frozenset[int]] = {}

    def num_byzantine(self, num_clients: int) -> int:
        """``⌊fraction · num_clients⌋``, the number of Byzantine clients in the population."""
        return math.floor(self.fraction * num_clients + 1e-9)

    def byzantine_clients(self, num_clients: int) -> frozenset[int]:
        """The Byzantine client ids among ``0 … num_clients−1`` (fixed by ``seed`` and ``num_clients``)."""
        if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
            raise ConfigError(f"num_clients must be an int >= 1, got {num_clients!r}")
        chosen = self._byzantine.get(num_clients)
        if chosen is None:
            perm = torch.randperm(num_clients, generator=torch_rng(self.seed, "byzantine", num_clients))
            chosen = frozenset(int(c) for c in perm[: self.num_byzantine(num_clients)])
            self._byzantine[num_clients] = chosen
        return chosen

    def __call__(
        self,
        updates: Sequence[torch.Tensor],
        client_ids: Sequence[int],
        *,
        num_clients: int,
        round: int = 0,
    ) -> list[torch.Tensor]:
        """Return ``updates`` with the Byzantine clients' entries replaced (honest ones are the same
        objects, not copies). ``client_ids[i]`` is the id of ``updates[i]``."""
        if len(updates) != len(client_ids):
            raise ValueError(f"got {len(updates)} updates but {len(client_ids)} client ids")
        byz = self.byzantine_clients(num_clients)
        for c in client_ids:
            if not 0 <= int(c) < num_clients:
                raise ValueError(f"client id {c} outside [0, {num_clients})")
        mask = [int(c) in byz for c in client_ids]
        if not any(mask):
            return list(updates)
        return self._corrupt(updates, [int(c) for c in client_ids], mask, round)

    def _corrupt(
        self,
        updates: Sequence[torch.Tensor],
        client_ids: Sequence[int],
        mask: Sequence[bool],
        round: int,
    ) -> list[torch.Tensor]:
        return [
            self._corrupt_one(u, torch_rng(self.seed, "attack", self.name, round, c)) if bad else u
            for u, c, bad in zip(updates, client_ids, mask, strict=True)
        ]

    def _corrupt_one(self, update: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        return update

    def poison_labels(self, y: torch.Tensor, num_classes: int, client: int) -> torch.Tensor:
        """The labels client ``client`` trains on (unchanged unless the attack poisons data)."""
        return y

    def _options(self) -> str:
        return ""

    def __repr__(self) -> str:
        extra = self._options()
        return f"{type(self).__name__}(fraction={self.fraction}, seed={self.seed}{extra})"


class SignFlip(Attack):
    """Sign flipping: a Byzantine client sends ``−scale · u`` instead of its update ``u``.

    A classic attack (e.g. Allen-Zhu et al., ICLR 2021; Karimireddy et al., ICML 2021 "bit flip").
    """

    name = "sign_flip"

    def __init__(self, fraction: float, *, seed: int = 0, scale: float = 1.0) -> None:
        super().__init__(fraction, seed=seed)
        if not math.isfinite(scale) or scale <= 0:
            raise ConfigError(f"sign_flip scale must be a finite number > 0, got {scale}")
        self.scale = float(scale)

    def _corrupt_one(self, update: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        return update * (-self.scale)

    def _options(self) -> str:
        return f", scale={self.scale}"


class ScaledAttack(Attack):
    """Scaling: a Byzantine client sends ``scale · u`` (boosting, as in model-replacement backdoors,
    Bagdasaryan et al., AISTATS 2020). A negative ``scale`` is a boosted sign flip."""

    name = "scaled"

    def __init__(self, fraction: float, *, seed: int = 0, scale: float = 10.0) -> None:
        super().__init__(fraction, seed=seed)
        if not math.isfinite(scale):
            raise ConfigError(f"scaled attack scale must be finite, got {scale}")
        self.scale = float(scale)

    def _corrupt_one(self, update: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        return update * self.scale

    def _options(self) -> str:
        return f", scale={self.scale}"


class GaussianAttack(Attack):
    """Gaussian: a Byzantine client's update is replaced by ``N(0, std² I)`` noise, drawn from the
    seed tree ``(seed, "attack", "gaussian", round, client)``."""

    name = "gaussian"

    def __init__(self, fraction: float, *, seed: int = 0, std: float = 1.0) -> None:
        super().__init__(fraction, seed=seed)
        if not math.isfinite(std) or std <= 0:
            raise ConfigError(f"gaussian attack std must be a finite number > 0, got {std}")
        self.std = float(std)

    def _corrupt_one(self, update: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        noise = torch.randn(update.shape, generator=rng, dtype=torch.float32) * self.std
        return noise.to(update.dtype)

    def _options(self) -> str:
        return f", std={self.std}"


class ALIE(Attack):
    """ "A little is enough" (Baruch, Baruch, Goldberg, NeurIPS 2019): every Byzantine client of the
    round sends ``μ − z σ``, with ``μ``, ``σ`` the coordinate-wise mean and (sample) standard
    deviation of *all* the round's true updates -- an omniscient attacker; the paper estimates them
    from the corrupted workers' own honest gradients, which differ only by sampling noise.

    ``z=None`` uses the paper's ``z_max = Φ⁻¹((n − s)/n)`` with ``s = ⌊n/2 + 1⌋ − f``, ``n`` the
    round's clients and ``f`` its Byzantine clients (``s`` clamped to ≥ 1 when they are a
    majority): the largest shift for which enough honest clients still look "further" from the
    mean than the Byzantine ones. The direction is ``−σ``, as in the paper; it stays within the
    spread of honest updates and so defeats median/Krum-style rules more than the attacks above.
    """

    name = "alie"

    def __init__(self, fraction: float, *, seed: int = 0, z: float | None = None) -> None:
        super().__init__(fraction, seed=seed)
        if z is not None and not math.isfinite(z):
            raise ConfigError(f"alie z must be finite (or None for the paper's z_max), got {z}")
        self.z = None if z is None else float(z)

    @staticmethod
    def z_max(n: int, f: int) -> float:
        """The paper's ``z_max`` for ``f`` Byzantine among ``n`` workers."""
        s = max(1, math.floor(n / 2 + 1) - f)
        return NormalDist().inv_cdf((n - s) / n) if s < n else 0.0

    def _corrupt(
        self,
        updates: Sequence[torch.Tensor],
        client_ids: Sequence[int],
        mask: Sequence[bool],
        round: int,
    ) -> list[torch.Tensor]:
        n, f = len(updates), sum(mask)
        z = self.z_max(n, f) if self.z is None else self.z
        stacked = torch.stack([u.double() for u in updates])
        mu = stacked.mean(dim=0)
        sigma = stacked.std(dim=0) if n > 1 else torch.zeros_like(mu)
        bad = (mu - z * sigma).to(updates[0].dtype)
        return [bad.clone() if m else u for u, m in zip(updates, mask, strict=True)]

    def _options(self) -> str:
        return f", z={self.z}"


class LabelFlip(Attack):
    """Label flipping on the Byzantine clients' training data: ``y → num_classes − 1 − y``
    (e.g. Fang et al., USENIX Security 2020; Tolpegin et al., ESORICS 2020).

    ``poisons_data`` is true: the loop passes a Byzantine client's labels through
    :meth:`poison_labels` before local training and sends the resulting update unchanged
    (``__call__`` returns the updates as they are). ``flip_fraction`` < 1 flips only a seeded
    subset of each client's labels.
    """

    name = "label_flip"
    poisons_data = True

    def __init__(self, fraction: float, *, seed: int = 0, flip_fraction: float = 1.0) -> None:
        super().__init__(fraction, seed=seed)
        if not 0.0 < flip_fraction <= 1.0:
            raise ConfigError(f"label_flip flip_fraction must be in (0, 1], got {flip_fraction}")
        self.flip_fraction = float(flip_fraction)

    def poison_labels(self, y: torch.Tensor, num_classes: int, client: int) -> torch.Tensor:
        """Flipped labels for client ``client`` (its seed is derived from the attack seed and id)."""
        return flip_labels(
            y,
            num_classes,
            seed=derive_seed(self.seed, "label_flip", client),
            flip_fraction=self.flip_fraction,
        )

    def _options(self) -> str:
        return f", flip_fraction={self.flip_fraction}"


ATTACKS: dict[str, type[Attack]] = {
    cls.name: cls for cls in (SignFlip, ScaledAttack, GaussianAttack, ALIE, LabelFlip)
}
"""Attacks by config name."""


def make_attack(name: str, fraction: float, **options: Any) -> Attack:
    """Build attack ``name`` on ``⌊fraction · num_clients⌋`` clients (``seed`` and the attack's
    options as keywords; unknown names/options -> ConfigError).

    >>> make_attack("sign_flip", 0.2, seed=1)
    SignFlip(fraction=0.2, seed=1, scale=1.0)
    """
    cls = ATTACKS.get(name)
    if cls is None:
        close = difflib.get_close_matches(name, list(ATTACKS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown attack {name!r}; expected one of {sorted(ATTACKS)}{hint}")
    params = [p for p in list(inspect.signature(cls.__init__).parameters)[1:] if p != "fraction"]
    for key in options:
        if key not in params:
            close = difflib.get_close_matches(key, params, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"attack {name!r} has no option {key!r}; its options: {sorted(params)}{hint}")
    return cls(fraction, **options)
