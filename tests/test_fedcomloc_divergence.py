"""FedComLoc-Local whose local iterate blows up: the run stops as diverged (RunDiverged, metrics
kept, every update rejected), instead of crashing with the local codec's EncodeError on NaN/Inf."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from fedsqueeze.experiment import config_from_dict, run
from fedsqueeze.experiment.run import RunDiverged


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cfg(lr: float, local_codec: str = "uniform:8") -> Any:
    return config_from_dict(
        {
            "rounds": 3,
            "data": {
                "dataset": "synthetic",
                "partition": "natural",
                "num_clients": 4,
                "options": {"num_clients": 4, "alpha": 1.0, "beta": 1.0},
            },
            "model": {"name": "logreg"},
            "clients": {"per_round": 4, "batch_size": 16, "lr": lr},
            # p = 0.01: K ~ Geometric(0.01), so a round has many local steps to blow up in
            "algorithm": {
                "name": "fedcomloc",
                "options": {"variant": "local", "p": 0.01, "local_codec": local_codec},
            },
            "eval": {"every": 1},
        }
    )


@pytest.mark.parametrize("local_codec", ["uniform:8", "topk:50%"])
def test_local_variant_divergence_is_a_diverged_run(local_codec: str, tmp_path: Path) -> None:
    # a step size of 1e38 blows the iterate up within a few local steps: uniform refuses a range
    # beyond float32 (max - min overflows), Top-K refuses the inf/nan entries that follow
    with pytest.raises(RunDiverged, match="every client update was NaN/Inf"):
        run(_cfg(1e38, local_codec), tmp_path / "r", plots=False)
    recs = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["rejected_updates"] == 4
    assert recs[-1]["aggregated_clients"] == 0
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["status"] == "diverged"


def test_local_variant_finite_run_unchanged(tmp_path: Path) -> None:
    # the finiteness check does not change a healthy run: every local step is taken and counted
    res = run(_cfg(0.05), tmp_path / "ok", plots=False)
    assert res.status == "completed"
    for rec in res.metrics:
        assert rec["rejected_updates"] == 0
        assert rec["local_steps"] == 4 * rec["local_steps_per_client"]


def test_local_codec_that_cannot_code_the_received_model_is_an_error_not_divergence(
    tmp_path: Path,
) -> None:
    # a budget below the local codec's minimum fails on the (finite) received model itself, before
    # any local step: that is a configuration problem and must not be reported as "training diverged"
    from fedsqueeze.errors import EncodeError

    with pytest.raises(EncodeError, match="cannot hold"):
        run(_cfg(0.05, "budget:bytes=40 > uniform:4"), tmp_path / "b", plots=False)


def test_a_rejected_nan_client_recovers_next_round(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # client 0's update is NaN in round 1 only: it is rejected then, and from round 2 on it trains
    # from the received model with its old h_i (its NaN x̂_i is discarded, not folded into h_i)
    import fedsqueeze.sim.local as local

    real = local.train_clients
    calls = {"n": 0}

    def poisoned(*args: object, **kwargs: object) -> list:
        results = real(*args, **kwargs)  # type: ignore[arg-type]
        calls["n"] += 1
        if calls["n"] == 1:
            first = next(iter(results[0].delta))
            results[0].delta[first] = results[0].delta[first] * float("nan")
        return results

    monkeypatch.setattr(local, "train_clients", poisoned)
    raw = _cfg(0.05).to_dict()
    raw["algorithm"] = {"name": "scaffnew", "options": {"p": 0.3}}
    raw["rounds"] = 4
    res = run(config_from_dict(raw), tmp_path / "n", plots=False)
    assert res.status == "completed"
    assert [r["rejected_updates"] for r in res.metrics] == [1, 0, 0, 0]
    assert all(r["h_weighted_sum_norm"] == r["h_weighted_sum_norm"] for r in res.metrics)  # never NaN
