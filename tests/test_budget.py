"""The ``budget`` policy: payloads never exceed the budget, choices are reproducible and sensible."""

from __future__ import annotations

import itertools
import math
import re

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
from fedsqueeze.wire.container import decode_container
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
        ("budget:bits=1 > topk:1% > uniform:4", "chooses Top-K's k"),
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


# ---------------------------------------------------------------------------- template mode
#: one spec per method of the M22 budget sweep (examples/fmnist_budget_sweep.toml)
TEMPLATES = [
    "m22:bits=3,M=0",
    "m22:bits=2,M=2",
    "m22:bits=4,M=4",
    "weibull_lloyd:2",
    "tinyscript:4",
    "uniform:3",
    "fp8",
    "fp4",
    "countsketch:rows=1,k=0.1%,table=fp16",
]


def _cnn_update() -> dict[str, torch.Tensor]:
    """A realistic update: the shapes of cifar_cnn's first layers, heavy-tailed entries whose scale
    differs per layer, and an integer buffer (which must go ``raw``)."""
    g = gen(21)
    t = torch.distributions.StudentT(3.0)
    torch.manual_seed(21)
    return {
        "conv1.weight": t.sample((32, 1, 3, 3)) * 3e-2,
        "conv1.bias": torch.randn(32, generator=g) * 1e-2,
        "conv2.weight": t.sample((64, 32, 3, 3)) * 5e-3,
        "conv2.bias": torch.randn(64, generator=g) * 1e-3,
        "fc.weight": t.sample((10, 640)) * 1e-2,
        "fc.bias": torch.randn(10, generator=g) * 1e-2,
        "steps": torch.tensor(50),
    }


def _d(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in state.values() if t.is_floating_point())


@pytest.mark.parametrize("bits", [0.6, 1.8])
@pytest.mark.parametrize("template", TEMPLATES)
def test_template_fills_the_update_budget(template: str, bits: float) -> None:
    """Each sweep method, at M22's R = 0.6 d and 1.8 d: the measured container is within the budget
    and uses nearly all of it, one more unit of the knob would not fit, and it decodes."""
    state = _cnn_update()
    policy = parse_spec(f"budget:bits={bits} > {template}")
    assert isinstance(policy, Budget)
    budget = math.floor(bits * _d(state) / 8)
    fit = policy.fit_update(state, rng=gen(1))
    assert fit.budget_nbytes == budget == policy.update_budget_nbytes(state)
    assert fit.nbytes == len(fit.payload) <= budget
    assert fit.nbytes >= 0.99 * budget, (fit.nbytes, budget)
    # the search found the largest knob: one more does not fit
    from fedsqueeze.codecs.budget import _TemplateSearch

    floats = {n: t for n, t in state.items() if t.is_floating_point()}
    search = _TemplateSearch(policy.template, floats, state)  # type: ignore[arg-type]
    assert len(search.build(fit.knob + 1, gen(1))[0]) > budget
    # encode_state_dict (hence every channel) sends exactly this container
    assert fedsqueeze.encode_state_dict(state, policy, rng=gen(1)) == fit.payload
    back = fedsqueeze.decode_state_dict(fit.payload)
    assert list(back) == list(state) and torch.equal(back["steps"], state["steps"])
    frames = decode_container(fit.payload)
    for name, t in floats.items():
        assert back[name].shape == t.shape
        if not policy.stochastic:  # every frame is the template's own, reproduced by its spec
            assert bytes(frames[name]) == parse_spec(fit.specs[name]).encode(t)


