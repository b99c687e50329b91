"""The network model: pure functions of bytes -> **modelled** seconds.

Every time this module returns is modelled from a :class:`~fedsqueeze.network.profiles.LinkProfile`,
never measured. The model, per transfer::

    modelled_time_s = latency_s + 8 * nbytes / (bandwidth_bps * m)

where ``m`` is the client's bandwidth factor for the round (``m = 1`` without jitter; with jitter a
lognormal of mean 1 and standard deviation ``jitter``, shared by the uplink and the downlink of that
client in that round: the link is good or bad for the whole round). A transfer of 0 bytes costs 0 s
(nothing is sent, nothing is waited for).

A round, per client, is sequential: download the broadcast, compute, upload the update::

    per_client_s = down + compute + up

Clients run in parallel and the synchronous server waits for the slowest one it is still expecting:

* **dropped** clients (probability ``drop_prob`` per round) vanish and are assumed to be detected at
  once (the connection closes), so they are not waited for and their update never arrives;
* with a ``deadline_s``, clients with ``per_client_s > deadline_s`` are **stragglers**: their update
  is discarded, and since the server cannot know that a straggler will be late until the deadline
  passes, a round with any straggler lasts exactly ``deadline_s``;
* otherwise ``modelled_time_s`` is the largest ``per_client_s`` among the completed clients (0 when
  none completed and none straggled).

Server side: the broadcast is modelled as each client downloading the same payload over *its own*
downlink, all at once; the server's own uplink is assumed not to be the bottleneck (true for a
datacenter server and a few hundred clients per round, optimistic for huge cohorts on a thin
server pipe). :meth:`NetworkModel.broadcast_times_s` gives those per-client download times.

Determinism: the link assignment comes from ``seed`` alone; jitter and dropouts of client ``c`` in
round ``r`` come from a NumPy ``Generator`` seeded with ``SeedSequence([seed, stream, r, c])``, so
they depend on nothing else (not on the other clients sampled, not on call order, no global state).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from fedsqueeze.errors import ConfigError
from fedsqueeze.network.profiles import LinkProfile, NetworkSpec, parse_network

# Distinct entropy words per random stream, so assignment, jitter and dropouts never share draws.
_STREAM_ASSIGN = 0x4E45_5401
_STREAM_JITTER = 0x4E45_5402
_STREAM_DROP = 0x4E45_5403


@dataclass(frozen=True)
class RoundTiming:
    """Modelled timing of one synchronous round.

    Attributes
    ----------
    modelled_time_s:
        Modelled wall-clock length of the round (see the module docstring for the rule).
    per_client_s:
        ``down + compute + up`` for each client, aligned with the ``clients`` passed in. Dropped
        clients show the time they *would* have taken; they are excluded from ``modelled_time_s``.
    stragglers:
        Clients that missed the deadline (their updates are excluded).
    dropped:
        Clients that vanished this round (their updates never arrive).
    completed:
        Clients whose updates arrive in time, in the order given.
    """

    modelled_time_s: float
    per_client_s: list[float]
    stragglers: list[int]
    dropped: list[int]
    completed: list[int]


def _check_int(value: object, what: str, lo: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ConfigError(f"{what} must be an integer, got {type(value).__name__} {value!r}")
    if int(value) < lo:
        raise ConfigError(f"{what} must be >= {lo}, got {value}")
    return int(value)


def _assign_counts(fractions: list[float], n: int) -> list[int]:
    """Largest-remainder apportionment: counts summing to ``n``, each within 1 of ``fraction * n``."""
    exact = [f * n for f in fractions]
    counts = [math.floor(x) for x in exact]
    order = sorted(range(len(fractions)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


class NetworkModel:
    """Modelled links for ``num_clients`` clients, deterministic from ``seed``.

    Parameters
    ----------
    spec:
        A network spec string (``"4g"``, ``"mix:2g=0.2,3g=0.3,4g=0.5"``, ``"custom:up=1e6,down=5e6"``)
        or a parsed :class:`NetworkSpec`.
    num_clients:
        Number of clients; client ids are ``0 .. num_clients - 1``.
    seed:
        Non-negative integer. In a mix, exactly ``round(fraction * num_clients)`` clients get each
        profile (largest-remainder rounding), and which clients get which is a seeded permutation.

    Examples
    --------
    >>> net = NetworkModel("custom:up=1e6,down=1e6,latency=0.05", num_clients=4, seed=0)
    >>> net.transfer_time_s(1_000_000, client=0, direction="up", round_idx=0)  # 0.05 + 8e6 / 1e6
    8.05
    """

    def __init__(self, spec: str | NetworkSpec, num_clients: int, seed: int) -> None:
        self.spec = spec if isinstance(spec, NetworkSpec) else parse_network(spec)
        self.num_clients = _check_int(num_clients, "num_clients", lo=1)
        self.seed = _check_int(seed, "seed")
        profiles = [p for p, _ in self.spec.components]
        if len(profiles) == 1:
            self._links = [profiles[0]] * self.num_clients
        else:
            counts = _assign_counts([f for _, f in self.spec.components], self.num_clients)
            pool = np.repeat(np.arange(len(profiles)), counts)
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, _STREAM_ASSIGN]))
            self._links = [profiles[int(i)] for i in rng.permutation(pool)]

    def __repr__(self) -> str:
        return f"NetworkModel({self.spec.text!r}, num_clients={self.num_clients}, seed={self.seed})"

    def _client(self, client: int) -> int:
        c = _check_int(client, "client")
        if c >= self.num_clients:
            raise ConfigError(
                f"client {c} is out of range: this network has clients 0..{self.num_clients - 1}"
            )
        return c

    def _rng(self, stream: int, round_idx: int, client: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.seed, stream, round_idx, client]))

    def link(self, client: int) -> LinkProfile:
        """The link profile assigned to ``client`` (fixed for the whole run)."""
        return self._links[self._client(client)]

    def bandwidth_factor(self, client: int, round_idx: int) -> float:
        """The client's modelled bandwidth multiplier in this round (1.0 without jitter).

        Lognormal with mean 1 and standard deviation ``jitter``: ``exp(sigma * z - sigma**2 / 2)``
        with ``sigma**2 = log(1 + jitter**2)``, ``z`` drawn from ``(seed, round_idx, client)``.
        """
        profile = self.link(client)
        r = _check_int(round_idx, "round_idx")
        if profile.jitter == 0:
            return 1.0
        sigma = math.sqrt(math.log1p(profile.jitter**2))
        z = float(self._rng(_STREAM_JITTER, r, int(client)).standard_normal())
        return math.exp(sigma * z - 0.5 * sigma * sigma)

    def transfer_time_s(
        self, nbytes: int, client: int, direction: Literal["up", "down"], round_idx: int
    ) -> float:
        """Modelled seconds to move ``nbytes`` over the client's link: ``latency + 8 * nbytes / bandwidth``.

        ``direction="up"`` is client -> server (uplink), ``"down"`` server -> client (downlink).
        0 bytes take 0 s.
        """
        n = _check_int(nbytes, "nbytes")
        if direction not in ("up", "down"):
            raise ConfigError(f"direction must be 'up' or 'down', got {direction!r}")
        profile = self.link(client)
        factor = self.bandwidth_factor(client, round_idx)
        if n == 0:
            return 0.0
        bps = profile.uplink_bps if direction == "up" else profile.downlink_bps
        return profile.latency_s + 8.0 * n / (bps * factor)

    def dropped(self, client: int, round_idx: int) -> bool:
        """Whether ``client`` vanishes in round ``round_idx`` (probability ``drop_prob``, seeded)."""
        profile = self.link(client)
        r = _check_int(round_idx, "round_idx")
        if profile.drop_prob == 0:
            return False
        return bool(self._rng(_STREAM_DROP, r, int(client)).random() < profile.drop_prob)

    def broadcast_times_s(self, nbytes: int, clients: list[int], round_idx: int) -> list[float]:
        """Modelled download time of one ``nbytes`` broadcast for each client, over its own downlink."""
        return [self.transfer_time_s(nbytes, c, "down", round_idx) for c in clients]

    def round_time(
        self,
        round_idx: int,
        clients: list[int],
        down_nbytes: list[int],
        up_nbytes: list[int],
        compute_s: list[float],
        deadline_s: float | None = None,
    ) -> RoundTiming:
        """Modelled timing of a synchronous round (rule in the module docstring).

        ``down_nbytes``, ``up_nbytes`` and ``compute_s`` are aligned with ``clients``; for a
        broadcast pass the same size for every client.
        """
        n = len(clients)
        for what, seq in (("down_nbytes", down_nbytes), ("up_nbytes", up_nbytes), ("compute_s", compute_s)):
            if len(seq) != n:
                raise ConfigError(f"round_time: {what} has {len(seq)} entries, expected one per client ({n})")
        if len(set(clients)) != n:
            raise ConfigError(f"round_time: clients must be distinct, got {clients}")
        if deadline_s is not None and not (math.isfinite(deadline_s) and deadline_s > 0):
            raise ConfigError(f"deadline_s must be a finite number > 0 or None, got {deadline_s!r}")
        for c, t in zip(clients, compute_s, strict=True):
            if not (math.isfinite(t) and t >= 0):
                raise ConfigError(f"round_time: compute_s for client {c} must be finite and >= 0, got {t!r}")

        per_client: list[float] = []
        stragglers: list[int] = []
        dropped: list[int] = []
        completed: list[int] = []
        slowest = 0.0
        for c, down, up, comp in zip(clients, down_nbytes, up_nbytes, compute_s, strict=True):
            t = (
                self.transfer_time_s(down, c, "down", round_idx)
                + float(comp)
                + self.transfer_time_s(up, c, "up", round_idx)
            )
            per_client.append(t)
            if self.dropped(c, round_idx):
                dropped.append(c)
            elif deadline_s is not None and t > deadline_s:
                stragglers.append(c)
            else:
                completed.append(c)
                slowest = max(slowest, t)
        modelled = float(deadline_s) if stragglers and deadline_s is not None else slowest
        return RoundTiming(
            modelled_time_s=modelled,
            per_client_s=per_client,
            stragglers=stragglers,
            dropped=dropped,
            completed=completed,
        )
