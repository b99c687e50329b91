"""CIFAR-10 from the official *binary* tarball ``cifar-10-binary.tar.gz`` (never the pickled version).

Looked up as ``<data_dir>/cifar10/cifar-10-binary.tar.gz`` and checked against the official md5
``c32a1d4ab5d03f1284b67883e8d87530`` before it is opened. The members
``cifar-10-batches-bin/data_batch_{1..5}.bin`` and ``test_batch.bin`` are read straight from the
archive into memory (nothing is extracted to disk, so archive paths are never trusted). Each record is
1 label byte followed by 3072 pixel bytes (1024 red, 1024 green, 1024 blue, row-major 32x32), so a
batch must be a whole number of 3073-byte records.

Images become float32 ``(N, 3, 32, 32)`` normalised per channel with the training-set statistics
mean ``(0.4914, 0.4822, 0.4465)`` and std ``(0.2470, 0.2435, 0.2616)``.
"""

from __future__ import annotations

import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from fedsqueeze.data.base import ArrayDataset, DataError, FederatedData, FileSpec, require_files
from fedsqueeze.data.download import CIFAR10_URL, fetch_spec

CIFAR10_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
CIFAR10_FILE = FileSpec("cifar-10-binary.tar.gz", md5=CIFAR10_MD5, url=CIFAR10_URL, nbytes=170_052_171)
CIFAR10_MEMBER_DIR = "cifar-10-batches-bin"
CIFAR10_TRAIN_MEMBERS = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR10_TEST_MEMBERS = ("test_batch.bin",)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
RECORD_BYTES = 1 + 3 * 32 * 32


def parse_cifar_batch(
    data: bytes, *, name: str = "CIFAR batch"
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    """Split one binary batch into images ``(n, 3, 32, 32)`` uint8 and labels ``(n,)`` uint8."""
    if len(data) == 0 or len(data) % RECORD_BYTES:
        raise DataError(
            f"{name}: {len(data)} bytes is not a whole number of {RECORD_BYTES}-byte records "
            "(1 label byte + 3072 pixel bytes); the archive is corrupted or not the binary version"
        )
    rec = np.frombuffer(data, dtype=np.uint8).reshape(-1, RECORD_BYTES)
    labels = rec[:, 0].copy()
    if int(labels.max()) >= 10:
        raise DataError(f"{name}: label {int(labels.max())} out of range [0, 10)")
    images = rec[:, 1:].reshape(-1, 3, 32, 32)
    return images, labels


def read_cifar10_tarball(path: Path) -> dict[str, tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]]:
    """Read the train and test batches of a CIFAR-10 binary tarball (no checksum check here).

    Returns ``{"train": (images, labels), "test": (images, labels)}`` with uint8 arrays.
    """
    wanted = {f"{CIFAR10_MEMBER_DIR}/{m}" for m in CIFAR10_TRAIN_MEMBERS + CIFAR10_TEST_MEMBERS}
    blobs: dict[str, bytes] = {}
    try:
        with tarfile.open(path, mode="r:gz") as tar:
            for member in tar:
                if member.name in wanted and member.isfile():
                    f = tar.extractfile(member)
                    if f is not None:
                        blobs[member.name] = f.read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(
            f"{path}: cannot read the tar.gz archive ({e}); delete it and download it again"
        ) from e
    missing = sorted(wanted - blobs.keys())
    if missing:
        raise DataError(
            f"{path}: archive lacks {', '.join(missing)}; expected the binary CIFAR-10 tarball "
            f"(cifar-10-binary.tar.gz, folder {CIFAR10_MEMBER_DIR}/), not the python or matlab version"
        )
    out = {}
    for split, members in (("train", CIFAR10_TRAIN_MEMBERS), ("test", CIFAR10_TEST_MEMBERS)):
        parts = [parse_cifar_batch(blobs[f"{CIFAR10_MEMBER_DIR}/{m}"], name=f"{path}:{m}") for m in members]
        out[split] = (
            np.concatenate([p[0] for p in parts]),
            np.concatenate([p[1] for p in parts]),
        )
    return out


def normalise_channels(
    images: npt.NDArray[np.uint8], mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """``(images / 255 - mean[c]) / std[c]`` per channel (axis 1) as float32."""
    out = np.empty(images.shape, dtype=np.float32)
    for c, (m, s) in enumerate(zip(mean, std, strict=True)):
        lut = ((np.arange(256, dtype=np.float64) / 255.0 - m) / s).astype(np.float32)
        out[:, c] = lut[images[:, c]]
    return torch.from_numpy(out)


def load_cifar10(data_dir: Path, download: bool = False, verify: bool = True) -> FederatedData:
    """CIFAR-10: 50,000 train / 10,000 test colour images, ``(3, 32, 32)``, 10 classes.

    ``verify=False`` skips the md5 check (for a re-packed archive you trust); the provenance then
    records ``"verified": False``.
    """
    t0 = time.perf_counter()
    folder = data_dir / "cifar10"
    if verify:
        records = require_files("cifar10", folder, [CIFAR10_FILE], download=download, fetch=fetch_spec)
    else:
        spec = FileSpec(CIFAR10_FILE.name, url=CIFAR10_URL)
        path = folder / spec.name
        if not path.is_file():
            # Let require_files produce the standard missing-file message (or download).
            require_files("cifar10", folder, [CIFAR10_FILE], download=download, fetch=fetch_spec)
        records = [{"path": str(path), "nbytes": path.stat().st_size, "verified": False}]
    arrays = read_cifar10_tarball(folder / CIFAR10_FILE.name)
    splits = {}
    for split, (imgs, labels) in arrays.items():
        splits[split] = ArrayDataset(
            normalise_channels(imgs, CIFAR10_MEAN, CIFAR10_STD), torch.from_numpy(labels.astype(np.int64)), 10
        )
    info: dict[str, Any] = {
        "files": records,
        "source": "Krizhevsky 2009, CIFAR-10 binary version (https://www.cs.toronto.edu/~kriz/cifar.html)",
        "normalisation": {"mean": list(CIFAR10_MEAN), "std": list(CIFAR10_STD), "per_channel": True},
        "classes": list(CIFAR10_CLASSES),
        "load_s": round(time.perf_counter() - t0, 4),
    }
    return FederatedData(
        name="cifar10",
        train=splits["train"],
        test=splits["test"],
        input_shape=(3, 32, 32),
        num_classes=10,
        natural_clients=None,
        client_names=None,
        info=info,
    )