@pytest.mark.parametrize("template", [*TEMPLATES, "lloydmax:3,M=2", "topk > fp16", "topk"])
def test_template_size_prediction_is_exact(template: str) -> None:
    """The search's zero-valued size probes equal the real payload sizes (guards format drift)."""
    from fedsqueeze.codecs.budget import _Template, _TemplateSearch

    state = _cnn_update()
    floats = {n: t for n, t in state.items() if t.is_floating_point()}
    search = _TemplateSearch(_Template.parse(template), floats, state)
    d = _d(state)
    for knob in (search.kmin, 1, 7, d // 100, d // 10, d // 3):
        assert search.predicted_nbytes(knob) == len(search.build(knob, gen(2))[0]), knob


def test_global_topk_matches_m22_global_selection() -> None:
    from fedsqueeze.codecs.rd import global_topk_counts

    state = _cnn_update()
    fit = parse_spec("budget:bits=0.6 > m22:bits=2,M=2").fit_update(state)  # type: ignore[attr-defined]
    counts = global_topk_counts(state, k=fit.knob)
    for name, spec in fit.specs.items():
        assert spec == f"m22:k={counts[name]},bits=2,M=2,law=gennorm"


def test_template_on_one_tensor_is_reproduced_by_its_spec() -> None:
    x = torch.distributions.StudentT(3.0).sample((5000,))
    specs = ["budget:bits=0.6 > m22:bits=2,M=2", "budget:bytes=900 > tinyscript:3", "budget:bits=1.8 > fp4"]
    for spec in specs:
        policy = parse_spec(spec)
        fit = policy.fit(x, rng=gen(3))  # type: ignore[attr-defined]
        assert fit.nbytes <= policy.budget_nbytes(5000)  # type: ignore[attr-defined]
        assert policy.encode(x, rng=gen(3)) == fit.payload
        assert parse_spec(fit.specs[""]).encode(x, rng=gen(3)) == fit.payload
        # the caller's generator advances exactly as for that one encode
        g1, g2 = gen(3), gen(3)
        policy.encode(x, rng=g1)
        parse_spec(fit.specs[""]).encode(x, rng=g2)
        assert torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))


@pytest.mark.parametrize("template", TEMPLATES)
def test_template_budget_too_small(template: str) -> None:
    state = _cnn_update()
    policy = parse_spec(f"budget:bytes=300 > {template}")
    with pytest.raises(EncodeError, match=r"300 bytes cannot hold .* smallest payload .* is \d+ bytes"):
        policy.encode_update(state)  # type: ignore[attr-defined]
    x = torch.randn(1000, generator=gen(4))
    small = parse_spec(f"budget:bytes=20 > {template}")
    minimum = small.min_nbytes(x)  # type: ignore[attr-defined]
    with pytest.raises(EncodeError, match=f"smallest payload .* is {minimum} bytes"):
        small.encode(x)
    assert len(parse_spec(f"budget:bytes={minimum} > {template}").encode(x, rng=gen(5))) <= minimum


def test_plain_budget_covers_the_whole_update() -> None:
    """Without a template, a whole update shares one budget (biases alone could not meet 0.6 bits)."""
    state = _cnn_update()
    payload = fedsqueeze.encode_state_dict(state, parse_spec("budget:bits=0.6"))
    assert len(payload) <= math.floor(0.6 * _d(state) / 8)
    assert list(fedsqueeze.decode_state_dict(payload)) == list(state)


