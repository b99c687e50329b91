"""``run(config) -> RunResult``: the federated round loop, its outputs, checkpoints and resume.

Per round t (1-based in the outputs):

1. sample clients with the configured sampler (``fedsqueeze.sim.sampling``; seed tree
   ``(seed, "sample", t)``); an importance sampler also rescales the weights (unbiased estimate);
2. downlink: the server's broadcast payload, charged per sampled client (see ``channel``);
3. local training from the model the clients decoded (``fedsqueeze.sim.local.train_clients``);
4. uplink: each client's model difference through the uplink codec (+ EF); a non-finite update is
   rejected (logged and counted), never aggregated;
5. aggregation and server step (``algorithms``), on what the server decoded from the bytes, or
   on the payload bytes themselves when the algorithm combines them (FetchSGD sums sketches);
6. network model: ``modelled_round_time_s`` = slowest client's download + compute + upload;
7. evaluation every ``eval.every`` rounds and on the last round; one line appended to
   ``metrics.jsonl`` (flushed), so a killed run loses nothing already written;
8. a checkpoint every ``checkpoint.every`` rounds (safetensors + JSON, written atomically).

A run is deterministic: the same config and seed give identical metrics (``wall_time_s`` aside, and
``modelled_time_s`` too when ``network.compute = "measured"``). ``resume=True`` restarts from the
last checkpoint and reaches the same final metrics as an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from fedsqueeze import __version__
from fedsqueeze.algorithms import AlgoContext, make_algorithm
from fedsqueeze.algorithms.aggregators import make_aggregator
from fedsqueeze.algorithms.attacks import make_attack
from fedsqueeze.algorithms.privacy import CentralDP, LocalDP, compute_epsilon
from fedsqueeze.channel import DownlinkChannel, ModelCodec, ParamLayout, UplinkChannel
from fedsqueeze.errors import ConfigError, FedSqueezeError
from fedsqueeze.experiment.config import RunConfig
from fedsqueeze.sim.sampling import make_sampler, weighted_sum
from fedsqueeze.sim.seeds import derive_seed, torch_rng

log = logging.getLogger("fedsqueeze.run")

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CONFIG = "config.json"
CKPT = "checkpoint"


class RunDiverged(FedSqueezeError):
    """The global model or its test loss became NaN/Inf; the run stopped, outputs kept."""


@dataclass
class RunResult:
    """What a run produced: its directory, per-round metrics and the summary."""

    out_dir: Path
    metrics: list[dict[str, Any]]
    summary: dict[str, Any]
    status: str = "completed"
    plots: list[Path] = field(default_factory=list)


_SLOW_ROUND_S = float(os.environ.get("FEDSQUEEZE_TEST_SLOW_ROUND_S", "0") or 0)

ProgressFn = Callable[[dict[str, Any]], None]


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, batch_size: int
) -> tuple[float, float]:
    """Test accuracy and mean cross-entropy of ``model`` with ``params`` (functional call)."""
    correct, loss_sum = 0, 0.0
    for s in range(0, len(y), batch_size):
        out = torch.func.functional_call(model, params, (x[s : s + batch_size],))
        yy = y[s : s + batch_size]
        loss_sum += float(torch.nn.functional.cross_entropy(out, yy, reduction="sum"))
        correct += int((out.argmax(dim=1) == yy).sum())
    n = max(1, len(y))
    return correct / n, loss_sum / n


class _Setup:
    """Everything built from the config before the first round (data, model, channels)."""

    def __init__(self, cfg: RunConfig, out_dir: Path) -> None:
        from fedsqueeze.data import load_dataset, partition
        from fedsqueeze.models import build_model
        from fedsqueeze.network import NetworkModel

        self.cfg = cfg
        d = cfg.data
        self.data = load_dataset(d.dataset, d.data_dir, download=d.download, **d.options)
        labels = self.data.train.y.numpy()
        self.parts = partition(
            labels,
            d.num_clients,
            d.partition,
            seed=derive_seed(cfg.seed, "partition"),
            alpha=d.alpha,
            shards_per_client=d.shards_per_client,
            natural=self.data.natural_clients,
            min_size=d.min_client_size,
        )
        self.client_data = [(self.data.train.x[p], self.data.train.y[p]) for p in self.parts]
        torch.manual_seed(derive_seed(cfg.seed, "init"))
        self.model = build_model(
            cfg.model.name, self.data.input_shape, self.data.num_classes, **cfg.model.options
        )
        self.model.eval()
        params = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        self.layout = ParamLayout.from_state(params)
        self.x0 = self.layout.flatten(params)
        c = cfg.compression
        offload = str(out_dir / "state") if c.state_offload else None
        self.uplink = UplinkChannel(
            c.uplink,
            self.layout,
            ef=c.uplink_ef,
            state_dtype=_dtype(c.state_dtype),
            offload_dir=offload,
            scope=c.uplink_scope,
        )
        self.downlink = DownlinkChannel(c.downlink, self.layout, mode=c.downlink_mode, ef=c.downlink_ef)
        # extra per-client payloads of an algorithm (SCAFFOLD's Δc_i): the uplink codec, no EF,
        # stateless (no PowerSGD warm start)
        self.extra_uplink = UplinkChannel(c.uplink, self.layout, warm_start=False, scope=c.uplink_scope)
        self.algo = make_algorithm(
            cfg,
            AlgoContext(
                layout=self.layout,
                num_clients=d.num_clients,
                clients_per_round=cfg.clients_per_round(),
                client_lr=cfg.clients.lr,
                seed=cfg.seed,
                state_dtype=_dtype(c.state_dtype),
                offload_dir=str(out_dir / "algo_state") if c.state_offload else None,
                model=self.model,
            ),
        )
        self.aggregator = make_aggregator(cfg.algorithm.aggregator, **cfg.algorithm.aggregator_options)
        self.attack = (
            make_attack(
                cfg.attack.name,
                cfg.attack.fraction,
                seed=derive_seed(cfg.seed, "attack"),
                **cfg.attack.options,
            )
            if cfg.attack.name != "none"
            else None
        )
        p = cfg.privacy
        self.local_dp = LocalDP(p.clip_norm, p.noise_multiplier) if p.mode == "local" else None
        self.central_dp = CentralDP(p.clip_norm, p.noise_multiplier) if p.mode == "central" else None
        self.participations: dict[int, int] = {}
        self.network = NetworkModel(cfg.network.profile, d.num_clients, derive_seed(cfg.seed, "network"))
        self.per_round = cfg.clients_per_round()
        # vectors an algorithm broadcasts with x (SCAFFOLD's c): the downlink codec, whole vector
        self.extra_downlink = ModelCodec(c.downlink, self.layout)
        sizes = [int(y.shape[0]) for _, y in self.client_data]
        self.sampler = make_sampler(
            cfg.clients.sampling,
            cfg.clients.sampling_options,
            num_clients=d.num_clients,
            per_round=self.per_round,
            seed=cfg.seed,
            sizes=sizes,
            weights=[self.algo.client_weight(i, n) for i, n in enumerate(sizes)],
        )
        incl = self.sampler.static_inclusion()
        if incl is None or cfg.network.deadline_s is not None:  # stragglers: not a fixed probability
            self.algo.bind_participation(None)
        else:
            drop = [self.network.link(c).drop_prob for c in range(d.num_clients)]
            self.algo.bind_participation([float(q) * (1.0 - p) for q, p in zip(incl, drop, strict=True)])
        # the unbiased (Horvitz-Thompson) reweighting applies to the plain weighted mean only;
        # robust aggregators get the plain weights (they ignore weights anyway)
        self.reweight = cfg.algorithm.aggregator == "mean" and self.central_dp is None


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def _save_checkpoint(out: Path, s: _Setup, x: torch.Tensor, round_idx: int, totals: dict[str, float]) -> None:
    tmp = out / (CKPT + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    tensors = {"global/x": x, **s.algo.state_dict(), **s.downlink.state_dict(), **s.aggregator.state_dict()}
    tensors.update(s.sampler.state_dict())
    for st in s.uplink.stores():  # per-client uplink state (EF, PowerSGD Q): RAM-held ones here
        if st.offload_dir is None:
            tensors.update(st.state_dict())
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "tensors.safetensors"))
    for st in s.uplink.stores():  # disk-held ones: their folder, copied
        if st.offload_dir is not None:
            shutil.copytree(st.offload_dir, tmp / "offload" / st.name)
    meta = {
        "round": round_idx,
        "totals": totals,
        "downlink": s.downlink.meta(),
        "participations": {str(k): v for k, v in s.participations.items()},
        "version": __version__,
    }
    (tmp / "meta.json").write_text(json.dumps(meta))
    final = out / CKPT
    old = out / (CKPT + ".old")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def _load_checkpoint(out: Path, s: _Setup) -> tuple[torch.Tensor, int, dict[str, float]]:
    ck = out / CKPT
    if not (ck / "meta.json").exists():
        raise ConfigError(f"--resume: no checkpoint in {out} (set checkpoint.every > 0 to write them)")
    meta = json.loads((ck / "meta.json").read_text())
    tensors = load_file(str(ck / "tensors.safetensors"))
    s.algo.load_state_dict(tensors)
    s.aggregator.load_state_dict(tensors)
    s.sampler.load_state_dict(tensors)
    s.downlink.load_state_dict(tensors, meta["downlink"])
    s.participations = {int(k): int(v) for k, v in meta.get("participations", {}).items()}
    for st in s.uplink.stores():
        if st.offload_dir is None:
            st.load_state_dict(tensors)
        else:
            src = ck / "offload" / st.name
            if not src.exists() and st is s.uplink.store:
                src = ck / "offload"  # checkpoints written before the per-store layout
            shutil.rmtree(st.offload_dir, ignore_errors=True)
            shutil.copytree(src, st.offload_dir)
    return tensors["global/x"], int(meta["round"]), {k: float(v) for k, v in meta["totals"].items()}


def _truncate_metrics(path: Path, last_round: int) -> list[dict[str, Any]]:
    """Keep the records of rounds <= last_round (drops a torn last line of a killed run)."""
    kept: list[dict[str, Any]] = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                break
            if rec.get("round", 0) <= last_round:
                kept.append(rec)
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return kept


def run(
    cfg: RunConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    progress: ProgressFn | None = None,
    plots: bool = True,
) -> RunResult:
    """Run (or resume) a federated experiment; write its outputs under ``out_dir``."""
    from fedsqueeze.sim.local import LocalTrainConfig, train_clients

    out = Path(out_dir)
    if resume:
        saved = out / CONFIG
        if not saved.exists():
            raise ConfigError(f"--resume: {saved} not found; is {out} a fedsqueeze run directory?")
        saved_cfg = json.loads(saved.read_text())["config"]
        if saved_cfg != cfg.to_dict():
            raise ConfigError(
                f"--resume: the config differs from the one saved in {saved}; resume with the same config"
            )
    else:
        if (out / METRICS).exists():
            raise ConfigError(
                f"{out} already holds a run; use --resume to continue it or choose another --out"
            )
        out.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(
            out / CONFIG,
            {
                "config": cfg.to_dict(),
                "fedsqueeze": __version__,
                "torch": torch.__version__,
                "numpy": np.__version__,
            },
        )
    s = _Setup(cfg, out)
    x = s.x0
    start = 0
    totals = {
        "cum_uplink_bytes": 0.0,
        "cum_downlink_bytes": 0.0,
        "modelled_time_s": 0.0,
        "wall_time_s": 0.0,
        "local_steps": 0.0,
        "rejected_updates": 0.0,
    }
    metrics: list[dict[str, Any]] = []
    if resume:
        x, start, totals = _load_checkpoint(out, s)
        metrics = _truncate_metrics(out / METRICS, start)
    local_cfg = LocalTrainConfig(
        epochs=cfg.clients.epochs,
        batch_size=cfg.clients.batch_size,
        lr=cfg.clients.lr,
        momentum=cfg.clients.momentum,
        weight_decay=cfg.clients.weight_decay,
        max_steps=cfg.clients.max_steps,
    )
    status = "completed"
    message = ""
    mfile = (out / METRICS).open("a")
    try:
        for t in range(start, cfg.rounds):
            t0 = time.perf_counter()
            rec = _one_round(cfg, s, t, x, local_cfg, train_clients)
            x = rec.pop("_x")
            totals["cum_uplink_bytes"] += rec["uplink_bytes"]
            totals["cum_downlink_bytes"] += rec["downlink_bytes"]
            totals["modelled_time_s"] += rec["modelled_round_time_s"]
            totals["local_steps"] += rec["local_steps"]
            totals["rejected_updates"] += rec["rejected_updates"]
            evaluate_now = (t + 1) % cfg.eval.every == 0 or t + 1 == cfg.rounds
            acc: float | None = None
            loss: float | None = None
            finite = bool(torch.isfinite(x).all())
            if evaluate_now or not finite:
                acc, loss = evaluate(
                    s.model, s.layout.unflatten(x), s.data.test.x, s.data.test.y, cfg.eval.batch_size
                )
            totals["wall_time_s"] += time.perf_counter() - t0
            rec.update(
                test_accuracy=acc,
                test_loss=loss,
                cum_uplink_bytes=int(totals["cum_uplink_bytes"]),
                cum_downlink_bytes=int(totals["cum_downlink_bytes"]),
                modelled_time_s=totals["modelled_time_s"],
                wall_time_s=totals["wall_time_s"],
                cum_local_steps=int(totals["local_steps"]),
            )
            rec = {"round": t + 1, **rec}
            mfile.write(json.dumps(rec) + "\n")
            mfile.flush()
            metrics.append(rec)
            if progress is not None:
                progress(rec)
            all_rejected = rec["rejected_updates"] > 0 and rec["aggregated_clients"] == 0
            if not finite or (loss is not None and not math.isfinite(loss)) or all_rejected:
                status = "diverged"
                what = (
                    "every client update was NaN/Inf (local training diverged)"
                    if all_rejected
                    else "the global model or its test loss is NaN/Inf"
                )
                message = (
                    f"round {t + 1}: {what}; the run stopped. Lower clients.lr or server.lr; "
                    "metrics up to this round are kept"
                )
                break
            if cfg.checkpoint.every and (t + 1) % cfg.checkpoint.every == 0:
                _save_checkpoint(out, s, x, t + 1, totals)
            if _SLOW_ROUND_S:  # test hook: lets the kill-and-resume test interrupt a run mid-way
                time.sleep(_SLOW_ROUND_S)
    finally:
        mfile.close()
    summary = _summary(cfg, metrics, status, message, s)
    _write_json_atomic(out / SUMMARY, summary)
    paths: list[Path] = []
    if plots and metrics:
        from fedsqueeze.reports import load_run, plot_run

        paths = plot_run(load_run(out), out)
    result = RunResult(out, metrics, summary, status, paths)
    if status == "diverged":
        raise RunDiverged(message)
    return result


def _one_round(
    cfg: RunConfig, s: _Setup, t: int, x: torch.Tensor, local_cfg: Any, train_clients: Any
) -> dict[str, Any]:
    seed = cfg.seed
    algo = s.algo
    plan = algo.plan_round(t, local_cfg)
    cohort = s.sampler.sample(t)
    clients = cohort.clients
    # importance sampling + plain mean: Horvitz-Thompson weights over a fixed denominator
    denominator = cohort.denominator if s.reweight else None
    bc = s.downlink.broadcast(x, t, rng=torch_rng(seed, "down", t))
    down_bytes = [s.downlink.charge(c, t, bc.nbytes) for c in clients]
    bx = algo.broadcast_extras(t)
    if bx:  # algorithm vectors sent with x: encoded once, charged to every sampled client
        bx_payloads = {
            name: s.extra_downlink.encode(vec, rng=torch_rng(seed, "down-extra", name, t))
            for name, vec in bx.items()
        }
        bx_nbytes = sum(len(p) for p in bx_payloads.values())
        down_bytes = [b + bx_nbytes for b in down_bytes]
        algo.receive_broadcast_extras(t, {n: s.extra_downlink.decode(p) for n, p in bx_payloads.items()})
    dropped = [c for c in clients if s.network.dropped(c, t)]
    active = [c for c in clients if c not in dropped]
    flat_starts = [algo.client_start(c, t, bc.decoded) for c in active]
    shared = all(v is bc.decoded for v in flat_starts)
    start: Any = s.layout.unflatten(bc.decoded) if shared else [s.layout.unflatten(v) for v in flat_starts]
    datasets = [_client_data(s, c) for c in active]
    train_seeds = [derive_seed(seed, "train", t, c) for c in active]
    t_train = time.perf_counter()
    results: list[Any] = []
    if active:
        custom = algo.local_train(t, active, flat_starts, datasets, plan.local, train_seeds)
        results = (
            custom
            if custom is not None
            else train_clients(
                s.model,
                start,
                datasets,
                plan.local,
                train_seeds,
                engine=cfg.clients.engine,
                grad_hook=algo.grad_hook(active, flat_starts),
            )
        )
    train_s = time.perf_counter() - t_train
    up_bytes: dict[int, int] = {}
    decoded: dict[int, torch.Tensor] = {}
    payloads: dict[int, bytes] = {}
    extras: dict[int, dict[str, torch.Tensor]] = {}
    weights: dict[int, float] = {}
    rejected: list[int] = []
    steps: dict[int, int] = {}
    losses = []
    msgs = [
        algo.client_message(c, t, st, s.layout.flatten(r.delta), r.steps)
        for c, st, r in zip(active, flat_starts, results, strict=True)
    ]
    deltas = [m.update for m in msgs]
    if s.attack is not None and not s.attack.poisons_data and deltas:
        # Byzantine clients replace their raw update; it still goes through EF and the codec,
        # so what they send is a real, measured payload.
        deltas = s.attack(deltas, active, num_clients=cfg.data.num_clients, round=t)
    for c, r, delta, msg in zip(active, results, deltas, msgs, strict=True):
        steps[c] = r.steps
        if not bool(torch.isfinite(delta).all()) or not all(
            bool(torch.isfinite(v).all()) for v in msg.extras.values()
        ):
            rejected.append(c)  # a NaN/Inf update is excluded, never encoded or aggregated
            log.warning("round %d: client %d sent a non-finite (NaN/Inf) update; rejected", t + 1, c)
            continue
        if s.local_dp is not None:  # clip + noise on the client, before EF and encoding
            delta = s.local_dp.privatize(delta, generator=torch_rng(seed, "local-dp", t, c))
        s.participations[c] = s.participations.get(c, 0) + 1
        if algo.decodes_uplink:
            dl = s.uplink.send(c, delta, rng=torch_rng(seed, "up", t, c))
            payloads[c], decoded[c] = dl.payload, dl.decoded
        else:  # the algorithm combines the payload bytes itself (Algorithm.aggregate_payloads)
            payloads[c] = s.uplink.encode(c, delta, rng=torch_rng(seed, "up", t, c))
        up_bytes[c] = len(payloads[c])
        extras[c] = {}
        for name, vec in msg.extras.items():  # each extra vector is one more measured payload
            xdl = s.extra_uplink.send(c, vec, rng=torch_rng(seed, "up-extra", name, t, c))
            up_bytes[c] += xdl.nbytes
            extras[c][name] = xdl.decoded
        factor = 1.0 if denominator is None else cohort.factor(c)  # 1/(N q_c)-style HT factor
        weights[c] = algo.client_weight(c, r.num_samples) * factor
        losses.append(r.train_loss)
    if cfg.network.compute == "measured":
        compute = {c: train_s / max(1, len(active)) for c in active}
    else:
        compute = {c: steps.get(c, 0) * cfg.network.compute_s_per_step for c in active}
    senders = list(up_bytes)
    timing = s.network.round_time(
        t,
        senders,
        [down_bytes[clients.index(c)] for c in senders],
        [up_bytes[c] for c in senders],
        [compute[c] for c in senders],
        deadline_s=cfg.network.deadline_s,
    )
    accepted = [c for c in senders if c not in set(timing.stragglers)]
    if s.sampler.observes_norms:  # what the server learned about each aggregated client
        for c in accepted:
            if c in decoded:
                s.sampler.observe(c, float(decoded[c].norm()))
    skipped = ""
    if accepted:
        agg = algo.aggregate_payloads(
            {c: payloads[c] for c in accepted}, {c: weights[c] for c in accepted}, denominator=denominator
        )
        if agg is None and not algo.decodes_uplink:
            raise FedSqueezeError(f"{algo.name}: decodes_uplink is False but aggregate_payloads gave None")
        ups = [decoded[c] for c in accepted] if agg is None else []
        f = cfg.algorithm.num_byzantine
        if agg is not None:
            pass  # the algorithm aggregated the payload bytes (e.g. FetchSGD's summed sketches)
        elif s.central_dp is not None:
            agg = s.central_dp.aggregate(
                ups, generator=torch_rng(seed, "central-dp", t), denominator=s.per_round
            )
        elif s.aggregator.tolerates(len(ups), f):
            ws = [weights[c] for c in accepted]
            if denominator is not None:  # unbiased estimate of the full-participation mean
                agg = weighted_sum(ups, ws, denominator)
            else:
                agg = s.aggregator(ups, ws, num_byzantine=f)
        else:  # drops/stragglers left too few updates for the rule's guarantee: keep the model
            agg = None
            skipped = f"{s.aggregator.name} cannot tolerate f={f} among n={len(ups)} updates"
        if agg is not None:
            x_new = algo.server_update(
                x, agg, accepted=accepted, extras={c: extras[c] for c in accepted}, t=t
            )
            observe = getattr(s.aggregator, "observe_step", None)
            if observe is not None:
                observe(float((x_new - x).norm()))
            x = x_new
    return {
        "_x": x,
        "clients": clients,
        "uplink_bytes": int(sum(up_bytes.values())),
        "downlink_bytes": int(sum(down_bytes)),
        "uplink_bytes_per_client": [up_bytes.get(c, 0) for c in clients],
        "downlink_bytes_per_client": down_bytes,
        "modelled_round_time_s": timing.modelled_time_s,
        "train_loss": float(np.mean(losses)) if losses else None,
        "local_steps": int(sum(steps.values())),
        "rejected_updates": len(rejected),
        "rejected_clients": rejected,
        "dropped_clients": dropped,
        "stragglers": list(timing.stragglers),
        "aggregated_clients": len(accepted) if not skipped else 0,
        "skipped_aggregation": skipped or None,
        **(
            {"inclusion_probs": [cohort.inclusion[c] for c in clients]}
            if cohort.inclusion is not None
            else {}
        ),
        **algo.round_metrics(),
    }


def _client_data(s: _Setup, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Client ``c``'s training data; a label-flipping Byzantine client trains on poisoned labels."""
    x, y = s.client_data[c]
    if (
        s.attack is not None
        and s.attack.poisons_data
        and c in s.attack.byzantine_clients(s.cfg.data.num_clients)  # honest clients keep their labels
    ):
        y = s.attack.poison_labels(y, s.data.num_classes, c)
    return x, y


