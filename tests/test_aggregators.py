"""Robust aggregation rules: robustness in a synthetic attacked round, exact small cases, errors, state."""

from __future__ import annotations

import math

import pytest
import torch

from fedsqueeze.algorithms import aggregators as agg_mod
from fedsqueeze.algorithms.aggregators import (
    AGGREGATORS,
    clip_to_norm,
    make_aggregator,
    pairwise_sq_distances,
)
from fedsqueeze.algorithms.attacks import make_attack
from fedsqueeze.algorithms.fedavg import FedAvg
from fedsqueeze.errors import ConfigError

N, D, F = 20, 400, 4  # 20 % Byzantine


def honest_round(seed: int = 0, n: int = N, d: int = D, noise: float = 0.05) -> list[torch.Tensor]:
    """Honest updates: one common vector plus small independent noise."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(d, generator=g)
    return [common + noise * torch.randn(d, generator=g) for _ in range(n)]


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).norm() / ref.norm())


ROBUST = [
    ("median", {}),
    ("trimmed_mean", {"beta": 0.2}),
    ("trimmed_mean", {}),
    ("krum", {}),
    ("multi_krum", {}),
    ("centered_clipping", {"tau": 2.0, "iterations": 3, "init": "median"}),
    ("clipped_differences", {}),
    ("bucketing", {"inner": "median", "bucket_size": 2}),
]
ATTACKS = [("sign_flip", {}), ("scaled", {"scale": 10.0}), ("scaled", {"scale": -10.0})]


@pytest.mark.parametrize(("attack", "attack_opts"), ATTACKS, ids=lambda v: str(v))
@pytest.mark.parametrize(("name", "opts"), ROBUST, ids=lambda v: str(v))
def test_robust_rules_withstand_attack_that_breaks_the_mean(
    name: str, opts: dict, attack: str, attack_opts: dict
) -> None:
    honest = honest_round()
    honest_mean = torch.stack(honest).mean(0)
    att = make_attack(attack, F / N, seed=5, **attack_opts)
    assert len(att.byzantine_clients(N)) == F
    attacked = att(honest, list(range(N)), num_clients=N, round=0)
    weights = [1.0] * N

    plain = make_aggregator("mean")(attacked, weights)
    assert rel_err(plain, honest_mean) > 0.35  # sign flip: 0.4; scaled: 1.8 / 2.2

    rule = make_aggregator(name, **opts)
    if name == "clipped_differences":
        rule(honest, weights, num_byzantine=F)  # a clean round sets the reference
    out = rule(attacked, weights, num_byzantine=F)
    assert out.shape == (D,) and out.dtype == torch.float32
    assert rel_err(out, honest_mean) < 0.08


def test_centered_clipping_from_previous_aggregate_single_iteration() -> None:
    """The paper's setting: L = 1 starting from the previous aggregate."""
    honest = honest_round(1)
    honest_mean = torch.stack(honest).mean(0)
    cc = make_aggregator("centered_clipping", tau=1.0)
    cc.load_state_dict({"aggregator/reference": honest_mean + 0.01})
    attacked = make_attack("scaled", F / N, seed=0, scale=-100.0)(honest, list(range(N)), num_clients=N)
    out = cc(attacked, [1.0] * N, num_byzantine=F)
    assert rel_err(out, honest_mean) < 0.03
    # each update moves v by at most tau / n per iteration
    assert float((out - (honest_mean + 0.01)).norm()) <= 1.0 + 1e-4


def test_centered_clipping_byzantine_influence_bounded() -> None:
    ref = torch.zeros(50)
    honest = [torch.zeros(50) for _ in range(8)]
    evil = [torch.full((50,), 1e6) for _ in range(2)]
    cc = make_aggregator("centered_clipping", tau=0.5, iterations=4)
    cc.load_state_dict({"aggregator/reference": ref})
    out = cc(honest + evil, [1.0] * 10, num_byzantine=2)
    # honest points sit at the reference, so only the Byzantine clipped pulls count: <= L f tau / n
    assert float(out.norm()) <= 4 * 2 * 0.5 / 10 + 1e-6
    assert torch.equal(cc.state_dict()["aggregator/reference"], out)