def test_uplink_channel_with_ef_stays_within_budget() -> None:
    from fedsqueeze.channel import ParamLayout, UplinkChannel

    state = {n: t for n, t in _cnn_update().items() if t.is_floating_point()}
    layout = ParamLayout.from_state(state)
    budget = math.floor(0.6 * layout.numel / 8)
    ch = UplinkChannel("budget:bits=0.6 > m22:bits=3,M=2", layout, ef="ef14")
    delta = layout.flatten(state)
    for _ in range(3):
        dl = ch.send(0, delta, rng=gen(6))
        assert dl.nbytes <= budget and dl.nbytes >= 0.99 * budget


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("budget:bits=1 > m22:10%,bits=2", "chooses m22's k"),
        ("budget:bits=1 > m22:k=5", "chooses m22's k"),
        ("budget:bits=1 > countsketch:cols=100,k=1%", "chooses countsketch's cols"),
        ("budget:bits=1 > m22:bits=2 > zstd", "nothing but 'ans' may follow"),
        ("budget:bits=1 > uniform:4 > zstd", "lossless stage"),
        ("budget:bits=1 > uniform:4 > ans > ans", "lossless stage"),
        ("budget:bits=1 > uniform:4 > ans:x=1", "takes no arguments"),
        ("budget:bits=1 > fp8 > ans", "cannot entropy-code the template 'fp8:e4m3'"),
        ("budget:bits=1 > topk > ans", "cannot entropy-code the template 'fp32'"),
        ("budget:bits=1 > countsketch:rows=1,k=1% > ans", "cannot entropy-code"),
        ("budget:bits=1 > qsgd:s=3,coding=elias > ans", "cannot entropy-code.*elias"),
        ("budget:bits=1 > randk:10%", "sparsifier stage"),
        ("budget:bits=1,max_bits=4 > uniform:4", "max_bits"),
        ("budget:bits=1 > uniform:40", "uniform"),
        ("budget:bits=1 > nosuch", "unknown codec"),
    ],
)
def test_bad_templates(spec: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_spec(spec)


@pytest.mark.parametrize(
    ("spec", "canonical"),
    [
        ("budget:bits=0.6 > m22:bits=2,M=2", "budget:bits=0.6 > m22:bits=2,M=2,law=gennorm"),
        ("budget:bits=0.6 > topk > uniform:2", "budget:bits=0.6 > uniform:2"),
        ("budget:bits=1.8 > topk", "budget:bits=1.8 > fp32"),
        ("budget:bytes=4096 > countsketch:k=1%", "budget:bytes=4096 > countsketch:rows=5,k=1%"),
        ("budget:bits=0.6 > fp8", "budget:bits=0.6 > fp8:e4m3"),
    ],
)
def test_template_spec_round_trip(spec: str, canonical: str) -> None:
    c = parse_spec(spec)
    assert c.spec == canonical
    assert parse_spec(c.spec).spec == canonical


@pytest.mark.parametrize(
    "spec",
    harness.extra(
        ["budget:bytes=256 > m22:bits=2,M=2", "budget:bytes=300 > tinyscript:3", "budget:bytes=200 > fp4"]
    ),
)
def test_template_conformance_harness(spec: str) -> None:
    harness.run_spec_checks(spec)


@pytest.mark.parametrize(
    ("spec", "match", "absent"),
    [
        # the placeholder knob used while parsing never leaks into the message
        ("budget:bits=1 > countsketch:rows=1", r"bad template 'countsketch:rows=1'.*needs k=", "987654321"),
        # an alias carries its size without a ':'; the message still names the stage
        ("budget:bits=1 > top-1% > fp8", r"no size on 'top-1%'", "without ''"),
    ],
)
def test_template_error_messages_name_what_the_user_wrote(spec: str, match: str, absent: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        parse_spec(spec)
    assert absent not in str(info.value)


@pytest.mark.parametrize(
    "tail",
    ["", " > m22:bits=2,M=2", " > uniform:2", " > countsketch:rows=1,k=10%", " > m22:bits=2,M=2 > ans"],
)
def test_named_minimum_is_exact_and_never_over_budget(tail: str) -> None:
    # small random updates (empty / 0-dim / int buffers included): the EncodeError names the
    # minimum M; a budget of M fits, M - 1 does not, and no budget is ever exceeded
    g = torch.Generator().manual_seed(7)
    for case in range(4):
        shapes: list[tuple[int, ...]] = [*[(), (0,), (3, 4), (25,)][case:], (5, 2)]
        state = {f"t{i}": torch.randn(s, generator=g) for i, s in enumerate(shapes)}
        state["steps"] = torch.tensor(case)
        with pytest.raises(EncodeError) as info:
            fedsqueeze.codecs.encode_state_dict(state, parse_spec(f"budget:bytes=18{tail}"))
        found = re.search(r"(?:minimum is|\) is) (\d+) bytes", str(info.value))
        assert found is not None, str(info.value)
        least = int(found.group(1))
        payload = fedsqueeze.codecs.encode_state_dict(state, parse_spec(f"budget:bytes={least}{tail}"))
        assert len(payload) <= least
        with pytest.raises(EncodeError):
            fedsqueeze.codecs.encode_state_dict(state, parse_spec(f"budget:bytes={least - 1}{tail}"))
        for extra in (1, 37, 500):
            n = least + extra
            assert len(fedsqueeze.codecs.encode_state_dict(state, parse_spec(f"budget:bytes={n}{tail}"))) <= n


# ---------------------------------------------------------------------------- template + ans
#: entropy-coded templates (the 0.6 d sweep's value coders, and one more width each)
ANS_TEMPLATES = [
    "m22:bits=3,M=2",
    "m22:bits=3,M=0",
    "weibull_lloyd:2",
    "weibull_lloyd:3",
    "uniform:4",
    "tinyscript:4",
]


def _plain_at(template: str, state: dict[str, torch.Tensor], knob: int, rng: torch.Generator) -> bytes:
    """The plain template's container at a given global knob."""
    from fedsqueeze.codecs.budget import _Template, _TemplateSearch

    floats = {n: t for n, t in state.items() if t.is_floating_point()}
    return _TemplateSearch(_Template.parse(template), floats, state).build(knob, rng)[0]


@pytest.mark.parametrize("bits", [0.6, 1.8])
@pytest.mark.parametrize("template", ANS_TEMPLATES)
def test_entropy_coded_template_fits_and_keeps_more(template: str, bits: float) -> None:
    """``budget:bits=R > T > ans`` on a heavy-tailed update: the real coded container is within the
    budget, one more kept entry is not, every frame is an ``ans`` frame whose inner payload is the
    plain template's (so it decodes to exactly the plain template at the same K), and the entropy
    coder buys more kept entries than the plain template at the same budget."""
    from fedsqueeze.codecs.budget import _Template, _TemplateSearch
    from fedsqueeze.codecs.entropy import inner_payload

    state = _cnn_update()
    policy = parse_spec(f"budget:bits={bits} > {template} > ans")
    assert isinstance(policy, Budget) and policy.template is not None and policy.template.ans
    budget = math.floor(bits * _d(state) / 8)
    fit = policy.fit_update(state, rng=gen(1))
    assert fit.budget_nbytes == budget and fit.nbytes == len(fit.payload) <= budget
    floats = {n: t for n, t in state.items() if t.is_floating_point()}
    search = _TemplateSearch(policy.template, floats, state)
    if fit.knob < search.kmax:  # the largest K: one more does not fit
        assert len(search.build(fit.knob + 1, gen(1))[0]) > budget
    # more entries than the plain template at the same bytes (the law is peaked: Student-t, nu = 3)
    plain = parse_spec(f"budget:bits={bits} > {template}").fit_update(state, rng=gen(1))  # type: ignore[attr-defined]
    assert fit.knob > plain.knob, (fit.knob, plain.knob)
    if template.startswith("m22"):
        assert fit.knob >= 1.1 * plain.knob
    # decode equality: the coded container decodes exactly as the plain template at the same K
    back = fedsqueeze.decode_state_dict(fit.payload)
    same_k = fedsqueeze.decode_state_dict(_plain_at(template, state, fit.knob, gen(1)))
    assert list(back) == list(state) and torch.equal(back["steps"], state["steps"])
    for name, t in floats.items():
        assert back[name].shape == t.shape and torch.equal(back[name], same_k[name])
    frames = decode_container(fit.payload)
    plain_frames = decode_container(_plain_at(template, state, fit.knob, gen(1)))
    for name, t in floats.items():
        assert inspect(frames[name]).codec_id == Ans.codec_id
        assert fit.specs[name].endswith(" > ans")
        assert inner_payload(frames[name]) == bytes(plain_frames[name])
        if not policy.stochastic:
            assert bytes(frames[name]) == parse_spec(fit.specs[name]).encode(t)
    assert _Template.parse(template).spec_for(3) + " > ans" == policy.template.spec_for(3)


@pytest.mark.parametrize("template", ["m22:bits=3,M=2", "tinyscript:4", "uniform:4"])
def test_entropy_coded_template_is_deterministic(template: str) -> None:
    from fedsqueeze.codecs.budget import _TemplateSearch

    state = _cnn_update()
    policy = parse_spec(f"budget:bits=0.6 > {template} > ans")
    a = policy.fit_update(state, rng=gen(9))  # type: ignore[attr-defined]
    b = policy.fit_update(state, rng=gen(9))  # type: ignore[attr-defined]
    assert a == b
    g1 = gen(9)
    assert fedsqueeze.encode_state_dict(state, policy, rng=g1) == a.payload  # what channels send
    # the caller's generator advances as for one encode at that K (not once per size probe)
    floats = {n: t for n, t in state.items() if t.is_floating_point()}
    _, g2 = _TemplateSearch(policy.template, floats, state).build(a.knob, gen(9))  # type: ignore[attr-defined]
    assert g2 is not None and torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))
    # one tensor: the frame is reproduced by its spec
    x = torch.distributions.StudentT(3.0).sample((5000,))
    fit = parse_spec(f"budget:bytes=600 > {template} > ans").fit(x, rng=gen(3))  # type: ignore[attr-defined]
    assert fit.nbytes <= 600
    assert parse_spec(fit.specs[""]).encode(x, rng=gen(3)) == fit.payload


