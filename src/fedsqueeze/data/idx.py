"""MNIST and Fashion-MNIST from the original IDX ``.gz`` files.

Files are looked up as ``<data_dir>/mnist/*.gz`` and ``<data_dir>/fashion_mnist/*.gz`` under their
original names (``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``,
``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``). Each file's sha256 is checked against
the published value before it is parsed, and the IDX header is checked strictly (magic, element type,
number of dimensions, sizes, exact payload length).

Images become float32 ``(N, 1, 28, 28)`` with ``(x / 255 - mean) / std`` using the standard
statistics of each training set: MNIST ``(0.1307, 0.3081)``, Fashion-MNIST ``(0.2860, 0.3530)``.
Loading the 60k + 10k images (hash, gunzip, parse, normalise) takes about 0.5 s on one core, so
nothing is cached on disk.
"""

from __future__ import annotations

import gzip
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from fedsqueeze.data.base import ArrayDataset, DataError, FederatedData, FileSpec, require_files
from fedsqueeze.data.download import FASHION_MNIST_URL, MNIST_URL, fetch_spec

#: IDX element-type codes (third magic byte) -> numpy big-endian dtype.
_IDX_TYPES: dict[int, str] = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

MNIST_FILES: dict[str, FileSpec] = {
    "train_images": FileSpec(
        "train-images-idx3-ubyte.gz",
        sha256="440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        url=MNIST_URL + "train-images-idx3-ubyte.gz",
        nbytes=9_912_422,
    ),
    "train_labels": FileSpec(
        "train-labels-idx1-ubyte.gz",
        sha256="3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        url=MNIST_URL + "train-labels-idx1-ubyte.gz",
        nbytes=28_881,
    ),
    "test_images": FileSpec(
        "t10k-images-idx3-ubyte.gz",
        sha256="8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        url=MNIST_URL + "t10k-images-idx3-ubyte.gz",
        nbytes=1_648_877,
    ),
    "test_labels": FileSpec(
        "t10k-labels-idx1-ubyte.gz",
        sha256="f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        url=MNIST_URL + "t10k-labels-idx1-ubyte.gz",
        nbytes=4_542,
    ),
}

FASHION_MNIST_FILES: dict[str, FileSpec] = {
    "train_images": FileSpec(
        "train-images-idx3-ubyte.gz",
        sha256="3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        url=FASHION_MNIST_URL + "train-images-idx3-ubyte.gz",
        nbytes=26_421_880,
    ),
    "train_labels": FileSpec(
        "train-labels-idx1-ubyte.gz",
        sha256="a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        url=FASHION_MNIST_URL + "train-labels-idx1-ubyte.gz",
        nbytes=29_515,
    ),
    "test_images": FileSpec(
        "t10k-images-idx3-ubyte.gz",
        sha256="346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        url=FASHION_MNIST_URL + "t10k-images-idx3-ubyte.gz",
        nbytes=4_422_102,
    ),
    "test_labels": FileSpec(
        "t10k-labels-idx1-ubyte.gz",
        sha256="67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
        url=FASHION_MNIST_URL + "t10k-labels-idx1-ubyte.gz",
        nbytes=5_148,
    ),
}

#: (mean, std) of the training pixels scaled to [0, 1].
MNIST_STATS = (0.1307, 0.3081)
FASHION_MNIST_STATS = (0.2860, 0.3530)

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


def parse_idx(data: bytes, *, name: str = "IDX data", ndim: int | None = None) -> npt.NDArray[Any]:
    """Parse an (uncompressed) IDX buffer strictly and return a read-only array view of it.

    Checks: the two leading zero bytes, a known element type, the number of dimensions (``ndim``
    when given), non-zero sizes, and that the payload length equals exactly ``prod(dims)`` elements.

    Raises
    ------
    DataError
        Naming ``name`` and what was wrong.
    """
    if len(data) < 4:
        raise DataError(f"{name}: {len(data)} bytes is too short for an IDX header (4-byte magic)")
    if data[0] != 0 or data[1] != 0:
        raise DataError(f"{name}: bad IDX magic {data[:4].hex()}, expected 0000 followed by type and ndim")
    dtype_code, nd = data[2], data[3]
    if dtype_code not in _IDX_TYPES:
        raise DataError(f"{name}: unknown IDX element type 0x{dtype_code:02x}")
    if ndim is not None and nd != ndim:
        raise DataError(f"{name}: IDX file has {nd} dimension(s), expected {ndim}")
    header = 4 + 4 * nd
    if len(data) < header:
        raise DataError(f"{name}: truncated IDX header ({len(data)} bytes, need {header})")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(nd))
    if any(d == 0 for d in dims):
        raise DataError(f"{name}: IDX dimensions {dims} contain a zero")
    dtype = np.dtype(_IDX_TYPES[dtype_code])
    count = int(np.prod(dims, dtype=np.int64))
    expected_len = header + count * dtype.itemsize
    if len(data) != expected_len:
        raise DataError(
            f"{name}: IDX payload is {len(data) - header} bytes, expected {count * dtype.itemsize} "
            f"for dimensions {dims} ({'truncated' if len(data) < expected_len else 'trailing bytes'})"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)


