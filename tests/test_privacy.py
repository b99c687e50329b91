"""Client-level DP: clipping, noise calibration, and the RDP accountant against independent references."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from fedsqueeze.algorithms.privacy import (
    CentralDP,
    DPAccountant,
    LocalDP,
    clip_update,
    compute_epsilon,
    noise_multiplier_for,
)
from fedsqueeze.errors import ConfigError


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("scale", [1e-3, 0.5, 1.0, 3.0, 1e4])
def test_clip_bounds_the_norm(scale: float) -> None:
    u = torch.randn(1000, generator=gen(1)) * scale
    c = clip_update(u, 2.0)
    norm = float(u.norm())
    assert float(c.norm()) <= 2.0 * (1 + 1e-6)
    if norm <= 2.0:
        assert torch.equal(c, u)
    else:
        assert float(c.norm()) == pytest.approx(2.0, rel=1e-6)
        assert torch.allclose(c / c.norm(), u / u.norm(), atol=1e-6)  # direction kept


def test_local_dp_noise_std_and_clip() -> None:
    ldp = LocalDP(clip_norm=0.5, noise_multiplier=1.3)
    u = torch.full((200_000,), 10.0)
    out = ldp.privatize(u, generator=gen(2))
    noise = out - clip_update(u, 0.5)
    assert float(noise.std()) == pytest.approx(1.3 * 0.5, rel=0.01)
    assert abs(float(noise.mean())) < 0.01
    assert torch.equal(out, ldp.privatize(u, generator=gen(2)))  # deterministic from the generator
    assert torch.equal(LocalDP(0.5, 0.0).privatize(u, generator=gen(0)), clip_update(u, 0.5))


def test_central_dp_noise_std_is_sigma_c_over_n() -> None:
    sigma, c, n = 1.5, 0.8, 10
    cdp = CentralDP(clip_norm=c, noise_multiplier=sigma)
    zeros = [torch.zeros(200_000) for _ in range(n)]
    out = cdp.aggregate(zeros, generator=gen(3))
    assert out.dtype == torch.float32
    assert float(out.std()) == pytest.approx(sigma * c / n, rel=0.01)
    assert cdp.noise_std(n) == pytest.approx(sigma * c / n)
    # a fixed denominator (the configured cohort) when fewer clients arrived
    out2 = cdp.aggregate(zeros[:5], generator=gen(3), denominator=n)
    assert torch.allclose(out2, out)


def test_central_dp_mean_of_clipped_and_sensitivity() -> None:
    ups = [torch.randn(50, generator=gen(i)) * 5 for i in range(6)]
    noiseless = CentralDP(clip_norm=1.0, noise_multiplier=0.0)
    want = torch.stack([clip_update(u, 1.0) for u in ups]).mean(0)
    assert torch.allclose(noiseless.aggregate(ups, generator=gen(0)), want, atol=1e-6)
    # adding one client (even a huge one) moves the sum by at most C
    base = noiseless.aggregate(ups, generator=gen(0), denominator=1)
    more = noiseless.aggregate([*ups, torch.full((50,), 1e9)], generator=gen(0), denominator=1)
    assert float((more - base).norm()) <= 1.0 + 1e-4


# ------------------------------------------------------------------------------------------------
# accounting


def exact_gaussian_epsilon(mu: float, delta: float) -> float:
    """Exact ε of a Gaussian mechanism with μ = sensitivity/std (Balle & Wang, ICML 2018):
    δ(ε) = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2), solved for ε by bisection."""
    phi = torch.distributions.Normal(0.0, 1.0)

    def delta_of(eps: float) -> float:
        a = torch.tensor(-eps / mu + mu / 2, dtype=torch.float64)
        b = torch.tensor(-eps / mu - mu / 2, dtype=torch.float64)
        return float(phi.cdf(a)) - math.exp(eps) * float(phi.cdf(b))

    lo, hi = 0.0, 200.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_of(mid) > delta else (lo, mid)
    return hi


@pytest.mark.parametrize(("sigma", "steps"), [(1.0, 10), (2.0, 100), (5.0, 1)])
def test_rdp_epsilon_vs_exact_gaussian_composition(sigma: float, steps: int) -> None:
    """q = 1: T Gaussian mechanisms compose to one with μ = √T/σ exactly; RDP is an upper bound
    within ~10 % of it (the known slack of the RDP conversion)."""
    exact = exact_gaussian_epsilon(math.sqrt(steps) / sigma, 1e-5)
    rdp = compute_epsilon(noise_multiplier=sigma, sample_rate=1.0, steps=steps, delta=1e-5).epsilon
    assert exact <= rdp <= 1.12 * exact


def test_rdp_matches_independent_formula_for_integer_orders() -> None:
    """Sampled Gaussian RDP at integer α (Mironov, Talwar, Zhang 2019, eq. for integer orders):
    ε_α = log Σ_k C(α,k) (1−q)^(α−k) q^k exp((k²−k)/(2σ²)) / (α − 1), per step."""
    from opacus.accountants.analysis.rdp import compute_rdp

    q, sigma, steps = 0.05, 1.2, 300
    for alpha in range(2, 12):
        terms = [
            math.comb(alpha, k) * (1 - q) ** (alpha - k) * q**k * math.exp((k * k - k) / (2 * sigma**2))
            for k in range(alpha + 1)
        ]
        want = steps * math.log(sum(terms)) / (alpha - 1)
        got = float(compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=[alpha])[0])
        assert got == pytest.approx(want, rel=1e-9)


def test_rdp_vs_prv_accountant_with_subsampling() -> None:
    """A second accountant (Opacus's PRV, Gopi, Lee, Wutschitz 2021; near-exact) must be below RDP
    and close to it."""
    from opacus.accountants import PRVAccountant

    sigma, q, steps = 1.0, 0.01, 1000
    rdp = compute_epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=1e-5).epsilon
    prv = PRVAccountant()
    prv.history = [(sigma, q, steps)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        eps_prv = prv.get_epsilon(delta=1e-5)
    assert eps_prv <= rdp <= 1.25 * eps_prv
    assert rdp == pytest.approx(2.1014, abs=2e-3)  # frozen: Opacus 1.6 RDP with RDP_ORDERS


def test_epsilon_monotonicity_and_edges() -> None:
    def eps(sigma: float, q: float = 0.1, steps: int = 100) -> float:
        return compute_epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=1e-5).epsilon

    values = [eps(s) for s in (0.7, 1.0, 1.5, 3.0)]
    assert values == sorted(values, reverse=True) and values[-1] < values[0] / 5
    assert eps(1.0, q=0.05) < eps(1.0, q=0.1) < eps(1.0, q=0.5)
    assert eps(1.0, steps=10) < eps(1.0, steps=100)
    assert eps(0.0) == math.inf
    assert eps(1.0, steps=0) == 0.0


def test_noise_multiplier_for_round_trip() -> None:
    sigma = noise_multiplier_for(target_epsilon=2.0, delta=1e-5, sample_rate=0.01, steps=1000)
    got = compute_epsilon(noise_multiplier=sigma, sample_rate=0.01, steps=1000, delta=1e-5).epsilon
    assert 1.9 <= got <= 2.0


def test_accountant_ledger_and_state() -> None:
    acc = DPAccountant()
    assert acc.spent(1e-5).epsilon == 0.0
    for _ in range(50):
        acc.step(noise_multiplier=1.0, sample_rate=0.1)
    assert acc.history == [(1.0, 0.1, 50)]
    one_shot = compute_epsilon(noise_multiplier=1.0, sample_rate=0.1, steps=50, delta=1e-5)
    assert acc.spent(1e-5).epsilon == pytest.approx(one_shot.epsilon)
    acc.step(noise_multiplier=2.0, sample_rate=0.1, steps=10)
    assert acc.steps == 60 and acc.spent(1e-5).epsilon > one_shot.epsilon
    other = DPAccountant()
    other.load_state_dict(acc.state_dict())
    assert other.history == acc.history
    assert CentralDP(1.0, 1.0).epsilon(sample_rate=0.1, rounds=50, delta=1e-5).epsilon == pytest.approx(
        one_shot.epsilon
    )


def test_local_dp_accounting_uses_sensitivity_2c_without_amplification() -> None:
    spent = LocalDP(clip_norm=1.0, noise_multiplier=4.0).epsilon(participations=5, delta=1e-5)
    ref = compute_epsilon(noise_multiplier=2.0, sample_rate=1.0, steps=5, delta=1e-5)
    assert spent.epsilon == pytest.approx(ref.epsilon) and spent.noise_multiplier == 4.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"noise_multiplier": -1.0, "sample_rate": 0.1, "steps": 1, "delta": 1e-5}, "noise_multiplier"),
        ({"noise_multiplier": 1.0, "sample_rate": 0.0, "steps": 1, "delta": 1e-5}, "sample_rate"),
        ({"noise_multiplier": 1.0, "sample_rate": 1.5, "steps": 1, "delta": 1e-5}, "sample_rate"),
        ({"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": -1, "delta": 1e-5}, "steps"),
        ({"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 1, "delta": 0.0}, "delta"),
    ],
)
def test_accounting_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        compute_epsilon(**kwargs)


def test_mechanism_errors() -> None:
    with pytest.raises(ConfigError, match="clip_norm"):
        CentralDP(clip_norm=0.0, noise_multiplier=1.0)
    with pytest.raises(ConfigError, match="noise_multiplier"):
        LocalDP(clip_norm=1.0, noise_multiplier=-0.1)
    with pytest.raises(ConfigError, match="denominator"):
        CentralDP(1.0, 1.0).aggregate([torch.zeros(3)], generator=gen(), denominator=0)
    with pytest.raises(ConfigError, match="target_epsilon"):
        noise_multiplier_for(target_epsilon=0.0, delta=1e-5, sample_rate=0.1, steps=10)
