"""Core data containers, the data-directory rule, file checks and the :class:`DataError`.

Every dataset loader returns a :class:`FederatedData`: a train and a test :class:`ArrayDataset`
(whole tensors in memory: the datasets fedsqueeze simulates fit comfortably), the per-example input
shape, the number of classes, and, where the data is naturally federated (Shakespeare roles,
Synthetic generating clients), the indices of each natural client into ``train``.

Files are always checked before they are parsed: :func:`verify_file` hashes a file and compares it
with the published (or recorded) checksum, and :func:`require_files` turns missing files into one
:class:`DataError` that names every path it looked for and the three ways to fix it
(``--data-dir``, ``FEDSQUEEZE_DATA``, ``download=True``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from fedsqueeze.errors import ConfigError

#: Environment variable naming the data directory when no ``data_dir`` argument is given.
DATA_ENV = "FEDSQUEEZE_DATA"

#: Fallback data directory (``~`` is expanded at call time).
DEFAULT_DATA_DIR = "~/.cache/fedsqueeze/data"

IndexArray = npt.NDArray[np.int64]


class DataError(ConfigError):
    """A dataset file is missing, corrupted (checksum mismatch), malformed, or cannot be downloaded.

    A :class:`~fedsqueeze.errors.ConfigError` subclass: like a bad option, it is detected before any
    training starts, and the message says what was expected, what was found and how to fix it.
    """


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """The data directory: ``data_dir``, else ``$FEDSQUEEZE_DATA``, else ``~/.cache/fedsqueeze/data``.

    The path is ``~``-expanded and made absolute; it need not exist (loaders say which files they
    looked for when it does not).
    """
    if data_dir is None or (isinstance(data_dir, str) and not data_dir.strip()):
        env = os.environ.get(DATA_ENV, "").strip()
        data_dir = env if env else DEFAULT_DATA_DIR
    if not isinstance(data_dir, str | os.PathLike):
        raise ConfigError(f"data_dir must be a path or None, got {type(data_dir).__name__} {data_dir!r}")
    return Path(data_dir).expanduser().absolute()


def _as_index(idx: npt.ArrayLike | torch.Tensor, n: int) -> torch.Tensor:
    """Validate an index array against a length ``n`` and return it as an int64 tensor."""
    t = idx if isinstance(idx, torch.Tensor) else torch.from_numpy(np.asarray(idx))
    if t.dtype == torch.bool:
        if t.shape != (n,):
            raise ConfigError(f"boolean mask must have shape ({n},), got {tuple(t.shape)}")
        return torch.nonzero(t, as_tuple=False).reshape(-1)
    if t.ndim != 1:
        raise ConfigError(f"subset indices must be 1-D, got shape {tuple(t.shape)}")
    if t.numel() == 0:
        return torch.zeros(0, dtype=torch.int64)
    if t.dtype.is_floating_point or t.dtype.is_complex:
        raise ConfigError(f"subset indices must be integers, got dtype {t.dtype}")
    t = t.to(torch.int64)
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= n:
        raise ConfigError(f"subset indices must lie in [0, {n}), got values in [{lo}, {hi}]")
    return t


@dataclass(frozen=True, eq=False)
class ArrayDataset:
    """A whole dataset as two tensors.

    Attributes
    ----------
    x:
        Features, shape ``(N, *input_shape)``: float32, normalised, for images and vectors; int64
        token ids ``(N, T)`` for text.
    y:
        int64 labels, shape ``(N,)``. For next-character prediction: the id of the character that
        follows each window (one target per window).
    num_classes:
        Number of label values (labels lie in ``[0, num_classes)``); the vocabulary size for text.
    """

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int

    def __post_init__(self) -> None:
        if not isinstance(self.x, torch.Tensor) or not isinstance(self.y, torch.Tensor):
            raise ConfigError("ArrayDataset x and y must be torch tensors")
        if self.y.ndim != 1 or self.y.dtype != torch.int64:
            raise ConfigError(f"labels y must be 1-D int64, got shape {tuple(self.y.shape)} {self.y.dtype}")
        if self.x.ndim < 1 or self.x.shape[0] != self.y.shape[0]:
            raise ConfigError(
                f"x and y must hold the same number of examples, got x {tuple(self.x.shape)} "
                f"and y {tuple(self.y.shape)}"
            )
        if int(self.num_classes) < 1:
            raise ConfigError(f"num_classes must be >= 1, got {self.num_classes}")

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __repr__(self) -> str:
        return (
            f"ArrayDataset(n={len(self)}, x={tuple(self.x.shape)} {self.x.dtype}, "
            f"num_classes={self.num_classes})"
        )

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Per-example shape (``x.shape[1:]``)."""
        return tuple(int(s) for s in self.x.shape[1:])

    def subset(self, idx: npt.ArrayLike | torch.Tensor) -> ArrayDataset:
        """The examples at ``idx`` (integer indices or a boolean mask), as a new dataset (copies)."""
        t = _as_index(idx, len(self))
        return ArrayDataset(self.x[t], self.y[t], self.num_classes)

    def label_counts(self) -> npt.NDArray[np.int64]:
        """Number of examples per label, length ``num_classes``."""
        return np.bincount(self.y.numpy(), minlength=self.num_classes).astype(np.int64)