def test_mean_is_fedavg_bit_for_bit() -> None:
    ups = honest_round(3, n=7, d=33)
    w = [3.0, 1.0, 7.0, 2.0, 2.0, 9.0, 1.0]
    assert torch.equal(make_aggregator("mean")(ups, w), FedAvg().aggregate(ups, w))


def test_median_exact_small_cases() -> None:
    vals = [torch.tensor([1.0, 10.0]), torch.tensor([3.0, -5.0]), torch.tensor([2.0, 0.0])]
    assert torch.equal(make_aggregator("median")(vals, [1, 1, 1]), torch.tensor([2.0, 0.0]))
    vals.append(torch.tensor([100.0, 1.0]))  # even n: average of the two middle values
    assert torch.equal(make_aggregator("median")(vals, [1, 1, 1, 1]), torch.tensor([2.5, 0.5]))


def test_trimmed_mean_exact_small_cases() -> None:
    vals = [torch.tensor([v]) for v in (1.0, 2.0, 3.0, 100.0)]
    assert torch.equal(make_aggregator("trimmed_mean", beta=0.25)(vals, [1] * 4), torch.tensor([2.5]))
    assert torch.equal(make_aggregator("trimmed_mean", beta=0.0)(vals, [1] * 4), torch.tensor([26.5]))
    # beta=None trims exactly f per side
    assert torch.equal(make_aggregator("trimmed_mean")(vals, [1] * 4, num_byzantine=1), torch.tensor([2.5]))


def test_krum_picks_the_update_in_the_dense_cluster() -> None:
    pts = [torch.tensor([0.0, 0.0]), torch.tensor([0.1, 0.0]), torch.tensor([0.0, 0.1])]
    pts += [torch.tensor([0.05, 0.05]), torch.tensor([50.0, 50.0]), torch.tensor([-40.0, 9.0])]
    krum = make_aggregator("krum")
    out = krum(pts, [1] * 6, num_byzantine=1)  # n=6 > 2*1+2
    assert krum.selected == [3]  # the centre of the cluster has the smallest score
    assert torch.equal(out, pts[3])
    mk = make_aggregator("multi_krum")  # m = n - f = 5: still drops the farthest outlier
    mk(pts, [1] * 6, num_byzantine=1)
    assert 4 not in mk.selected and len(mk.selected) == 5
    mk2 = make_aggregator("multi_krum", m=4)
    out2 = mk2(pts, [1] * 6, num_byzantine=1)
    assert mk2.selected == [0, 1, 2, 3]
    assert torch.allclose(out2, torch.stack(pts[:4]).mean(0))


def test_krum_scores_match_the_definition() -> None:
    ups = honest_round(4, n=9, d=20, noise=1.0)
    sq = pairwise_sq_distances(ups)
    f = 2
    for i in range(9):
        others = sorted(float((ups[i].double() - ups[j].double()).square().sum()) for j in range(9) if j != i)
        want = sum(others[: 9 - f - 2])
        assert agg_mod.MultiKrum.scores(sq, f)[i].item() == pytest.approx(want, rel=1e-9)


