"""The ``fedsqueeze`` command: ``compare``, ``inspect``, ``codecs``, ``encode``.

Each command parses its options, calls the library, and prints the returned objects (a Rich table,
or JSON on stdout with ``--format json``). Every :class:`~fedsqueeze.errors.FedSqueezeError` is
caught here and printed as one red line on stderr with exit code 2; there are no tracebacks for
user errors.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from fedsqueeze import __version__
from fedsqueeze.codecs import encode_state_dict, parse_spec
from fedsqueeze.codecs import spec as spec_module
from fedsqueeze.codecs.registry import all_ids, class_by_name
from fedsqueeze.compare import (
    DEFAULT_SPECS,
    CompareRow,
    compare,
    default_input,
    load_input,
    load_tensors,
    unavailable_codecs,
)
from fedsqueeze.errors import ConfigError, DecodeError, FedSqueezeError
from fedsqueeze.wire.container import decode_container, is_container
from fedsqueeze.wire.frame import FrameHeader, parse_frame

EXIT_USER_ERROR = 2
DEFAULT_SIZE = 10_000
DEFAULT_REPEATS = 20
#: Codec seeds start this far above the input's seed: ``torch.randn`` and ``torch.rand`` from equal
#: seeds share one uniform stream (the noise would be correlated with the input itself).
CODEC_SEED_OFFSET = 1000
#: Width used when stdout is not a terminal (files, pipes, test runners).
MIN_PIPE_WIDTH = 160

app = typer.Typer(
    name="fedsqueeze",
    help="Communication-efficient federated learning: codecs that produce real bytes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


class TableFormat(str, Enum):
    """Output of ``compare`` and ``codecs``."""

    table = "table"
    json = "json"


class TextFormat(str, Enum):
    """Output of ``inspect``."""

    text = "text"
    json = "json"


def _out() -> Console:
    console = Console(highlight=False)
    if not console.is_terminal:  # piped or captured: don't squeeze tables into 80 columns
        console = Console(highlight=False, width=max(console.width, MIN_PIPE_WIDTH))
    return console


def _err() -> Console:
    return Console(stderr=True, highlight=False)


def _fail(message: str) -> typer.Exit:
    """Print ``error: message`` as one red line on stderr; return the Exit to raise."""
    line = " ".join(message.split())  # one line, whatever the message holds
    _err().print(Text(f"error: {line}", style="bold red"), soft_wrap=True)
    return typer.Exit(EXIT_USER_ERROR)


@contextmanager
def _user_errors() -> Iterator[None]:
    """Turn every FedSqueezeError (and file-system errors) into one line + exit code 2."""
    try:
        yield
    except FedSqueezeError as exc:
        raise _fail(str(exc)) from None
    except OSError as exc:
        raise _fail(f"{exc.strerror or type(exc).__name__}: {exc.filename or exc}") from None


def _print_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2))


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fedsqueeze {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Communication-efficient federated learning: codecs that produce real bytes."""


# ---------------------------------------------------------------------------------- compare
@app.command("compare")
def compare_cmd(
    codec: Annotated[
        list[str] | None,
        typer.Option(
            "--codec",
            "-c",
            metavar="SPEC",
            help="Codec spec, repeatable (e.g. -c uniform:8 -c 'topk:1% > uniform:4'). "
            "Default: the tutorial's set plus extras.",
        ),
    ] = None,
    size: Annotated[
        int | None,
        typer.Option(
            "--size",
            "-n",
            help=f"Entries of the N(0,1) input (default: {DEFAULT_SIZE}, the tutorial's size).",
        ),
    ] = None,
    input_file: Annotated[
        Path | None,
        typer.Option(
            "--input",
            "-i",
            metavar="FILE",
            help="A saved update (.safetensors, .pt, .pth) instead of random input; a state_dict's "
            "floating tensors are concatenated in sorted key order.",
        ),
    ] = None,
    repeats: Annotated[
        int,
        typer.Option("--repeats", "-r", help="Encodes per codec (omega, bias and timings use all)."),
    ] = DEFAULT_REPEATS,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the N(0,1) input.")] = 42,
    codec_seed: Annotated[
        int | None,
        typer.Option(
            "--codec-seed",
            help=f"Base seed of the codecs' randomness (repeat r uses base + r; "
            f"default: seed + {CODEC_SEED_OFFSET}, so it never shares the input's stream).",
        ),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads",
            help="torch intra-op threads while measuring (default: torch's own choice). "
            "Use 1 on a busy machine: a thread pool sharing cores with other jobs stalls.",
        ),
    ] = None,
    fmt: Annotated[TableFormat, typer.Option("--format", "-f", help="Output format.")] = (TableFormat.table),
) -> None:
    """Encode one tensor with several codecs and measure the real bytes, errors and speed."""
    with _user_errors():
        if threads is not None:
            if threads < 1:
                raise ConfigError(f"--threads must be >= 1, got {threads}")
            torch.set_num_threads(threads)
        if input_file is not None and size is not None:
            raise ConfigError("--size and --input exclude each other (a file has its own size)")
        if input_file is not None:
            x = load_input(input_file)
            source = (
                f"{input_file} ({x.numel()} float32 entries; floating tensors flattened and "
                "concatenated in sorted key order)"
            )
        else:
            n = DEFAULT_SIZE if size is None else size
            x = default_input(n, seed)
            source = f"N(0,1) float32, n={n}, seed={seed}"
        base = seed + CODEC_SEED_OFFSET if codec_seed is None else codec_seed
        specs = list(codec) if codec else _default_specs()
        rows = compare(x, specs, repeats=repeats, seed=base)

    if fmt is TableFormat.json:
        _print_json([r.to_dict() for r in rows])
        return
    caption = (
        f"nbytes = len(payload) of repeat 0, frame header included (22 B for a vector); "
        f"ratio = fp32 bytes (4·n) / nbytes. Input: {source}. R={repeats} repeat(s), codec seeds "
        f"{base}..{base + repeats - 1}; omega = mean ||x-x̂||²/||x||², bias = ||mean x̂ - x||/||x|| "
        f"(an unbiased codec shows ≈ sqrt(omega/R)); MB/s = 1e6 B of fp32 input per second, "
        f"median, {torch.get_num_threads()} torch thread(s)."
    )
    _out().print(_compare_table(rows, caption))