@dataclass(frozen=True, eq=False)
class FederatedData:
    """A loaded dataset ready for federated simulation.

    Attributes
    ----------
    name:
        Registry name (``"mnist"``, ``"shakespeare"``, ...).
    train, test:
        The two splits. Clients are carved out of ``train`` by :func:`fedsqueeze.data.partition`;
        ``test`` is the server-side (global) evaluation set.
    input_shape:
        Per-example shape, e.g. ``(1, 28, 28)``, ``(64,)``, ``(80,)``.
    num_classes:
        Number of classes (vocabulary size for next-character prediction).
    natural_clients:
        For naturally federated data, per natural client (writer, role, generating client) the sorted
        int64 indices into ``train``; ``None`` otherwise.
    client_names:
        Names of the natural clients, aligned with ``natural_clients``; ``None`` otherwise.
    info:
        Provenance: the files read with their verified checksums, the normalisation, options, load
        time. JSON-serialisable.
    test_clients:
        Where the test split is per natural client too (Shakespeare, Synthetic): per natural client the
        indices into ``test``, aligned with ``natural_clients``; ``None`` otherwise.
    """

    name: str
    train: ArrayDataset
    test: ArrayDataset
    input_shape: tuple[int, ...]
    num_classes: int
    natural_clients: list[IndexArray] | None
    client_names: list[str] | None
    info: dict[str, Any] = field(default_factory=dict)
    test_clients: list[IndexArray] | None = None

    def __post_init__(self) -> None:
        for split, ds in (("train", self.train), ("test", self.test)):
            if ds.input_shape != tuple(self.input_shape):
                raise ConfigError(
                    f"{self.name}: {split} examples have shape {ds.input_shape}, expected {self.input_shape}"
                )
        if self.natural_clients is not None:
            if self.client_names is not None and len(self.client_names) != len(self.natural_clients):
                raise ConfigError(
                    f"{self.name}: {len(self.client_names)} client names for "
                    f"{len(self.natural_clients)} natural clients"
                )
            if self.test_clients is not None and len(self.test_clients) != len(self.natural_clients):
                raise ConfigError(
                    f"{self.name}: {len(self.test_clients)} test clients for "
                    f"{len(self.natural_clients)} natural clients"
                )

    def __repr__(self) -> str:
        nat = "none" if self.natural_clients is None else str(len(self.natural_clients))
        return (
            f"FederatedData({self.name!r}, train={len(self.train)}, test={len(self.test)}, "
            f"input_shape={self.input_shape}, num_classes={self.num_classes}, natural_clients={nat})"
        )


# --------------------------------------------------------------------------------------- files