def test_chunked_computation_matches_one_shot(monkeypatch: pytest.MonkeyPatch) -> None:
    ups = honest_round(6, n=9, d=1001, noise=1.0)
    whole = {
        "median": make_aggregator("median")(ups, [1] * 9),
        "trimmed": make_aggregator("trimmed_mean", beta=0.2)(ups, [1] * 9),
        "dist": pairwise_sq_distances(ups),
    }
    monkeypatch.setattr(agg_mod, "_CHUNK_BYTES", 9 * 8 * 64)  # 64-column chunks -> 16 chunks
    assert torch.equal(make_aggregator("median")(ups, [1] * 9), whole["median"])
    assert torch.equal(make_aggregator("trimmed_mean", beta=0.2)(ups, [1] * 9), whole["trimmed"])
    assert torch.allclose(pairwise_sq_distances(ups), whole["dist"], rtol=1e-12)
    brute = torch.stack([torch.stack([(a.double() - b.double()).square().sum() for b in ups]) for a in ups])
    assert torch.allclose(whole["dist"], brute, rtol=1e-10)


# ------------------------------------------------------------------------------------------------
# clipped differences (Malinovsky et al. 2024) and bucketing


def test_clipped_differences_bounds_a_byzantine_majority_round() -> None:
    honest = honest_round(7, n=5)
    cd = make_aggregator("clipped_differences", clip_multiplier=0.5)
    first = cd(honest, [1] * 5, num_byzantine=2)  # no reference yet: plain median
    assert torch.equal(first, make_aggregator("median")(honest, [1] * 5))
    assert cd.radius() == pytest.approx(0.5 * float(first.norm()))
    # a round where 3 of the 5 sampled clients are Byzantine: the median alone follows them ...
    evil = [torch.full((D,), 1e4)] * 3 + honest[:2]
    assert float(make_aggregator("median")(evil, [1] * 5).norm()) > 1e5
    # ... but the clipped differences move the aggregate by at most the radius
    cd.observe_step(2.0)  # the loop reports the model step: radius = 0.5 * 2
    out = cd(evil, [1] * 5, num_byzantine=2)
    assert cd.last_radius == pytest.approx(1.0)
    assert float((out - first).norm()) <= 1.0 + 1e-4


def test_clipped_differences_state_and_fixed_radius() -> None:
    ups = honest_round(8, n=5)
    a = make_aggregator("clipped_differences", clip_radius=0.3, inner="trimmed_mean")
    a(ups, [1] * 5, num_byzantine=1)
    state = {k: v.clone() for k, v in a.state_dict().items()}
    b = make_aggregator("clipped_differences", clip_radius=0.3, inner="trimmed_mean")
    b.load_state_dict(state)
    nxt = honest_round(9, n=5)
    assert torch.equal(a(nxt, [1] * 5, num_byzantine=1), b(nxt, [1] * 5, num_byzantine=1))
    a.reset()
    assert a.radius() is None


def test_bucketing_is_seeded_and_resumable() -> None:
    ups = honest_round(10, n=10, noise=1.0)
    a = make_aggregator("bucketing", inner="median", bucket_size=2, seed=3)
    b = make_aggregator("bucketing", inner="median", bucket_size=2, seed=3)
    r1 = a(ups, [1] * 10, num_byzantine=2)
    assert torch.equal(r1, b(ups, [1] * 10, num_byzantine=2))
    c = make_aggregator("bucketing", inner="median", bucket_size=2, seed=3)
    c.load_state_dict(a.state_dict())
    assert torch.equal(a(ups, [1] * 10, num_byzantine=2), c(ups, [1] * 10, num_byzantine=2))
    # 10 updates, buckets of 2 -> 5 bucket means; median needs 2f < 5
    assert a.tolerates(10, 2) and not a.tolerates(10, 3)


# ------------------------------------------------------------------------------------------------
# tolerance and errors


