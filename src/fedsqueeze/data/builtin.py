"""Datasets that need no files: ``digits`` (real, bundled with scikit-learn) and ``synthetic`` (generated).

``digits``
    scikit-learn's ``load_digits()``: 1,797 real 8x8 handwritten digits (the UCI optdigits test set),
    10 classes. Features: the 64 pixel counts (0-16) scaled to [0, 1], then standardised per feature
    with the *training* mean and std (a constant feature keeps std 1). Split: stratified 80/20
    train/test, deterministic from ``seed`` (default 0): per class, a ``Generator(PCG64(seed))``
    permutation puts ``round(0.2 * n_class)`` examples in the test set. The bundled CSV is read
    directly (about 20 ms) without importing scikit-learn (about 1-2 s); ``load_digits`` is the
    fallback when the file is not where scikit-learn keeps it.

``synthetic``
    Synthetic(alpha, beta) of FedProx (Li et al., "Federated Optimization in Heterogeneous Networks",
    MLSys 2020), following its generator (``data/synthetic_*/generate_niid.py``): for client ``k``,
    ``u_k ~ N(0, alpha)``, ``B_k ~ N(0, beta)``, ``W_k ~ N(u_k, 1)`` (60 x 10), ``b_k ~ N(u_k, 1)``,
    ``v_k ~ N(B_k, 1)`` (60), ``x ~ N(v_k, Sigma)`` with ``Sigma = diag(j ** -1.2)``,
    ``y = argmax(softmax(W_k^T x + b_k))``. As in that code, ``alpha`` and ``beta`` are used as
    standard deviations. Client sizes are ``floor(lognormal(4, 2)) + 50``, the sizes that code draws
    (the paper describes them as following a power law). ``iid=True`` gives FedProx's
    Synthetic-IID (one shared ``W, b ~ N(0, 1)``, ``x ~ N(0, Sigma)``). 20% of each client
    (``test_fraction``) is held out into the test set; ``natural_clients`` / ``test_clients`` are the
    generating clients. Features are left as generated (float32, not standardised).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from fedsqueeze.data.base import ArrayDataset, DataError, FederatedData, IndexArray
from fedsqueeze.errors import ConfigError

SYNTHETIC_FEATURES = 60
SYNTHETIC_CLASSES = 10


def _rng(seed: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(seed))


def _check_int(name: str, value: Any, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < lo:
        raise ConfigError(f"{name} must be an integer >= {lo}, got {value!r}")
    return int(value)


def _check_fraction(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 < float(value) < 1.0:
        raise ConfigError(f"{name} must be a number strictly between 0 and 1, got {value!r}")
    return float(value)


# ----------------------------------------------------------------------------------------- digits


def _digits_csv() -> Path | None:
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "datasets" / "data" / "digits.csv.gz"
        if p.is_file():
            return p
    return None


def _read_digits() -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64], dict[str, Any]]:
    path = _digits_csv()
    if path is not None:
        raw = path.read_bytes()
        try:
            table = np.loadtxt(gzip.decompress(raw).decode("ascii").splitlines(), delimiter=",")
        except (OSError, EOFError, ValueError) as e:
            raise DataError(f"{path}: cannot parse scikit-learn's bundled digits CSV ({e})") from e
        if table.ndim != 2 or table.shape != (1797, 65):
            raise DataError(f"{path}: expected a 1797 x 65 table, got {table.shape}")
        prov = {"path": str(path), "sha256": hashlib.sha256(raw).hexdigest(), "reader": "csv"}
        x, y = table[:, :64], table[:, 64]
    else:
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:
            raise DataError(
                "the 'digits' dataset comes with scikit-learn, which is not installed; "
                "run `pip install scikit-learn` (or pick another dataset)"
            ) from e
        bunch = load_digits()
        x, y = np.asarray(bunch.data, dtype=np.float64), np.asarray(bunch.target)
        prov = {"reader": "sklearn.datasets.load_digits"}
    if x.min() < 0 or x.max() > 16 or not np.all(np.isin(y, np.arange(10))):
        raise DataError("scikit-learn digits: pixel values outside 0..16 or labels outside 0..9")
    return x, y.astype(np.int64), prov


def load_digits_dataset(data_dir: Path | None = None, download: bool = False, seed: int = 0) -> FederatedData:
    """scikit-learn digits: 1,797 real 8x8 digits, 64 standardised features, stratified 80/20 split.

    ``data_dir`` and ``download`` are accepted for a uniform loader signature and ignored.
    """
    seed = _check_int("digits: seed", seed, 0)
    t0 = time.perf_counter()
    x, y, prov = _read_digits()
    x = x / 16.0
    rng = _rng(seed)
    test_mask = np.zeros(len(y), dtype=bool)
    for c in range(10):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        test_mask[idx[: round(0.2 * len(idx))]] = True
    train_idx, test_idx = np.flatnonzero(~test_mask), np.flatnonzero(test_mask)
    mean = x[train_idx].mean(axis=0)
    std = x[train_idx].std(axis=0)
    std[std == 0] = 1.0
    xs = ((x - mean) / std).astype(np.float32)
    yt = torch.from_numpy(y)
    train = ArrayDataset(torch.from_numpy(xs[train_idx]), yt[train_idx], 10)
    test = ArrayDataset(torch.from_numpy(xs[test_idx]), yt[test_idx], 10)
    info: dict[str, Any] = {
        "files": [prov],
        "source": "scikit-learn load_digits (UCI optdigits test set, 1797 samples)",
        "normalisation": "x/16, then per-feature (x - train mean) / train std (std 0 -> 1)",
        "split": {"test_fraction": 0.2, "stratified": True, "seed": seed},
        "load_s": round(time.perf_counter() - t0, 4),
    }
    return FederatedData(
        name="digits",
        train=train,
        test=test,
        input_shape=(64,),
        num_classes=10,
        natural_clients=None,
        client_names=None,
        info=info,
    )


# -------------------------------------------------------------------------------------- synthetic


def load_synthetic(
    data_dir: Path | None = None,
    download: bool = False,
    alpha: float = 1.0,
    beta: float = 1.0,
    num_clients: int = 30,
    seed: int = 0,
    test_fraction: float = 0.2,
    iid: bool = False,
) -> FederatedData:
    """FedProx Synthetic(alpha, beta): ``num_clients`` generating clients, 60 features, 10 classes.

    ``Synthetic(0, 0)``, ``(0.5, 0.5)`` and ``(1, 1)`` are the settings of the FedProx paper; larger
    ``alpha`` makes the clients' models differ more, larger ``beta`` their feature distributions.
    ``data_dir`` and ``download`` are accepted for a uniform loader signature and ignored.
    """
    for opt, val in (("alpha", alpha), ("beta", beta)):
        if isinstance(val, bool) or not isinstance(val, int | float) or not np.isfinite(val) or val < 0:
            raise ConfigError(f"synthetic: {opt} must be a finite number >= 0, got {val!r}")
    num_clients = _check_int("synthetic: num_clients", num_clients, 1)
    seed = _check_int("synthetic: seed", seed, 0)
    test_fraction = _check_fraction("synthetic: test_fraction", test_fraction)
    if not isinstance(iid, bool):
        raise ConfigError(f"synthetic: iid must be true or false, got {iid!r}")
    t0 = time.perf_counter()
    d, c = SYNTHETIC_FEATURES, SYNTHETIC_CLASSES
    rng = _rng(seed)
    sizes = rng.lognormal(4, 2, num_clients).astype(np.int64) + 50
    sd_x = np.power(np.arange(1, d + 1, dtype=np.float64), -1.2) ** 0.5
    w_shared = b_shared = u = big_b = np.zeros(0)
    if iid:
        w_shared = rng.normal(0.0, 1.0, (d, c))
        b_shared = rng.normal(0.0, 1.0, c)
    else:
        u = rng.normal(0.0, float(alpha), num_clients)
        big_b = rng.normal(0.0, float(beta), num_clients)
    xs_tr: list[npt.NDArray[np.float64]] = []
    ys_tr: list[npt.NDArray[np.int64]] = []
    xs_te: list[npt.NDArray[np.float64]] = []
    ys_te: list[npt.NDArray[np.int64]] = []
    train_clients: list[IndexArray] = []
    test_clients: list[IndexArray] = []
    n_tr = n_te = 0
    for k in range(num_clients):
        n = int(sizes[k])
        w: npt.NDArray[np.float64]
        b: npt.NDArray[np.float64]
        v: npt.NDArray[np.float64]
        if iid:
            w, b, v = w_shared, b_shared, np.zeros(d)
        else:
            w = rng.normal(u[k], 1.0, (d, c))
            b = rng.normal(u[k], 1.0, c)
            v = rng.normal(big_b[k], 1.0, d)
        x: npt.NDArray[np.float64] = v + rng.standard_normal((n, d)) * sd_x
        y = np.argmax(x @ w + b, axis=1).astype(np.int64)
        n_test = max(1, round(test_fraction * n))
        xs_tr.append(x[: n - n_test])
        ys_tr.append(y[: n - n_test])
        xs_te.append(x[n - n_test :])
        ys_te.append(y[n - n_test :])
        train_clients.append(np.arange(n_tr, n_tr + n - n_test, dtype=np.int64))
        test_clients.append(np.arange(n_te, n_te + n_test, dtype=np.int64))
        n_tr += n - n_test
        n_te += n_test
    train = ArrayDataset(
        torch.from_numpy(np.concatenate(xs_tr).astype(np.float32)), torch.from_numpy(np.concatenate(ys_tr)), c
    )
    test = ArrayDataset(
        torch.from_numpy(np.concatenate(xs_te).astype(np.float32)), torch.from_numpy(np.concatenate(ys_te)), c
    )
    info: dict[str, Any] = {
        "files": [],
        "source": "FedProx Synthetic(alpha, beta) generator (Li et al. 2020)",
        "options": {
            "alpha": float(alpha),
            "beta": float(beta),
            "num_clients": num_clients,
            "seed": seed,
            "test_fraction": test_fraction,
            "iid": iid,
        },
        "client_sizes": [int(s) for s in sizes],
        "load_s": round(time.perf_counter() - t0, 4),
    }
    return FederatedData(
        name="synthetic",
        train=train,
        test=test,
        input_shape=(d,),
        num_classes=c,
        natural_clients=train_clients,
        client_names=[f"client_{k:0{len(str(num_clients - 1))}d}" for k in range(num_clients)],
        info=info,
        test_clients=test_clients,
    )
