"""The network model: exact arithmetic, seeded determinism, mixes, deadlines, dropouts, bad specs."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from fedsqueeze.errors import ConfigError
from fedsqueeze.network import PROFILES, LinkProfile, NetworkModel, NetworkSpec, RoundTiming, parse_network

MB = 1_000_000


# --------------------------------------------------------------------------------------------- arithmetic
def test_one_megabyte_over_one_megabit_plus_latency() -> None:
    net = NetworkModel("custom:up=1e6,down=2e6,latency=0.05", num_clients=3, seed=0)
    # 1 MB = 8e6 bits over 1 Mbit/s = 8 s, plus 50 ms one-way latency.
    assert net.transfer_time_s(MB, client=0, direction="up", round_idx=0) == pytest.approx(8.05, abs=1e-12)
    assert net.transfer_time_s(MB, client=2, direction="down", round_idx=7) == pytest.approx(4.05, abs=1e-12)
    assert net.transfer_time_s(0, client=1, direction="up", round_idx=0) == 0.0
    assert net.transfer_time_s(1, client=1, direction="up", round_idx=0) == pytest.approx(0.05 + 8e-6)


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_every_builtin_profile_follows_the_formula(name: str) -> None:
    p = PROFILES[name]
    assert p.name == name and p.jitter == 0 and p.drop_prob == 0
    assert p.downlink_bps >= p.uplink_bps > 0 and p.latency_s > 0
    net = NetworkModel(name, num_clients=2, seed=3)
    assert net.link(1) == p
    nbytes = 123_456
    assert net.transfer_time_s(nbytes, 1, "up", 4) == pytest.approx(p.latency_s + 8 * nbytes / p.uplink_bps)
    assert net.transfer_time_s(nbytes, 1, "down", 4) == pytest.approx(
        p.latency_s + 8 * nbytes / p.downlink_bps
    )


def test_documented_assumptions() -> None:
    assert (PROFILES["2g"].uplink_bps, PROFILES["2g"].downlink_bps) == (0.1e6, 0.2e6)
    assert (PROFILES["3g"].uplink_bps, PROFILES["3g"].downlink_bps) == (1e6, 3e6)
    assert (PROFILES["4g"].uplink_bps, PROFILES["4g"].downlink_bps) == (5e6, 20e6)
    assert set(PROFILES) == {"2g", "3g", "4g", "5g", "wifi", "ethernet", "datacenter"}


def test_round_time_is_max_of_down_compute_up() -> None:
    net = NetworkModel("custom:up=1e6,down=4e6,latency=0.1", num_clients=3, seed=0)
    timing = net.round_time(
        0, clients=[0, 1, 2], down_nbytes=[MB, MB, MB], up_nbytes=[0, MB, MB // 2], compute_s=[1.0, 0.5, 3.0]
    )
    # down: 0.1 + 2 = 2.1 s each; up: 0, 8.1, 4.1 s.
    assert timing.per_client_s == pytest.approx([3.1, 2.1 + 0.5 + 8.1, 2.1 + 3.0 + 4.1])
    assert timing.modelled_time_s == pytest.approx(10.7)
    assert timing.stragglers == [] and timing.dropped == [] and timing.completed == [0, 1, 2]
    assert isinstance(timing, RoundTiming)


def test_broadcast_is_each_client_on_its_own_downlink() -> None:
    net = NetworkModel("mix:3g=0.5,4g=0.5", num_clients=10, seed=1)
    times = net.broadcast_times_s(MB, list(range(10)), round_idx=0)
    for c, t in enumerate(times):
        p = net.link(c)
        assert t == pytest.approx(p.latency_s + 8 * MB / p.downlink_bps)
    assert sorted({round(t, 6) for t in times}) == [
        round(0.035 + 8 * MB / 20e6, 6),
        round(0.1 + 8 * MB / 3e6, 6),
    ]


# --------------------------------------------------------------------------------------------- deadline
def test_deadline_excludes_stragglers_and_round_lasts_until_deadline() -> None:
    net = NetworkModel("custom:up=1e6,down=1e6,latency=0", num_clients=4, seed=0)
    up = [MB // 8, MB // 4, MB, 2 * MB]  # 1 s, 2 s, 8 s, 16 s
    timing = net.round_time(5, [0, 1, 2, 3], [0] * 4, up, [0.0] * 4, deadline_s=10.0)
    assert timing.per_client_s == pytest.approx([1.0, 2.0, 8.0, 16.0])
    assert timing.stragglers == [3] and timing.completed == [0, 1, 2]
    # The server cannot know client 3 is late until the deadline passes.
    assert timing.modelled_time_s == 10.0
    no_straggler = net.round_time(5, [0, 1, 2], [0] * 3, up[:3], [0.0] * 3, deadline_s=10.0)
    assert no_straggler.modelled_time_s == pytest.approx(8.0) and no_straggler.stragglers == []
    exact = net.round_time(5, [2], [0], [MB], [0.0], deadline_s=8.0)  # exactly on time is in time
    assert exact.completed == [2] and exact.modelled_time_s == pytest.approx(8.0)


def test_empty_round() -> None:
    net = NetworkModel("4g", num_clients=2, seed=0)
    timing = net.round_time(0, [], [], [], [])
    assert timing == RoundTiming(0.0, [], [], [], [])


# --------------------------------------------------------------------------------------------- dropouts
def test_dropout_rate_matches_drop_prob() -> None:
    net = NetworkModel("4g:drop=0.1", num_clients=200, seed=11)
    drops = [net.dropped(c, r) for r in range(50) for c in range(200)]
    rate = sum(drops) / len(drops)
    # 10 000 Bernoulli(0.1) draws: std 0.003, so 0.1 +- 0.015 is a 5-sigma band.
    assert abs(rate - 0.1) < 0.015
    assert not any(NetworkModel("4g", num_clients=5, seed=0).dropped(c, 0) for c in range(5))


def test_dropped_clients_are_not_waited_for() -> None:
    net = NetworkModel("custom:up=1e6,down=1e6,latency=0,drop=0.5", num_clients=40, seed=2)
    clients = list(range(40))
    up = [MB * (c + 1) // 8 for c in clients]  # client c takes c + 1 seconds
    timing = net.round_time(3, clients, [0] * 40, up, [0.0] * 40)
    expected_drop = [c for c in clients if net.dropped(c, 3)]
    assert timing.dropped == expected_drop and 0 < len(expected_drop) < 40
    assert timing.completed == [c for c in clients if c not in expected_drop]
    assert timing.per_client_s == pytest.approx([c + 1.0 for c in clients])  # would-be times for all
    assert timing.modelled_time_s == pytest.approx(max(timing.completed) + 1.0)


# --------------------------------------------------------------------------------------------- mixes
def test_mix_fractions_are_respected_exactly() -> None:
    net = NetworkModel("mix:2g=0.2,3g=0.3,4g=0.5", num_clients=1000, seed=5)
    counts = Counter(net.link(c).name for c in range(1000))
    assert counts == {"2g": 200, "3g": 300, "4g": 500}
    odd = NetworkModel("mix:2g=0.334,3g=0.333,4g=0.333", num_clients=10, seed=0)
    counts = Counter(odd.link(c).name for c in range(10))
    assert sum(counts.values()) == 10 and all(3 <= v <= 4 for v in counts.values())


def test_mix_assignment_is_shuffled_and_seeded() -> None:
    a = [NetworkModel("mix:3g=0.5,4g=0.5", 100, seed=1).link(c).name for c in range(100)]
    b = [NetworkModel("mix:3g=0.5,4g=0.5", 100, seed=1).link(c).name for c in range(100)]
    c = [NetworkModel("mix:3g=0.5,4g=0.5", 100, seed=2).link(c).name for c in range(100)]
    assert a == b and a != c
    assert a[:50] != ["3g"] * 50  # not simply in blocks


# ------------------------------------------------------------------------------------- jitter / determinism
def test_jitter_is_deterministic_per_seed_round_client() -> None:
    spec = "custom:up=1e6,down=1e6,latency=0,jitter=0.5,drop=0.2"
    a = NetworkModel(spec, num_clients=20, seed=9)
    b = NetworkModel(spec, num_clients=20, seed=9)
    t_a = [a.transfer_time_s(MB, c, "up", r) for r in range(5) for c in range(20)]
    # Different call order, different model instance: same answers.
    t_b = [b.transfer_time_s(MB, c, "up", r) for r in range(5) for c in reversed(range(20))]
    assert t_a == [t_b[r * 20 + 19 - c] for r in range(5) for c in range(20)]
    assert len(set(t_a)) == len(t_a)  # jitter actually varies
    np.random.seed(0)  # global state is irrelevant
    assert a.transfer_time_s(MB, 3, "up", 2) == t_a[2 * 20 + 3]
    other = NetworkModel(spec, num_clients=20, seed=10)
    assert other.transfer_time_s(MB, 3, "up", 2) != t_a[2 * 20 + 3]
    # Round timing does not depend on which other clients are in the round.
    full = a.round_time(4, list(range(20)), [MB] * 20, [MB] * 20, [0.0] * 20)
    part = a.round_time(4, [7], [MB], [MB], [0.0])
    assert part.per_client_s[0] == full.per_client_s[7]
    assert (7 in part.dropped) == (7 in full.dropped)


def test_jitter_has_mean_one_and_requested_std() -> None:
    net = NetworkModel("4g:jitter=0.3", num_clients=100, seed=0)
    f = np.array([net.bandwidth_factor(c, r) for r in range(40) for c in range(100)])
    assert abs(f.mean() - 1.0) < 0.02 and abs(f.std() - 0.3) < 0.03 and (f > 0).all()
    assert NetworkModel("4g", 1, 0).bandwidth_factor(0, 0) == 1.0
    # up and down share the round's factor
    t_up = net.transfer_time_s(MB, 5, "up", 3) - 0.035
    t_down = net.transfer_time_s(MB, 5, "down", 3) - 0.035
    assert t_up / t_down == pytest.approx(20e6 / 5e6)


# --------------------------------------------------------------------------------------------- specs
def test_parse_forms() -> None:
    assert parse_network("4G").components == ((PROFILES["4g"], 1.0),)
    assert parse_network(" LTE ").components[0][0] == PROFILES["4g"]
    spec = parse_network("mix:2g=20%, 3g=30%, 4g=50%")
    assert [(p.name, f) for p, f in spec.components] == [("2g", 0.2), ("3g", 0.3), ("4g", 0.5)]
    custom = parse_network("custom:up=1e6,down=5e6,latency=0.05").components[0][0]
    assert custom == LinkProfile("custom", 1e6, 5e6, 0.05)
    assert parse_network("custom:up=1e6,down=5e6").components[0][0].latency_s == 0.0
    over = parse_network("3g:jitter=0.3,drop=0.05").components[0][0]
    assert (over.uplink_bps, over.jitter, over.drop_prob) == (1e6, 0.3, 0.05)
    single = NetworkSpec.single(PROFILES["wifi"])
    assert NetworkModel(single, 3, 0).link(2) == PROFILES["wifi"] and single.homogeneous


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("", "empty network spec"),
        ("5gg", "did you mean '5g'"),
        ("wify", "did you mean 'wifi'"),
        ("satellite", "valid: 2g, 3g, 4g, 5g, wifi, ethernet, datacenter"),
        ("mix:2g=0.5,4g=0.4", "must sum to 1"),
        ("mix:2g=0.5,4gg=0.5", "did you mean '4g'"),
        ("mix:2g=0.5,edge=0.5", "listed twice"),
        ("mix:2g=-0.5,4g=1.5", "must be > 0"),
        ("mix:2g=half,4g=0.5", "not a number"),
        ("mix:2g", "expected key=value"),
        ("mix", "needs profile=fraction"),
        ("custom:up=1e6", "needs down="),
        ("custom:up=1e6,down=5e6,latncy=0.1", "did you mean 'latency'"),
        ("custom:up=0,down=5e6", "uplink_bps must be a finite number > 0"),
        ("custom:up=1e6,down=5e6,latency=-1", "latency_s must be"),
        ("custom:up=inf,down=5e6", "must be finite"),
        ("4g:drop=1", "drop_prob must be in [0, 1)"),
        ("4g:jitter=-0.1", "jitter must be"),
        ("4g:bandwidth=3", "unknown argument 'bandwidth'"),
        ("4g:", "nothing after ':'"),
        ("4g:drop=0.1,drop=0.2", "given twice"),
        ("4g:drop=0.1,,jitter=0.1", "empty argument"),
    ],
)
def test_bad_specs(spec: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_network(spec)
    assert needle in str(info.value)


def test_bad_arguments() -> None:
    net = NetworkModel("4g", num_clients=3, seed=0)
    with pytest.raises(ConfigError, match="out of range"):
        net.link(3)
    with pytest.raises(ConfigError, match="nbytes must be >= 0"):
        net.transfer_time_s(-1, 0, "up", 0)
    with pytest.raises(ConfigError, match="'up' or 'down'"):
        net.transfer_time_s(1, 0, "sideways", 0)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="round_idx must be >= 0"):
        net.dropped(0, -1)
    with pytest.raises(ConfigError, match="one per client"):
        net.round_time(0, [0, 1], [1], [1, 1], [0.0, 0.0])
    with pytest.raises(ConfigError, match="distinct"):
        net.round_time(0, [0, 0], [1, 1], [1, 1], [0.0, 0.0])
    with pytest.raises(ConfigError, match="deadline_s"):
        net.round_time(0, [0], [1], [1], [0.0], deadline_s=0.0)
    with pytest.raises(ConfigError, match="compute_s"):
        net.round_time(0, [0], [1], [1], [math.nan])
    with pytest.raises(ConfigError, match="num_clients"):
        NetworkModel("4g", num_clients=0, seed=0)
    with pytest.raises(ConfigError, match="seed"):
        NetworkModel("4g", num_clients=1, seed=-1)
