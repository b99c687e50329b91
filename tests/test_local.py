"""Local training engines: agreement, determinism, SGD semantics, hooks, uneven clients, errors."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from fedsqueeze.errors import ConfigError
from fedsqueeze.models import build_model
from fedsqueeze.sim import LocalResult, LocalTrainConfig, choose_engine, client_batches, train_clients

ENGINES = ("sequential", "vmap")
SIZES = [50, 7, 33, 32, 64]  # a client smaller than the batch, one exactly a batch, partial last batches


def _setup(
    name: str = "mlp",
    shape: tuple[int, ...] = (1, 8, 8),
    sizes: list[int] = SIZES,
    seed: int = 0,
    **opts: object,
) -> tuple[nn.Module, dict[str, torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(seed)
    model = build_model(name, shape, 10, **opts)
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    gen = torch.Generator().manual_seed(seed + 1)
    data = [(torch.randn(n, *shape, generator=gen), torch.randint(0, 10, (n,), generator=gen)) for n in sizes]
    return model, start, data


def _assert_same(a: list[LocalResult], b: list[LocalResult], rtol: float = 1e-4) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b, strict=True):
        assert (ra.steps, ra.num_samples) == (rb.steps, rb.num_samples)
        assert list(ra.delta) == list(rb.delta)
        for k in ra.delta:
            scale = float(ra.delta[k].abs().max())
            torch.testing.assert_close(ra.delta[k], rb.delta[k], rtol=rtol, atol=rtol * scale + 1e-9)
        if math.isnan(ra.train_loss):
            assert math.isnan(rb.train_loss)
        else:
            assert ra.train_loss == pytest.approx(rb.train_loss, rel=1e-4)


def _bitwise(a: list[LocalResult], b: list[LocalResult]) -> bool:
    return all(
        torch.equal(ra.delta[k], rb.delta[k]) and ra.train_loss == rb.train_loss
        for ra, rb in zip(a, b, strict=True)
        for k in ra.delta
    )


CFGS = [
    LocalTrainConfig(epochs=2, batch_size=16, lr=0.05),
    LocalTrainConfig(epochs=2, batch_size=16, lr=0.05, momentum=0.9, weight_decay=1e-3),
    LocalTrainConfig(epochs=3, batch_size=16, lr=0.05, max_steps=5),
]


@pytest.mark.parametrize("cfg", CFGS)
@pytest.mark.parametrize("name", ["logreg", "mlp"])
def test_engines_agree_fast_path(name: str, cfg: LocalTrainConfig) -> None:
    model, start, data = _setup(name)
    seeds = [11, 12, 13, 14, 15]
    _assert_same(
        train_clients(model, start, data, cfg, seeds, engine="sequential"),
        train_clients(model, start, data, cfg, seeds, engine="vmap"),
    )


def test_engines_agree_generic_vmap_path() -> None:
    model, start, data = _setup("cifar_cnn", (1, 20, 20), sizes=[9, 20, 3])
    cfg = LocalTrainConfig(epochs=1, batch_size=8, lr=0.05, momentum=0.5)
    _assert_same(
        train_clients(model, start, data, cfg, [1, 2, 3], engine="sequential"),
        train_clients(model, start, data, cfg, [1, 2, 3], engine="vmap"),
    )


def test_engines_agree_lstm() -> None:
    torch.manual_seed(0)
    model = build_model("lstm", (6,), 12, hidden_size=8, embed_dim=4)
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    data = [(torch.randint(0, 12, (n, 6)), torch.randint(0, 12, (n,))) for n in (5, 9)]
    cfg = LocalTrainConfig(batch_size=4, lr=0.1)
    seq = train_clients(model, start, data, cfg, [0, 1], engine="sequential")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # functorch: no batching rule for the LSTM kernel (slow fallback)
        vm = train_clients(model, start, data, cfg, [0, 1], engine="vmap")
    _assert_same(seq, vm)


def test_per_client_start_dicts() -> None:
    model, start, data = _setup("mlp", sizes=[20, 12, 5])
    starts = [{k: v + 0.01 * i for k, v in start.items()} for i in range(3)]
    cfg = LocalTrainConfig(batch_size=8, lr=0.1)
    seq = train_clients(model, starts, data, cfg, [0, 1, 2], engine="sequential")
    _assert_same(seq, train_clients(model, starts, data, cfg, [0, 1, 2], engine="vmap"))
    alone = train_clients(model, starts[1], data[1:2], cfg, [1], engine="sequential")
    _assert_same(seq[1:2], alone)


@pytest.mark.parametrize("engine", ENGINES)
def test_deterministic_bitwise(engine: str) -> None:
    model, start, data = _setup("mlp")
    cfg = CFGS[1]
    a = train_clients(model, start, data, cfg, [5, 6, 7, 8, 9], engine=engine)
    b = train_clients(model, start, data, cfg, [5, 6, 7, 8, 9], engine=engine)
    assert _bitwise(a, b)
    c = train_clients(model, start, data, cfg, [5, 6, 7, 8, 10], engine=engine)
    assert _bitwise(a[:4], c[:4])  # a client's seed affects only that client
    assert not torch.equal(a[4].delta["1.weight"], c[4].delta["1.weight"])


@pytest.mark.parametrize("engine", ENGINES)
def test_independent_of_client_order(engine: str) -> None:
    model, start, data = _setup("mlp")
    seeds = [1, 2, 3, 4, 5]
    fwd = train_clients(model, start, data, CFGS[0], seeds, engine=engine)
    rev = train_clients(model, start, data[::-1], CFGS[0], seeds[::-1], engine=engine)
    _assert_same(fwd, rev[::-1], rtol=1e-5)


@pytest.mark.parametrize("engine", ENGINES)
def test_one_step_is_one_sgd_step_on_the_batch_mean(engine: str) -> None:
    """max_steps=1: delta == -lr * grad of the mean CE over the first batch (partial batch included)."""
    model, start, data = _setup("mlp", sizes=[7, 40])
    cfg = LocalTrainConfig(batch_size=16, lr=0.3, max_steps=1)
    res = train_clients(model, start, data, cfg, [3, 4], engine=engine)
    for (x, y), seed, r in zip(data, [3, 4], res, strict=True):
        idx = client_batches(x.shape[0], cfg, seed)[0]
        assert idx.numel() == min(16, x.shape[0])
        params = {k: v.clone().requires_grad_() for k, v in start.items()}
        loss = F.cross_entropy(torch.func.functional_call(model, params, (x[idx],)), y[idx])
        grads = torch.autograd.grad(loss, list(params.values()))
        assert r.steps == 1
        assert r.train_loss == pytest.approx(float(loss.detach()), rel=1e-5)
        for k, g in zip(params, grads, strict=True):
            torch.testing.assert_close(r.delta[k], -cfg.lr * g, rtol=1e-4, atol=1e-7)


def test_sequential_matches_torch_optim_sgd() -> None:
    model, start, data = _setup("mlp", sizes=[37])
    cfg = LocalTrainConfig(epochs=2, batch_size=8, lr=0.05, momentum=0.9, weight_decay=0.01)
    (res,) = train_clients(model, start, data, cfg, [42], engine="sequential")
    ref = build_model("mlp", (1, 8, 8), 10)
    ref.load_state_dict(start)
    opt = torch.optim.SGD(ref.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    x, y = data[0]
    for idx in client_batches(37, cfg, 42):
        opt.zero_grad()
        F.cross_entropy(ref(x[idx]), y[idx]).backward()
        opt.step()
    for k, p in ref.named_parameters():
        torch.testing.assert_close(res.delta[k], p.detach() - start[k], rtol=1e-5, atol=1e-7)


def test_client_batches_schedule() -> None:
    cfg = LocalTrainConfig(epochs=2, batch_size=4)
    batches = client_batches(10, cfg, 0)
    assert [b.numel() for b in batches] == [4, 4, 2, 4, 4, 2]
    assert sorted(torch.cat(batches[:3]).tolist()) == list(range(10))
    assert sorted(torch.cat(batches[3:]).tolist()) == list(range(10))
    assert not torch.equal(torch.cat(batches[:3]), torch.cat(batches[3:]))  # reshuffled per epoch
    assert [
        b.numel() for b in client_batches(10, LocalTrainConfig(epochs=2, batch_size=4, max_steps=4), 0)
    ] == [
        4,
        4,
        2,
        4,
    ]
    assert client_batches(0, cfg, 0) == []


@pytest.mark.parametrize("engine", ENGINES)
def test_uneven_clients_steps_and_empty_client(engine: str) -> None:
    model, start, data = _setup("mlp", sizes=[50, 7, 0, 33])
    cfg = LocalTrainConfig(epochs=2, batch_size=16, lr=0.05)
    res = train_clients(model, start, data, cfg, [0, 1, 2, 3], engine=engine)
    assert [r.steps for r in res] == [8, 2, 0, 6]
    assert [r.num_samples for r in res] == [50, 7, 0, 33]
    assert all(float(d.abs().sum()) == 0.0 for d in res[2].delta.values())
    assert math.isnan(res[2].train_loss)
    assert all(float(d.abs().sum()) > 0.0 for r in (res[0], res[1], res[3]) for d in r.delta.values())
    assert all(d.dtype == torch.float32 for r in res for d in r.delta.values())


@pytest.mark.parametrize("engine", ENGINES)
def test_max_steps_caps_every_client(engine: str) -> None:
    model, start, data = _setup("mlp", sizes=[50, 7, 33])
    res = train_clients(
        model, start, data, LocalTrainConfig(epochs=3, batch_size=16, max_steps=4), [0, 1, 2], engine=engine
    )
    assert [r.steps for r in res] == [4, 3, 4]
    zero = train_clients(model, start, data, LocalTrainConfig(max_steps=0), [0, 1, 2], engine=engine)
    assert all(r.steps == 0 and float(d.abs().sum()) == 0 for r in zero for d in r.delta.values())


@pytest.mark.parametrize("engine", ENGINES)
def test_convex_problem_loss_decreases(engine: str) -> None:
    torch.manual_seed(0)
    model = build_model("logreg", (2,), 2)
    start = {k: torch.zeros_like(v) for k, v in model.named_parameters()}
    data = []
    for _ in range(3):
        x = torch.randn(40, 2)
        data.append((x, (x[:, 0] + 0.5 * x[:, 1] > 0).long()))  # linearly separable
    cfg = LocalTrainConfig(epochs=5, batch_size=8, lr=0.5)
    res = train_clients(model, start, data, cfg, [0, 1, 2], engine=engine)
    for (x, y), r in zip(data, res, strict=True):
        before = F.cross_entropy(torch.func.functional_call(model, start, (x,)), y)
        after_params = {k: start[k] + r.delta[k] for k in start}
        after = F.cross_entropy(torch.func.functional_call(model, after_params, (x,)), y)
        assert float(after) < 0.5 * float(before)
        assert r.train_loss < float(before)


@pytest.mark.parametrize("engine", ENGINES)
def test_grad_hook_zero_gives_zero_delta(engine: str) -> None:
    model, start, data = _setup("mlp", sizes=[20, 5])
    calls: list[int] = []

    def zero(
        i: int, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        calls.append(i)
        assert set(params) == set(grads) == set(start)
        return {k: torch.zeros_like(g) for k, g in grads.items()}

    cfg = LocalTrainConfig(batch_size=8, lr=0.1)
    res = train_clients(model, start, data, cfg, [0, 1], engine=engine, grad_hook=zero)
    assert all(float(d.abs().max()) == 0.0 for r in res for d in r.delta.values())
    assert sorted(calls) == [0, 0, 0, 1]  # every step of every client


@pytest.mark.parametrize("engine", ENGINES)
def test_grad_hook_applied_every_step(engine: str) -> None:
    """Halving the gradient in a hook equals halving the learning rate (no momentum)."""
    model, start, data = _setup("mlp", sizes=[30, 9, 16])
    seeds = [4, 5, 6]

    def half(
        i: int, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        for g in grads.values():
            g.mul_(0.5)
        return grads

    hooked = train_clients(
        model, start, data, LocalTrainConfig(batch_size=8, lr=0.2), seeds, engine=engine, grad_hook=half
    )
    plain = train_clients(model, start, data, LocalTrainConfig(batch_size=8, lr=0.1), seeds, engine=engine)
    _assert_same(hooked, plain, rtol=1e-5)


def test_grad_hook_sees_current_params_same_in_both_engines() -> None:
    """A FedProx-style hook (mu * (w - w_start)) gives the same result in both engines."""
    model, start, data = _setup("mlp", sizes=[30, 9])
    mu = 5.0

    def prox(
        i: int, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        return {k: g + mu * (params[k] - start[k]) for k, g in grads.items()}

    cfg = LocalTrainConfig(epochs=2, batch_size=8, lr=0.05, momentum=0.5)
    seq = train_clients(model, start, data, cfg, [0, 1], engine="sequential", grad_hook=prox)
    _assert_same(seq, train_clients(model, start, data, cfg, [0, 1], engine="vmap", grad_hook=prox))
    free = train_clients(model, start, data, cfg, [0, 1], engine="sequential")
    norm = lambda r: sum(float(d.norm() ** 2) for d in r.delta.values())  # noqa: E731
    assert all(norm(a) < norm(b) for a, b in zip(seq, free, strict=True))


@pytest.mark.parametrize("engine", ENGINES)
def test_model_left_unchanged(engine: str) -> None:
    model, start, data = _setup("mlp")
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    shifted = {k: v + 1.0 for k, v in start.items()}
    train_clients(model, shifted, data, CFGS[1], [0, 1, 2, 3, 4], engine=engine)
    after = dict(model.named_parameters())
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in model.parameters())


def test_auto_engine_choice() -> None:
    mlp, _, data = _setup("mlp")
    assert choose_engine(mlp, data) == "vmap"
    assert choose_engine(mlp, data[:1]) == "sequential"
    assert choose_engine(build_model("cnn", (1, 28, 28), 10), data) == "sequential"
    assert choose_engine(build_model("lstm", (5,), 10), data) == "sequential"
    mixed = [data[0], (torch.randn(4, 1, 8, 9), torch.zeros(4, dtype=torch.int64))]
    assert choose_engine(mlp, mixed) == "sequential"


def test_auto_matches_explicit_engine() -> None:
    model, start, data = _setup("mlp")
    auto = train_clients(model, start, data, CFGS[0], [1, 2, 3, 4, 5])
    assert _bitwise(auto, train_clients(model, start, data, CFGS[0], [1, 2, 3, 4, 5], engine="vmap"))


def test_config_validation() -> None:
    for bad in (
        {"epochs": 0},
        {"batch_size": 0},
        {"lr": -1.0},
        {"lr": float("nan")},
        {"momentum": 1.0},
        {"weight_decay": -0.1},
        {"max_steps": -1},
    ):
        with pytest.raises(ConfigError):
            LocalTrainConfig(**bad)
    assert LocalTrainConfig(epochs=2, batch_size=10, max_steps=3).steps_for(25) == 3
    assert LocalTrainConfig(epochs=2, batch_size=10).steps_for(25) == 6


def test_input_errors() -> None:
    model, start, data = _setup("mlp", sizes=[10, 10])
    cfg = LocalTrainConfig()
    with pytest.raises(ConfigError, match="engine"):
        train_clients(model, start, data, cfg, [0, 1], engine="gpu")
    with pytest.raises(ConfigError, match="one seed per client"):
        train_clients(model, start, data, cfg, [0])
    with pytest.raises(ConfigError, match="missing"):
        train_clients(model, {k: v for k, v in start.items() if k != "1.bias"}, data, cfg, [0, 1])
    with pytest.raises(ConfigError, match="one dict per client"):
        train_clients(model, [start], data, cfg, [0, 1])
    with pytest.raises(ConfigError, match="int64"):
        train_clients(model, start, [(data[0][0], data[0][1].int())], cfg, [0])
    with pytest.raises(ConfigError, match="shape"):
        train_clients(model, start, [(data[0][0], data[0][1][:5])], cfg, [0])
    mixed = [data[0], (torch.randn(4, 64), torch.zeros(4, dtype=torch.int64))]
    with pytest.raises(ConfigError, match="sequential"):
        train_clients(model, start, mixed, cfg, [0, 1], engine="vmap")
    # the sequential engine takes mixed shapes (flattened by the model)
    assert len(train_clients(model, start, mixed, cfg, [0, 1], engine="sequential")) == 2

    def bad_hook(
        i: int, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        return {}

    with pytest.raises(ConfigError, match="grad_hook"):
        train_clients(model, start, data, cfg, [0, 1], engine="sequential", grad_hook=bad_hook)


def test_vmap_gathers_in_chunks_identically(monkeypatch: pytest.MonkeyPatch) -> None:
    import fedsqueeze.sim.local as local

    model, start, data = _setup("mlp")
    full = train_clients(model, start, data, CFGS[1], [1, 2, 3, 4, 5], engine="vmap")
    monkeypatch.setattr(local, "_GATHER_BUDGET_BYTES", 1)  # one step per gathered chunk
    assert _bitwise(full, train_clients(model, start, data, CFGS[1], [1, 2, 3, 4, 5], engine="vmap"))


@pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh])  # ReLU: the batched-matmul kernel; Tanh: torch.func.vmap
def test_engines_agree_custom_sequential(act: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), act(), nn.Linear(16, 3))
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    data = [(torch.randn(n, 6), torch.randint(0, 3, (n,))) for n in (13, 4, 20)]
    cfg = LocalTrainConfig(epochs=2, batch_size=8, lr=0.1, weight_decay=1e-2)
    _assert_same(
        train_clients(model, start, data, cfg, [0, 1, 2], engine="sequential"),
        train_clients(model, start, data, cfg, [0, 1, 2], engine="vmap"),
    )
    assert choose_engine(model, data) == ("vmap" if act is nn.ReLU else "sequential")


def test_vmap_pads_to_the_largest_real_batch_not_to_batch_size() -> None:
    """``batch_size`` far above every client's size means "full batch": the vmap engine pads the
    per-step batches to the largest real one (padding to ``batch_size`` would allocate
    K x steps x 10^9 indices here, and cost 49x in time at batch_size = 60000 on 20 MNIST-sized
    clients, measured), and gives the sequential engine's result."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    data = [(torch.randn(n, 12), torch.randint(0, 3, (n,))) for n in (7, 20, 13)]
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    cfg = LocalTrainConfig(lr=0.1, batch_size=10**9, epochs=3)
    fast = train_clients(model, start, data, cfg, seeds=[0, 1, 2], engine="vmap")
    ref = train_clients(model, start, data, cfg, seeds=[0, 1, 2], engine="sequential")
    for a, b in zip(fast, ref, strict=True):
        assert a.steps == b.steps == 3 and a.num_samples == b.num_samples
        for k in a.delta:
            torch.testing.assert_close(a.delta[k], b.delta[k], rtol=1e-5, atol=1e-6)
