"""fedsqueeze.stats: law fits, W2, kurtosis, subsampling, independence pass rates, teacher/student."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from scipy import stats as sstats

from fedsqueeze.errors import ConfigError
from fedsqueeze.stats import (
    LAWS,
    StatsError,
    TeacherStudent,
    fit_layer,
    ks_pass_rate,
    spearman_pass_rate,
)
from fedsqueeze.stats.fit import wasserstein2

N = 50_000  # entries per synthetic layer: shape standard errors ~0.5 %


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # tiny MLPs on a shared machine: extra torch threads only spin
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _rvs(dist: object, n: int = N, seed: int = 1) -> np.ndarray:
    return np.asarray(dist.rvs(size=n, random_state=seed))  # type: ignore[attr-defined]


def test_stats_error_is_a_config_error() -> None:
    assert issubclass(StatsError, ConfigError)
    assert issubclass(StatsError, ValueError)


# ---------------------------------------------------------------------------------------------- fits
@pytest.mark.parametrize("beta", [0.8, 1.5])
def test_gennorm_recovers_shape_and_scale(beta: float) -> None:
    x = _rvs(sstats.gennorm(beta, scale=0.02))
    g = fit_layer(x, ("gennorm",)).fits["gennorm"]
    assert g.params["beta"] == pytest.approx(beta, rel=0.05)
    assert g.params["scale"] == pytest.approx(0.02, rel=0.05)
    assert abs(g.params["loc"]) < 1e-3
    assert g.warnings == ()


@pytest.mark.parametrize("beta", [0.6, 1.0, 2.5])
def test_gennorm_matches_scipy_mle(beta: float) -> None:
    x = _rvs(sstats.gennorm(beta, loc=0.0, scale=3.0), n=4000, seed=7)
    g = fit_layer(x, ("gennorm",), loc="zero").fits["gennorm"]
    b_ref, _, s_ref = sstats.gennorm.fit(x, floc=0.0)
    assert g.params["beta"] == pytest.approx(b_ref, rel=2e-3)
    assert g.params["scale"] == pytest.approx(s_ref, rel=2e-3)
    # ours is the maximum: never worse than scipy's optimum
    ll_ref = float(np.mean(sstats.gennorm.logpdf(x, b_ref, 0.0, s_ref)))
    assert g.loglik_per_sample >= ll_ref - 1e-9


def test_dweibull_matches_scipy_mle() -> None:
    x = _rvs(sstats.dweibull(1.3, scale=0.5), n=4000, seed=3)
    d = fit_layer(x, ("dweibull",), loc="zero").fits["dweibull"]
    c_ref, _, s_ref = sstats.dweibull.fit(x, floc=0.0)
    assert d.params["c"] == pytest.approx(c_ref, rel=5e-3)
    assert d.params["scale"] == pytest.approx(s_ref, rel=5e-3)


def test_laplace_gaussian_dweibull_recover_parameters() -> None:
    lap = fit_layer(_rvs(sstats.laplace(loc=0.5, scale=2.0)), ("laplace", "gennorm"))
    assert lap.fits["laplace"].params["loc"] == pytest.approx(0.5, abs=0.03)
    assert lap.fits["laplace"].params["scale"] == pytest.approx(2.0, rel=0.02)
    assert lap.fits["gennorm"].params["beta"] == pytest.approx(1.0, rel=0.05)

    gau = fit_layer(_rvs(sstats.norm(loc=-1.0, scale=3.0)), ("gaussian", "gennorm"))
    assert gau.fits["gaussian"].params["loc"] == pytest.approx(-1.0, abs=0.05)
    assert gau.fits["gaussian"].params["scale"] == pytest.approx(3.0, rel=0.02)
    assert gau.fits["gennorm"].params["beta"] == pytest.approx(2.0, rel=0.05)
    assert gau.fits["gennorm"].params["scale"] == pytest.approx(3.0 * math.sqrt(2), rel=0.05)

    dw = fit_layer(_rvs(sstats.dweibull(0.7, scale=1e-3)), ("dweibull",)).fits["dweibull"]
    assert dw.params["c"] == pytest.approx(0.7, rel=0.05)
    assert dw.params["scale"] == pytest.approx(1e-3, rel=0.05)


def test_loglik_per_sample_equals_scipy_logpdf_mean() -> None:
    x = _rvs(sstats.gennorm(1.2, scale=0.1), n=5000)
    f = fit_layer(x, loc="median")
    for law in LAWS:
        lf = f.fits[law]
        assert lf.loglik_per_sample == pytest.approx(float(np.mean(lf.dist().logpdf(x))), abs=1e-9), law
        assert lf.n_used == x.size


def test_w2_true_law_small_wrong_law_larger() -> None:
    x = _rvs(sstats.laplace(scale=1.0))
    f = fit_layer(x)
    assert f.fits["laplace"].w2 / f.std < 0.03
    assert f.fits["gennorm"].w2 / f.std < 0.03
    assert f.fits["gaussian"].w2 > 5 * f.fits["laplace"].w2
    assert f.best("w2").law in ("laplace", "gennorm", "dweibull")
    assert f.best("loglik").law != "gaussian"

    g = fit_layer(_rvs(sstats.norm(scale=2.0)))
    assert g.fits["gaussian"].w2 / g.std < 0.01
    assert g.fits["laplace"].w2 > 5 * g.fits["gaussian"].w2


def test_w2_definition_on_a_tiny_sample() -> None:
    # midpoint grid u = (i - 1/2)/m against the exact law: W2^2 = mean (x_(i) - ppf(u_i))^2
    xs = np.array([-1.0, 0.0, 2.0])
    u = np.array([1 / 6, 1 / 2, 5 / 6])
    want = math.sqrt(float(np.mean((xs - sstats.norm.ppf(u)) ** 2)))
    assert wasserstein2(xs, sstats.norm.ppf) == pytest.approx(want)


def test_kurtosis_laplace_3_gaussian_0_and_equals_scipy() -> None:
    lap = _rvs(sstats.laplace(), n=200_000)
    gau = _rvs(sstats.norm(), n=200_000)
    assert fit_layer(lap, ("gaussian",)).excess_kurtosis == pytest.approx(3.0, abs=0.15)
    assert fit_layer(gau, ("gaussian",)).excess_kurtosis == pytest.approx(0.0, abs=0.05)
    x = _rvs(sstats.gennorm(0.9), n=3000)
    f = fit_layer(x, ("gaussian",))
    assert f.excess_kurtosis == pytest.approx(float(sstats.kurtosis(x)), rel=1e-9)
    assert f.mean == pytest.approx(float(x.mean()))
    assert f.std == pytest.approx(float(x.std()))


def test_torch_input_any_shape_and_tiny_scale() -> None:
    g = torch.Generator().manual_seed(0)
    t = (torch.randn(200, 250, generator=g) * 1e-7).to(torch.float32)
    f = fit_layer(t)
    assert f.n == 50_000 and not f.sampled
    assert f.fits["gennorm"].params["beta"] == pytest.approx(2.0, rel=0.05)
    assert f.fits["gaussian"].params["scale"] == pytest.approx(1e-7, rel=0.02)


def test_subsampling_path_is_deterministic_and_accurate() -> None:
    x = _rvs(sstats.gennorm(0.8), n=300_000, seed=5)
    f = fit_layer(x, ("gennorm", "gaussian"), max_samples=40_000, seed=3)
    assert f.sampled and f.n == 300_000 and f.n_used == 40_000
    assert f.fits["gennorm"].n_used == 40_000
    assert f.fits["gennorm"].params["beta"] == pytest.approx(0.8, rel=0.05)
    # layer statistics use every entry
    assert f.mean == pytest.approx(float(x.mean()))
    assert f.excess_kurtosis == pytest.approx(float(sstats.kurtosis(x)), rel=1e-9)
    again = fit_layer(x, ("gennorm", "gaussian"), max_samples=40_000, seed=3)
    assert again == f  # timings are excluded from equality
    other = fit_layer(x, ("gennorm", "gaussian"), max_samples=40_000, seed=4)
    assert other.fits["gennorm"].params != f.fits["gennorm"].params
    full = fit_layer(x[:1000], max_samples=None)
    assert not full.sampled and full.n_used == 1000


def test_shape_at_bound_is_reported() -> None:
    # two-point data: the likelihood keeps growing with beta, so the search stops at 10
    x = np.tile([-1.0, 1.0], 500)
    g = fit_layer(x, ("gennorm",), loc="zero").fits["gennorm"]
    assert g.params["beta"] == pytest.approx(10.0, rel=1e-3)
    assert any("bound" in w for w in g.warnings)


def test_dweibull_leaves_out_entries_at_loc() -> None:
    x = np.concatenate([_rvs(sstats.dweibull(1.2), n=2000), np.zeros(100)])
    f = fit_layer(x, ("dweibull", "gennorm"), loc="zero")
    assert f.fits["dweibull"].n_used == 2000
    assert any("left out" in w for w in f.fits["dweibull"].warnings)
    assert f.fits["gennorm"].n_used == 2100


# ---------------------------------------------------------------------------------------------- bad input
def test_constant_layer_flag_and_raise() -> None:
    f = fit_layer(torch.full((10, 10), 0.25))
    assert f.constant and f.fits == {} and f.std == 0.0 and f.mean == 0.25
    assert math.isnan(f.excess_kurtosis)
    with pytest.raises(StatsError, match="constant"):
        f.best()
    with pytest.raises(StatsError, match="constant"):
        fit_layer(np.zeros(10), on_constant="raise")


def test_constant_subsample_of_non_constant_layer_raises() -> None:
    x = np.zeros(1_000_000)
    x[:3] = 1.0
    with pytest.raises(StatsError, match="max_samples=None"):
        fit_layer(x, max_samples=1000, seed=0)


@pytest.mark.parametrize("x", [np.array([]), np.array([1.5]), torch.zeros(1)])
def test_too_few_entries(x: object) -> None:
    with pytest.raises(StatsError, match="at least 2"):
        fit_layer(x)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_entries(bad: float) -> None:
    x = np.linspace(-1, 1, 100)
    x[37] = bad
    with pytest.raises(StatsError, match=r"non-finite.*index 37"):
        fit_layer(x)
    with pytest.raises(StatsError, match="non-finite"):
        spearman_pass_rate(x, n=10, trials=2)


def test_bad_arguments() -> None:
    x = np.linspace(-1, 1, 100)
    with pytest.raises(StatsError, match="did you mean 'gennorm'"):
        fit_layer(x, ("gennrom",))
    with pytest.raises(StatsError, match="empty"):
        fit_layer(x, ())
    with pytest.raises(StatsError, match="max_samples"):
        fit_layer(x, max_samples=1)
    with pytest.raises(StatsError, match="max_samples"):
        fit_layer(x, max_samples=10.5)  # type: ignore[arg-type]
    with pytest.raises(StatsError, match="loc"):
        fit_layer(x, loc="mode")  # type: ignore[arg-type]
    with pytest.raises(StatsError, match="real numbers"):
        fit_layer(np.ones(4, dtype=complex))
    with pytest.raises(StatsError, match="real numbers"):
        fit_layer(torch.ones(4, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------- independence
@pytest.fixture(scope="module")
def layers() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    size = 20_000
    iid, iid2 = rng.standard_normal(size), rng.standard_normal(size)
    eps = rng.standard_normal(size)
    rho = 0.95
    ar = np.empty(size)  # AR(1): neighbours strongly correlated
    ar[0] = eps[0]
    for i in range(1, size):
        ar[i] = rho * ar[i - 1] + math.sqrt(1 - rho * rho) * eps[i]
    return {"iid": iid, "iid2": iid2, "ar": ar, "walk": np.cumsum(eps)}


@pytest.mark.parametrize("fn", [spearman_pass_rate, ks_pass_rate])
@pytest.mark.parametrize("pairing", ["random", "neighbours", "blocks"])
def test_pass_rate_about_095_on_iid_entries(layers: dict[str, np.ndarray], fn: object, pairing: str) -> None:
    r = fn(layers["iid"], None, n=100, trials=300, seed=1, pairing=pairing)  # type: ignore[operator]
    assert r.mode == "entries" and r.trials == 300 and r.n_undefined == 0
    assert 0.90 <= r.pass_rate <= 0.995


@pytest.mark.parametrize("fn", [spearman_pass_rate, ks_pass_rate])
def test_pass_rate_about_095_between_iid_iterations(layers: dict[str, np.ndarray], fn: object) -> None:
    r = fn(layers["iid"], layers["iid2"], 100, 300, 0.05, 2)  # type: ignore[operator]
    assert r.mode == "iterations"
    assert 0.90 <= r.pass_rate <= 0.995


def test_pass_rate_about_0_on_dependent_data(layers: dict[str, np.ndarray]) -> None:
    a, noise = layers["iid"], layers["iid2"]
    # same entries, strongly related across iterations
    assert spearman_pass_rate(a, a + 0.3 * noise, n=100, trials=100).pass_rate < 0.02
    # neighbouring entries of an AR(1) layer
    r = spearman_pass_rate(layers["ar"], n=100, trials=100, pairing="neighbours")
    assert r.pass_rate < 0.02 and r.mean_statistic > 0.8
    # the layer's law changed between iterations (3x scale)
    assert ks_pass_rate(a, 3 * noise, n=100, trials=100).pass_rate < 0.02
    # regions of a non-stationary layer follow different laws
    assert ks_pass_rate(layers["walk"], n=100, trials=100, pairing="blocks").pass_rate < 0.05


def test_random_pairing_within_a_layer_cannot_see_dependence(layers: dict[str, np.ndarray]) -> None:
    # documented caveat: random index sets make the two samples exchangeable
    assert spearman_pass_rate(layers["ar"], n=100, trials=200).pass_rate > 0.9
    assert ks_pass_rate(layers["walk"], n=100, trials=200).pass_rate > 0.9


def test_pass_rate_deterministic_and_undefined_trials() -> None:
    x = np.random.default_rng(3).standard_normal(5000)
    assert spearman_pass_rate(x, n=50, trials=20, seed=9) == spearman_pass_rate(x, n=50, trials=20, seed=9)
    sparse = np.zeros(10_000)
    sparse[:20] = 1.0  # most subsets of 10 are all zero: Spearman undefined there
    r = spearman_pass_rate(sparse, n=10, trials=50)
    assert r.n_undefined > 0 and r.n_pass <= r.trials - r.n_undefined
    all_zero_b = spearman_pass_rate(np.arange(100.0), np.zeros(100), n=10, trials=5)
    assert all_zero_b.n_undefined == 5 and math.isnan(all_zero_b.pass_rate)


def test_pass_rate_bad_arguments() -> None:
    x = np.linspace(0, 1, 100)
    with pytest.raises(StatsError, match="2n <= entries"):
        ks_pass_rate(x, n=51)
    with pytest.raises(StatsError, match="neighbours"):
        spearman_pass_rate(x, n=49, pairing="neighbours", lag=3)
    with pytest.raises(StatsError, match="same number of entries"):
        spearman_pass_rate(x, x[:50], n=10)
    with pytest.raises(StatsError, match="alpha"):
        ks_pass_rate(x, n=10, alpha=1.5)
    with pytest.raises(StatsError, match="n must be"):
        spearman_pass_rate(x, n=2)
    with pytest.raises(StatsError, match="trials"):
        ks_pass_rate(x, n=10, trials=0)
    with pytest.raises(StatsError, match="pairing"):
        ks_pass_rate(x, n=10, pairing="adjacent")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------- teacher/student
def test_teacher_student_updates_finite_and_loss_decreases() -> None:
    ts = TeacherStudent(40, 20, 3, seed=0)
    before = ts.test_loss()
    shapes = {"fc1.weight": (20, 40), "fc1.bias": (20,), "fc2.weight": (3, 20), "fc2.bias": (3,)}
    count = 0
    for upd in ts.generate_updates(300, 32, 0.2):
        count += 1
        assert {k: tuple(v.shape) for k, v in upd.items()} == shapes
        assert all(bool(torch.isfinite(v).all()) for v in upd.values())
    assert count == 300 and ts.steps_done == 300 and math.isfinite(ts.last_loss)
    after = ts.test_loss()
    assert after < 0.5 * before
    # the teacher never moves
    assert all(not p.requires_grad for p in ts.teacher.parameters())


def test_teacher_student_reproducible_and_update_kind() -> None:
    def run(seed: int, kind: str) -> list[dict[str, torch.Tensor]]:
        ts = TeacherStudent(10, [8, 6], 2, seed=seed, noise_std=0.1, activation="relu")
        return list(ts.generate_updates(5, 16, 0.05, kind=kind))  # type: ignore[arg-type]

    a, b, c = run(1, "gradient"), run(1, "gradient"), run(2, "gradient")
    assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)
    assert not torch.equal(a[0]["fc1.weight"], c[0]["fc1.weight"])
    assert set(a[0]) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "fc3.weight", "fc3.bias"}
    u = run(1, "update")
    assert all(torch.allclose(x[k], -0.05 * y[k]) for x, y in zip(u, a, strict=True) for k in x)


def test_teacher_student_updates_feed_fit_layer() -> None:
    ts = TeacherStudent(64, 64, 4, seed=3)
    *_, last = ts.generate_updates(20, 64, 0.1)
    f = fit_layer(last["fc1.weight"])
    assert f.n == 64 * 64 and set(f.fits) == set(LAWS)


def test_teacher_student_bad_arguments() -> None:
    with pytest.raises(StatsError, match="hidden"):
        TeacherStudent(4, 0, 2)
    with pytest.raises(StatsError, match="d_in"):
        TeacherStudent(0, 4, 2)
    with pytest.raises(StatsError, match="activation"):
        TeacherStudent(4, 4, 2, activation="gelu")  # type: ignore[arg-type]
    with pytest.raises(StatsError, match="noise_std"):
        TeacherStudent(4, 4, 2, noise_std=-1.0)
    ts = TeacherStudent(4, 4, 2)
    with pytest.raises(StatsError, match="lr"):
        next(ts.generate_updates(1, 4, 0.0))
    with pytest.raises(StatsError, match="batch"):
        next(ts.generate_updates(1, 0, 0.1))
    with pytest.raises(StatsError, match="kind"):
        next(ts.generate_updates(1, 4, 0.1, kind="delta"))  # type: ignore[arg-type]