@pytest.mark.parametrize(
    ("name", "opts", "n", "ok", "bad"),
    [
        ("mean", {}, 10, 0, 1),
        ("median", {}, 10, 4, 5),
        ("trimmed_mean", {"beta": 0.2}, 10, 2, 3),
        ("trimmed_mean", {}, 10, 4, 5),
        ("krum", {}, 10, 3, 4),
        ("multi_krum", {}, 7, 2, 3),
        ("centered_clipping", {"tau": 1.0}, 9, 4, 5),
        ("clipped_differences", {"inner": "krum"}, 10, 3, 4),
    ],
)
def test_tolerates_and_error_names_n_and_f(name: str, opts: dict, n: int, ok: int, bad: int) -> None:
    rule = make_aggregator(name, **opts)
    assert rule.tolerates(n, ok) and not rule.tolerates(n, bad)
    rule.require(n, ok)
    with pytest.raises(ConfigError, match=rf"f={bad}\b.*n={n}\b"):
        rule.require(n, bad)
    ups = honest_round(11, n=n, d=8)
    with pytest.raises(ConfigError, match=rf"f={bad}\b.*n={n}\b"):
        rule(ups, [1] * n, num_byzantine=bad)


def test_krum_needs_three_updates_even_without_byzantine() -> None:
    with pytest.raises(ConfigError, match="n > 2f \\+ 2"):
        make_aggregator("krum")(honest_round(0, n=2, d=4), [1, 1])


@pytest.mark.parametrize("beta", [-0.1, 0.5, 0.7, math.nan])
def test_trimmed_mean_beta_range(beta: float) -> None:
    with pytest.raises(ConfigError, match=r"\[0, 0.5\)"):
        make_aggregator("trimmed_mean", beta=beta)


@pytest.mark.parametrize(
    ("name", "opts", "match"),
    [
        ("medain", {}, "did you mean 'median'"),
        ("median", {"beta": 0.1}, "has no option 'beta'"),
        ("trimmed_mean", {"bta": 0.1}, "did you mean 'beta'"),
        ("centered_clipping", {}, "needs option"),
        ("centered_clipping", {"tau": -1.0}, "tau"),
        ("centered_clipping", {"tau": 1.0, "iterations": 0}, "iterations"),
        ("centered_clipping", {"tau": 1.0, "init": "mean"}, "init"),
        ("multi_krum", {"m": 0}, "int >= 1"),
        ("krum", {"m": 2}, "has no option 'm'"),
        ("clipped_differences", {"clip_multiplier": 1.0, "clip_radius": 1.0}, "not both"),
        ("clipped_differences", {"clip_radius": 0.0}, "clip_radius"),
        ("clipped_differences", {"inner": "clipped_differences"}, "itself"),
        ("clipped_differences", {"inner": "nope"}, "unknown aggregator"),
        ("bucketing", {"bucket_size": 0}, "bucket_size"),
    ],
)
def test_invalid_options(name: str, opts: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        make_aggregator(name, **opts)


def test_multi_krum_m_larger_than_n() -> None:
    with pytest.raises(ConfigError, match="m=9 exceeds"):
        make_aggregator("multi_krum", m=9)(honest_round(0, n=5, d=4), [1] * 5)


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_input_validation(name: str) -> None:
    rule = make_aggregator(name, **({"tau": 1.0} if name == "centered_clipping" else {}))
    ups = honest_round(0, n=5, d=4)
    with pytest.raises(ValueError, match="no client updates"):
        rule([], [])
    with pytest.raises(ValueError, match="weights"):
        rule(ups, [1.0] * 4)
    with pytest.raises(ValueError, match="weights"):
        rule(ups, [1.0, 1.0, -1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="shape"):
        rule([*ups[:4], torch.zeros(5)], [1.0] * 5)
    with pytest.raises(ValueError, match="flat"):
        rule([u.reshape(2, 2) for u in ups], [1.0] * 5)
    with pytest.raises(ConfigError, match="num_byzantine"):
        rule(ups, [1.0] * 5, num_byzantine=-1)


def test_clip_to_norm() -> None:
    x = torch.tensor([3.0, 4.0])
    assert torch.allclose(clip_to_norm(x, 1.0), torch.tensor([0.6, 0.8]))
    assert torch.equal(clip_to_norm(x, 10.0), x)
    assert torch.equal(clip_to_norm(torch.zeros(3), 1.0), torch.zeros(3))