def test_entropy_coded_m22_keeps_more_on_a_peaked_law() -> None:
    """One GenNorm(beta = 0.7) tensor, M22's M = 2 (codes skewed towards the inner cells)."""
    import numpy as np
    from scipy import stats

    x = torch.from_numpy(stats.gennorm.rvs(0.7, size=40_000, random_state=np.random.default_rng(0)))
    x = x.float()
    for bits in (0.6, 1.8):
        plain = parse_spec(f"budget:bits={bits} > m22:bits=3,M=2").fit(x)  # type: ignore[attr-defined]
        coded = parse_spec(f"budget:bits={bits} > m22:bits=3,M=2 > ans").fit(x)  # type: ignore[attr-defined]
        assert plain.nbytes <= plain.budget_nbytes and coded.nbytes <= coded.budget_nbytes
        assert coded.knob >= 1.1 * plain.knob, (bits, coded.knob, plain.knob)


@pytest.mark.parametrize("template", ANS_TEMPLATES)
def test_entropy_coded_template_budget_too_small(template: str) -> None:
    state = _cnn_update()
    policy = parse_spec(f"budget:bytes=300 > {template} > ans")
    with pytest.raises(EncodeError, match=r"300 bytes cannot hold .* entropy-coded\) is \d+ bytes"):
        policy.encode_update(state)  # type: ignore[attr-defined]
    x = torch.randn(1000, generator=gen(4))
    minimum = parse_spec(f"budget:bytes=20 > {template} > ans").min_nbytes(x)  # type: ignore[attr-defined]
    with pytest.raises(EncodeError, match=f"smallest payload .* is {minimum} bytes"):
        parse_spec(f"budget:bytes={minimum - 1} > {template} > ans").encode(x)
    assert len(parse_spec(f"budget:bytes={minimum} > {template} > ans").encode(x, rng=gen(5))) <= minimum


