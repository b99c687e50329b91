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
