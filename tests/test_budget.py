"""The ``budget`` policy: payloads never exceed the budget, choices are reproducible and sensible."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import fedsqueeze
import harness
from fedsqueeze.codecs.budget import (
    MIN_BUDGET_NBYTES,
    Budget,
    BudgetChoice,
    encode_state_dict_within_budget,
)
from fedsqueeze.codecs.entropy import Ans
from fedsqueeze.codecs.spec import parse_spec
from fedsqueeze.errors import ConfigError, DecodeError, EncodeError
from fedsqueeze.wire.frame import build_frame, inspect


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tensors() -> list[torch.Tensor]:
    g = gen(0)
    lap = torch.distributions.Laplace(0.0, 1.0)
    torch.manual_seed(0)
    sparse = torch.zeros(3000)
    sparse[torch.randperm(3000, generator=g)[:40]] = torch.randn(40, generator=g)
    return [
        torch.tensor(1.5),
        torch.randn(1, generator=g),
        torch.randn(2, generator=g),
        torch.randn(7, generator=g),
        torch.randn(3, 5, generator=g),
        torch.randn(2, 3, 4, 5, generator=g),
        torch.randn(1000, generator=g),
        lap.sample((4000,)),
        torch.randn(64, 3, 3, 3, generator=g) * 1e-3,
        torch.zeros(500),
        torch.full((300,), -2.0),
        sparse,
        torch.randn(20000, generator=g).to(torch.float16),
    ]


BUDGETS = [
    {"bits_per_entry": 0.3},
    {"bits_per_entry": 0.6},
    {"bits_per_entry": 1.8},
    {"bits_per_entry": 4.0},
    {"bits_per_entry": 40.0},
    {"nbytes": 18},
    {"nbytes": 40},
    {"nbytes": 75},
    {"nbytes": 300},
    {"nbytes": 5000},
]


@pytest.mark.parametrize("ans", [False, True], ids=["plain", "ans"])
@pytest.mark.parametrize("budget", BUDGETS, ids=str)
def test_never_over_budget(budget: dict[str, float], ans: bool) -> None:
    for x in tensors():
        policy = Budget(**budget, ans=ans)  # type: ignore[arg-type]
        limit = policy.budget_nbytes(x.numel())
        minimum = policy.min_nbytes(x)
        if limit < minimum:
            with pytest.raises(EncodeError, match=f"smallest possible is {minimum} bytes"):
                policy.encode(x)
            continue
        choice = policy.choose(x)
        assert choice.nbytes == len(choice.payload) <= limit == choice.budget_nbytes
        y = fedsqueeze.decode(choice.payload)
        assert y.shape == x.shape and y.dtype == x.dtype
        err = float(((y.double() - x.double()) ** 2).sum())
        assert math.isclose(err, choice.sq_error, rel_tol=1e-6, abs_tol=1e-12) or x.dtype != torch.float32


def test_budget_from_bits_per_entry() -> None:
    assert Budget(bits_per_entry=0.6).budget_nbytes(552_874) == math.floor(0.6 * 552_874 / 8)
    assert Budget(nbytes=4096).budget_nbytes(10**9) == 4096


def test_choice_is_reproduced_by_its_spec() -> None:
    x = torch.randn(30000, generator=gen(1))
    for spec in ["budget:bits=0.6", "budget:bits=2", "budget:bits=0.6 > ans", "budget:bytes=300"]:
        choice = parse_spec(spec).choose(x)  # type: ignore[attr-defined]
        assert parse_spec(choice.spec).encode(x) == choice.payload, (spec, choice.spec)
        assert isinstance(choice, BudgetChoice)


def test_m22_budget_picks_sparse_low_bit_payload() -> None:
    """0.6 bits per entry (M22's R = 0.6 d): positions counted, the payload is Top-K at a few bits."""
    d = 100_000
    x = torch.randn(d, generator=gen(2))
    plain = Budget(bits_per_entry=0.6).choose(x)
    coded = Budget(bits_per_entry=0.6, ans=True).choose(x)
    for c in (plain, coded):
        assert c.nbytes <= 7500 and c.spec.startswith("topk:k=")
        assert 1 <= c.bits <= 4 and 0.02 * d < c.k < 0.2 * d
    # entropy coding buys accuracy at the same budget
    assert coded.sq_error < plain.sq_error
    assert inspect(coded.payload).codec_id == Ans.codec_id


def test_more_budget_never_hurts_much() -> None:
    x = torch.randn(20000, generator=gen(3))
    errs = [Budget(bits_per_entry=r).choose(x).sq_error for r in (0.3, 0.6, 1.2, 2.4, 4.8, 9.6)]
    assert all(b <= a * 1.001 for a, b in itertools.pairwise(errs)), errs
    assert Budget(bits_per_entry=40).choose(x).sq_error == 0.0  # fp32 fits: lossless


def test_choice_minimises_error_among_fitting_candidates() -> None:
    from fedsqueeze.codecs.budget import _Search

    torch.manual_seed(0)
    x = torch.distributions.Laplace(0.0, 1.0).sample((5000,))
    budget = 1500
    cands = _Search(x, 8, False).candidates(budget)
    choice = Budget(nbytes=budget).choose(x)
    assert choice.sq_error == min(c.sq_error for c in cands)
    assert all(c.nbytes <= budget for c in cands)
    # the search finds (to within its tolerance) the largest k that fits at each width
    for c in cands:
        if c.spec.startswith("topk") and c.k < x.numel() - 1:
            bigger = parse_spec(f"topk:k={math.ceil(c.k * 1.01) + 1} > uniform:{c.bits}").encode(x)
            assert len(bigger) > budget


def test_too_small_budgets() -> None:
    x = torch.randn(100, generator=gen(4))
    policy = Budget(nbytes=30)
    minimum = policy.min_nbytes(x)
    assert minimum > 30
    with pytest.raises(EncodeError, match=f"30 bytes .* smallest possible is {minimum} bytes"):
        policy.encode(x)
    assert len(Budget(nbytes=minimum).encode(x)) == minimum
    with pytest.raises(ConfigError, match=f"minimum is {MIN_BUDGET_NBYTES} bytes"):
        Budget(nbytes=MIN_BUDGET_NBYTES - 1)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("budget", "exactly one"),
        ("budget:bits=0.6,bytes=100", "exactly one"),
        ("budget:bits=0", "> 0"),
        ("budget:bits=nan", "> 0"),
        ("budget:bytes=10", "minimum"),
        ("budget:bytes=1.5", "not an integer"),
        ("budget:0.6", "unexpected extra"),
        ("budget:bits=1,max_bits=17", "max_bits"),
        ("budget:bits=1 > uniform:4", "chooses the value bit width"),
        ("topk:1% > budget:bits=1", "stages must be"),
    ],
)
def test_bad_specs(spec: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_spec(spec)


@pytest.mark.parametrize(
    "spec", ["budget:bits=0.6", "budget:bytes=4096,max_bits=4", "budget:bits=0.6 > ans", "budget:bits=1e-05"]
)
def test_spec_round_trip(spec: str) -> None:
    c = parse_spec(spec)
    assert isinstance(c, Budget)
    assert parse_spec(c.spec).spec == c.spec
    assert c.ans == spec.endswith("> ans")


def test_reserved_id_never_decodes() -> None:
    with pytest.raises(DecodeError, match="reserved"):
        fedsqueeze.decode(build_frame(Budget.codec_id, torch.float32, (3,), b"\x00" * 8))


@pytest.mark.parametrize("spec", harness.extra(["budget:bytes=256", "budget:bytes=256 > ans"]))
def test_conformance_harness(spec: str) -> None:
    harness.run_spec_checks(spec)


# ---------------------------------------------------------------------------- whole model
def _state() -> dict[str, torch.Tensor]:
    g = gen(5)
    return {
        "conv.weight": torch.randn(32, 3, 5, 5, generator=g),
        "conv.bias": torch.randn(32, generator=g),
        "bn.num_batches_tracked": torch.tensor(7),
        "fc.weight": torch.randn(10, 2048, generator=g) * 0.1,
        "fc.bias": torch.randn(10, generator=g),
    }


@pytest.mark.parametrize("ans", [False, True])
@pytest.mark.parametrize("bits", [0.6, 1.8, 6.0])
def test_state_dict_within_budget(bits: float, ans: bool) -> None:
    sd = _state()
    d = sum(t.numel() for t in sd.values() if t.is_floating_point())
    out = encode_state_dict_within_budget(sd, bits_per_entry=bits, ans=ans)
    assert out.budget_nbytes == math.floor(bits * d / 8)
    assert len(out.payload) <= out.budget_nbytes
    back = fedsqueeze.decode_state_dict(out.payload)
    assert list(back) == list(sd)
    assert torch.equal(back["bn.num_batches_tracked"], sd["bn.num_batches_tracked"])
    for name, t in sd.items():
        assert back[name].shape == t.shape and back[name].dtype == t.dtype
    assert set(out.choices) == {n for n, t in sd.items() if t.is_floating_point()}
    # the big tensors get most of the budget
    assert out.choices["fc.weight"].nbytes > out.choices["fc.bias"].nbytes


def test_state_dict_budget_too_small() -> None:
    with pytest.raises(EncodeError, match=r"its minimum is \d+ bytes"):
        encode_state_dict_within_budget(_state(), nbytes=100)
    with pytest.raises(ConfigError, match="exactly one"):
        encode_state_dict_within_budget(_state())


def test_index_size_matches_topk_index_section() -> None:
    """The search's size shortcut must track ``sparse.encode_indices`` exactly (format drift)."""
    import numpy as np

    from fedsqueeze.codecs.budget import index_section_nbytes
    from fedsqueeze.codecs.sparse import encode_indices

    rng = np.random.default_rng(0)
    for d in (1, 2, 7, 100, 1000, 50_000):
        for k in sorted({0, 1, 2, d // 100, d // 10, d // 4, d // 3, d // 2, d - 1, d} - {d + 1}):
            idx = np.sort(rng.choice(d, size=k, replace=False)).astype(np.int64)
            assert index_section_nbytes(idx, d) == len(encode_indices(idx, d)), (d, k)
    clustered = np.arange(1000, 3000, dtype=np.int64)
    assert index_section_nbytes(clustered, 10**6) == len(encode_indices(clustered, 10**6))
