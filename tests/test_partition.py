"""Partitioners: invariants (disjoint, cover, sorted, deterministic), skew, errors; describe()."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsqueeze.data import describe, load_dataset, natural_selection, partition
from fedsqueeze.data.idx import MNIST_FILES, read_idx_gz
from fedsqueeze.errors import ConfigError


def _labels(n: int = 2000, classes: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.Generator(np.random.PCG64(seed)).integers(0, classes, n).astype(np.int64)


@pytest.fixture(scope="module")
def mnist_labels() -> np.ndarray:
    env = os.environ.get("FEDSQUEEZE_DATA")
    root = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    path = root / "mnist" / MNIST_FILES["train_labels"].name
    if not path.is_file():
        pytest.skip(f"shared data folder {root} is absent (set FEDSQUEEZE_DATA to a copy of shared/data)")
    return read_idx_gz(path, ndim=1).astype(np.int64)


def _check_cover(parts: list[np.ndarray], n: int) -> None:
    for p in parts:
        assert p.dtype == np.int64 and p.ndim == 1
        assert np.all(np.diff(p) > 0)  # sorted, no duplicates
    allidx = np.concatenate(parts)
    assert len(allidx) == n  # disjoint ...
    assert np.array_equal(np.sort(allidx), np.arange(n))  # ... and covering


@pytest.mark.parametrize(
    ("scheme", "kwargs"),
    [
        ("iid", {}),
        ("dirichlet", {"alpha": 0.5}),
        ("dirichlet", {"alpha": 0.01, "min_size": 5}),
        ("shards", {"shards_per_client": 2}),
        ("shards", {"shards_per_client": 3}),
    ],
)
@pytest.mark.parametrize("num_clients", [1, 7, 100])
def test_invariants_and_determinism(scheme: str, kwargs: dict, num_clients: int) -> None:
    labels = _labels()
    parts = partition(labels, num_clients, scheme, seed=11, **kwargs)
    assert len(parts) == num_clients
    _check_cover(parts, len(labels))
    assert min(len(p) for p in parts) >= kwargs.get("min_size", 1)
    again = partition(labels, num_clients, scheme, seed=11, **kwargs)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    if num_clients > 1:
        other = partition(labels, num_clients, scheme, seed=12, **kwargs)
        assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


@settings(max_examples=60)
@given(
    n=st.integers(1, 300),
    num_clients=st.integers(1, 40),
    classes=st.integers(1, 12),
    alpha=st.floats(0.005, 50.0),
    min_size=st.integers(0, 4),
    seed=st.integers(0, 2**32),
)
def test_dirichlet_property(
    n: int, num_clients: int, classes: int, alpha: float, min_size: int, seed: int
) -> None:
    labels = _labels(n, classes, seed % 1000)
    if num_clients * max(min_size, 1) > n:
        with pytest.raises(ConfigError, match="lower num_clients"):
            partition(labels, num_clients, "dirichlet", seed=seed, alpha=alpha, min_size=min_size)
        return
    parts = partition(labels, num_clients, "dirichlet", seed=seed, alpha=alpha, min_size=min_size)
    _check_cover(parts, n)
    assert min(len(p) for p in parts) >= min_size


def test_iid_sizes_balanced() -> None:
    parts = partition(_labels(1003), 10, "iid", seed=0)
    assert sorted({len(p) for p in parts}) == [100, 101]


def test_dirichlet_skew_grows_as_alpha_shrinks(mnist_labels: np.ndarray) -> None:
    summaries = {
        a: describe(partition(mnist_labels, 100, "dirichlet", seed=0, alpha=a, min_size=10), mnist_labels, 10)
        for a in (0.01, 0.1, 1.0, 100.0)
    }
    mean_classes = [summaries[a].mean_classes_per_client for a in (0.01, 0.1, 1.0, 100.0)]
    assert mean_classes == sorted(mean_classes) and mean_classes[0] < 1.5 and mean_classes[-1] > 9.5
    tv = [summaries[a].label_skew_tv for a in (0.01, 0.1, 1.0, 100.0)]
    assert tv == sorted(tv, reverse=True) and tv[0] > 0.8 and tv[-1] < 0.1
    assert summaries[0.01].sizes.min() >= 10


def test_dirichlet_tiny_alpha_many_clients(mnist_labels: np.ndarray) -> None:
    parts = partition(mnist_labels, 1000, "dirichlet", seed=3, alpha=0.01, min_size=20)
    _check_cover(parts, len(mnist_labels))
    assert min(len(p) for p in parts) >= 20


def test_shards_mnist_at_most_two_classes(mnist_labels: np.ndarray) -> None:
    parts = partition(mnist_labels, 100, "shards", seed=0, shards_per_client=2)
    _check_cover(parts, len(mnist_labels))
    summary = describe(parts, mnist_labels, 10)
    assert summary.classes_per_client.max() <= 2
    assert summary.mean_classes_per_client > 1.8  # two different classes for most clients
    sizes = summary.sizes
    assert sizes.min() >= 560 and sizes.max() <= 640  # shards of ~300 examples each


def test_shards_fewer_shards_than_classes() -> None:
    labels = _labels(100, 10)
    parts = partition(labels, 2, "shards", seed=0, shards_per_client=2)
    _check_cover(parts, 100)
    assert sorted(len(p) for p in parts) == [50, 50]  # equal contiguous cuts of the sorted labels
    rank = np.empty(100, dtype=np.int64)
    rank[np.argsort(labels, kind="stable")] = np.arange(100)
    for p in parts:  # each client: two contiguous runs of the label-sorted array
        assert int(np.sum(np.diff(np.sort(rank[p])) != 1)) <= 1
    with pytest.raises(ConfigError, match="only 30 examples"):
        partition(_labels(30, 3), 20, "shards", seed=0, shards_per_client=2)


def test_natural() -> None:
    data = load_dataset("synthetic", num_clients=12, seed=1)
    assert data.natural_clients is not None
    labels = data.train.y.numpy()
    parts = partition(labels, 12, "natural", seed=0, natural=data.natural_clients)
    assert all(np.array_equal(a, b) for a, b in zip(parts, data.natural_clients, strict=True))
    some = partition(labels, 5, "natural", seed=4, natural=data.natural_clients)
    keep = natural_selection([len(p) for p in data.natural_clients], 5, seed=4)
    assert len(some) == 5 and list(keep) == sorted(keep)
    assert all(np.array_equal(a, data.natural_clients[int(k)]) for a, k in zip(some, keep, strict=True))
    again = partition(labels, 5, "natural", seed=4, natural=data.natural_clients)
    assert all(np.array_equal(a, b) for a, b in zip(some, again, strict=True))
    with pytest.raises(ConfigError, match="only 12 natural clients"):
        partition(labels, 13, "natural", seed=0, natural=data.natural_clients)
    with pytest.raises(ConfigError, match="has none"):
        partition(labels, 3, "natural", seed=0)
    # natural clients below min_size are skipped
    nat = [np.array([0]), np.array([1, 2, 3]), np.array([4, 5])]
    got = partition(np.zeros(6, dtype=np.int64), 2, "natural", seed=0, natural=nat, min_size=2)
    assert [p.tolist() for p in got] == [[1, 2, 3], [4, 5]]


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((10, 0, "iid"), {}, "num_clients must be an integer >= 1"),
        ((10, 11, "iid"), {}, "need at least 11 examples, the dataset has 10"),
        ((10, 3, "dirichlet"), {"alpha": 0.0}, "alpha must be > 0"),
        ((10, 3, "dirichlet"), {"alpha": -1.0}, "alpha must be > 0"),
        ((10, 3, "dirichlet"), {"alpha": float("nan")}, "finite"),
        ((10, 3, "dirichlet"), {"min_size": 4}, "need at least 12"),
        ((10, 3, "dirichelt"), {}, "did you mean 'dirichlet'"),
        ((10, 3, "iid"), {"seed": -1}, "seed must be"),
    ],
)
def test_errors(args: tuple, kwargs: dict, match: str) -> None:
    n, num_clients, scheme = args
    kw = {"seed": 0, **kwargs}
    with pytest.raises(ConfigError, match=match):
        partition(_labels(n), num_clients, scheme, **kw)


def test_bad_labels() -> None:
    with pytest.raises(ConfigError, match="1-D"):
        partition(np.zeros((3, 2), dtype=np.int64), 2, "iid", seed=0)
    with pytest.raises(ConfigError, match="integers"):
        partition(np.zeros(5), 2, "iid", seed=0)
    with pytest.raises(ConfigError, match=">= 0"):
        partition(np.array([0, -1, 2]), 2, "iid", seed=0)


def test_describe_dict_and_render() -> None:
    labels = np.array([0, 0, 1, 2, 2, 2], dtype=np.int64)
    parts = [np.array([0, 1]), np.array([2, 3, 4, 5]), np.array([], dtype=np.int64)]
    s = describe(parts, labels, 3)
    assert s.label_hist.tolist() == [[2, 0, 0], [0, 1, 3], [0, 0, 0]]
    d = s.to_dict()
    assert d["sizes"] == [2, 4, 0] and d["size_min"] == 0 and d["size_max"] == 4 and d["size_median"] == 2.0
    assert d["mean_classes_per_client"] == pytest.approx(1.0) and d["total"] == 6
    # pooled (1/3, 1/6, 1/2): TV of client 0 = 2/3, of client 1 = 1/3; the empty client is left out
    assert d["label_skew_tv"] == pytest.approx(0.5)
    from rich.table import Table

    table = s.render()
    assert isinstance(table, Table) and table.row_count == 3
    text = s.to_text()
    assert "3 clients, 6 examples" in text and "classes" in text
    assert describe(parts, labels, 3).render(max_rows=1).row_count == 2
    with pytest.raises(ConfigError, match="outside"):
        describe(parts, labels, 2)