def _default_specs() -> list[str]:
    """The default specs this build can run; the others are named on stderr."""
    usable = [s for s in DEFAULT_SPECS if not unavailable_codecs(s)]
    skipped = [s for s in DEFAULT_SPECS if s not in usable]
    if skipped:
        _err().print(
            Text(
                "note: skipping default spec(s) whose codecs this build lacks: " + ", ".join(skipped),
                style="yellow",
            ),
            soft_wrap=True,
        )
    return usable


def _compare_table(rows: list[CompareRow], caption: str) -> Table:
    table = Table(title="fedsqueeze compare", caption=caption, caption_justify="left")
    table.add_column("codec", no_wrap=True)
    for name in (
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
        table.add_column(name, justify="right", overflow="fold")
    for r in rows:
        table.add_row(
            Text(r.codec),
            f"{r.nbytes}",
            f"{r.ratio:.3f}",
            f"{r.bits_per_entry:.3f}",
            f"{r.mse:.3g}",
            f"{r.rel_error:.3g}",
            f"{r.omega:.3g}",
            f"{r.bias:.3g}",
            f"{r.encode_MBps:.0f}",
            f"{r.decode_MBps:.0f}",
        )
    return table


# ---------------------------------------------------------------------------------- inspect
def _read_headers(data: bytes) -> tuple[str, list[tuple[str | None, FrameHeader]]]:
    """Validate a payload's structure and CRCs (bodies are never decoded) and list its headers."""
    if is_container(data):
        entries: list[tuple[str | None, FrameHeader]] = []
        for name, frame in decode_container(data).items():
            try:
                entries.append((name, parse_frame(frame)[0]))
            except DecodeError as exc:
                raise DecodeError(f"container entry {name!r}: {exc}") from None
        return "container", entries
    return "frame", [(None, parse_frame(data)[0])]


@app.command("inspect")
def inspect_cmd(
    file: Annotated[Path, typer.Argument(help="A payload file: one frame or a container.")],
    fmt: Annotated[TextFormat, typer.Option("--format", "-f", help="Output format.")] = (TextFormat.text),
) -> None:
    """Print the header(s) of a payload without decoding any body.

    Sizes, lengths and CRC32s are checked, so a truncated or corrupted file is reported (exit 2).
    """
    with _user_errors():
        data = file.read_bytes()
        kind, entries = _read_headers(data)

    if fmt is TextFormat.json:
        if kind == "frame":
            _print_json({"kind": "frame", "nbytes": len(data), "header": entries[0][1].to_dict()})
        else:
            _print_json(
                {
                    "kind": "container",
                    "nbytes": len(data),
                    "count": len(entries),
                    "entries": [{"name": name, "header": h.to_dict()} for name, h in entries],
                }
            )
        return

    out = _out()
    if kind == "frame":
        out.print(Text(f"{file}: frame, {len(data)} bytes"))
        grid = Table.grid(padding=(0, 2))
        grid.add_column(justify="right", style="bold")
        grid.add_column()
        for key, value in entries[0][1].to_dict().items():
            grid.add_row(key, Text(str(value)))
        out.print(grid)
        return
    out.print(Text(f"{file}: container, {len(entries)} entries, {len(data)} bytes"))
    table = Table()
    cols = (
        "name",
        "codec",
        "codec_id",
        "dtype",
        "shape",
        "numel",
        "header_nbytes",
        "body_nbytes",
        "nbytes",
        "crc32",
    )
    for c in cols:
        table.add_column(c, justify="left" if c in ("name", "codec", "dtype", "shape") else "right")
    for name, h in entries:
        d = h.to_dict()
        shape = "(" + ", ".join(str(s) for s in d["shape"]) + ")"
        table.add_row(
            Text(str(name)),
            Text(str(d["codec"])),
            str(d["codec_id"]),
            d["dtype"],
            shape,
            str(d["numel"]),
            str(d["header_nbytes"]),
            str(d["body_nbytes"]),
            str(d["nbytes"]),
            d["crc32"],
        )
    out.print(table)


# ---------------------------------------------------------------------------------- codecs
def _codec_info() -> list[dict[str, Any]]:
    """One dict per registered codec.

    Flags come from the codec that ``parse_spec`` builds from ``name`` alone or, for codecs that
    need an argument (sparsifiers need ``k``), from ``name:10%``; ``flags_spec`` says which. They
    are ``None`` when neither builds.
    """
    rows: list[dict[str, Any]] = []
    for codec_id, name in all_ids().items():
        cls: Any = class_by_name(name)
        doc = ((cls.__doc__ or "").strip().splitlines() or [""])[0]
        lossless: bool | None = None
        unbiased: bool | None = None
        flags_spec: str | None = None
        for probe in (name, f"{name}:10%"):
            try:
                inst = parse_spec(probe)
            except FedSqueezeError:
                continue
            lossless, unbiased, flags_spec = bool(inst.lossless), bool(inst.unbiased), inst.spec
            break
        rows.append(
            {
                "name": name,
                "codec_id": codec_id,
                "stage": str(getattr(cls, "stage", "?")),
                "lossless": lossless,
                "unbiased": unbiased,
                "flags_spec": flags_spec,
                "description": doc,
            }
        )
    return rows


@app.command("codecs")
def codecs_cmd(
    fmt: Annotated[TableFormat, typer.Option("--format", "-f", help="Output format.")] = (TableFormat.table),
) -> None:
    """List the registered codecs (wire id, stage, flags) and the spec-string grammar."""
    with _user_errors():
        rows = _codec_info()
    if fmt is TableFormat.json:
        _print_json(rows)
        return

    def flag(v: bool | None) -> str:
        return "?" if v is None else ("yes" if v else "no")

    table = Table(
        title="registered codecs",
        caption="lossless/unbiased: flags of the codec built from 'flags from' (defaults, or an "
        "example argument where one is required; they can depend on the arguments); "
        "'?' = could not be built",
        caption_justify="left",
    )
    for c in ("name", "id", "stage", "lossless", "unbiased", "flags from", "description"):
        table.add_column(c, justify="right" if c == "id" else "left")
    for r in rows:
        table.add_row(
            r["name"],
            str(r["codec_id"]),
            r["stage"],
            flag(r["lossless"]),
            flag(r["unbiased"]),
            Text(r["flags_spec"] or "?"),
            Text(r["description"]),
        )
    out = _out()
    out.print(table)
    out.print(Text("Spec strings\n", style="bold"))
    out.print(Text((spec_module.__doc__ or "").strip()))


# ---------------------------------------------------------------------------------- encode
@app.command("encode")
def encode_cmd(
    spec: Annotated[str, typer.Argument(metavar="SPEC", help="Codec spec, e.g. 'uniform:8'.")],
    input_file: Annotated[
        Path, typer.Argument(metavar="INPUT_FILE", help="A .safetensors, .pt or .pth file.")
    ],
    output_file: Annotated[Path, typer.Argument(metavar="OUTPUT_FILE", help="Payload to write.")],
    seed: Annotated[int, typer.Option("--seed", help="Seed of the codec's randomness.")] = 42,
) -> None:
    """Encode a saved tensor (-> one frame) or state_dict (-> a container) into a payload file.

    In a state_dict, floating-point tensors go through SPEC and all others through 'raw'.
    """
    with _user_errors():
        codec = parse_spec(spec)
        obj = load_tensors(input_file)
        rng = torch.Generator().manual_seed(seed)
        if isinstance(obj, torch.Tensor):
            payload = codec.encode(obj, rng=rng)
            what = f"frame of shape {tuple(obj.shape)}"
            numel = obj.numel()
        else:
            payload = encode_state_dict(obj, codec, rng=rng)
            what = f"container of {len(obj)} tensors"
            numel = sum(t.numel() for t in obj.values())
        output_file.write_bytes(payload)
    ratio = f", {numel * 4 / len(payload):.2f}x vs fp32" if payload else ""
    _out().print(Text(f"wrote {output_file}: {len(payload)} bytes ({what}, codec {codec.spec}{ratio})"))


# Simulation (run, sweep, report, describe) and design-quantizer commands register themselves on ``app``.
from fedsqueeze.cli import analyze_commands, rd_commands, sim_commands  # noqa: E402, F401

if __name__ == "__main__":  # python -m fedsqueeze.cli.main: run the registered app, not this copy
    from fedsqueeze.cli.main import app as _registered_app

    _registered_app()
