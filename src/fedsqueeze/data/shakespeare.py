"""Shakespeare (LEAF, TFF packaging): next-character prediction, one natural client per speaking role.

Files: ``<data_dir>/shakespeare/shakespeare_train.json.gz`` and ``shakespeare_test.json.gz``, gzip of
UTF-8 JSON ``{"users": [...], "num_samples": [...], "user_data": {role: {"snippets": [str, ...]}}}``
(715 roles; 16,068 train and 2,356 test snippets). No official hash exists; the sha256 values recorded
with the shared data copy are checked instead.

Vocabulary
    LEAF's fixed 80-character table ``ALL_LETTERS`` (newline, space, punctuation, digits ``0-9``,
    ``A-Z``, ``a-z``, ``[ ] }``, ``>``; the data uses 78 of them), preceded by two special ids:
    ``0`` = padding, ``1`` = unknown character. Vocabulary size (``num_classes``) = 82.

Examples
    Per role, the snippets are joined with ``"\\n"`` (each snippet is a block of whole lines) and
    turned into ids. An example is a window of ``seq_len`` ids (default 80, LEAF's and TFF's
    sequence length) and its target is the id of the character right after it. Windows start every
    ``stride`` characters. LEAF uses ``stride=1``, which yields ~2.36M heavily overlapping train
    windows (1.5 GB of int64 ids); the default here is ``stride=80``: windows that do not overlap
    (each character is in exactly one input window), ~29k train / ~4.2k test examples, the same
    amount of text. A role whose text is shorter than ``seq_len + 1`` characters is left-padded with
    the padding id to one window, so every role keeps at least one train example. (26 roles have only
    an empty test snippet and so no test example.)

Natural clients
    ``natural_clients[i]`` = the train windows of role ``client_names[i]`` (roles sorted by name),
    ``test_clients[i]`` = its test windows; the global test set is all roles' test windows.
    ``max_clients`` keeps a deterministic random subset of roles (by ``seed``), in name order.
"""

from __future__ import annotations

import gzip
import json
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from fedsqueeze.data.base import ArrayDataset, DataError, FederatedData, FileSpec, IndexArray, require_files
from fedsqueeze.errors import ConfigError

#: LEAF's character table (``leaf/models/utils/language_utils.py``), in LEAF's order.
ALL_LETTERS = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
PAD_ID = 0
UNK_ID = 1
VOCAB_SIZE = len(ALL_LETTERS) + 2
SEQ_LEN = 80

SHAKESPEARE_FILES: dict[str, FileSpec] = {
    "train": FileSpec(
        "shakespeare_train.json.gz",
        sha256="8df08261ec33ab2528fdd522679368e7ced97a5c420f17d065df9cb3ef914dcf",
        nbytes=1_011_074,
    ),
    "test": FileSpec(
        "shakespeare_test.json.gz",
        sha256="4ee417e6333309a5a3587dfb067fc5afaa8d9d48637e74007344efcffd1aedb6",
        nbytes=160_152,
    ),
}


def _char_table() -> npt.NDArray[np.int64]:
    lut = np.full(128, UNK_ID, dtype=np.int64)
    for i, ch in enumerate(ALL_LETTERS):
        lut[ord(ch)] = i + 2
    return lut


_LUT = _char_table()


def encode_text(text: str) -> npt.NDArray[np.int64]:
    """Character ids of ``text`` (characters outside :data:`ALL_LETTERS` map to :data:`UNK_ID`)."""
    if not text.isascii():
        text = "".join(c if c.isascii() else "\x00" for c in text)  # \x00 is not in the table -> UNK
    return _LUT[np.frombuffer(text.encode("ascii"), dtype=np.uint8)]


def decode_ids(ids: npt.ArrayLike | torch.Tensor) -> str:
    """Inverse of :func:`encode_text`: padding becomes ``""``, unknown becomes U+FFFD."""
    arr = ids.numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
    table = ["", "\ufffd", *ALL_LETTERS]
    return "".join(table[int(i)] for i in arr.reshape(-1))


