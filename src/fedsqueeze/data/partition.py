"""Split a dataset's examples among simulated clients, and describe how skewed the split is.

:func:`partition` returns one sorted int64 index array per client. All schemes are deterministic
functions of ``seed`` (numpy ``Generator(PCG64(seed))``); ``iid``, ``dirichlet`` and ``shards`` give
disjoint arrays that together cover every example exactly once.

Schemes
-------
``iid``
    A random permutation cut into ``num_clients`` parts whose sizes differ by at most one.
``dirichlet``
    Label skew (Hsu et al. 2019): for every class, proportions ``p ~ Dir(alpha * 1)`` over the
    clients, and that class's examples (in random order) are cut at ``cumsum(p)``. Small ``alpha``
    (0.01-0.1) gives clients with one or two classes, large ``alpha`` (100) approaches ``iid``;
    ``alpha`` is the knob to tune first. **Minimum size**: a single draw is made, then every client
    below ``min_size`` receives examples *moved* from the currently largest client (random
    examples of that client, so a repaired client inherits the donor's dominant class). Unlike
    redrawing until every client is large enough (NIID-Bench), this always terminates, also for
    ``alpha=0.01`` with many clients, and it changes the draw only as much as needed.
``shards``
    McMahan et al. 2017: examples sorted by label, cut into ``num_clients * shards_per_client``
    shards, each client gets ``shards_per_client`` random shards. Here the shards are *label-pure*:
    each class is cut into a number of shards proportional to its size (at least one), so a client
    holds at most ``shards_per_client`` classes (cutting the sorted array into equal shards, as in the
    paper, lets a shard straddle two labels). With fewer shards than classes present, label-pure
    shards are impossible and the sorted array is cut into equal contiguous shards instead.
``natural``
    The dataset's own clients (``FederatedData.natural_clients``: Shakespeare roles, Synthetic's
    generating clients). Natural clients smaller than ``min_size`` are skipped; if more remain than
    ``num_clients``, a random subset chosen by ``seed`` is kept, in the original order (see
    :func:`natural_selection` to recover which ones, e.g. for their names).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from fedsqueeze.errors import ConfigError

IndexArray = npt.NDArray[np.int64]

SCHEMES = ("iid", "dirichlet", "shards", "natural")


def _rng(seed: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(seed))


def _check_int(name: str, value: Any, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < lo:
        raise ConfigError(f"{name} must be an integer >= {lo}, got {value!r}")
    return int(value)


def _check_labels(labels: Any) -> npt.NDArray[np.int64]:
    arr = labels.numpy() if hasattr(labels, "numpy") and not isinstance(labels, np.ndarray) else labels
    arr = np.asarray(arr)
    if arr.ndim != 1:
        raise ConfigError(f"labels must be a 1-D array, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ConfigError(f"labels must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and int(arr.min()) < 0:
        raise ConfigError(f"labels must be >= 0, got minimum {int(arr.min())}")
    return arr


def _finish(owner: npt.NDArray[np.int64], num_clients: int) -> list[IndexArray]:
    """Per-client sorted index arrays from an owner-per-example array (one stable sort)."""
    order = np.argsort(owner, kind="stable").astype(np.int64)
    counts = np.bincount(owner, minlength=num_clients)
    return [a.copy() for a in np.split(order, np.cumsum(counts)[:-1])]


def natural_selection(sizes: Sequence[int], num_clients: int, *, seed: int, min_size: int = 1) -> IndexArray:
    """Which natural clients ``partition(..., scheme="natural")`` keeps, in order (indices into them)."""
    num_clients = _check_int("num_clients", num_clients, 1)
    sizes_arr = np.asarray(sizes, dtype=np.int64)
    eligible = np.flatnonzero(sizes_arr >= min_size)
    if num_clients > len(eligible):
        skipped = len(sizes_arr) - len(eligible)
        raise ConfigError(
            f"natural partition: {num_clients} clients requested but the dataset has only {len(eligible)} "
            f"natural clients with >= {min_size} example(s)"
            + (f" ({skipped} smaller ones skipped)" if skipped else "")
            + f"; use num_clients <= {len(eligible)} or another scheme (iid, dirichlet, shards)"
        )
    if num_clients == len(eligible):
        return eligible.astype(np.int64)
    chosen = _rng(seed).choice(len(eligible), size=num_clients, replace=False)
    return eligible[np.sort(chosen)].astype(np.int64)


def _iid(n: int, num_clients: int, rng: np.random.Generator) -> list[IndexArray]:
    perm = rng.permutation(n).astype(np.int64)
    return [np.sort(p) for p in np.array_split(perm, num_clients)]


def _dirichlet(
    labels: npt.NDArray[np.int64], num_clients: int, alpha: float, min_size: int, rng: np.random.Generator
) -> list[IndexArray]:
    n = len(labels)
    owner = np.empty(n, dtype=np.int64)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        p = rng.dirichlet(np.full(num_clients, alpha))
        if not np.all(np.isfinite(p)) or p.sum() <= 0:  # numerical underflow at tiny alpha
            p = np.zeros(num_clients)
            p[rng.integers(num_clients)] = 1.0
        cuts = np.floor(np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
        cuts = np.clip(cuts, 0, len(idx))
        owner[idx] = np.repeat(np.arange(num_clients, dtype=np.int64), np.diff(np.r_[0, cuts, len(idx)]))
    counts = np.bincount(owner, minlength=num_clients)
    # Repair: move random examples from the largest client to each client below min_size.
    while True:
        small = int(np.argmin(counts))
        need = min_size - int(counts[small])
        if need <= 0:
            break
        donor = int(np.argmax(counts))
        give = min(need, int(counts[donor]) - min_size)
        # give >= 1 always: num_clients * min_size <= n, so the largest client exceeds min_size
        # whenever another one is below it.
        pool = np.flatnonzero(owner == donor)
        moved = rng.choice(pool, size=give, replace=False)
        owner[moved] = small
        counts[donor] -= give
        counts[small] += give
    return _finish(owner, num_clients)


def _allocate_shards(class_sizes: npt.NDArray[np.int64], total: int) -> npt.NDArray[np.int64]:
    """Shards per class: proportional to size (largest remainder), at least 1, at most the class size."""
    quota = class_sizes * total / class_sizes.sum()
    alloc = np.maximum(np.floor(quota).astype(np.int64), 1)
    alloc = np.minimum(alloc, class_sizes)
    while alloc.sum() < total:
        room = alloc < class_sizes
        score = np.where(room, quota - alloc, -np.inf)
        alloc[int(np.argmax(score))] += 1
    while alloc.sum() > total:
        score = np.where(alloc > 1, alloc - quota, -np.inf)
        alloc[int(np.argmax(score))] -= 1
    return alloc


def _shards(
    labels: npt.NDArray[np.int64], num_clients: int, shards_per_client: int, rng: np.random.Generator
) -> list[IndexArray]:
    n = len(labels)
    total = num_clients * shards_per_client
    classes, class_sizes = np.unique(labels, return_counts=True)
    if total > n:
        raise ConfigError(
            f"shards partition: {num_clients} clients x {shards_per_client} shards = {total} shards "
            f"but only {n} examples; lower num_clients or shards_per_client"
        )
    order = np.argsort(labels, kind="stable")
    shards: list[npt.NDArray[np.int64]] = []
    if total < len(classes):
        # Too few shards to be label-pure: equal contiguous cuts of the sorted array (as the paper).
        shards = list(np.array_split(order, total))
    else:
        alloc = _allocate_shards(class_sizes.astype(np.int64), total)
        start = 0
        for size, k in zip(class_sizes, alloc, strict=True):
            shards.extend(np.array_split(order[start : start + size], int(k)))
            start += int(size)
    perm = rng.permutation(total)
    owner = np.empty(n, dtype=np.int64)
    for client in range(num_clients):
        for s in perm[client * shards_per_client : (client + 1) * shards_per_client]:
            owner[shards[int(s)]] = client
    return _finish(owner, num_clients)


def partition(
    labels: npt.NDArray[Any],
    num_clients: int,
    scheme: str,
    *,
    seed: int,
    alpha: float = 0.5,
    shards_per_client: int = 2,
    natural: list[npt.NDArray[Any]] | None = None,
    min_size: int = 1,
) -> list[IndexArray]:
    """Per-client index arrays (sorted int64) into a dataset with these ``labels``.

    Parameters
    ----------
    labels:
        Integer label per example, shape ``(N,)`` (a tensor is accepted too).
    num_clients:
        Number of clients (>= 1).
    scheme:
        ``"iid"``, ``"dirichlet"``, ``"shards"`` or ``"natural"`` (module docstring).
    seed:
        Everything random comes from ``numpy.random.Generator(PCG64(seed))``.
    alpha:
        Dirichlet concentration (> 0); smaller = more label skew. ``dirichlet`` only.
    shards_per_client:
        Shards (hence at most classes) per client. ``shards`` only.
    natural:
        The dataset's natural clients (index arrays into the same examples). ``natural`` only.
    min_size:
        Minimum examples per client: guaranteed by ``dirichlet`` (by moving examples), a
        consequence of ``iid``/``shards`` sizes, and a filter on natural clients.

    Raises
    ------
    ConfigError
        Unknown scheme, ``num_clients < 1``, more clients (times ``min_size``) than examples,
        ``alpha <= 0``, ``natural`` scheme without natural clients or with too few of them.
    """
    if not isinstance(scheme, str) or scheme.strip().lower() not in SCHEMES:
        near = difflib.get_close_matches(str(scheme).strip().lower(), SCHEMES, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ConfigError(f"unknown partition scheme {scheme!r}{hint}; choose one of {', '.join(SCHEMES)}")
    scheme = scheme.strip().lower()
    num_clients = _check_int("num_clients", num_clients, 1)
    min_size = _check_int("min_size", min_size, 0)
    seed = _check_int("seed", seed, 0)
    lab = _check_labels(labels)
    n = len(lab)
    rng = _rng(seed)

    if scheme == "natural":
        if natural is None:
            raise ConfigError(
                "the 'natural' partition needs a dataset with natural clients (e.g. shakespeare, "
                "synthetic); this dataset has none: use iid, dirichlet or shards"
            )
        parts = [np.asarray(p) for p in natural]
        for i, p in enumerate(parts):
            if p.ndim != 1 or (
                p.size and (not np.issubdtype(p.dtype, np.integer) or p.min() < 0 or p.max() >= n)
            ):
                raise ConfigError(f"natural client {i}: expected 1-D integer indices in [0, {n})")
        keep = natural_selection([len(p) for p in parts], num_clients, seed=seed, min_size=min_size)
        return [np.sort(parts[int(i)].astype(np.int64)) for i in keep]

    if n == 0:
        raise ConfigError("cannot partition an empty dataset")
    if num_clients > n or num_clients * min_size > n:
        raise ConfigError(
            f"{num_clients} clients with >= {max(min_size, 1)} example(s) each need at least "
            f"{num_clients * max(min_size, 1)} examples, the dataset has {n}; lower num_clients"
        )
    if scheme == "iid":
        return _iid(n, num_clients, rng)
    if scheme == "dirichlet":
        if (
            isinstance(alpha, bool)
            or not isinstance(alpha, int | float | np.floating)
            or not np.isfinite(alpha)
        ):
            raise ConfigError(f"dirichlet alpha must be a finite number > 0, got {alpha!r}")
        if alpha <= 0:
            raise ConfigError(
                f"dirichlet alpha must be > 0, got {alpha!r} (0.01 = extreme label skew, 100 = nearly iid)"
            )
        return _dirichlet(lab, num_clients, float(alpha), min_size, rng)
    shards_per_client = _check_int("shards_per_client", shards_per_client, 1)
    parts = _shards(lab, num_clients, shards_per_client, rng)
    small = [i for i, p in enumerate(parts) if len(p) < min_size]
    if small:
        raise ConfigError(
            f"shards partition: client(s) {small[:5]} got fewer than min_size={min_size} examples; "
            "lower num_clients or shards_per_client"
        )
    return parts


# ------------------------------------------------------------------------------------- describe


@dataclass
class PartitionSummary:
    """Sizes and label histograms of a partition, with summary statistics.

    Attributes
    ----------
    sizes:
        Examples per client, shape ``(clients,)``.
    label_hist:
        Examples per client and class, shape ``(clients, num_classes)``.
    num_classes:
        Number of classes (columns of ``label_hist``).
    """

    sizes: npt.NDArray[np.int64]
    label_hist: npt.NDArray[np.int64]
    num_classes: int

    @property
    def num_clients(self) -> int:
        return len(self.sizes)

    @property
    def total(self) -> int:
        """Examples over all clients."""
        return int(self.sizes.sum())

    @property
    def classes_per_client(self) -> npt.NDArray[np.int64]:
        """Number of distinct labels each client holds."""
        return (self.label_hist > 0).sum(axis=1).astype(np.int64)

    @property
    def mean_classes_per_client(self) -> float:
        return float(self.classes_per_client.mean()) if self.num_clients else 0.0

    @property
    def label_skew_tv(self) -> float:
        """Mean total-variation distance between each client's label distribution and the pooled one.

        0 for a perfectly balanced (iid-like) split; close to 1 when every client has one class
        out of many. Empty clients are left out.
        """
        nz = self.sizes > 0
        if not nz.any():
            return 0.0
        pooled = self.label_hist.sum(axis=0) / max(self.total, 1)
        local = self.label_hist[nz] / self.sizes[nz, None]
        return float(0.5 * np.abs(local - pooled).sum(axis=1).mean())

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary: statistics plus per-client sizes and histograms."""
        s = self.sizes
        empty = self.num_clients == 0
        return {
            "num_clients": self.num_clients,
            "num_classes": self.num_classes,
            "total": self.total,
            "size_min": 0 if empty else int(s.min()),
            "size_median": 0.0 if empty else float(np.median(s)),
            "size_max": 0 if empty else int(s.max()),
            "size_mean": 0.0 if empty else float(s.mean()),
            "size_std": 0.0 if empty else float(s.std()),
            "mean_classes_per_client": self.mean_classes_per_client,
            "min_classes_per_client": 0 if empty else int(self.classes_per_client.min()),
            "max_classes_per_client": 0 if empty else int(self.classes_per_client.max()),
            "label_skew_tv": self.label_skew_tv,
            "sizes": [int(v) for v in s],
            "label_hist": [[int(v) for v in row] for row in self.label_hist],
        }

    def summary_line(self) -> str:
        d = self.to_dict()
        return (
            f"{d['num_clients']} clients, {d['total']} examples; size min/median/max "
            f"{d['size_min']}/{d['size_median']:g}/{d['size_max']}; classes per client "
            f"{d['mean_classes_per_client']:.2f} (mean); label skew (TV) {d['label_skew_tv']:.3f}"
        )

    def render(self, max_rows: int = 20) -> Any:
        """A :class:`rich.table.Table`: one row per client (first ``max_rows``), size and histogram."""
        from rich.table import Table

        table = Table(title=f"Partition: {self.summary_line()}", show_lines=False)
        table.add_column("client", justify="right")
        table.add_column("size", justify="right")
        table.add_column("classes", justify="right")
        for c in range(self.num_classes):
            table.add_column(str(c), justify="right")
        for i in range(min(self.num_clients, max_rows)):
            row = self.label_hist[i]
            table.add_row(
                str(i),
                str(int(self.sizes[i])),
                str(int(self.classes_per_client[i])),
                *[str(int(v)) if v else "." for v in row],
            )
        if self.num_clients > max_rows:
            table.add_row("...", f"({self.num_clients - max_rows} more)", "", *[""] * self.num_classes)
        return table

    def to_text(self, max_rows: int = 20) -> str:
        """Plain-text rendering of :meth:`render` (no colours)."""
        from rich.console import Console

        console = Console(width=max(100, 12 + 7 * (self.num_classes + 3)), color_system=None, record=True)
        with console.capture() as cap:
            console.print(self.render(max_rows))
        return cap.get()

    def __str__(self) -> str:
        return self.summary_line()


def describe(
    parts: Sequence[npt.NDArray[Any]], labels: npt.NDArray[Any], num_classes: int
) -> PartitionSummary:
    """Per-client sizes and label histograms of ``parts`` over ``labels`` (in ``[0, num_classes)``)."""
    lab = _check_labels(labels)
    num_classes = _check_int("num_classes", num_classes, 1)
    if lab.size and int(lab.max()) >= num_classes:
        raise ConfigError(f"label {int(lab.max())} is outside [0, {num_classes}); pass the right num_classes")
    hist = np.zeros((len(parts), num_classes), dtype=np.int64)
    for i, p in enumerate(parts):
        if len(p):
            hist[i] = np.bincount(lab[np.asarray(p, dtype=np.int64)], minlength=num_classes)
    sizes = np.array([len(p) for p in parts], dtype=np.int64)
    return PartitionSummary(sizes=sizes, label_hist=hist, num_classes=num_classes)
