"""Client participation (``fedsqueeze.sim.sampling``): determinism, exact inclusion probabilities,
unbiased Horvitz-Thompson aggregation, cyclic groups, norm feedback, config errors, checkpoints,
stragglers under a sampler, and SCAFFOLD's charged downlink of ``c``."""

from __future__ import annotations

import copy
import importlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fedsqueeze.algorithms.base import AlgoContext
from fedsqueeze.algorithms.scaffold import DELTA_C, Scaffold
from fedsqueeze.channel import ModelCodec, ParamLayout
from fedsqueeze.errors import ConfigError
from fedsqueeze.experiment import config_from_dict, load_config, run
from fedsqueeze.experiment.config import apply_overrides
from fedsqueeze.experiment.run import _Setup
from fedsqueeze.sim.sampling import (
    CyclicSampler,
    ImportanceSampler,
    inclusion_probabilities,
    make_sampler,
    systematic_sample,
    weighted_sum,
)
from fedsqueeze.sim.seeds import np_rng

ROOT = Path(__file__).resolve().parents[1]
run_mod = importlib.import_module("fedsqueeze.experiment.run")  # the package exports run() as "run"

SIZES = [3.0, 5.0, 8.0, 10.0, 12.0, 20.0, 25.0, 40.0, 60.0, 90.0, 150.0, 400.0]
N, M = len(SIZES), 4

SYNTH: dict[str, Any] = {
    "rounds": 6,
    "data": {
        "dataset": "synthetic",
        "partition": "natural",
        "num_clients": 10,
        "options": {"num_clients": 10, "alpha": 1.0, "beta": 1.0},
    },
    "model": {"name": "logreg"},
    "clients": {"per_round": 4, "batch_size": 32, "lr": 0.05, "engine": "sequential"},
    "eval": {"every": 100},
}


def synth(**sections: Any) -> dict[str, Any]:
    raw = copy.deepcopy(SYNTH)
    for k, v in sections.items():
        if isinstance(v, dict):
            raw.setdefault(k, {}).update(v)
        else:
            raw[k] = v
    return raw


def strip_wall(recs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "wall_time_s"} for r in recs]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------- samplers alone


def test_uniform_is_the_loops_original_draw() -> None:
    s = make_sampler("uniform", {}, num_clients=N, per_round=M, seed=7)
    for t in range(20):
        legacy = sorted(int(c) for c in np_rng(7, "sample", t).choice(N, M, replace=False))
        cohort = s.sample(t)
        assert cohort.clients == legacy
        assert cohort.denominator is None and cohort.inclusion is None
        assert all(cohort.factor(c) == 1.0 for c in cohort.clients)


@pytest.mark.parametrize(
    "name,opts",
    [
        ("uniform", {}),
        ("importance", {"by": "size"}),
        ("importance", {"by": "norm"}),
        ("cyclic", {"groups": 3}),
    ],
)
def test_samplers_are_deterministic_per_seed(name: str, opts: dict) -> None:
    def draws(seed: int) -> list[list[int]]:
        s = make_sampler(name, opts, num_clients=N, per_round=M, seed=seed, sizes=SIZES, weights=SIZES)
        out = []
        for t in range(12):
            out.append(s.sample(t).clients)
            for c in out[-1]:
                s.observe(c, float(c + 1))  # norm feedback (ignored by all but importance/norm)
        return out

    a, b, other = draws(1), draws(1), draws(2)
    assert a == b
    assert a != other
    assert all(len(set(c)) == len(c) and c == sorted(c) for c in a)