def privacy_spent(cfg: RunConfig, s: _Setup, rounds: int) -> dict[str, Any] | None:
    """ε so far (Opacus RDP): central -> per run; local -> worst client over its participations."""
    p = cfg.privacy
    if p.mode == "none" or rounds == 0 or p.noise_multiplier == 0:
        return None if p.mode == "none" else {"epsilon": float("inf"), "delta": p.delta, "mode": p.mode}
    if p.mode == "central":
        spent = compute_epsilon(
            noise_multiplier=p.noise_multiplier,
            sample_rate=s.per_round / cfg.data.num_clients,
            steps=rounds,
            delta=p.delta,
        )
    else:
        assert s.local_dp is not None
        most = max(s.participations.values(), default=0)
        if most == 0:
            return {"epsilon": 0.0, "delta": p.delta, "mode": p.mode}
        spent = s.local_dp.epsilon(most, p.delta)
    return {"epsilon": spent.epsilon, "delta": p.delta, "mode": p.mode, "accountant": spent.accountant}


def _summary(
    cfg: RunConfig, metrics: list[dict[str, Any]], status: str, message: str, s: _Setup
) -> dict[str, Any]:
    evals = [m for m in metrics if m.get("test_accuracy") is not None]
    last = metrics[-1] if metrics else {}
    return {
        "name": cfg.name,
        "status": status,
        "message": message,
        "rounds_completed": len(metrics),
        "final_test_accuracy": evals[-1]["test_accuracy"] if evals else None,
        "best_test_accuracy": max((m["test_accuracy"] for m in evals), default=None),
        "final_test_loss": evals[-1]["test_loss"] if evals else None,
        "total_uplink_bytes": last.get("cum_uplink_bytes", 0),
        "total_downlink_bytes": last.get("cum_downlink_bytes", 0),
        "modelled_time_s": last.get("modelled_time_s", 0.0),
        "wall_time_s": last.get("wall_time_s", 0.0),
        "local_steps": last.get("cum_local_steps", 0),
        "rejected_updates": int(sum(m.get("rejected_updates", 0) for m in metrics)),
        "model_params": s.layout.numel,
        "dense_update_bytes": s.layout.numel * 4,
        "num_clients": cfg.data.num_clients,
        "clients_per_round": s.per_round,
        "uplink": cfg.compression.uplink,
        "uplink_ef": cfg.compression.uplink_ef,
        "downlink": cfg.compression.downlink,
        "privacy": privacy_spent(cfg, s, len(metrics)),
        "aggregator": cfg.algorithm.aggregator,
        "attack": None
        if cfg.attack.name == "none"
        else {"name": cfg.attack.name, "fraction": cfg.attack.fraction},
        # per-client uplink state: EF residuals/estimates and PowerSGD warm-start Qs (all stores)
        "uplink_state_bytes_ram": s.uplink.nbytes_ram,
        "uplink_state_bytes_disk": s.uplink.nbytes_disk,
        "uplink_state_bytes_by_store": {
            st.name: {"ram": st.nbytes_ram, "disk": st.nbytes_disk} for st in s.uplink.stores()
        },
        # per-client algorithm state (control variates, EF21 estimates...): measured, not estimated
        "algorithm_state_bytes_ram": sum(st.nbytes_ram for st in s.algo.stores()),
        "algorithm_state_bytes_disk": sum(st.nbytes_disk for st in s.algo.stores()),
    }