def make_windows(
    ids: npt.NDArray[np.int64], seq_len: int = SEQ_LEN, stride: int = SEQ_LEN
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Windows of ``seq_len`` ids every ``stride`` positions and the id following each.

    Texts shorter than ``seq_len + 1`` are left-padded with :data:`PAD_ID` to exactly one window;
    an empty text gives no window.
    """
    if ids.size == 0:
        return np.zeros((0, seq_len), dtype=np.int64), np.zeros(0, dtype=np.int64)
    if ids.size < seq_len + 1:
        ids = np.concatenate([np.full(seq_len + 1 - ids.size, PAD_ID, dtype=np.int64), ids])
    win = np.lib.stride_tricks.sliding_window_view(ids, seq_len + 1)[::stride]
    return np.ascontiguousarray(win[:, :seq_len]), np.ascontiguousarray(win[:, seq_len])


def _read_json_gz(path: Path) -> dict[str, Any]:
    try:
        with gzip.open(path, "rb") as f:
            obj = json.loads(f.read().decode("utf-8"))
    except (OSError, EOFError, zlib.error, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not a valid gzip-compressed JSON file ({e})") from e
    if (
        not isinstance(obj, dict)
        or not isinstance(obj.get("users"), list)
        or not isinstance(obj.get("user_data"), dict)
    ):
        raise DataError(f"{path}: expected a JSON object with 'users' (list) and 'user_data' (object)")
    for u in obj["users"]:
        rec = obj["user_data"].get(u)
        if not isinstance(rec, dict) or not isinstance(rec.get("snippets"), list):
            raise DataError(f"{path}: user {u!r} has no 'snippets' list in 'user_data'")
    return obj


def _build_split(
    obj: dict[str, Any], users: list[str], seq_len: int, stride: int
) -> tuple[ArrayDataset, list[IndexArray], int, int]:
    xs, ys, clients = [], [], []
    start = 0
    n_snippets = n_chars = 0
    for u in users:
        snippets = obj["user_data"].get(u, {"snippets": []})["snippets"]
        n_snippets += len(snippets)
        text = "\n".join(str(s) for s in snippets)
        n_chars += sum(len(str(s)) for s in snippets)
        x, y = make_windows(encode_text(text), seq_len, stride)
        xs.append(x)
        ys.append(y)
        clients.append(np.arange(start, start + len(y), dtype=np.int64))
        start += len(y)
    x_all = np.concatenate(xs) if xs else np.zeros((0, seq_len), dtype=np.int64)
    y_all = np.concatenate(ys) if ys else np.zeros(0, dtype=np.int64)
    ds = ArrayDataset(torch.from_numpy(x_all), torch.from_numpy(y_all), VOCAB_SIZE)
    return ds, clients, n_snippets, n_chars


def load_shakespeare(
    data_dir: Path,
    download: bool = False,
    stride: int = SEQ_LEN,
    seq_len: int = SEQ_LEN,
    max_clients: int | None = None,
    seed: int = 0,
) -> FederatedData:
    """LEAF Shakespeare: 715 roles, next-character prediction over windows of ``seq_len`` characters.

    Parameters
    ----------
    stride:
        Step between window starts (default 80: non-overlapping; LEAF uses 1, ~80x more examples).
    seq_len:
        Window length in characters (default 80, as LEAF and TFF).
    max_clients:
        Keep only this many roles (a deterministic random subset chosen by ``seed``); ``None`` = all.
    seed:
        Seed of that subset choice (numpy ``Generator(PCG64(seed))``); unused when ``max_clients`` is None.
    """
    for opt, val in (("stride", stride), ("seq_len", seq_len)):
        if isinstance(val, bool) or not isinstance(val, int | np.integer) or val < 1:
            raise ConfigError(f"shakespeare: {opt} must be an integer >= 1, got {val!r}")
    t0 = time.perf_counter()
    folder = data_dir / "shakespeare"
    records = require_files("shakespeare", folder, list(SHAKESPEARE_FILES.values()), download=download)
    train_obj = _read_json_gz(folder / SHAKESPEARE_FILES["train"].name)
    test_obj = _read_json_gz(folder / SHAKESPEARE_FILES["test"].name)
    users = sorted(str(u) for u in train_obj["users"])
    total_users = len(users)
    if max_clients is not None:
        if isinstance(max_clients, bool) or not isinstance(max_clients, int | np.integer) or max_clients < 1:
            raise ConfigError(
                f"shakespeare: max_clients must be an integer >= 1 or None, got {max_clients!r}"
            )
        if max_clients < len(users):
            rng = np.random.Generator(np.random.PCG64(seed))
            keep = np.sort(rng.choice(len(users), size=int(max_clients), replace=False))
            users = [users[i] for i in keep]
    train, train_clients, n_train_snip, n_train_chars = _build_split(train_obj, users, seq_len, stride)
    test, test_clients, n_test_snip, n_test_chars = _build_split(test_obj, users, seq_len, stride)
    info: dict[str, Any] = {
        "files": records,
        "source": "LEAF Shakespeare (Caldas et al. 2018), TFF packaging, re-saved as JSON",
        "vocab": ALL_LETTERS,
        "pad_id": PAD_ID,
        "unk_id": UNK_ID,
        "vocab_size": VOCAB_SIZE,
        "seq_len": seq_len,
        "stride": stride,
        "num_clients_total": total_users,
        "num_clients": len(users),
        "max_clients": max_clients,
        "seed": seed,
        "num_snippets_train": n_train_snip,
        "num_snippets_test": n_test_snip,
        "num_chars_train": n_train_chars,
        "num_chars_test": n_test_chars,
        "load_s": round(time.perf_counter() - t0, 4),
    }
    return FederatedData(
        name="shakespeare",
        train=train,
        test=test,
        input_shape=(seq_len,),
        num_classes=VOCAB_SIZE,
        natural_clients=train_clients,
        client_names=users,
        info=info,
        test_clients=test_clients,
    )
