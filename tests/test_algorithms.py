"""Algorithms on the shared round loop: the convex sanity problem (Scaffnew reaches the exact
optimum under heterogeneity, FedAvg stalls), config errors, determinism, resume with state."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from fedsqueeze.errors import ConfigError
from fedsqueeze.experiment import config_from_dict, run
from fedsqueeze.experiment.run import _Setup

LAM, GAMMA, ROUNDS, P = 1.0, 0.02, 100, 0.2
CONVEX: dict[str, Any] = {
    "rounds": ROUNDS,
    "data": {
        "dataset": "synthetic",
        "partition": "natural",
        "num_clients": 10,
        "options": {"num_clients": 10, "alpha": 1.0, "beta": 1.0},
    },
    "model": {"name": "logreg"},
    # batch larger than any client: full-batch local gradient steps (deterministic problem)
    "clients": {"per_round": 10, "batch_size": 700, "lr": GAMMA, "weight_decay": LAM, "epochs": 5},
    "eval": {"every": 1000},
    "checkpoint": {"every": ROUNDS},
}


def conf(algo: str = "fedavg", opts: dict[str, Any] | None = None, **sections: dict[str, Any]) -> Any:
    raw = copy.deepcopy(CONVEX)
    raw["algorithm"] = {"name": algo, "options": opts or {}}
    for k, v in sections.items():
        raw.setdefault(k, {}).update(v)
    return config_from_dict(raw)


def strip_wall(recs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "wall_time_s"} for r in recs]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    """Small matrices: one intra-op thread is much faster on a shared CPU (restored afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def problem(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Exact minimisers of Σ_i w_i f_i + (λ/2)||x||² for uniform and sample-count weights (LBFGS, float64)."""
    s = _Setup(conf(), tmp_path_factory.mktemp("setup"))
    data = [(x.double(), y) for x, y in s.client_data]
    sizes = torch.tensor([len(y) for _, y in data], dtype=torch.float64)

    def objective(w: torch.Tensor) -> Any:
        w = w / w.sum()

        def f(x: torch.Tensor) -> torch.Tensor:
            p = s.layout.unflatten(x)
            loss = sum(
                wi * torch.nn.functional.cross_entropy(a @ p["1.weight"].T + p["1.bias"], b)
                for wi, (a, b) in zip(w, data, strict=True)
            )
            return loss + LAM / 2 * (x * x).sum()  # type: ignore[return-value]

        return f

    out: dict[str, Any] = {"x0": s.x0.double()}
    for name, w in (("uniform", torch.ones(len(data), dtype=torch.float64)), ("samples", sizes)):
        f = objective(w)
        x = s.x0.double().clone().requires_grad_(True)
        opt = torch.optim.LBFGS(
            [x], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15, line_search_fn="strong_wolfe"
        )

        def closure(f: Any = f, x: torch.Tensor = x, opt: Any = opt) -> torch.Tensor:
            opt.zero_grad()
            loss = f(x)
            loss.backward()
            return loss  # type: ignore[no-any-return]

        for _ in range(3):
            opt.step(closure)
        assert torch.autograd.grad(f(x), x)[0].norm() < 1e-6
        out[name] = (x.detach(), f)
    return out


def final_x(out: Path) -> torch.Tensor:
    return load_file(str(out / "checkpoint" / "tensors.safetensors"))["global/x"].double()


def ratios(problem: dict[str, Any], out: Path, weights: str) -> tuple[float, float]:
    xs, f = problem[weights]
    x = final_x(out)
    xx = x.clone().requires_grad_(True)
    g = float(torch.autograd.grad(f(xx), xx)[0].norm())
    x0 = problem["x0"].clone().requires_grad_(True)
    g0 = float(torch.autograd.grad(f(x0), x0)[0].norm())
    return float((x - xs).norm() / (problem["x0"] - xs).norm()), g / g0


def test_scaffnew_reaches_the_optimum_fedavg_stalls(problem: dict[str, Any], tmp_path: Path) -> None:
    res = {}
    for algo, opts, w in (
        ("fedavg", {}, "samples"),
        ("scaffnew", {"p": P}, "uniform"),
        ("scaffnew", {"p": P, "weights": "samples"}, "samples"),
        ("fedprox", {"mu": 1.0}, "samples"),
        ("scaffold", {}, "uniform"),  # c = (1/N) Σ c_i: its fixed point is the uniform optimum
    ):
        key = f"{algo}-{w}"
        r = run(conf(algo, opts), tmp_path / key, plots=False)
        res[key] = (*ratios(problem, tmp_path / key, w), r)
    print({k: (f"{v[0]:.2e}", f"{v[1]:.2e}") for k, v in res.items()})
    fedavg_d, fedavg_g, _ = res["fedavg-samples"]
    assert fedavg_d > 1e-2 and fedavg_g > 1e-2  # client drift: a biased fixed point
    for key in ("scaffnew-uniform", "scaffnew-samples"):
        d, g, r = res[key]
        assert d < 1e-3 and g < 1e-3, (key, d, g)  # exact optimum of its own weighting
        assert d < fedavg_d / 50
        m = r.metrics
        # rounds and local steps are reported separately; K ~ Geometric(p), mean 1/p
        assert [x["communication_rounds"] for x in m] == list(range(1, ROUNDS + 1))
        ks = [x["local_steps_per_client"] for x in m]
        assert min(ks) >= 1 and 0.6 / P < sum(ks) / len(ks) < 1.5 / P
        assert m[-1]["cum_iterations"] == sum(ks)
        assert m[-1]["h_weighted_sum_norm"] < 1e-4  # Σ w_i h_i = 0 with exact averaging
    # linear convergence: the Scaffnew distance keeps shrinking geometrically (checked at half time)
    half = run(conf_half(), tmp_path / "half", plots=False)
    assert half.status == "completed"
    d_half, _ = ratios(problem, tmp_path / "half", "uniform")
    assert res["scaffnew-uniform"][0] < d_half / 10
    assert res["fedprox-samples"][0] < fedavg_d
    assert res["scaffold-uniform"][0] < fedavg_d / 10
    # SCAFFOLD uploads Δy_i and Δc_i: twice FedAvg's fp32 payload
    assert (
        res["scaffold-uniform"][2].metrics[0]["uplink_bytes"]
        == 2 * res["fedavg-samples"][2].metrics[0]["uplink_bytes"]
    )


def conf_half() -> Any:
    raw = copy.deepcopy(CONVEX)
    raw["rounds"] = ROUNDS // 2
    raw["checkpoint"] = {"every": ROUNDS // 2}
    raw["algorithm"] = {"name": "scaffnew", "options": {"p": P}}
    return config_from_dict(raw)


@pytest.mark.parametrize(
    "algo,opts,extra,msg",
    [
        ("scaffnew", {"p": 0.0}, {}, "algorithm.options.p"),
        ("scaffnew", {"p": 1.5}, {}, "algorithm.options.p"),
        ("scaffnew", {"pp": 0.5}, {}, "did you mean 'algorithm.options.p'"),
        ("scaffnew", {}, {"clients": {"per_round": 5}}, "full participation"),
        ("scaffnew", {}, {"clients": {"momentum": 0.9}}, "clients.momentum"),
        ("fedprox", {"mu": -1.0}, {}, "algorithm.options.mu"),
        ("fedadam", {"tau": 0.0}, {}, "algorithm.options.tau"),
        ("fedadam", {"optimizer": "rms"}, {}, "algorithm.options.optimizer"),
        ("fedadam", {}, {"server": {"lr": 0.5}}, "server.lr"),
        ("scaffold", {}, {"clients": {"momentum": 0.5}}, "clients.momentum"),
        ("fedcomloc", {"variant": "com"}, {}, "compression.uplink"),
        ("fedcomloc", {"variant": "local"}, {}, "local_codec"),
        ("fedcomloc", {"variant": "local", "local_codec": "topk:200%"}, {}, "ratio must be in"),
        ("fedcomloc", {"variant": "global"}, {"compression": {"downlink": "topk:10%"}}, "downlink_mode"),
    ],
)
def test_invalid_hyperparameters_are_config_errors(algo: str, opts: dict, extra: dict, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        conf(algo, opts, **extra)


def test_unknown_algorithm_name() -> None:
    with pytest.raises(ConfigError, match=r"algorithm\.name"):
        conf("fedsgd")


@pytest.mark.parametrize(
    "algo,opts,extra",
    [
        ("fedcomloc", {"variant": "com", "p": 0.5}, {"compression": {"uplink": "topk:30%"}}),
        (
            "fedcomloc",
            {"variant": "com", "p": 0.5, "compress": "delta"},
            {"compression": {"uplink": "qsgd:16"}},
        ),
        ("fedcomloc", {"variant": "local", "p": 0.5, "local_codec": "topk:50%"}, {}),
        (
            "fedcomloc",
            {"variant": "global", "p": 0.5},
            {"compression": {"downlink": "topk:30%", "downlink_mode": "model"}},
        ),
        ("fedadam", {"lr": 0.05}, {}),
        ("fedadam", {"lr": 0.05, "optimizer": "yogi"}, {}),
    ],
)
def test_variants_run_deterministically_and_learn(algo: str, opts: dict, extra: dict, tmp_path: Path) -> None:
    c = conf(algo, opts, **extra)
    c = config_from_dict({**c.to_dict(), "rounds": 15, "eval": {"every": 15}, "checkpoint": {"every": 0}})
    a = run(c, tmp_path / "a", plots=False)
    b = run(c, tmp_path / "b", plots=False)
    assert strip_wall(a.metrics) == strip_wall(b.metrics)
    # chance is 0.1; Top-K of the broadcast *model* (variant "global") zeroes weights and costs accuracy
    assert a.summary["final_test_accuracy"] > 0.3, a.summary["final_test_accuracy"]
    if "uplink" in extra.get("compression", {}):  # compressed uplink: fewer bytes than fp32 would take
        assert a.metrics[0]["uplink_bytes"] < 10 * a.summary["dense_update_bytes"]


@pytest.mark.parametrize("algo,opts", [("scaffold", {}), ("scaffnew", {"p": 0.3})])
def test_resume_with_algorithm_state_is_identical(algo: str, opts: dict, tmp_path: Path) -> None:
    raw = copy.deepcopy(CONVEX)
    raw.update(rounds=9, checkpoint={"every": 4}, algorithm={"name": algo, "options": opts})
    raw["data"]["num_clients"] = 10
    raw["clients"] = {**raw["clients"], "batch_size": 16}  # stochastic: the seed tree matters
    c = config_from_dict(raw)
    full = run(c, tmp_path / "full", plots=False)
    part = run(config_from_dict({**raw, "rounds": 9}), tmp_path / "part", plots=False)
    assert strip_wall(part.metrics) == strip_wall(full.metrics)
    # simulate a kill after round 8's checkpoint: drop the last metric line, resume
    m = tmp_path / "part" / "metrics.jsonl"
    m.write_text("".join(line + "\n" for line in m.read_text().splitlines()[:8]))
    ck = json.loads((tmp_path / "part" / "checkpoint" / "meta.json").read_text())
    assert ck["round"] == 8
    resumed = run(c, tmp_path / "part", resume=True, plots=False)
    assert strip_wall(resumed.metrics) == strip_wall(full.metrics)


def test_algorithm_state_offload_is_reported_identical_and_resumable(tmp_path: Path) -> None:
    """Scaffnew's per-client h_i / x̂_i on disk: same metrics as in RAM, bytes reported, resume identical."""
    raw = copy.deepcopy(CONVEX)
    raw.update(rounds=7, checkpoint={"every": 3}, algorithm={"name": "scaffnew", "options": {"p": 0.3}})
    raw["data"]["num_clients"] = 10
    ram = run(config_from_dict(raw), tmp_path / "ram", plots=False)
    d = ram.summary["model_params"]
    # two float32 vectors (h_i and x̂_i) per client, all 10 clients participate
    assert ram.summary["algorithm_state_bytes_ram"] == 10 * 2 * d * 4
    assert ram.summary["algorithm_state_bytes_disk"] == 0
    raw_off = copy.deepcopy(raw)
    raw_off["compression"] = {**raw_off.get("compression", {}), "state_offload": True}
    off = run(config_from_dict(raw_off), tmp_path / "off", plots=False)
    assert strip_wall(off.metrics) == strip_wall(ram.metrics)
    assert off.summary["algorithm_state_bytes_ram"] == 0
    assert off.summary["algorithm_state_bytes_disk"] >= 10 * 2 * d * 4  # safetensors adds headers
    # kill after round 6's checkpoint (round 7 half done), resume from the disk-held state
    m = tmp_path / "off" / "metrics.jsonl"
    m.write_text("".join(line + "\n" for line in m.read_text().splitlines()[:6]))
    (tmp_path / "off" / "summary.json").unlink()
    resumed = run(config_from_dict(raw_off), tmp_path / "off", resume=True, plots=False)
    assert strip_wall(resumed.metrics) == strip_wall(ram.metrics)
