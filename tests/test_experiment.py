"""The round loop end to end on the built-in digits data: bytes, determinism, resume, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fedsqueeze
from fedsqueeze.channel import DownlinkChannel, ParamLayout, UplinkChannel
from fedsqueeze.errors import ConfigError
from fedsqueeze.experiment import RunDiverged, config_from_dict, load_config, run
from fedsqueeze.experiment.config import apply_overrides

TINY = {
    "name": "tiny",
    "rounds": 4,
    "data": {"dataset": "digits", "partition": "dirichlet", "alpha": 0.5, "num_clients": 8},
    "model": {"name": "mlp", "options": {"hidden": [32]}},
    "clients": {"per_round": 3, "batch_size": 16, "lr": 0.1, "engine": "sequential"},
    "network": {"profile": "3g"},
}


def cfg(**over: object) -> fedsqueeze.experiment.RunConfig:
    return config_from_dict(apply_overrides(TINY, {k.replace("__", "."): v for k, v in over.items()}))


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]


def strip_wall(recs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "wall_time_s"} for r in recs]


def test_run_writes_outputs_and_counts_real_bytes(tmp_path: Path) -> None:
    res = run(cfg(compression__uplink="topk:10% > uniform:4", compression__uplink_ef="ef14"), tmp_path / "r")
    out = tmp_path / "r"
    for f in (
        "config.json",
        "metrics.jsonl",
        "summary.json",
        "accuracy_vs_round.png",
        "accuracy_vs_uplink_mb.png",
        "accuracy_vs_modelled_time.png",
    ):
        assert (out / f).exists(), f
    recs = lines(out)
    assert len(recs) == 4 and [r["round"] for r in recs] == [1, 2, 3, 4]
    keys = {
        "round",
        "test_accuracy",
        "test_loss",
        "uplink_bytes",
        "downlink_bytes",
        "cum_uplink_bytes",
        "cum_downlink_bytes",
        "modelled_time_s",
        "wall_time_s",
    }
    assert keys <= set(recs[0])
    # uplink bytes are the sum of per-client payload lengths, cumulated exactly
    assert all(r["uplink_bytes"] == sum(r["uplink_bytes_per_client"]) for r in recs)
    assert recs[-1]["cum_uplink_bytes"] == sum(r["uplink_bytes"] for r in recs)
    # and equal to real payloads: re-encode one client's update size bound: far below dense fp32
    dense = res.summary["dense_update_bytes"]
    assert 0 < recs[0]["uplink_bytes_per_client"][0] < dense / 10
    assert res.summary["final_test_accuracy"] is not None


def test_uplink_bytes_equal_len_of_the_payload() -> None:
    layout = ParamLayout.from_state({"w": torch.zeros(10, 5), "b": torch.zeros(5)})
    ch = UplinkChannel("uniform:4", layout)
    delta = torch.randn(55)
    d = ch.send(0, delta)
    assert (
        d.nbytes
        == len(d.payload)
        == len(fedsqueeze.encode_state_dict(layout.unflatten(delta), fedsqueeze.parse_spec("uniform:4")))
    )


def test_same_seed_same_metrics_and_different_seed_differs(tmp_path: Path) -> None:
    c = cfg(compression__uplink="uniform:4,stochastic=true")
    run(c, tmp_path / "a")
    run(c, tmp_path / "b")
    assert strip_wall(lines(tmp_path / "a")) == strip_wall(lines(tmp_path / "b"))
    run(cfg(seed=1, compression__uplink="uniform:4,stochastic=true"), tmp_path / "c")
    assert strip_wall(lines(tmp_path / "a")) != strip_wall(lines(tmp_path / "c"))


def test_ef_helps_top1pct(tmp_path: Path) -> None:
    base = {"rounds": 15, "compression.uplink": "topk:1%"}
    no_ef = run(config_from_dict(apply_overrides(TINY, base)), tmp_path / "n", plots=False)
    ef = run(
        config_from_dict(apply_overrides(TINY, {**base, "compression.uplink_ef": "ef14"})),
        tmp_path / "e",
        plots=False,
    )
    assert ef.summary["final_test_accuracy"] > no_ef.summary["final_test_accuracy"]


def test_downlink_delta_charges_catch_up_and_first_contact() -> None:
    layout = ParamLayout.from_state({"w": torch.zeros(100)})
    ch = DownlinkChannel("topk:10%", layout, mode="delta")
    x = torch.randn(100)
    b0 = ch.broadcast(x, 0)
    # first contact at round 0 costs the first broadcast, but never more than a lossless fetch
    assert ch.charge(5, 0, b0.nbytes) == min(b0.nbytes, ch.full_fetch_nbytes)
    b1 = ch.broadcast(x * 1.1, 1)
    b2 = ch.broadcast(x * 1.2, 2)
    assert ch.charge(5, 2, b2.nbytes) == min(b1.nbytes + b2.nbytes, ch.full_fetch_nbytes)
    assert ch.charge(5, 2, b2.nbytes) == 0  # already synced this round
    ch.broadcast(x, 3)
    assert ch.charge(7, 3, 0) == min(sum(ch.history), ch.full_fetch_nbytes)


def test_kill_and_resume_gives_identical_final_metrics(tmp_path: Path) -> None:
    raw = apply_overrides(
        TINY,
        {
            "rounds": 12,
            "checkpoint.every": 3,
            "compression.uplink": "topk:10%",
            "compression.uplink_ef": "ef14",
            "server.momentum": 0.5,
        },
    )
    conf = tmp_path / "c.toml"
    conf.write_text(_toml(raw))
    full = run(config_from_dict(raw), tmp_path / "full", plots=False)
    out = tmp_path / "killed"
    env = {**os.environ, "FEDSQUEEZE_TEST_SLOW_ROUND_S": "0.3"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedsqueeze", "run", str(conf), "--out", str(out), "--quiet"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        if (out / "checkpoint" / "meta.json").exists() and len(lines(out)) >= 7:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(lines(out))
    assert 3 <= done < 12, f"kill came at {done} rounds"
    resumed = run(config_from_dict(raw), out, resume=True, plots=False)
    assert strip_wall(resumed.metrics) == strip_wall(full.metrics)
    assert strip_wall(lines(out)) == strip_wall(lines(tmp_path / "full"))


def _toml(raw: dict, prefix: str = "") -> str:
    top = [f"{k} = {json.dumps(v)}" for k, v in raw.items() if not isinstance(v, dict)]
    tables = []
    for k, v in raw.items():
        if isinstance(v, dict):
            inner = ", ".join(
                f"{kk} = {json.dumps(vv) if not isinstance(vv, dict) else _inline(vv)}"
                for kk, vv in v.items()
            )
            tables.append(f"{k} = {{ {inner} }}")
    return "\n".join(top + tables) + "\n"


def _inline(d: dict) -> str:
    return "{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in d.items()) + " }"


def test_resume_refuses_a_changed_config_and_a_missing_checkpoint(tmp_path: Path) -> None:
    run(cfg(), tmp_path / "r", plots=False)
    with pytest.raises(ConfigError, match="differs"):
        run(cfg(rounds=5), tmp_path / "r", resume=True)
    with pytest.raises(ConfigError, match="no checkpoint"):
        run(cfg(), tmp_path / "r", resume=True)
    with pytest.raises(ConfigError, match="already holds a run"):
        run(cfg(), tmp_path / "r")


def test_diverging_run_stops_with_a_clear_message_and_keeps_metrics(tmp_path: Path) -> None:
    with pytest.raises(RunDiverged, match="NaN"):
        run(cfg(clients__lr=1e6, server__lr=1e6, rounds=6), tmp_path / "d", plots=False)
    recs = lines(tmp_path / "d")
    assert recs, "metrics written before the divergence are kept"
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert summary["status"] == "diverged"


@pytest.mark.parametrize(
    "over,msg",
    [
        ({"clients.per_round": 20}, "cannot sample more clients per round than exist"),
        ({"clients.lrr": 0.1}, "did you mean 'clients.lr'"),
        ({"compression.uplink": "topk:200%"}, "ratio must be in"),
        ({"compression.uplink_ef": "ef99"}, "compression.uplink_ef"),
        ({"clients.lr": -1}, "clients.lr"),
        ({"rounds": 0}, "rounds"),
        ({"data.alpha": 0}, "data.alpha"),
    ],
)
def test_bad_configs_name_the_key(over: dict, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg.replace("(", r"\(")):
        config_from_dict(apply_overrides(TINY, over))


def test_unknown_key_in_a_file_suggests_the_nearest(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text("rounds = 3\n[clients]\nbatchsize = 3\n")
    with pytest.raises(ConfigError, match=r"did you mean 'clients\.batch_size'"):
        load_config(p)
    p.write_text("[cleints]\nlr = 3\n")
    with pytest.raises(ConfigError, match="did you mean 'clients'"):
        load_config(p)


def test_missing_data_files_are_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="mnist"):
        run(cfg(data__dataset="mnist", data__data_dir=str(tmp_path / "nothing")), tmp_path / "x")


def test_yaml_config_is_accepted(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text(
        "name: y\nrounds: 2\nclients:\n  lr: 0.2\n  per_round: 3\n"
        "compression:\n  uplink: 'topk:1% > uniform:4'\n"
    )
    c = load_config(p)
    assert c.rounds == 2 and c.clients.lr == 0.2 and c.compression.uplink == "topk:1% > uniform:4"
    p.write_text("clients:\n  lr: [oops\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(p)


def test_attack_hurts_mean_and_median_resists(tmp_path: Path) -> None:
    base = {
        "rounds": 8,
        "data.num_clients": 10,
        "clients.per_round": 10,
        "attack.name": "sign_flip",
        "attack.fraction": 0.2,
        "attack.options": {"scale": 4.0},
    }
    mean = run(config_from_dict(apply_overrides(TINY, base)), tmp_path / "m", plots=False)
    med = run(
        config_from_dict(
            apply_overrides(TINY, {**base, "algorithm.aggregator": "median", "algorithm.num_byzantine": 2})
        ),
        tmp_path / "d",
        plots=False,
    )
    honest = run(
        config_from_dict(
            apply_overrides(TINY, {k: v for k, v in base.items() if not k.startswith("attack")})
        ),
        tmp_path / "h",
        plots=False,
    )
    acc = {
        k: r.summary["final_test_accuracy"] for k, r in (("mean", mean), ("median", med), ("honest", honest))
    }
    assert acc["median"] > acc["mean"] + 0.1, acc
    assert acc["honest"] > 0.5, acc


def test_aggregator_tolerance_is_checked_at_config_time() -> None:
    with pytest.raises(ConfigError, match="cannot tolerate"):
        cfg(algorithm__aggregator="krum", algorithm__num_byzantine=1)  # 3 per round: krum needs n > 2f+2
    with pytest.raises(ConfigError, match=r"trim|beta"):
        cfg(algorithm__aggregator="trimmed_mean", algorithm__aggregator_options={"beta": 0.5})
    with pytest.raises(ConfigError, match="central"):
        cfg(privacy__mode="central", algorithm__aggregator="median")


def test_nan_update_from_one_client_is_rejected_and_the_run_continues(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import fedsqueeze.sim.local as local

    real = local.train_clients

    def poisoned(*args: object, **kwargs: object) -> list:
        results = real(*args, **kwargs)  # type: ignore[arg-type]
        first = next(iter(results[0].delta))
        results[0].delta[first] = results[0].delta[first] * float("nan")  # one client diverges
        return results

    monkeypatch.setattr(local, "train_clients", poisoned)
    res = run(cfg(), tmp_path / "n", plots=False)
    assert res.status == "completed"
    assert res.summary["rejected_updates"] == 4  # one per round, logged and counted
    warned = [r for r in caplog.records if r.name == "fedsqueeze.run" and "non-finite" in r.getMessage()]
    assert len(warned) == 4
    assert all(r["rejected_updates"] == 1 and r["aggregated_clients"] == 2 for r in res.metrics)
    assert all(
        r["test_accuracy"] is not None and r["test_accuracy"] == r["test_accuracy"] for r in res.metrics
    )


def test_central_dp_reports_epsilon(tmp_path: Path) -> None:
    res = run(
        cfg(privacy__mode="central", privacy__noise_multiplier=1.0, privacy__clip_norm=1.0),
        tmp_path / "p",
        plots=False,
    )
    eps = res.summary["privacy"]["epsilon"]
    assert 0 < eps < 100
    more = run(
        cfg(privacy__mode="central", privacy__noise_multiplier=4.0, privacy__clip_norm=1.0),
        tmp_path / "q",
        plots=False,
    )
    assert more.summary["privacy"]["epsilon"] < eps
