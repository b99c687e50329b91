"""Datasets for federated simulation, from verified local files, and the partitioners that split them.

>>> from fedsqueeze.data import load_dataset, partition, describe
>>> data = load_dataset("digits")                       # built in, no files needed
>>> parts = partition(data.train.y.numpy(), 10, "dirichlet", seed=0, alpha=0.5)
>>> len(parts)
10

``load_dataset(name, data_dir, download=False, **options)`` finds the files under
:func:`resolve_data_dir` (argument, else ``$FEDSQUEEZE_DATA``, else ``~/.cache/fedsqueeze/data``),
checks their checksums, parses them strictly and returns a :class:`FederatedData`. See
:data:`DATASETS` for the names, their options and where their files go:

=================  =======================================================  ==========================
name               files (under ``data_dir``)                               options
=================  =======================================================  ==========================
``mnist``          ``mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``  --
``fashion_mnist``  ``fashion_mnist/`` (same four names)                     --
``cifar10``        ``cifar10/cifar-10-binary.tar.gz``                       ``verify``
``shakespeare``    ``shakespeare/shakespeare_{train,test}.json.gz``         ``stride, seq_len,
                                                                            max_clients, seed``
``digits``         none (bundled with scikit-learn)                         ``seed``
``synthetic``      none (generated)                                         ``alpha, beta, num_clients,
                                                                            seed, test_fraction, iid``
=================  =======================================================  ==========================
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsqueeze.data.base import (
    DATA_ENV,
    ArrayDataset,
    DataError,
    FederatedData,
    FileSpec,
    resolve_data_dir,
)
from fedsqueeze.data.builtin import load_digits_dataset, load_synthetic
from fedsqueeze.data.cifar import load_cifar10
from fedsqueeze.data.idx import load_fashion_mnist, load_mnist
from fedsqueeze.data.partition import SCHEMES, PartitionSummary, describe, natural_selection, partition
from fedsqueeze.data.shakespeare import load_shakespeare
from fedsqueeze.errors import ConfigError


@dataclass(frozen=True)
class DatasetInfo:
    """A registry entry: the loader and what a caller may want to know before loading.

    ``loader(data_dir, download, **options)`` returns a :class:`FederatedData`; ``options`` maps each
    option name to its default.
    """

    name: str
    loader: Callable[..., FederatedData]
    description: str
    needs_files: bool
    downloadable: bool
    natural_clients: bool
    options: dict[str, Any]


def _options(loader: Callable[..., FederatedData]) -> dict[str, Any]:
    params = inspect.signature(loader).parameters
    return {k: p.default for k, p in params.items() if k not in ("data_dir", "download")}


def _entry(
    name: str,
    loader: Callable[..., FederatedData],
    description: str,
    *,
    needs_files: bool,
    downloadable: bool,
    natural_clients: bool,
) -> DatasetInfo:
    return DatasetInfo(
        name, loader, description, needs_files, downloadable, natural_clients, _options(loader)
    )


DATASETS: dict[str, DatasetInfo] = {
    d.name: d
    for d in (
        _entry(
            "mnist",
            load_mnist,
            "MNIST handwritten digits, 60k/10k, (1, 28, 28), 10 classes",
            needs_files=True,
            downloadable=True,
            natural_clients=False,
        ),
        _entry(
            "fashion_mnist",
            load_fashion_mnist,
            "Fashion-MNIST article images, 60k/10k, (1, 28, 28), 10 classes",
            needs_files=True,
            downloadable=True,
            natural_clients=False,
        ),
        _entry(
            "cifar10",
            load_cifar10,
            "CIFAR-10 colour images, 50k/10k, (3, 32, 32), 10 classes (binary tarball)",
            needs_files=True,
            downloadable=True,
            natural_clients=False,
        ),
        _entry(
            "shakespeare",
            load_shakespeare,
            "LEAF Shakespeare next-character prediction, 715 roles, windows of 80 characters",
            needs_files=True,
            downloadable=False,
            natural_clients=True,
        ),
        _entry(
            "digits",
            load_digits_dataset,
            "scikit-learn digits, 1797 real 8x8 digits, 64 features, 10 classes (built in)",
            needs_files=False,
            downloadable=False,
            natural_clients=False,
        ),
        _entry(
            "synthetic",
            load_synthetic,
            "FedProx Synthetic(alpha, beta), 60 features, 10 classes, generated clients (built in)",
            needs_files=False,
            downloadable=False,
            natural_clients=True,
        ),
    )
}

#: Other spellings accepted by :func:`load_dataset` (after lower-casing, '-' and ' ' -> '_').
ALIASES: dict[str, str] = {
    "fashionmnist": "fashion_mnist",
    "fmnist": "fashion_mnist",
    "cifar_10": "cifar10",
    "cifar": "cifar10",
    "sklearn_digits": "digits",
}


def canonical_name(name: str) -> str:
    """The registry name for ``name`` (case-insensitive, ``-``/space = ``_``, a few aliases)."""
    if not isinstance(name, str):
        raise ConfigError(f"dataset name must be a string, got {type(name).__name__} {name!r}")
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    key = ALIASES.get(key, key)
    if key not in DATASETS:
        near = difflib.get_close_matches(key, [*DATASETS, *ALIASES], n=1)
        hint = f" (did you mean {ALIASES.get(near[0], near[0])!r}?)" if near else ""
        raise ConfigError(f"unknown dataset {name!r}{hint}; available: {', '.join(DATASETS)}")
    return key


def load_dataset(
    name: str, data_dir: str | Path | None = None, *, download: bool = False, **options: Any
) -> FederatedData:
    """Load a dataset by registry name.

    Parameters
    ----------
    name:
        One of :data:`DATASETS` (``"mnist"``, ``"fashion_mnist"``, ``"cifar10"``, ``"shakespeare"``,
        ``"digits"``, ``"synthetic"``); case and ``-``/``_`` do not matter.
    data_dir:
        Folder holding ``<dataset>/`` sub-folders; default :func:`resolve_data_dir`. Ignored by the
        built-in datasets.
    download:
        Fetch missing files from the official mirror (verified before use). Never implicit.
    **options:
        Dataset options (``DATASETS[name].options`` lists them with defaults); unknown names are a
        :class:`~fedsqueeze.errors.ConfigError` that suggests the nearest one.

    Raises
    ------
    DataError
        Missing files (naming every path looked for), checksum mismatch, malformed file, failed
        download.
    ConfigError
        Unknown dataset or option, invalid option value.
    """
    entry = DATASETS[canonical_name(name)]
    unknown = [k for k in options if k not in entry.options]
    if unknown:
        bad = unknown[0]
        near = difflib.get_close_matches(bad, list(entry.options), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        allowed = ", ".join(entry.options) if entry.options else "none"
        raise ConfigError(f"unknown option {bad!r} for dataset {entry.name!r}{hint}; its options: {allowed}")
    if not isinstance(download, bool):
        raise ConfigError(f"download must be true or false, got {download!r}")
    return entry.loader(resolve_data_dir(data_dir), download, **options)


__all__ = [
    "DATASETS",
    "DATA_ENV",
    "SCHEMES",
    "ArrayDataset",
    "DataError",
    "DatasetInfo",
    "FederatedData",
    "FileSpec",
    "PartitionSummary",
    "canonical_name",
    "describe",
    "load_dataset",
    "natural_selection",
    "partition",
    "resolve_data_dir",
]
