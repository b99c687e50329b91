"""FedComLoc-Com's control-variate reference ``h_ref`` (algorithms/scaffnew.py): with a lossy uplink
the default ``"local"`` update h_i += (p/γ)(x̄ − x̂_i) lets Σ w_i h_i drift by the mean compression
error, while ``"sent"`` (h_i += (p/γ)(x̄ − u_i), u_i decoded from the client's own payload) keeps
Σ w_i h_i = 0 up to float rounding; lossless uplinks make the two identical; bad values are
ConfigErrors."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from fedsqueeze.algorithms.scaffnew import FedComLoc, Scaffnew
from fedsqueeze.errors import ConfigError
from fedsqueeze.experiment import config_from_dict, run

BASE: dict[str, Any] = {
    "rounds": 12,
    "data": {
        "dataset": "synthetic",
        "partition": "natural",
        "num_clients": 6,
        "options": {"num_clients": 6, "alpha": 1.0, "beta": 1.0},
    },
    "model": {"name": "logreg"},
    "clients": {"per_round": 6, "batch_size": 32, "lr": 0.05},
    "eval": {"every": 12},
    "checkpoint": {"every": 0},
}


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def conf(algo: str = "fedcomloc", uplink: str = "topk:20%", **opts: Any) -> Any:
    raw = copy.deepcopy(BASE)
    raw["algorithm"] = {"name": algo, "options": {"p": 0.3, **opts}}
    raw["compression"] = {"uplink": uplink}
    return config_from_dict(raw)


def h_norms(res: Any) -> list[float]:
    return [float(m["h_weighted_sum_norm"]) for m in res.metrics]


@pytest.mark.parametrize(
    "uplink,compress",
    [("topk:20%", "model"), ("uniform:4", "model"), ("topk:20%", "delta"), ("qsgd:4", "delta")],
)
def test_sent_keeps_the_weighted_h_sum_at_zero_local_does_not(
    uplink: str, compress: str, tmp_path: Path
) -> None:
    local = run(conf(uplink=uplink, compress=compress), tmp_path / "local", plots=False)
    sent = run(conf(uplink=uplink, compress=compress, h_ref="sent"), tmp_path / "sent", plots=False)
    # h starts at 0 and is first updated at the start of round 2: its norm is 0 in round 1
    hl, hs = h_norms(local), h_norms(sent)
    assert hl[0] == hs[0] == 0.0
    # the same first round (same coin, same data): x̂_i differ only through h, which is still 0
    assert local.metrics[0]["uplink_bytes"] == sent.metrics[0]["uplink_bytes"]
    h_scale = max(hl)
    assert h_scale > 1e-2, hl  # "local": Σ w_i h_i drifts by (p/γ)(Σ w_i u_i − Σ w_i x̂_i)
    assert max(hs) < 1e-4 * max(1.0, h_scale), hs  # "sent": only float32 rounding
    assert sent.status == "completed"


def test_sent_with_a_lossless_uplink_equals_local(tmp_path: Path) -> None:
    # fp16 of a model is lossy only by rounding; fp32 is exact: u_i = x̂_i bit for bit
    a = run(conf("scaffnew", uplink="fp32"), tmp_path / "a", plots=False)
    b = run(conf("scaffnew", uplink="fp32", h_ref="sent"), tmp_path / "b", plots=False)
    strip = [{k: v for k, v in m.items() if k != "wall_time_s"} for m in a.metrics]
    assert strip == [{k: v for k, v in m.items() if k != "wall_time_s"} for m in b.metrics]
    assert max(h_norms(a)) < 1e-4


def test_sent_with_model_scope_uplink(tmp_path: Path) -> None:
    # one frame for the whole model (compression.uplink_scope = "model"): decoded the same way
    raw = conf(uplink="topk:20%", h_ref="sent").to_dict()
    raw["compression"]["uplink_scope"] = "model"
    res = run(config_from_dict(raw), tmp_path / "m", plots=False)
    assert max(h_norms(res)) < 1e-4


@pytest.mark.parametrize(
    "algo,opts,compression,msg",
    [
        ("fedcomloc", {"h_ref": "decoded"}, {"uplink": "topk:20%"}, r"algorithm\.options\.h_ref"),
        ("fedcomloc", {"href": "sent"}, {"uplink": "topk:20%"}, "did you mean 'algorithm.options.h_ref'"),
        ("scaffnew", {"h_ref": "sent"}, {"uplink": "topk:20%", "uplink_ef": "ef21"}, "ef21"),
    ],
)
def test_h_ref_config_errors(algo: str, opts: dict, compression: dict, msg: str) -> None:
    raw = copy.deepcopy(BASE)
    raw["algorithm"] = {"name": algo, "options": opts}
    raw["compression"] = compression
    with pytest.raises(ConfigError, match=msg):
        config_from_dict(raw)


def test_h_ref_defaults_to_local_and_accepts_sent() -> None:
    assert FedComLoc.validate(conf())["h_ref"] == "local"  # the default keeps existing results
    assert FedComLoc.validate(conf(h_ref="sent"))["h_ref"] == "sent"
    assert Scaffnew.validate(conf("scaffnew", uplink="fp32", h_ref="sent"))["h_ref"] == "sent"
