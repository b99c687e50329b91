"""Tests of the ``fedsqueeze`` command line (Typer's CliRunner; one real subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from fedsqueeze import __version__
from fedsqueeze.cli.main import app
from fedsqueeze.codecs import decode, decode_state_dict, encode_state_dict, parse_spec
from fedsqueeze.codecs.registry import all_ids
from fedsqueeze.compare import DEFAULT_SPECS, unavailable_codecs
from fedsqueeze.errors import ConfigError
from fedsqueeze.wire import inspect as inspect_frame
from fedsqueeze.wire import inspect_container

KEYS = [
    "codec",
    "nbytes",
    "ratio",
    "bits_per_entry",
    "mse",
    "rel_error",
    "omega",
    "bias",
    "encode_MBps",
    "decode_MBps",
]
runner = CliRunner()


def skip_reason(spec: str) -> str | None:
    """Why ``spec`` cannot run in this build yet (None when it can); see test_compare.py."""
    missing = unavailable_codecs(spec)
    if missing:
        return f"codec(s) {missing} not registered in this build"
    try:
        codec = parse_spec(spec)
    except ConfigError as exc:
        return f"registered, but the spec is rejected ({exc}); DEFAULT_SPECS may need updating"
    try:
        decode(codec.encode(torch.linspace(-1, 1, 64), rng=torch.Generator().manual_seed(0)))
    except Exception as exc:  # a codec still being written
        return f"codec not working yet ({type(exc).__name__}: {exc})"
    return None


def assert_one_line_error(result, *fragments: str) -> None:  # type: ignore[no-untyped-def]
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr
    for frag in fragments:
        assert frag in lines[0]


@pytest.fixture
def state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "fc.weight": torch.randn(8, 4, generator=g),
        "fc.bias": torch.randn(8, generator=g),
        "bn.num_batches_tracked": torch.tensor(3),
    }


# ----------------------------------------------------------------------------- compare
def test_compare_json_has_exactly_the_keys() -> None:
    r = runner.invoke(
        app, ["compare", "-c", "fp32", "-c", "uniform:8", "-n", "1000", "-r", "2", "--format", "json"]
    )
    assert r.exit_code == 0, r.stderr
    rows = json.loads(r.stdout)  # stdout is the JSON and nothing else
    assert [row["codec"] for row in rows] == ["fp32", "uniform:8"]
    for row in rows:
        assert list(row) == KEYS
    assert rows[0]["nbytes"] == 4 * 1000 + 22
    assert rows[0]["ratio"] < 1 and rows[0]["mse"] == 0
    assert r.stderr == ""


def test_compare_table_caption() -> None:
    before = torch.get_num_threads()
    try:
        r = runner.invoke(app, ["compare", "-c", "uniform:4", "-n", "500", "-r", "3", "--threads", "1"])
    finally:
        torch.set_num_threads(before)
    assert r.exit_code == 0, r.stderr
    out = " ".join(r.stdout.split())
    for col in (
        "codec",
        "nbytes",
        "ratio",
        "bits/entry",
        "mse",
        "rel_error",
        "omega",
        "bias",
        "enc MB/s",
        "dec MB/s",
    ):
        assert col in out
    assert "uniform:4" in out
    assert "len(payload)" in out and "header included" in out
    assert "N(0,1) float32, n=500, seed=42" in out
    assert "1 torch thread(s)" in out


def test_compare_default_specs() -> None:
    registered = [s for s in DEFAULT_SPECS if not unavailable_codecs(s)]
    for spec in registered:
        reason = skip_reason(spec)
        if reason is not None:
            pytest.skip(f"default spec {spec!r}: {reason}")
    r = runner.invoke(app, ["compare", "-n", "1000", "-r", "2", "--format", "json"])
    assert r.exit_code == 0, r.stderr
    assert [row["codec"] for row in json.loads(r.stdout)] == registered
    missing = [s for s in DEFAULT_SPECS if s not in registered]
    if missing:  # named on stderr, never on stdout
        assert "skipping default spec" in r.stderr
        assert all(s in r.stderr for s in missing)
    else:
        assert r.stderr == ""
    table = runner.invoke(app, ["compare", "-n", "1000"])
    assert table.exit_code == 0
    for spec in registered:
        assert spec in table.stdout


def test_compare_input_file(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "update.safetensors"
    save_file(state, str(path))
    r = runner.invoke(app, ["compare", "-i", str(path), "-c", "fp16", "-f", "json"])
    assert r.exit_code == 0, r.stderr
    (row,) = json.loads(r.stdout)
    assert row["nbytes"] == 2 * (32 + 8) + 22  # the float tensors only, concatenated
    t = runner.invoke(app, ["compare", "-i", str(path), "-c", "fp16"])
    assert "update.safetensors" in t.stdout


def test_compare_bad_codec_names_the_nearest() -> None:
    r = runner.invoke(app, ["compare", "--codec", "unifrom:8"])
    assert_one_line_error(r, "unifrom", "did you mean 'uniform'")
    assert r.stdout == ""


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["-r", "0"], "repeats"),
        (["-n", "0"], "size"),
        (["-i", "does-not-exist.pt"], "does not exist"),
        (["-i", "x.pt", "-n", "10"], "--size and --input"),
        (["-c", "uniform:99"], "uniform"),
        (["--threads", "0"], "--threads"),
    ],
)
def test_compare_user_errors(args: list[str], fragment: str) -> None:
    assert_one_line_error(runner.invoke(app, ["compare", "-c", "fp32", *args]), fragment)


# ----------------------------------------------------------------------------- inspect
def test_inspect_frame(tmp_path: Path) -> None:
    payload = parse_spec("uniform:8").encode(torch.randn(3, 5))
    path = tmp_path / "w.fsqz"
    path.write_bytes(payload)
    r = runner.invoke(app, ["inspect", str(path), "--format", "json"])
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc == {"kind": "frame", "nbytes": len(payload), "header": inspect_frame(payload).to_dict()}
    assert doc["header"]["codec"] == "uniform" and doc["header"]["shape"] == [3, 5]
    t = runner.invoke(app, ["inspect", str(path)])
    assert t.exit_code == 0
    assert "frame" in t.stdout and "uniform" in t.stdout and "codec_id" in t.stdout
    assert f"{len(payload)} bytes" in t.stdout


def test_inspect_container(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    payload = encode_state_dict(state, parse_spec("fp16"))
    path = tmp_path / "update.fsqc"
    path.write_bytes(payload)
    r = runner.invoke(app, ["inspect", str(path), "-f", "json"])
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["kind"] == "container" and doc["count"] == 3 and doc["nbytes"] == len(payload)
    assert [e["name"] for e in doc["entries"]] == list(state)
    headers = inspect_container(payload)
    assert [e["header"] for e in doc["entries"]] == [h.to_dict() for h in headers.values()]
    assert [e["header"]["codec"] for e in doc["entries"]] == ["fp16", "fp16", "raw"]
    t = runner.invoke(app, ["inspect", str(path)])
    assert t.exit_code == 0
    assert "container, 3 entries" in t.stdout
    for name in state:
        assert name in t.stdout


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"this is not a payload at all", "not a fedsqueeze frame"),
        (b"", "too short"),
        (b"FSQC\x01garbage", "container"),
    ],
    ids=["garbage", "empty", "bad-container"],
)
def test_inspect_malformed(tmp_path: Path, content: bytes, fragment: str) -> None:
    path = tmp_path / "bad.bin"
    path.write_bytes(content)
    assert_one_line_error(runner.invoke(app, ["inspect", str(path)]), fragment)


def test_inspect_truncated_and_corrupted(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    frame = parse_spec("fp32").encode(torch.randn(100))
    (tmp_path / "trunc").write_bytes(frame[:-7])
    assert_one_line_error(runner.invoke(app, ["inspect", str(tmp_path / "trunc")]), "truncated")
    flipped = bytearray(frame)
    flipped[-1] ^= 0xFF
    (tmp_path / "crc").write_bytes(bytes(flipped))
    assert_one_line_error(runner.invoke(app, ["inspect", str(tmp_path / "crc")]), "CRC32")
    cont = bytearray(encode_state_dict(state, parse_spec("fp32")))
    cont[40] ^= 0x01
    (tmp_path / "cont").write_bytes(bytes(cont))
    assert_one_line_error(runner.invoke(app, ["inspect", str(tmp_path / "cont")]), "CRC32")
    assert_one_line_error(runner.invoke(app, ["inspect", str(tmp_path / "nope")]), "nope")


# ----------------------------------------------------------------------------- codecs
def test_codecs_json() -> None:
    r = runner.invoke(app, ["codecs", "--format", "json"])
    assert r.exit_code == 0, r.stderr
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert {row["codec_id"]: name for name, row in rows.items()} == all_ids()
    assert rows["fp32"]["lossless"] is True and rows["fp32"]["stage"] == "values"
    assert rows["uniform"]["lossless"] is False and rows["uniform"]["unbiased"] is False
    assert rows["raw"]["codec_id"] == 4
    for row in rows.values():
        assert set(row) == {"name", "codec_id", "stage", "lossless", "unbiased", "flags_spec", "description"}
        assert row["lossless"] in (True, False, None)


def test_codecs_table_has_grammar() -> None:
    r = runner.invoke(app, ["codecs"])
    assert r.exit_code == 0, r.stderr
    assert "uniform" in r.stdout and "fp16" in r.stdout
    assert "spec  := stage" in r.stdout  # the spec module's grammar


# ----------------------------------------------------------------------------- encode, version
def test_encode_then_inspect(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    src = tmp_path / "update.safetensors"
    save_file(state, str(src))
    out = tmp_path / "update.fsqc"
    r = runner.invoke(app, ["encode", "fp32", str(src), str(out)])
    assert r.exit_code == 0, r.stderr
    assert "container of 3 tensors" in r.stdout
    back = decode_state_dict(out.read_bytes())
    assert set(back) == set(state)
    for name, t in state.items():
        assert torch.equal(back[name], t)
    i = runner.invoke(app, ["inspect", str(out), "-f", "json"])
    assert json.loads(i.stdout)["kind"] == "container"

    tensor_src = tmp_path / "t.pt"
    torch.save(torch.randn(6, 2), tensor_src)
    r = runner.invoke(app, ["encode", "uniform:4", str(tensor_src), str(tmp_path / "t.fsqz")])
    assert r.exit_code == 0, r.stderr
    i = runner.invoke(app, ["inspect", str(tmp_path / "t.fsqz"), "-f", "json"])
    assert json.loads(i.stdout)["header"]["shape"] == [6, 2]


def test_encode_errors(tmp_path: Path) -> None:
    assert_one_line_error(
        runner.invoke(app, ["encode", "fp32", str(tmp_path / "x.pt"), str(tmp_path / "o")]),
        "does not exist",
    )
    torch.save(torch.tensor([1.0, float("inf")]), tmp_path / "inf.pt")
    assert_one_line_error(
        runner.invoke(app, ["encode", "uniform:8", str(tmp_path / "inf.pt"), str(tmp_path / "o")]),
        "non-finite",
    )


def test_version() -> None:
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0
    assert r.stdout.strip() == f"fedsqueeze {__version__}"


def test_real_process_error_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "garbage.bin"
    bad.write_bytes(b"\x00" * 64)
    proc = subprocess.run(
        [sys.executable, "-m", "fedsqueeze.cli.main", "inspect", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith("error: not a fedsqueeze frame")