def read_idx_gz(path: Path, *, ndim: int | None = None) -> npt.NDArray[Any]:
    """Gunzip and :func:`parse_idx` one file."""
    try:
        with path.open("rb") as f:
            raw = gzip.decompress(f.read())
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: not a valid gzip file ({e}); delete it and download it again") from e
    return parse_idx(raw, name=str(path), ndim=ndim)


def _images(path: Path) -> npt.NDArray[np.uint8]:
    arr = read_idx_gz(path, ndim=3)
    if arr.dtype != np.uint8 or arr.shape[1:] != (28, 28):
        raise DataError(f"{path}: expected uint8 images of 28x28, got {arr.dtype} {arr.shape}")
    return arr


def _labels(path: Path, n_images: int, num_classes: int = 10) -> npt.NDArray[np.uint8]:
    arr = read_idx_gz(path, ndim=1)
    if arr.dtype != np.uint8:
        raise DataError(f"{path}: expected uint8 labels, got {arr.dtype}")
    if arr.shape[0] != n_images:
        raise DataError(f"{path}: {arr.shape[0]} labels for {n_images} images")
    if int(arr.max()) >= num_classes:
        raise DataError(f"{path}: label {int(arr.max())} out of range [0, {num_classes})")
    return arr


def normalise_uint8(images: npt.NDArray[np.uint8], mean: float, std: float) -> torch.Tensor:
    """``(images / 255 - mean) / std`` as float32, through a 256-entry lookup table (one pass)."""
    lut = ((np.arange(256, dtype=np.float64) / 255.0 - mean) / std).astype(np.float32)
    return torch.from_numpy(lut[images])


def _load_idx_dataset(
    name: str,
    data_dir: Path,
    download: bool,
    files: dict[str, FileSpec],
    stats: tuple[float, float],
    source: str,
) -> FederatedData:
    t0 = time.perf_counter()
    folder = data_dir / name
    specs = list(files.values())
    records = require_files(name, folder, specs, download=download, fetch=fetch_spec)
    t_verify = time.perf_counter() - t0
    mean, std = stats
    splits = {}
    for split in ("train", "test"):
        imgs = _images(folder / files[f"{split}_images"].name)
        labels = _labels(folder / files[f"{split}_labels"].name, imgs.shape[0])
        x = normalise_uint8(imgs, mean, std).unsqueeze(1)
        y = torch.from_numpy(labels.astype(np.int64))
        splits[split] = ArrayDataset(x, y, 10)
    info: dict[str, Any] = {
        "files": records,
        "source": source,
        "normalisation": {"mean": mean, "std": std, "formula": "(x / 255 - mean) / std"},
        "verify_s": round(t_verify, 4),
        "load_s": round(time.perf_counter() - t0, 4),
    }
    return FederatedData(
        name=name,
        train=splits["train"],
        test=splits["test"],
        input_shape=(1, 28, 28),
        num_classes=10,
        natural_clients=None,
        client_names=None,
        info=info,
    )


def load_mnist(data_dir: Path, download: bool = False) -> FederatedData:
    """MNIST: 60,000 train / 10,000 test handwritten digits, ``(1, 28, 28)``, 10 classes."""
    return _load_idx_dataset(
        "mnist", data_dir, download, MNIST_FILES, MNIST_STATS, "LeCun, Cortes, Burges: MNIST (IDX files)"
    )


def load_fashion_mnist(data_dir: Path, download: bool = False) -> FederatedData:
    """Fashion-MNIST: 60,000 train / 10,000 test Zalando article images, ``(1, 28, 28)``, 10 classes."""
    data = _load_idx_dataset(
        "fashion_mnist",
        data_dir,
        download,
        FASHION_MNIST_FILES,
        FASHION_MNIST_STATS,
        "Xiao, Rasul, Vollgraf: Fashion-MNIST (zalandoresearch/fashion-mnist, IDX files)",
    )
    data.info["classes"] = list(FASHION_MNIST_CLASSES)
    return data
