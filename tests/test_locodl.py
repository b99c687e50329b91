"""LoCoDL (``fedsqueeze.algorithms.locodl``) on the shared round loop: linear convergence to the
*exact* minimiser with the identity codec and with unbiased Rand-K (the fixed-point property of the
update equations), the control-variate invariant, byte accounting, ω read from the codec,
resume, config errors."""

from __future__ import annotations

import copy
import importlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from fedsqueeze.algorithms.locodl import codec_omega
from fedsqueeze.channel import ModelCodec
from fedsqueeze.codecs import parse_spec
from fedsqueeze.errors import ConfigError
from fedsqueeze.experiment import config_from_dict, run
from fedsqueeze.experiment.run import _Setup

run_module = importlib.import_module("fedsqueeze.experiment.run")

# a strongly convex, heterogeneous problem: multinomial logistic regression on FedProx's
# Synthetic(1, 1) (10 natural clients) + (λ/2)‖x‖², full-batch local steps (batch > any client)
LAM, GAMMA = 10.0, 0.02
CONVEX: dict[str, Any] = {
    "rounds": 60,
    "data": {
        "dataset": "synthetic",
        "partition": "natural",
        "num_clients": 10,
        "options": {"num_clients": 10, "alpha": 1.0, "beta": 1.0},
    },
    "model": {"name": "logreg"},
    "clients": {"per_round": 10, "batch_size": 700, "lr": GAMMA, "weight_decay": LAM},
    "eval": {"every": 1000},
}


def conf(opts: dict[str, Any] | None = None, algo: str = "locodl", **sections: Any) -> Any:
    raw = copy.deepcopy(CONVEX)
    raw["algorithm"] = {"name": algo, "options": opts or {}}
    for k, v in sections.items():
        if isinstance(v, dict):
            raw.setdefault(k, {}).update(v)
        else:
            raw[k] = v
    return config_from_dict(raw)