def test_inclusion_probabilities_are_capped_and_sum_to_m() -> None:
    q = np.array([0.6, 0.2, 0.1, 0.05, 0.05])
    pi = inclusion_probabilities(q, 2)
    assert pi.sum() == pytest.approx(2.0)
    assert pi[0] == 1.0  # 2 · 0.6 > 1: certain
    rest = pi[1:]
    assert rest == pytest.approx(q[1:] / q[1:].sum())  # the remaining 1 spread ∝ q
    # cascading caps: after the first cap another one crosses 1
    pi = inclusion_probabilities([0.5, 0.3, 0.1, 0.1], 3)
    assert list(pi[:2]) == [1.0, 1.0] and pi.sum() == pytest.approx(3.0)
    assert inclusion_probabilities([0.25] * 4, 4).tolist() == [1.0] * 4
    with pytest.raises(ValueError, match="> 0"):
        inclusion_probabilities([0.5, 0.0, 0.5], 1)


def test_systematic_sample_hits_every_inclusion_probability() -> None:
    q = np.array(SIZES) / sum(SIZES)
    pi = inclusion_probabilities(0.8 * q + 0.2 / N, M)
    assert pi.max() == 1.0 and pi.min() < 0.2  # one certain client, several rare ones
    rng = np.random.default_rng(0)
    draws = 6000
    counts = np.zeros(N)
    for _ in range(draws):
        chosen = systematic_sample(pi, rng)
        assert len(chosen) == M and len(set(chosen)) == M
        counts[chosen] += 1
    freq = counts / draws
    se = np.sqrt(pi * (1 - pi) / draws) + 1e-12
    assert np.all(np.abs(freq - pi) <= 4.5 * se + 1e-12), (freq, pi)


