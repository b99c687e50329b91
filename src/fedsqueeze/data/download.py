"""Download one file to disk, verified: fetch to a temporary file, check its hash, then rename.

Only used when a loader is called with ``download=True``; nothing in fedsqueeze reaches the network
otherwise. A partially downloaded or corrupted file never appears under its final name: the bytes go
to ``<dest>.<random>.part`` in the same folder, are hashed while they stream, and are renamed with
:func:`os.replace` (atomic on one file system) only when the checksum matches.

Official locations are recorded in :data:`URLS`.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from fedsqueeze.data.base import DataError, FileSpec

#: Official download locations (mirrors that torchvision / the dataset authors use).
MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"

URLS: dict[str, str] = {
    "mnist": MNIST_URL,
    "fashion_mnist": FASHION_MNIST_URL,
    "cifar10": CIFAR10_URL,
}

_CHUNK = 1 << 20


def download(
    url: str,
    dest: str | Path,
    *,
    sha256: str | None = None,
    md5: str | None = None,
    timeout_s: float = 60.0,
) -> Path:
    """Download ``url`` to ``dest`` and verify it; return ``dest``.

    Parameters
    ----------
    url:
        Where to fetch from (``http``/``https`` only).
    dest:
        Final path; its folder is created. An existing file is replaced only after the new one
        verified.
    sha256, md5:
        Expected hex digest; at least one is required (an unverified download is refused).
    timeout_s:
        Socket timeout in seconds for connecting and for each read.

    Raises
    ------
    DataError
        Offline / unreachable / HTTP error (with the manual fix), or checksum mismatch (the temporary
        file is deleted).
    """
    if not url.startswith(("http://", "https://")):
        raise DataError(f"refusing to download from {url!r}: only http:// and https:// URLs are allowed")
    if sha256:
        algorithm, expected = "sha256", sha256
    elif md5:
        algorithm, expected = "md5", md5
    else:
        raise DataError(f"refusing to download {url} without a checksum (give sha256= or md5=)")
    request = urllib.request.Request(url, headers={"User-Agent": "fedsqueeze"})
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.new(algorithm)
    fd, tmp_name = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=timeout_s) as resp:
                for chunk in iter(lambda: resp.read(_CHUNK), b""):
                    h.update(chunk)
                    out.write(chunk)
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise DataError(
                f"could not download {url} ({type(e).__name__}: {getattr(e, 'reason', e)}). "
                f"If this machine is offline, fetch the file elsewhere and copy it to {dest}, "
                "or point --data-dir (or FEDSQUEEZE_DATA) at a folder that already has the data."
            ) from e
        actual = h.hexdigest()
        if actual != expected.lower():
            raise DataError(
                f"downloaded {url} but its {algorithm} is {actual}, expected {expected.lower()}; "
                "the download was discarded. Try again (the mirror may have served an error page), "
                f"or fetch the file by hand and copy it to {dest}."
            )
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dest


def fetch_spec(spec: FileSpec, dest: Path) -> None:
    """Download one :class:`~fedsqueeze.data.base.FileSpec` to ``dest`` (used by ``require_files``)."""
    if spec.url is None:
        raise DataError(f"no official download location is known for {spec.name}; copy it to {dest} by hand")
    download(spec.url, dest, sha256=spec.sha256, md5=spec.md5)
