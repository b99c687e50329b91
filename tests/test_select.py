"""Exact magnitude selection: ``topk_indices``, ``threshold_indices`` against the reference sort."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsqueeze.codecs import select
from fedsqueeze.codecs.select import threshold_indices, topk_indices

FAST = select.EXACT_MAX_NUMEL + 1  # smallest size that takes the sampled-threshold path


def reference(x: torch.Tensor, k: int) -> torch.Tensor:
    """The spec: first k of a stable sort of -|x| (ties -> lower index), sorted ascending.

    NumPy's single-threaded stable sort is used as the oracle (it places NaN last, like torch's);
    float16/bfloat16 are widened first, which is exact.
    """
    flat = x.detach().flatten()
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()
    order = np.argsort(-np.abs(flat.numpy()), kind="stable")[:k]
    return torch.from_numpy(np.sort(order).astype(np.int64))


def check(x: torch.Tensor, k: int) -> None:
    got = topk_indices(x, k)
    assert got.dtype == torch.int64
    assert got.is_contiguous()
    assert got.shape == (k,)
    want = reference(x, k)
    assert torch.equal(got, want), f"n={x.numel()} k={k}: {got[:10]} vs {want[:10]}"


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def distribution(name: str, n: int, seed: int) -> torch.Tensor:
    g = gen(seed)
    if name == "normal":
        return torch.randn(n, generator=g)
    if name == "small_ints":  # heavy ties everywhere, including at the cut
        return torch.randint(-3, 4, (n,), generator=g).float()
    if name == "two_values":
        return torch.where(torch.rand(n, generator=g) < 0.5, 1.0, -1.0)
    if name == "zeros":
        return torch.zeros(n)
    if name == "signed_zeros":
        return torch.where(torch.rand(n, generator=g) < 0.5, 0.0, -0.0)
    if name == "outlier":
        x = torch.randn(n, generator=g) * 1e-3
        x[n // 3] = 1e30
        return x
    if name == "sorted":
        return torch.sort(torch.randn(n, generator=g)).values
    if name == "reversed":
        return torch.sort(torch.randn(n, generator=g), descending=True).values
    if name == "negative":
        return -torch.rand(n, generator=g)
    if name == "heavy_tail":
        return torch.randn(n, generator=g) ** 5
    if name == "mostly_zero":
        x = torch.zeros(n)
        x[torch.randperm(n, generator=g)[: n // 200]] = torch.randn(n // 200, generator=g)
        return x
    if name == "layers":  # concatenated tensors at very different scales
        parts = [torch.randn(n // 4, generator=g) * s for s in (1e-4, 1.0, 1e-2)]
        return torch.cat([*parts, torch.randn(n - 3 * (n // 4), generator=g) * 10])
    if name == "periodic":  # 3x3-kernel-like layout: the centre tap is always the largest
        x = torch.randn(n, generator=g) * 0.1
        x[4::9] *= 100
        return x
    raise AssertionError(name)


DISTRIBUTIONS = [
    "normal", "small_ints", "two_values", "zeros", "signed_zeros", "outlier", "sorted",
    "reversed", "negative", "heavy_tail", "mostly_zero", "layers", "periodic",
]  # fmt: skip


@pytest.mark.parametrize("name", DISTRIBUTIONS)
@pytest.mark.parametrize("n", [1, 7, 1000, FAST, 100_003])
def test_matches_reference_on_adversarial_distributions(name: str, n: int) -> None:
    x = distribution(name, n, seed=n)
    for k in sorted({0, 1, 2, n // 1000, n // 100, n // 10, n // 3, n - 1, n}):
        if 0 <= k <= n:
            check(x, k)


@pytest.mark.parametrize("n", [0, 1, 2, 5])
def test_k_edge_cases(n: int) -> None:
    x = torch.randn(n, generator=gen(3))
    for k in range(n + 1):
        check(x, k)
    assert torch.equal(topk_indices(x, n), torch.arange(n))
    assert topk_indices(x, 0).numel() == 0


def test_ties_go_to_the_lower_index() -> None:
    x = torch.tensor([1.0, -3.0, 3.0, 0.5, -3.0, 3.0])
    assert topk_indices(x, 2).tolist() == [1, 2]
    assert topk_indices(x, 3).tolist() == [1, 2, 4]
    assert topk_indices(torch.full((FAST,), 2.5), 10).tolist() == list(range(10))


def test_negative_zero_ties_with_zero() -> None:
    x = torch.tensor([-0.0, 0.0, -0.0, 1.0, 0.0])
    assert topk_indices(x, 3).tolist() == [0, 1, 3]
    big = torch.zeros(FAST)
    big[::2] = -0.0
    big[FAST - 1] = -1.0
    assert topk_indices(big, 4).tolist() == [0, 1, 2, FAST - 1]


def test_infinities_are_the_largest() -> None:
    x = torch.randn(FAST, generator=gen(4))
    x[[10, 20, 30]] = torch.tensor([float("inf"), float("-inf"), float("inf")])
    check(x, 2)
    check(x, 3)
    check(x, 500)


@pytest.mark.parametrize("n", [10, FAST])
def test_nan_counts_as_smallest(n: int) -> None:
    x = torch.randn(n, generator=gen(5))
    x[::3] = float("nan")
    finite = n - (n + 2) // 3
    for k in (1, finite // 2, finite, finite + 1, n):
        check(x, k)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_float_dtypes(dtype: torch.dtype) -> None:
    x = (torch.randn(FAST, generator=gen(6)) * 4).round().to(dtype)  # many ties in every dtype
    for k in (0, 1, 100, FAST // 2, FAST):
        check(x, k)


def test_any_shape_and_layout_uses_flat_indices() -> None:
    x = torch.randn(300, 200, generator=gen(7))
    check(x, 600)
    check(x.t(), 600)  # non-contiguous: indices refer to x.t().flatten()
    w = torch.randn(64, 3, 3, 3, generator=gen(8), requires_grad=True)
    check(w, 17)


def test_retry_and_fallback_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(200_000, generator=gen(9))
    # A negative margin puts the first threshold above the k-th value: the retry must recover.
    monkeypatch.setattr(select, "MARGIN_Z", -8.0)
    for k in (2000, 20_000):
        check(x, k)


def test_sample_that_sees_only_the_largest_values_falls_back() -> None:
    n, k = 400_000, 40_000
    plan = select._sample_plan(n, k)
    assert plan is not None
    positions, _ = plan
    x = torch.rand(n, generator=gen(10))
    x[torch.from_numpy(positions.copy())] = 2.0  # every sampled entry is in the top: thr too high
    assert positions.size < k
    check(x, k)


def test_invalid_arguments_raise_value_error() -> None:
    x = torch.randn(10)
    for bad in (-1, 11, 10**20):
        with pytest.raises(ValueError, match=r"\[0, 10\]"):
            topk_indices(x, bad)
    for bad_type in (1.5, True, "3"):
        with pytest.raises(ValueError, match="integer"):
            topk_indices(x, bad_type)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="floating-point"):
        topk_indices(torch.arange(10), 3)
    with pytest.raises(ValueError, match=r"torch\.Tensor"):
        topk_indices(np.ones(10, np.float32), 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="NaN"):
        threshold_indices(x, float("nan"))
    assert topk_indices(x, np.int64(3)).numel() == 3  # numpy integers are fine


@given(
    data=st.lists(
        st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.0, -2.0, 0.5, 3.0, -3.0, 1e-30, float("inf")]),
        max_size=200,
    ),
    frac=st.floats(0.0, 1.0),
)
@settings(max_examples=150)
def test_hypothesis_small_with_heavy_ties(data: list[float], frac: float) -> None:
    x = torch.tensor(data, dtype=torch.float32)
    check(x, round(frac * x.numel()))


@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(FAST, 150_000),
    density=st.sampled_from([1e-4, 1e-3, 0.01, 0.05, 0.1, 0.3, 0.7, 0.99]),
    name=st.sampled_from(DISTRIBUTIONS),
    shape2d=st.booleans(),
)
@settings(max_examples=40)
def test_hypothesis_fast_path(seed: int, n: int, density: float, name: str, shape2d: bool) -> None:
    x = distribution(name, n, seed)
    if shape2d and n % 2 == 0:
        x = x.view(2, n // 2)
    check(x, min(n, max(0, round(density * n))))


@pytest.mark.parametrize("name", ["normal", "small_ints", "signed_zeros", "periodic"])
def test_threshold_indices_matches_mask(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(select, "CHUNK_NUMEL", 4096)  # many chunks, including a partial last one
    x = distribution(name, 50_001, seed=11)
    x[7] = float("nan")
    for thr in (-1.0, 0.0, 0.3, 1.0, 2.0, 1e9, float("inf")):
        got = threshold_indices(x, thr)
        want = torch.nonzero(x.abs() >= thr).flatten()
        assert got.dtype == torch.int64
        assert torch.equal(got, want), (name, thr)
    assert threshold_indices(torch.zeros(0), 1.0).numel() == 0
