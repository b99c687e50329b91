"""Dataset loaders: real files from the shared data folder, checksums, strict parsing, error messages."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsqueeze.data import (
    DATASETS,
    ArrayDataset,
    DataError,
    FederatedData,
    canonical_name,
    load_dataset,
    resolve_data_dir,
)
from fedsqueeze.data import download as download_mod
from fedsqueeze.data.cifar import CIFAR10_MD5, CIFAR10_MEAN, CIFAR10_STD, RECORD_BYTES
from fedsqueeze.data.idx import MNIST_FILES, parse_idx
from fedsqueeze.data.shakespeare import ALL_LETTERS, PAD_ID, UNK_ID, VOCAB_SIZE, decode_ids, encode_text
from fedsqueeze.errors import ConfigError


def _shared_data_dir() -> Path:
    env = os.environ.get("FEDSQUEEZE_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data"


SHARED = _shared_data_dir()
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _need(sub: str) -> Path:
    folder = SHARED / sub
    if not folder.is_dir():
        pytest.skip(f"shared data folder {folder} is absent (set FEDSQUEEZE_DATA to a copy of shared/data)")
    return SHARED


@pytest.fixture(scope="module")
def mnist() -> FederatedData:
    return load_dataset("mnist", _need("mnist"))


@pytest.fixture(scope="module")
def fashion() -> FederatedData:
    return load_dataset("fashion_mnist", _need("fashion_mnist"))


@pytest.fixture(scope="module")
def shakespeare() -> FederatedData:
    return load_dataset("shakespeare", _need("shakespeare"))


# --------------------------------------------------------------------------------- registry, dirs


def test_registry_names_and_options() -> None:
    assert set(DATASETS) == {"mnist", "fashion_mnist", "cifar10", "shakespeare", "digits", "synthetic"}
    assert DATASETS["shakespeare"].options == {"stride": 80, "seq_len": 80, "max_clients": None, "seed": 0}
    assert DATASETS["synthetic"].natural_clients and not DATASETS["mnist"].natural_clients
    assert canonical_name("Fashion-MNIST") == "fashion_mnist"
    assert canonical_name("CIFAR-10") == "cifar10"


def test_unknown_dataset_and_option_suggest() -> None:
    with pytest.raises(ConfigError, match="did you mean 'mnist'"):
        load_dataset("mnsit")
    with pytest.raises(ConfigError, match="did you mean 'stride'"):
        load_dataset("shakespeare", SHARED, strid=3)
    with pytest.raises(ConfigError, match="unknown option 'alpha' for dataset 'digits'"):
        load_dataset("digits", alpha=1.0)


def test_resolve_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FEDSQUEEZE_DATA", str(tmp_path / "env"))
    assert resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_data_dir(None) == tmp_path / "env"
    monkeypatch.delenv("FEDSQUEEZE_DATA")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_data_dir(None) == tmp_path / ".cache" / "fedsqueeze" / "data"


# --------------------------------------------------------------------------------------- MNIST


def test_mnist_shapes_counts_normalisation(mnist: FederatedData) -> None:
    assert mnist.input_shape == (1, 28, 28) and mnist.num_classes == 10
    assert mnist.train.x.shape == (60000, 1, 28, 28) and mnist.train.x.dtype == torch.float32
    assert mnist.test.x.shape == (10000, 1, 28, 28)
    assert mnist.train.y.dtype == torch.int64
    assert mnist.train.label_counts().tolist() == MNIST_TRAIN_COUNTS
    assert mnist.test.label_counts().tolist() == MNIST_TEST_COUNTS
    # standard stats (0.1307, 0.3081) are the training-set pixel mean/std
    assert abs(float(mnist.train.x.mean())) < 1e-3
    assert abs(float(mnist.train.x.std()) - 1.0) < 1e-3
    assert float(mnist.train.x.min()) == pytest.approx(-0.1307 / 0.3081, abs=1e-6)
    assert float(mnist.train.x.max()) == pytest.approx((1 - 0.1307) / 0.3081, abs=1e-5)
    assert mnist.natural_clients is None
    assert all(r["verified"] for r in mnist.info["files"]) and len(mnist.info["files"]) == 4
    assert mnist.info["files"][0]["sha256"] == MNIST_FILES["train_images"].sha256


def test_fashion_mnist(fashion: FederatedData) -> None:
    assert fashion.train.x.shape == (60000, 1, 28, 28) and fashion.test.x.shape == (10000, 1, 28, 28)
    assert fashion.train.label_counts().tolist() == [6000] * 10
    assert fashion.test.label_counts().tolist() == [1000] * 10
    assert abs(float(fashion.train.x.mean())) < 1e-3
    assert abs(float(fashion.train.x.std()) - 1.0) < 1e-3
    assert fashion.info["classes"][9] == "Ankle boot"


def _copy_mnist(tmp_path: Path) -> Path:
    src = _need("mnist") / "mnist"
    dst = tmp_path / "mnist"
    dst.mkdir()
    for spec in MNIST_FILES.values():
        shutil.copyfile(src / spec.name, dst / spec.name)
    return dst


def test_checksum_mismatch_names_file_and_hashes(tmp_path: Path) -> None:
    dst = _copy_mnist(tmp_path)
    victim = dst / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(victim.read_bytes())
    raw[100] ^= 0x01
    victim.write_bytes(bytes(raw))
    actual = hashlib.sha256(bytes(raw)).hexdigest()
    with pytest.raises(DataError) as exc:
        load_dataset("mnist", tmp_path)
    msg = str(exc.value)
    assert str(victim) in msg
    assert MNIST_FILES["test_labels"].sha256 in msg and actual in msg
    assert "Delete it and download it again" in msg and "--data-dir" in msg


def test_missing_files_message(tmp_path: Path) -> None:
    with pytest.raises(DataError) as exc:
        load_dataset("mnist", tmp_path)
    msg = str(exc.value)
    for spec in MNIST_FILES.values():
        assert str(tmp_path / "mnist" / spec.name) in msg
    assert "--data-dir" in msg and "FEDSQUEEZE_DATA" in msg and "download=True" in msg


def test_missing_one_file_lists_only_it(tmp_path: Path) -> None:
    dst = _copy_mnist(tmp_path)
    (dst / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="1 of 4") as exc:
        load_dataset("mnist", tmp_path)
    assert "train-labels-idx1-ubyte.gz" in str(exc.value)
    assert "t10k-labels" not in str(exc.value)


def _idx(dtype_code: int, dims: tuple[int, ...], payload: bytes) -> bytes:
    head = bytes([0, 0, dtype_code, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)
    return head + payload


def test_parse_idx_strict() -> None:
    ok = parse_idx(_idx(0x08, (2, 3), bytes(range(6))), ndim=2)
    assert ok.shape == (2, 3) and ok[1, 2] == 5
    with pytest.raises(DataError, match="magic"):
        parse_idx(b"\x01" + _idx(0x08, (2,), b"ab")[1:])
    with pytest.raises(DataError, match="element type"):
        parse_idx(_idx(0x07, (2,), b"ab"))
    with pytest.raises(DataError, match="expected 3"):
        parse_idx(_idx(0x08, (2,), b"ab"), ndim=3)
    with pytest.raises(DataError, match="truncated"):
        parse_idx(_idx(0x08, (2, 3), bytes(5)))
    with pytest.raises(DataError, match="trailing"):
        parse_idx(_idx(0x08, (2, 3), bytes(7)))
    with pytest.raises(DataError, match="header"):
        parse_idx(bytes([0, 0, 8, 3, 0, 0]))
    assert parse_idx(_idx(0x0C, (2,), (7).to_bytes(4, "big") + (9).to_bytes(4, "big"))).tolist() == [7, 9]


def test_corrupt_gzip_is_data_error(tmp_path: Path) -> None:
    from fedsqueeze.data.idx import read_idx_gz

    p = tmp_path / "x.gz"
    p.write_bytes(gzip.compress(_idx(0x08, (4,), b"abcd"))[:-6])
    with pytest.raises(DataError, match="gzip"):
        read_idx_gz(p)


# ------------------------------------------------------------------------------------ download


def test_download_offline_is_clear_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataError) as exc:
        load_dataset("mnist", tmp_path, download=True)
    msg = str(exc.value)
    assert "could not download https://ossci-datasets.s3.amazonaws.com/mnist/" in msg
    assert "offline" in msg and "--data-dir" in msg
    assert list((tmp_path / "mnist").iterdir()) == []  # no partial files left behind


class _FakeResponse(io.BytesIO):
    def __enter__(self) -> _FakeResponse:
        return self

    def __exit__(self, *args: object) -> None:
        self.close()


def test_download_verifies_then_renames(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    body = b"hello federated world" * 1000
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: _FakeResponse(body))
    dest = tmp_path / "sub" / "file.bin"
    good = hashlib.sha256(body).hexdigest()
    assert download_mod.download("https://example.invalid/f", dest, sha256=good) == dest
    assert dest.read_bytes() == body
    with pytest.raises(DataError, match="expected " + "0" * 64):
        download_mod.download("https://example.invalid/f", tmp_path / "bad.bin", sha256="0" * 64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]  # mismatch left nothing behind
    md5 = hashlib.md5(body).hexdigest()
    assert download_mod.download("https://example.invalid/f", tmp_path / "m.bin", md5=md5).is_file()
    with pytest.raises(DataError, match="without a checksum"):
        download_mod.download("https://example.invalid/f", tmp_path / "n.bin")
    with pytest.raises(DataError, match="only http"):
        download_mod.download("file:///etc/passwd", tmp_path / "p.bin", sha256=good)


def test_shakespeare_download_not_available(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no official download"):
        load_dataset("shakespeare", tmp_path, download=True)


# -------------------------------------------------------------------------------------- CIFAR-10


def _cifar_tarball(path: Path, per_batch: int = 3, n_test: int = 2, *, drop: str | None = None) -> dict:
    rng = np.random.Generator(np.random.PCG64(1))
    path.parent.mkdir(parents=True, exist_ok=True)
    batches = {}
    with tarfile.open(path, "w:gz") as tar:
        names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
        for name in names:
            n = n_test if name == "test_batch.bin" else per_batch
            labels = rng.integers(0, 10, n, dtype=np.uint8)
            pixels = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
            batches[name] = (labels, pixels)
            if name == drop:
                continue
            data = np.concatenate([labels[:, None], pixels], axis=1).tobytes()
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return batches


def test_cifar_reader_on_tiny_tarball(tmp_path: Path) -> None:
    batches = _cifar_tarball(tmp_path / "cifar10" / "cifar-10-binary.tar.gz")
    data = load_dataset("cifar10", tmp_path, verify=False)
    assert data.input_shape == (3, 32, 32) and data.num_classes == 10
    assert data.train.x.shape == (15, 3, 32, 32) and data.test.x.shape == (2, 3, 32, 32)
    labels = np.concatenate([batches[f"data_batch_{i}.bin"][0] for i in range(1, 6)])
    assert data.train.y.tolist() == labels.tolist()
    # record layout: 1024 red, 1024 green, 1024 blue, row-major; per-channel normalisation
    pixels = batches["data_batch_2.bin"][1][1]  # second record of batch 2 = train example 4
    for c in range(3):
        plane = pixels[c * 1024 : (c + 1) * 1024].reshape(32, 32) / 255.0
        expected = (plane - CIFAR10_MEAN[c]) / CIFAR10_STD[c]
        np.testing.assert_allclose(data.train.x[4, c].numpy(), expected, rtol=1e-5, atol=1e-5)
    assert data.info["files"][0]["verified"] is False


def test_cifar_checksum_mismatch(tmp_path: Path) -> None:
    _cifar_tarball(tmp_path / "cifar10" / "cifar-10-binary.tar.gz")
    with pytest.raises(DataError) as exc:
        load_dataset("cifar10", tmp_path)
    assert f"expected md5 {CIFAR10_MD5}" in str(exc.value)
    assert "cifar-10-binary.tar.gz" in str(exc.value)


def test_cifar_missing_member_and_bad_records(tmp_path: Path) -> None:
    _cifar_tarball(tmp_path / "a" / "cifar10" / "cifar-10-binary.tar.gz", drop="data_batch_3.bin")
    with pytest.raises(DataError, match=r"data_batch_3\.bin"):
        load_dataset("cifar10", tmp_path / "a", verify=False)
    p = tmp_path / "b" / "cifar10" / "cifar-10-binary.tar.gz"
    p.parent.mkdir(parents=True)
    with tarfile.open(p, "w:gz") as tar:
        for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
            data = bytes(RECORD_BYTES + 5)
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(DataError, match="3073-byte records"):
        load_dataset("cifar10", tmp_path / "b", verify=False)
    (tmp_path / "c" / "cifar10").mkdir(parents=True)
    (tmp_path / "c" / "cifar10" / "cifar-10-binary.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(DataError, match="cannot read"):
        load_dataset("cifar10", tmp_path / "c", verify=False)


def test_cifar_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"cifar10[/\\]cifar-10-binary\.tar\.gz"):
        load_dataset("cifar10", tmp_path)


# ----------------------------------------------------------------------------------- Shakespeare


def test_shakespeare_counts(shakespeare: FederatedData) -> None:
    d = shakespeare
    assert d.info["num_clients"] == 715 and len(d.natural_clients or []) == 715
    assert d.client_names is not None and d.client_names == sorted(d.client_names)
    assert d.info["num_snippets_train"] == 16068 and d.info["num_snippets_test"] == 2356
    assert d.info["num_chars_train"] == 2_359_315 and d.info["num_chars_test"] == 339_752
    assert d.input_shape == (80,) and d.num_classes == VOCAB_SIZE == 82
    assert d.train.x.dtype == torch.int64 and d.train.y.shape == (len(d.train),)
    # stride 80: about one window per 80 characters (+ the joining newlines), at least one per role
    assert 28_000 < len(d.train) < 31_000 and 3_500 < len(d.test) < 5_000
    assert all(r["verified"] for r in d.info["files"])


def test_shakespeare_clients_cover_and_vocab(shakespeare: FederatedData) -> None:
    d = shakespeare
    assert d.natural_clients is not None and d.test_clients is not None
    train_idx = np.concatenate(d.natural_clients)
    assert np.array_equal(train_idx, np.arange(len(d.train)))
    assert np.array_equal(np.concatenate(d.test_clients), np.arange(len(d.test)))
    assert min(len(c) for c in d.natural_clients) >= 1
    # 26 roles' only test snippet is the empty string: those have no test window, all others do
    assert sum(len(c) == 0 for c in d.test_clients) == 26
    assert int(d.train.x.max()) < VOCAB_SIZE and int(d.train.y.max()) < VOCAB_SIZE
    assert not bool((d.train.x == UNK_ID).any())  # all 78 characters are in LEAF's table
    assert not bool((d.train.y == PAD_ID).any())  # targets are always real characters


def test_shakespeare_windows_match_text() -> None:
    import json

    folder = _need("shakespeare") / "shakespeare"
    obj = json.loads(gzip.decompress((folder / "shakespeare_train.json.gz").read_bytes()))
    d = load_dataset("shakespeare", SHARED, stride=1, max_clients=3, seed=7)
    again = load_dataset("shakespeare", SHARED, stride=1, max_clients=3, seed=7)
    assert d.client_names == again.client_names and torch.equal(d.train.x, again.train.x)
    assert d.client_names is not None and len(d.client_names) == 3 and d.natural_clients is not None
    for name, idx in zip(d.client_names, d.natural_clients, strict=True):
        text = "\n".join(obj["user_data"][name]["snippets"])
        if len(text) <= 80:
            assert len(idx) == 1
            continue
        assert len(idx) == len(text) - 80  # stride 1: every position that has a next character
        first, last = int(idx[0]), int(idx[-1])
        assert decode_ids(d.train.x[first]) == text[:80]
        assert ALL_LETTERS[int(d.train.y[first]) - 2] == text[80]
        assert decode_ids(d.train.x[last]) == text[-81:-1]
        assert ALL_LETTERS[int(d.train.y[last]) - 2] == text[-1]


def test_shakespeare_short_text_padded_and_encoding() -> None:
    from fedsqueeze.data.shakespeare import make_windows

    x, y = make_windows(encode_text("To be"), seq_len=8, stride=8)
    assert x.shape == (1, 8) and decode_ids(x[0]) == "To b" and ALL_LETTERS[int(y[0]) - 2] == "e"
    assert x[0, :4].tolist() == [PAD_ID] * 4
    assert encode_text("a\u00e9~").tolist()[1:] == [UNK_ID, UNK_ID]
    with pytest.raises(ConfigError, match="stride"):
        load_dataset("shakespeare", SHARED, stride=0)


# -------------------------------------------------------------------------------------- built-in


def test_digits() -> None:
    d = load_dataset("digits")
    assert len(d.train) + len(d.test) == 1797 and len(d.test) == 359
    assert d.input_shape == (64,) and d.train.x.dtype == torch.float32
    counts = d.train.label_counts() + d.test.label_counts()
    assert counts.min() >= 174 and counts.max() <= 183
    ratio = d.test.label_counts() / counts
    assert np.all(np.abs(ratio - 0.2) < 0.01)  # stratified
    mean = d.train.x.mean(0)
    assert float(mean.abs().max()) < 1e-5
    again = load_dataset("digits")
    assert torch.equal(d.train.x, again.train.x) and torch.equal(d.test.y, again.test.y)
    other = load_dataset("digits", seed=1)
    assert not torch.equal(d.test.y, other.test.y) or not torch.equal(d.test.x, other.test.x)


def test_synthetic_deterministic_and_structured() -> None:
    a = load_dataset("synthetic", alpha=0.5, beta=0.5, seed=3)
    b = load_dataset("synthetic", alpha=0.5, beta=0.5, seed=3)
    c = load_dataset("synthetic", alpha=0.5, beta=0.5, seed=4)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)
    assert not torch.equal(a.train.x[:10], c.train.x[:10])
    assert a.input_shape == (60,) and a.num_classes == 10
    assert a.natural_clients is not None and len(a.natural_clients) == 30
    assert a.test_clients is not None
    assert np.array_equal(np.concatenate(a.natural_clients), np.arange(len(a.train)))
    sizes = np.array(a.info["client_sizes"])
    assert sizes.min() >= 50 and len(a.train) + len(a.test) == sizes.sum()
    for tr, te, n in zip(a.natural_clients, a.test_clients, sizes, strict=True):
        assert len(te) == round(0.2 * n) and len(tr) + len(te) == n
    # FedProx structure: each client's labels are a deterministic function of its features
    assert int(a.train.y.max()) < 10
    small = load_dataset("synthetic", num_clients=5, iid=True)
    assert small.natural_clients is not None and len(small.natural_clients) == 5
    with pytest.raises(ConfigError, match="alpha"):
        load_dataset("synthetic", alpha=-1.0)
    with pytest.raises(ConfigError, match="num_clients"):
        load_dataset("synthetic", num_clients=0)


# ------------------------------------------------------------------------------------ containers


def test_array_dataset_subset_and_validation() -> None:
    ds = ArrayDataset(torch.arange(10, dtype=torch.float32).reshape(5, 2), torch.tensor([0, 1, 2, 1, 0]), 3)
    sub = ds.subset(np.array([4, 0]))
    assert len(sub) == 2 and sub.y.tolist() == [0, 0] and sub.x[0].tolist() == [8.0, 9.0]
    assert len(ds.subset(torch.tensor([True, False, True, False, False]))) == 2
    assert len(ds.subset(np.array([], dtype=np.int64))) == 0
    assert ds.input_shape == (2,) and "n=5" in repr(ds)
    with pytest.raises(ConfigError, match="lie in"):
        ds.subset(np.array([5]))
    with pytest.raises(ConfigError, match="integers"):
        ds.subset(np.array([0.5]))
    with pytest.raises(ConfigError, match="same number"):
        ArrayDataset(torch.zeros(3, 2), torch.zeros(4, dtype=torch.int64), 2)
    with pytest.raises(ConfigError, match="int64"):
        ArrayDataset(torch.zeros(3, 2), torch.zeros(3), 2)