def _estimates(
    sampler: Any, deltas: torch.Tensor, weights: list[float], draws: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per round: the loop's reweighted aggregate, and (negative control) the cohort's plain
    self-normalised weighted mean without reweighting."""
    est, naive = [], []
    d = deltas.double().numpy()
    for t in range(draws):
        cohort = sampler.sample(t)
        ups = [deltas[c] for c in cohort.clients]
        ws = [weights[c] * cohort.factor(c) for c in cohort.clients]  # as the loop with "mean"
        est.append(weighted_sum(ups, ws, cohort.denominator).numpy())
        w = np.array([weights[c] for c in cohort.clients])
        naive.append(w @ d[cohort.clients] / w.sum())
    return np.array(est, dtype=np.float64), np.array(naive)


@pytest.mark.parametrize("by", ["size", "norm"])
def test_horvitz_thompson_aggregate_is_unbiased(by: str) -> None:
    """Monte Carlo over many rounds on fixed client vectors: the mean of the reweighted aggregate is
    the full-participation weighted mean within 4.5 standard errors, per coordinate; the cohort's
    plain weighted mean (no reweighting) misses it by far more, so the check has power."""
    g = torch.Generator().manual_seed(0)
    sizes = torch.tensor(SIZES)
    # heterogeneous clients whose updates correlate with their size (what makes naive sampling biased)
    deltas = torch.stack([sizes.log(), torch.randn(N, generator=g), (sizes / 100) ** 2], dim=1)
    deltas[3] *= 8.0  # one small client with a big update
    w = SIZES
    target = (torch.tensor(w)[:, None] * deltas).sum(0) / sum(w)
    s = ImportanceSampler(N, M, seed=3, sizes=SIZES, weights=w, by=by, floor=0.1)
    if by == "norm":
        for c in range(N - 3):  # the last three stay unseen: they use the mean of the known norms
            s.observe(c, float(deltas[c].norm()))
    draws = 4000
    est, naive = _estimates(s, deltas, w, draws)
    se = est.std(axis=0, ddof=1) / np.sqrt(draws)
    err = np.abs(est.mean(axis=0) - target.double().numpy())
    assert np.all(err <= 4.5 * se), (err, se)
    bias = np.abs(naive.mean(axis=0) - target.double().numpy())
    naive_se = naive.std(axis=0, ddof=1) / np.sqrt(draws)
    assert np.max(bias / naive_se) > 10, (bias, naive_se)


def test_importance_by_norm_lowers_the_error_of_the_estimate() -> None:
    """Sampling ∝ w_c‖Δ_c‖ (Chen, Horváth, Richtárik 2022) beats ∝ size when a few small clients
    carry large updates: smaller mean squared error of the (unbiased) aggregate."""
    sizes = torch.tensor(SIZES)
    deltas = torch.zeros(N, 2)
    deltas[:, 0] = 0.1
    deltas[[0, 1, 2], 1] = torch.tensor([200.0, -150.0, 120.0])  # rare, small, loud clients
    target = (sizes[:, None] * deltas).sum(0) / sizes.sum()
    mse = {}
    for by in ("size", "norm"):
        s = ImportanceSampler(N, M, seed=5, sizes=SIZES, weights=SIZES, by=by, floor=0.1)
        for c in range(N):
            s.observe(c, float(deltas[c].norm()))
        est, _ = _estimates(s, deltas, SIZES, 600)
        mse[by] = float(((est - target.double().numpy()) ** 2).sum(axis=1).mean())
    assert mse["norm"] < mse["size"] / 3, mse


def test_importance_by_norm_uses_observed_norms_mean_for_unseen_and_a_floor() -> None:
    w = [1.0] * 6
    s = ImportanceSampler(6, 2, seed=0, sizes=[10.0] * 6, weights=w, by="norm", floor=0.2, prior_norm=5.0)
    assert s.probabilities() == pytest.approx([1 / 6] * 6)  # nothing known: the prior for all
    s.observe(0, 10.0)
    s.observe(1, 2.0)
    s.observe(2, float("nan"))  # ignored
    q = s.probabilities()
    scores = np.array([10.0, 2.0, 6.0, 6.0, 6.0, 6.0])  # unseen: mean of known norms (6)
    assert q == pytest.approx(0.8 * scores / scores.sum() + 0.2 / 6)
    assert q.sum() == pytest.approx(1.0) and q.min() >= 0.2 / 6
    s.observe(3, 0.0)  # a zero update still keeps the floor
    assert s.probabilities()[3] == pytest.approx(0.2 / 6)
    # state round trip: a fresh sampler restored from state_dict draws the same cohorts
    fresh = ImportanceSampler(6, 2, seed=0, sizes=[10.0] * 6, weights=w, by="norm", floor=0.2, prior_norm=5.0)
    fresh.load_state_dict(s.state_dict())
    assert [fresh.sample(t).clients for t in range(10)] == [s.sample(t).clients for t in range(10)]
    assert s.state_dict()["sampler/norms"].dtype == torch.float64


def test_size_sampling_with_sample_weights_is_the_plain_cohort_mean() -> None:
    """Li et al. 2020 scheme I: sample ∝ n_c (no floor, no capping), then average uniformly."""
    sizes = [float(v) for v in range(10, 20)]  # no client gets capped at π = 1 with m = 3
    s = ImportanceSampler(10, 3, seed=0, sizes=sizes, weights=sizes, by="size", floor=1e-9)
    cohort = s.sample(4)
    assert cohort.denominator is not None
    coeff = [sizes[c] * cohort.factor(c) / cohort.denominator for c in cohort.clients]
    assert coeff == pytest.approx([1 / 3] * 3, rel=1e-6)


def test_cyclic_groups_partition_clients_and_rotate() -> None:
    s = CyclicSampler(10, 2, seed=4, groups=3)
    groups = s.groups
    assert sorted(c for g in groups for c in g) == list(range(10))
    assert sorted(len(g) for g in groups) == [3, 3, 4]
    for t in range(9):
        cohort = s.sample(t).clients
        assert len(cohort) == 2 and set(cohort) <= set(groups[t % 3])
    # within a group the draw varies over its visits
    assert len({tuple(s.sample(t).clients) for t in range(0, 30, 3)}) > 1
    whole = CyclicSampler(10, 2, seed=4, groups=3, whole_group=True)
    assert [whole.sample(t).clients for t in range(3)] == groups
    big = CyclicSampler(10, 8, seed=4, groups=3)  # per_round larger than the group: the whole group
    assert big.sample(1).clients == groups[1]
    assert CyclicSampler(10, 2, seed=4, groups=1).groups == [list(range(10))]


# ---------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "clients,extra,msg",
    [
        ({"sampling": "imporance"}, {}, "did you mean 'importance'"),
        ({"sampling": "roundrobin"}, {}, "expected one of"),
        ({"sampling": "cyclic"}, {}, "needs clients.sampling_options.groups"),
        ({"sampling": "cyclic", "sampling_options": {"groups": 0}}, {}, r"groups = 0 must be in \[1,"),
        ({"sampling": "cyclic", "sampling_options": {"groups": 11}}, {}, r"data.num_clients = 10"),
        ({"sampling": "cyclic", "sampling_options": {"groups": 2.5}}, {}, "must be an integer"),
        (
            {"sampling": "cyclic", "sampling_options": {"grups": 2}},
            {},
            "did you mean 'clients.sampling_options.groups'",
        ),
        ({"sampling": "importance", "sampling_options": {"by": "loss"}}, {}, "'size' or 'norm'"),
        ({"sampling": "importance", "sampling_options": {"floor": 0.0}}, {}, r"floor must be in \(0, 1\)"),
        ({"sampling": "importance", "sampling_options": {"floor": 1.0}}, {}, r"floor must be in \(0, 1\)"),
        ({"sampling": "importance", "sampling_options": {"floor": "x"}}, {}, "finite number"),
        ({"sampling": "importance", "sampling_options": {"prior_norm": -1}}, {}, "prior_norm must be > 0"),
        ({"sampling": "uniform", "sampling_options": {"by": "size"}}, {}, "valid options for 'uniform'"),
        ({"sampling": "importance"}, {"privacy": {"mode": "central"}}, "privacy.mode = 'central'"),
        (
            {"sampling": "cyclic", "sampling_options": {"groups": 2}, "per_round": 10},
            {"algorithm": {"name": "scaffnew"}},
            "needs every client every round",
        ),
        (  # EF21 aggregates payload bytes: the loop never has a decoded update whose norm to observe
            {"sampling": "importance", "sampling_options": {"by": "norm"}},
            {"algorithm": {"name": "ef21", "options": {"stepsize": 0.1}}},
            "would never observe a norm",
        ),
    ],
)
def test_bad_sampling_configs_are_config_errors(clients: dict, extra: dict, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        config_from_dict(synth(clients=clients, **extra))


def test_defaults_and_overrides() -> None:
    c = config_from_dict(SYNTH)
    assert c.clients.sampling == "uniform" and c.clients.sampling_options == {}
    raw = apply_overrides(
        SYNTH, ["clients.sampling=cyclic", "clients.sampling_options.groups=2", "clients.per_round=2"]
    )
    c = config_from_dict(raw)
    assert c.clients.sampling == "cyclic" and c.clients.sampling_options == {"groups": 2}
    with pytest.raises(ConfigError, match=r"did you mean 'clients\.sampling'"):
        apply_overrides(SYNTH, ["clients.samplng=cyclic"])


def test_example_config_loads() -> None:
    c = load_config(ROOT / "examples" / "synthetic_importance_sampling.toml")
    assert c.clients.sampling == "importance" and c.clients.sampling_options["by"] == "norm"


# ---------------------------------------------------------------------------------- the round loop


def test_resume_with_importance_sampler_is_identical(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = synth(
        rounds=8,
        clients={"sampling": "importance", "sampling_options": {"by": "norm", "floor": 0.1}},
        checkpoint={"every": 3},
    )
    c = config_from_dict(raw)
    full = run(c, tmp_path / "full", plots=False)
    cohorts = [tuple(m["clients"]) for m in full.metrics]
    assert len(set(cohorts)) > 2  # the sampler moves with the observed norms
    assert all(len(m["inclusion_probs"]) == len(m["clients"]) for m in full.metrics)
    part = run(c, tmp_path / "part", plots=False)
    assert strip_wall(part.metrics) == strip_wall(full.metrics)
    norms = load_file(str(tmp_path / "part" / "checkpoint" / "tensors.safetensors"))["sampler/norms"]
    assert int(torch.isfinite(norms).sum()) > 0

    def kill_after_round_6(path: Path) -> None:
        m = path / "metrics.jsonl"
        m.write_text("".join(line + "\n" for line in m.read_text().splitlines()[:6]))
        assert json.loads((path / "checkpoint" / "meta.json").read_text())["round"] == 6

    run(c, tmp_path / "lost", plots=False)
    kill_after_round_6(tmp_path / "part")
    kill_after_round_6(tmp_path / "lost")
    resumed = run(c, tmp_path / "part", resume=True, plots=False)
    assert strip_wall(resumed.metrics) == strip_wall(full.metrics)
    # power of the check: a resume that forgets the sampler's norms samples differently
    monkeypatch.setattr(ImportanceSampler, "load_state_dict", lambda self, state: None)
    forgot = run(c, tmp_path / "lost", resume=True, plots=False)
    assert [m["clients"] for m in forgot.metrics[6:]] != [m["clients"] for m in full.metrics[6:]]


def test_stragglers_are_excluded_from_the_reweighted_aggregate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = synth(
        clients={"sampling": "importance", "sampling_options": {"by": "norm"}},
        # 2g clients need ~0.9 s for fp32 down + up of the 610-parameter model; 4g ones ~0.08 s
        network={"profile": "mix:2g=0.4,4g=0.6", "compute_s_per_step": 0.0, "deadline_s": 0.5},
        checkpoint={"every": 6},
    )
    c = config_from_dict(raw)
    calls: list[tuple[int, list[float], float]] = []
    real = run_mod.weighted_sum

    def spy(ups: list[torch.Tensor], ws: list[float], den: float) -> torch.Tensor:
        calls.append((len(ups), list(ws), den))
        return real(ups, ws, den)

    monkeypatch.setattr(run_mod, "weighted_sum", spy)
    res = run(c, tmp_path / "r", plots=False)
    s = _Setup(c, tmp_path / "setup")
    sizes = [int(y.shape[0]) for _, y in s.client_data]
    n, m, total = 10, 4, float(sum(sizes))
    assert len(calls) == len(res.metrics)
    straggled: set[int] = set()
    aggregated: set[int] = set()
    for rec, (k, ws, den) in zip(res.metrics, calls, strict=True):
        accepted = [
            cl for cl in rec["clients"] if cl not in rec["stragglers"] and cl not in rec["dropped_clients"]
        ]
        straggled |= set(rec["stragglers"])
        aggregated |= set(accepted)
        assert k == rec["aggregated_clients"] == len(accepted)
        pi = dict(zip(rec["clients"], rec["inclusion_probs"], strict=True))
        # Horvitz-Thompson weights of the accepted clients only, over the fixed denominator m W / N
        assert ws == pytest.approx([sizes[cl] * m / (n * pi[cl]) for cl in accepted])
        assert den == pytest.approx(m * total / n)
    assert straggled - aggregated, "the setup should have a client that only ever straggled"
    norms = load_file(str(tmp_path / "r" / "checkpoint" / "tensors.safetensors"))["sampler/norms"]
    seen = {i for i in range(n) if torch.isfinite(norms[i])}
    assert seen == aggregated  # a straggler's update never reached the server's statistics either


def test_robust_aggregators_get_the_plain_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    c = config_from_dict(
        synth(
            rounds=3,
            clients={"sampling": "importance", "sampling_options": {"by": "size"}},
            algorithm={"aggregator": "median"},
        )
    )
    seen: list[list[float]] = []
    monkeypatch.setattr(run_mod, "weighted_sum", lambda *a: pytest.fail("HT sum used with median"))
    s = _Setup(c, tmp_path / "setup")
    sizes = [int(y.shape[0]) for _, y in s.client_data]
    real = type(s.aggregator).__call__

    def spy(self: Any, updates: Any, weights: Any, **kw: Any) -> torch.Tensor:
        seen.append(list(weights))
        return real(self, updates, weights, **kw)

    monkeypatch.setattr(type(s.aggregator), "__call__", spy)
    res = run(c, tmp_path / "r", plots=False)
    assert len(seen) == 3
    for rec, ws in zip(res.metrics, seen, strict=True):
        assert ws == [float(sizes[cl]) for cl in rec["clients"]]  # no 1/π factor


@pytest.mark.parametrize("codec,mode", [("fp32", "delta"), ("fp16", "model")])
def test_scaffold_downlink_pays_exactly_the_c_payload(codec: str, mode: str, tmp_path: Path) -> None:
    comp = {"downlink": codec, "downlink_mode": mode}
    runs = {}
    for algo in ("fedavg", "scaffold"):
        c = config_from_dict(synth(rounds=3, algorithm={"name": algo}, compression=comp))
        runs[algo] = run(c, tmp_path / algo, plots=False).metrics
    layout = _Setup(c, tmp_path / "setup").layout
    c_nbytes = len(ModelCodec(codec, layout).encode(torch.zeros(layout.numel)))
    assert c_nbytes > layout.numel  # a real vector's payload, not a header
    for fa, sc in zip(runs["fedavg"], runs["scaffold"], strict=True):
        assert fa["clients"] == sc["clients"]
        pairs = zip(fa["downlink_bytes_per_client"], sc["downlink_bytes_per_client"], strict=True)
        assert [b - a for a, b in pairs] == [c_nbytes] * len(sc["clients"])
        assert sc["downlink_bytes"] - fa["downlink_bytes"] == c_nbytes * len(sc["clients"])


def test_scaffold_clients_use_the_c_they_decoded() -> None:
    layout = ParamLayout.from_state({"w": torch.zeros(3, 2), "b": torch.zeros(2)})
    ctx = AlgoContext(layout=layout, num_clients=4, clients_per_round=2, client_lr=0.5)
    algo = Scaffold(ctx)
    algo.c = torch.arange(8.0)
    assert set(algo.broadcast_extras(0)) == {"c"} and torch.equal(algo.broadcast_extras(0)["c"], algo.c)
    c_dec = algo.c + 0.25  # a lossy downlink's version of c
    algo.receive_broadcast_extras(0, {"c": c_dec})
    hook = algo.grad_hook([1], [torch.zeros(8)])
    assert hook is not None
    grads = hook(0, {}, {n: torch.zeros(s) for n, s in zip(layout.names, layout.shapes, strict=True)})
    assert torch.equal(layout.flatten(grads), c_dec)  # g − c_i + c with c_i = 0 and the decoded c
    delta = torch.ones(8)
    msg = algo.client_message(1, 0, torch.zeros(8), delta, steps=2)
    assert torch.allclose(msg.extras[DELTA_C], -c_dec - delta / (2 * 0.5))
    # the server's own c is untouched by what clients decoded
    assert torch.equal(algo.c, torch.arange(8.0))


@pytest.mark.parametrize("mode", ["local", "central"])
def test_scaffold_refuses_privacy_because_delta_c_reveals_the_update(mode: str) -> None:
    """Δc_i = −c − Δy_i/(K η_l) travels un-noised (and c is broadcast): DP on Δy_i alone is void."""
    privacy = {"mode": mode, "clip_norm": 1.0, "noise_multiplier": 1.0}
    config_from_dict(synth(algorithm={"name": "fedavg"}, privacy=privacy))  # fine without Δc_i
    with pytest.raises(ConfigError, match="Δc_i"):
        config_from_dict(synth(algorithm={"name": "scaffold"}, privacy=privacy))