@dataclass(frozen=True)
class FileSpec:
    """One file a dataset needs: its name inside the dataset folder and its expected checksum.

    ``sha256`` is preferred; ``md5`` is used where that is the only official value (CIFAR-10).
    ``url`` is the official download location, or ``None`` where there is none.
    """

    name: str
    sha256: str | None = None
    md5: str | None = None
    url: str | None = None
    nbytes: int | None = None

    @property
    def algorithm(self) -> str:
        return "sha256" if self.sha256 else "md5"

    @property
    def expected(self) -> str | None:
        return self.sha256 or self.md5


_HASH_CACHE: dict[tuple[str, str, int, int], str] = {}


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, streamed in 1 MiB chunks (cached per path, size and mtime in-process)."""
    st = path.stat()
    key = (str(path.resolve()), algorithm, st.st_size, st.st_mtime_ns)
    cached = _HASH_CACHE.get(key)
    if cached is not None:
        return cached
    h = hashlib.new(algorithm)
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    _HASH_CACHE[key] = digest
    return digest


def verify_file(path: Path, expected: str, algorithm: str = "sha256") -> dict[str, Any]:
    """Check ``path`` against ``expected`` (hex); raise :class:`DataError` on mismatch.

    Returns a provenance record ``{"path", "nbytes", algorithm: digest, "verified": True}``.
    """
    actual = file_digest(path, algorithm)
    if actual != expected.lower():
        raise DataError(
            f"checksum mismatch for {path}: expected {algorithm} {expected.lower()}, got {actual}. "
            "The file is corrupted, truncated or a different version. Delete it and download it again "
            "(load_dataset(..., download=True) / --download), or point --data-dir (or FEDSQUEEZE_DATA) "
            "at a folder with the original files."
        )
    return {"path": str(path), "nbytes": path.stat().st_size, algorithm: actual, "verified": True}


def require_files(
    dataset: str,
    folder: Path,
    specs: Sequence[FileSpec],
    *,
    download: bool = False,
    fetch: Callable[[FileSpec, Path], None] | None = None,
) -> list[dict[str, Any]]:
    """Locate (and, if asked, download) every file of a dataset, then verify each checksum.

    Parameters
    ----------
    dataset:
        Registry name, for messages.
    folder:
        ``<data_dir>/<dataset folder>``, where the files must lie.
    specs:
        The files with their checksums.
    download:
        Fetch missing files that have a URL (through ``fetch``) before checking.
    fetch:
        ``fetch(spec, dest)`` downloads one file; injected by the loader so tests can replace it.

    Returns
    -------
    One provenance record per file (see :func:`verify_file`).
    """
    paths = [folder / s.name for s in specs]
    missing = [(s, p) for s, p in zip(specs, paths, strict=True) if not p.is_file()]
    if missing and download:
        no_url = [str(p) for s, p in missing if s.url is None]
        if no_url:
            raise DataError(
                f"{dataset}: no official download exists for {', '.join(no_url)}; copy the files there "
                "by hand, or point --data-dir (or FEDSQUEEZE_DATA) at a folder that has them."
            )
        if fetch is None:  # pragma: no cover - loaders always pass one
            raise DataError(f"{dataset}: downloading is not supported")
        folder.mkdir(parents=True, exist_ok=True)
        for s, p in missing:
            fetch(s, p)
        missing = [(s, p) for s, p in missing if not p.is_file()]
    if missing:
        looked = "\n  ".join(str(p) for _, p in missing)
        hint = (
            "pass download=True (CLI: --download) to fetch them from the official mirror, "
            if all(s.url for s, _ in missing)
            else ""
        )
        raise DataError(
            f"{dataset}: {len(missing)} of {len(specs)} data file(s) not found. Looked for:\n  {looked}\n"
            f"Fix: {hint}point --data-dir at the folder that contains '{folder.name}/', or set the "
            f"environment variable {DATA_ENV}. (data_dir here resolved to {folder.parent})"
        )
    records = []
    for s, p in zip(specs, paths, strict=True):
        if s.expected is None:  # pragma: no cover - every spec carries a checksum
            raise DataError(f"{dataset}: no checksum recorded for {s.name}")
        records.append(verify_file(p, s.expected, s.algorithm))
    return records