def strip_wall(recs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "wall_time_s"} for r in recs]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def problem(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """x* of (1/n) Σ_i CE_i(x) + (λ/2)‖x‖² (uniform weights, LBFGS in float64) and x⁰."""
    s = _Setup(conf(), tmp_path_factory.mktemp("setup"))
    data = [(a.double(), b) for a, b in s.client_data]

    def f(x: torch.Tensor) -> torch.Tensor:
        p = s.layout.unflatten(x)
        ce = sum(torch.nn.functional.cross_entropy(a @ p["1.weight"].T + p["1.bias"], b) for a, b in data)
        return ce / len(data) + LAM / 2 * (x * x).sum()

    x = s.x0.double().clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [x], max_iter=50, tolerance_grad=1e-10, tolerance_change=1e-16, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = f(x)
        loss.backward()
        return loss

    opt.step(closure)
    assert torch.autograd.grad(f(x), x)[0].norm() < 1e-7  # ‖x − x*‖ ≤ ‖∇‖/λ ≤ 1e-8
    return {"xstar": x.detach(), "x0": s.x0.double(), "layout": s.layout}


def tracked_models(cfg: Any, out: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[list[torch.Tensor], Any]:
    """Run ``cfg``; return the loop's global model (LoCoDL: y) after every round, and the result."""
    orig = run_module._one_round
    models: list[torch.Tensor] = []

    def spy(*args: Any, **kwargs: Any) -> dict[str, Any]:
        rec = orig(*args, **kwargs)
        models.append(rec["_x"].double().clone())
        return rec

    monkeypatch.setattr(run_module, "_one_round", spy)
    res = run(cfg, out, plots=False)
    monkeypatch.setattr(run_module, "_one_round", orig)
    return models, res


def tracked_run(
    cfg: Any, out: Path, problem: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> tuple[list[float], Any]:
    """Run ``cfg``; return ‖y_t − x*‖ / ‖x⁰ − x*‖ after every round, and the result."""
    models, res = tracked_models(cfg, out, monkeypatch)
    xs, x0 = problem["xstar"], problem["x0"]
    return [float((m - xs).norm() / (x0 - xs).norm()) for m in models], res


@pytest.mark.parametrize(
    "uplink,p,rounds,tol",
    [("fp32", 0.3, 45, 1e-5), ("randk:50%", 0.5, 60, 1e-4)],
    ids=["identity", "randk-unbiased"],
)
def test_converges_linearly_to_the_exact_minimiser(
    uplink: str,
    p: float,
    rounds: int,
    tol: float,
    problem: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rand-K keeps a random half of each tensor (independent masks per client, scaled by 2: ω = 1)."""
    cfg = conf({"p": p}, compression={"uplink": uplink}, rounds=rounds)
    errs, res = tracked_run(cfg, tmp_path / "r", problem, monkeypatch)
    print(uplink, " ".join(f"{e:.1e}" for e in errs[::5]))
    m = res.metrics
    # exact: the distance to x* itself (not to a biased fixed point) becomes tiny ...
    assert errs[-1] < tol, errs[-1]
    # ... linearly: every third of the run divides the error by 10 or more
    i, j = rounds // 3, 2 * rounds // 3
    assert errs[j] < errs[i] / 10 and errs[-1] < errs[j] / 10, (errs[i], errs[j], errs[-1])
    # the control variates stay balanced: (1/n) Σ u_i + v = 0 up to float32 rounding
    assert max(r["uv_sum_norm"] for r in m) < 1e-4
    # what the clients compress, x̂_i − ŷ, vanishes: so does the compression error (exactness)
    assert m[-1]["message_norm"] < 1e-4 * m[0]["message_norm"]
    assert m[-1]["client_spread"] <= 1e-4 * max(1e-3, max(r["client_spread"] for r in m))
    # rounds and local steps are reported separately; K ~ Geometric(p), mean 1/p
    ks = [r["local_steps_per_client"] for r in m]
    assert [r["communication_rounds"] for r in m] == list(range(1, rounds + 1))
    assert min(ks) >= 1 and m[-1]["cum_iterations"] == sum(ks)
    assert 0.5 / p < sum(ks) / len(ks) < 1.6 / p
    assert sum(r["local_steps"] for r in m) == 10 * sum(ks)  # every client, every iteration


def test_the_round_loop_runs_the_documented_equations(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An independent float64 transcription of the module docstring's equations (identity codec,
    g = (g_l2/2)‖y‖², ρ, χ < 1, the loop's coin) gives the same y after every round as the loop."""
    from fedsqueeze.sim.seeds import np_rng

    p, rho, chi, g_l2, rounds = 0.4, 0.7, 0.8, 0.5, 12
    cfg = conf({"p": p, "rho": rho, "chi": chi, "g_l2": g_l2}, rounds=rounds)
    s = _Setup(cfg, tmp_path / "setup")
    data = [(a.double(), b) for a, b in s.client_data]
    n = len(data)

    def grad(i: int, x: torch.Tensor) -> torch.Tensor:  # ∇f_i: CE_i + (λ/2)‖x‖² (clients.weight_decay)
        x = x.clone().requires_grad_(True)
        prm = s.layout.unflatten(x)
        a, b = data[i]
        loss = torch.nn.functional.cross_entropy(a @ prm["1.weight"].T + prm["1.bias"], b)
        return torch.autograd.grad(loss, x)[0] + LAM * x.detach()

    step = p * chi / GAMMA  # ω = 0 for fp32
    xs = [s.x0.double().clone() for _ in range(n)]
    us = [torch.zeros_like(xs[0]) for _ in range(n)]
    y, v = s.x0.double().clone(), torch.zeros_like(xs[0])
    ref = []
    for t in range(rounds):
        rng, k = np_rng(cfg.seed, "locodl-coin", t), 1
        while rng.random() >= p:
            k += 1
        for _ in range(k):
            xs = [x - GAMMA * grad(i, x) + GAMMA * u for i, (x, u) in enumerate(zip(xs, us, strict=True))]
            y = y - GAMMA * g_l2 * y + GAMMA * v
        ds = [x - y for x in xs]
        dbar = sum(ds) / (2 * n)
        xs = [(1 - rho) * x + rho * (y + dbar) for x in xs]
        us = [u + step * (dbar - d) for u, d in zip(us, ds, strict=True)]
        y, v = y + rho * dbar, v + step * dbar
        ref.append(y.clone())
    got, _ = tracked_models(cfg, tmp_path / "r", monkeypatch)
    for t, (a, b) in enumerate(zip(got, ref, strict=True)):
        assert (a - b).norm() < 1e-5 * b.norm(), (t, float((a - b).norm() / b.norm()))


def test_compression_saves_uplink_bytes_to_reach_the_optimum(
    problem: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """Uplink bytes until ‖y − x*‖ ≤ 1e-4 ‖x⁰ − x*‖. At equal p the rate is set by γμ, not by the
    compressor, so Rand-K 50% reaches the target in about as many rounds with about half the bytes.
    Uncompressed Scaffnew (at its own good p) is reported for reference: on this small problem
    (d = 610, n = 10) it needs fewer bytes than LoCoDL (see the module docstring of locodl)."""
    target = 1e-4

    def bytes_to_target(cfg: Any, name: str) -> tuple[int, int]:
        errs, res = tracked_run(cfg, tmp_path / name, problem, monkeypatch)
        hit = next((i for i, e in enumerate(errs) if e <= target), None)
        assert hit is not None, (name, errs[-1])
        return hit + 1, int(res.metrics[hit]["cum_uplink_bytes"])

    randk = bytes_to_target(conf({"p": 0.5}, compression={"uplink": "randk:50%"}, rounds=55), "randk")
    exact = bytes_to_target(conf({"p": 0.5}, rounds=55), "exact")
    scaffnew = bytes_to_target(conf({"p": 0.3}, algo="scaffnew", rounds=20), "scaffnew")
    with capsys.disabled():
        print(
            f"\n(rounds, uplink bytes) to {target:g}: locodl randk:50% {randk}, locodl fp32 {exact}, "
            f"scaffnew fp32 (p=0.3) {scaffnew}"
        )
    assert randk[0] < 1.3 * exact[0]  # compression barely slows it down at this p ...
    assert randk[1] < 0.7 * exact[1]  # ... and the uplink carries about half the bytes


def test_bytes_are_measured_and_the_downlink_is_charged_once(tmp_path: Path) -> None:
    cfg = conf({"p": 0.5}, compression={"uplink": "randk:25%"}, rounds=3)
    res = run(cfg, tmp_path / "b", plots=False)
    s = _Setup(cfg, tmp_path / "setup")
    dense = len(ModelCodec("fp32", s.layout).encode(s.x0))
    for r in res.metrics:
        # one dense model-sized broadcast per client per round (y, which carries d̄), not two
        assert r["downlink_bytes_per_client"] == [dense] * 10
        # C_i(x̂_i − ŷ) with Rand-K 25%: about a quarter of the dense payload (+ frame headers)
        assert all(0.2 * dense < b < 0.4 * dense for b in r["uplink_bytes_per_client"])


def test_omega_and_default_relaxation_come_from_the_codec(tmp_path: Path) -> None:
    s = _Setup(conf(compression={"uplink": "randk:25%"}, rounds=1), tmp_path / "a")
    algo: Any = s.algo
    # logreg: weight 10x60 keeps 150 of 600 (ω = 3), bias keeps round(2.5) = 2 of 10 (ω = 4): max
    assert algo.omega == pytest.approx(4.0)
    assert algo.rho == algo.chi == pytest.approx(1 / (1 + 4.0 / 10))
    assert algo.dual_step == pytest.approx(0.2 * algo.chi / (GAMMA * (1 + 2 * 4.0)))
    s2 = _Setup(
        conf({"omega": 1.0, "rho": 0.5}, compression={"uplink": "randk:25%", "uplink_scope": "model"}),
        tmp_path / "b",
    )
    assert (s2.algo.omega, s2.algo.rho) == (1.0, 0.5)  # type: ignore[attr-defined]
    # one frame of the whole model: 152 of 610 entries
    assert codec_omega(parse_spec("randk:25%"), [(610,)]) == pytest.approx(610 / 152 - 1)
    assert codec_omega(parse_spec("fp32 > zstd"), [(610,)]) == 0.0
    assert codec_omega(parse_spec("randk:k=5 > zstd"), [(600,), (10,)]) == pytest.approx(119.0)
    assert codec_omega(parse_spec("qsgd:16"), [(610,)]) is None
    assert codec_omega(parse_spec("topk:10%"), [(610,)]) is None


def test_resume_is_identical_and_state_offload_matches(tmp_path: Path) -> None:
    raw = copy.deepcopy(CONVEX)
    raw.update(
        rounds=9,
        checkpoint={"every": 4},
        algorithm={"name": "locodl", "options": {"p": 0.4}},
        compression={"uplink": "randk:30%"},
    )
    raw["clients"] = {**raw["clients"], "batch_size": 16}  # stochastic: the seed tree matters
    c = config_from_dict(raw)
    full = run(c, tmp_path / "full", plots=False)
    part = run(c, tmp_path / "part", plots=False)
    assert strip_wall(part.metrics) == strip_wall(full.metrics)  # deterministic
    d = full.summary["model_params"]
    assert full.summary["algorithm_state_bytes_ram"] == 10 * 2 * d * 4  # x_i and u_i, float32
    # kill after round 8's checkpoint: drop the last metric line, resume
    m = tmp_path / "part" / "metrics.jsonl"
    m.write_text("".join(line + "\n" for line in m.read_text().splitlines()[:8]))
    assert json.loads((tmp_path / "part" / "checkpoint" / "meta.json").read_text())["round"] == 8
    resumed = run(c, tmp_path / "part", resume=True, plots=False)
    assert strip_wall(resumed.metrics) == strip_wall(full.metrics)
    # per-client state on disk: same metrics, resumable
    raw_off = copy.deepcopy(raw)
    raw_off["compression"] = {**raw_off["compression"], "state_offload": True}
    off = run(config_from_dict(raw_off), tmp_path / "off", plots=False)
    assert strip_wall(off.metrics) == strip_wall(full.metrics)
    assert off.summary["algorithm_state_bytes_ram"] == 0
    m = tmp_path / "off" / "metrics.jsonl"
    m.write_text("".join(line + "\n" for line in m.read_text().splitlines()[:8]))
    resumed_off = run(config_from_dict(raw_off), tmp_path / "off", resume=True, plots=False)
    assert strip_wall(resumed_off.metrics) == strip_wall(full.metrics)


@pytest.mark.parametrize(
    "opts,extra,msg",
    [
        ({"p": 0.0}, {}, r"algorithm\.options\.p must be > 0"),
        ({"p": 1.5}, {}, r"algorithm\.options\.p"),
        ({"rho": 0.0}, {}, r"algorithm\.options\.rho"),
        ({"rho": 1.5}, {}, r"algorithm\.options\.rho"),
        ({"chi": -0.1}, {}, r"algorithm\.options\.chi"),
        ({"chi": 2}, {}, r"algorithm\.options\.chi"),
        ({"omega": -1.0}, {}, r"algorithm\.options\.omega"),
        ({"g_l2": -1.0}, {}, r"algorithm\.options\.g_l2"),
        ({"allow_biased": "yes"}, {}, r"algorithm\.options\.allow_biased"),
        ({"rhoo": 0.5}, {}, r"did you mean 'algorithm\.options\.rho'"),
        ({}, {"clients": {"per_round": 5}}, "full participation"),
        ({}, {"clients": {"momentum": 0.9}}, r"clients\.momentum"),
        ({}, {"server": {"lr": 0.5}}, r"server\.lr"),
        ({}, {"algorithm": {"aggregator": "median"}}, "aggregator"),
        ({}, {"compression": {"uplink": "randk:10%", "uplink_ef": "ef14"}}, "uplink_ef"),
        ({}, {"compression": {"downlink": "fp16"}}, "downlink must be lossless"),
        ({}, {"compression": {"uplink": "topk:10%"}}, "unbiased uplink codec"),
        ({"allow_biased": True}, {"compression": {"uplink": "topk:10%"}}, r"set algorithm\.options\.omega"),
        ({}, {"compression": {"uplink": "qsgd:16"}}, r"set algorithm\.options\.omega"),
    ],
)
def test_invalid_settings_are_config_errors(opts: dict, extra: dict, msg: str) -> None:
    raw = copy.deepcopy(CONVEX)
    raw["algorithm"] = {"name": "locodl", "options": opts}
    for k, v in extra.items():
        raw.setdefault(k, {}).update(v)
    with pytest.raises(ConfigError, match=msg):
        config_from_dict(raw)


def test_accepted_settings(tmp_path: Path) -> None:
    """Unbiased codecs with ω given, lossless compressed downlinks and biased codecs on request run."""
    for i, (opts, comp) in enumerate(
        [
            ({"omega": 2.0}, {"uplink": "qsgd:16"}),
            ({}, {"uplink": "randk:50% > zstd", "downlink": "fp32 > zstd", "downlink_mode": "model"}),
            ({"allow_biased": True, "omega": 0.0, "g_l2": 0.5}, {"uplink": "fp16"}),
        ]
    ):
        res = run(conf(opts, compression=comp, rounds=3), tmp_path / str(i), plots=False)
        assert res.status == "completed"
        assert res.metrics[-1]["uv_sum_norm"] < 1e-4