@pytest.mark.parametrize(
    ("spec", "canonical"),
    [
        ("budget:bits=0.6 > m22:bits=3,M=2 > ans", "budget:bits=0.6 > m22:bits=3,M=2,law=gennorm > ans"),
        ("budget:bits=0.6 > topk > uniform:2 > ans", "budget:bits=0.6 > uniform:2 > ans"),
        ("budget:bytes=900 > weibull_lloyd:3 > ANS", "budget:bytes=900 > weibull_lloyd:3 > ans"),
    ],
)
def test_entropy_coded_template_spec_round_trip(spec: str, canonical: str) -> None:
    c = parse_spec(spec)
    assert isinstance(c, Budget) and not c.ans  # ``ans`` (the built-in search's flag) stays off
    assert c.spec == canonical and parse_spec(c.spec).spec == canonical
    # the same policy built in code, or by adding the stage to a plain template
    plain = canonical.removesuffix(" > ans").split(" > ", 1)
    kwargs = {"bits_per_entry": 0.6} if "bits=" in plain[0] else {"nbytes": 900}
    assert Budget(**kwargs, template=plain[1], ans=True).spec == canonical  # type: ignore[arg-type]
    assert parse_spec(" > ".join(plain)).with_ans().spec == canonical  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="already entropy-coded"):
        c.with_ans()


def test_entropy_coded_template_through_uplink_channel() -> None:
    from fedsqueeze.channel import ParamLayout, UplinkChannel

    state = {n: t for n, t in _cnn_update().items() if t.is_floating_point()}
    layout = ParamLayout.from_state(state)
    budget = math.floor(0.6 * layout.numel / 8)
    ch = UplinkChannel("budget:bits=0.6 > m22:bits=3,M=2 > ans", layout, ef="ef14")
    delta = layout.flatten(state)
    for _ in range(3):
        dl = ch.send(0, delta, rng=gen(6))
        assert budget * 0.99 <= dl.nbytes <= budget


@pytest.mark.parametrize(
    "spec", harness.extra(["budget:bytes=256 > m22:bits=2,M=2 > ans", "budget:bytes=300 > uniform:3 > ans"])
)
def test_entropy_coded_template_conformance_harness(spec: str) -> None:
    harness.run_spec_checks(spec)
