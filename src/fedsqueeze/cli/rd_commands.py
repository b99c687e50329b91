"""Rate-distortion commands: ``design-quantizer`` (thin over :func:`fedsqueeze.codecs.rd.design`)."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from fedsqueeze.cli.main import _out, _print_json, _user_errors, app
from fedsqueeze.errors import ConfigError


class LawName(str, Enum):
    gennorm = "gennorm"
    dweibull = "dweibull"
    gaussian = "gaussian"
    laplace = "laplace"


class DesignFormat(str, Enum):
    table = "table"
    json = "json"


@app.command("design-quantizer")
def design_quantizer_cmd(
    law: Annotated[LawName, typer.Option("--law", help="Source law (unit variance).")] = LawName.gaussian,
    beta: Annotated[
        float | None, typer.Option("--beta", help="GenNorm shape β (law gennorm), in [0.1, 20].")
    ] = None,
    shape: Annotated[
        float | None,
        typer.Option("--shape", help="Shape of the law: β for gennorm, c for dweibull, in [0.1, 20]."),
    ] = None,
    m: Annotated[
        float, typer.Option("--M", "--m", help="Magnitude weight exponent M >= 0 (0 = plain MSE).")
    ] = 0.0,
    bits: Annotated[int, typer.Option("--bits", help="Bits per entry, 1..8 (2**bits levels).")] = 2,
    fmt: Annotated[DesignFormat, typer.Option("--format", "-f", help="Output format.")] = DesignFormat.table,
) -> None:
    """Design the Lloyd–Max quantizer for E[|X|^M (X - Q(X))^2] on a unit-variance law.

    Prints the centres, the thresholds (midpoints; the middle one is 0) and the expected
    distortion. Examples: --law gaussian --bits 2 (the classical table: ±0.4528, ±1.5104,
    D = 0.1175); --law gennorm --beta 0.7 --M 2 --bits 3; --law dweibull --shape 0.8 --bits 4.
    """
    from fedsqueeze.codecs.rd.design import design

    with _user_errors():
        if beta is not None and shape is not None and beta != shape:
            raise ConfigError(f"--beta {beta:g} and --shape {shape:g} disagree; give one of them")
        if beta is not None and law is LawName.dweibull:
            raise ConfigError("--beta is GenNorm's shape; for dweibull give --shape C")
        sh = beta if beta is not None else shape
        d = design(law.value, sh, m, bits)
    info = d.to_dict()
    info["requested_law"] = law.value
    if fmt is DesignFormat.json:
        _print_json(info)
        return
    title = f"{law.value} (family {d.law}, shape {d.shape:g}), M={d.M:g}, {d.bits} bit(s): {d.levels} levels"
    table = Table(title=title, caption_justify="left")
    for col in ("code", "cell from", "cell to", "centre"):
        table.add_column(col, justify="right")
    edges = [float("-inf"), *[float(t) for t in d.thresholds], float("inf")]
    for i, c in enumerate(d.centers):
        table.add_row(str(i), f"{edges[i]:.6g}", f"{edges[i + 1]:.6g}", f"{float(c):.6g}")
    table.caption = (
        f"E[|X|^M (X-Q)^2] = {d.distortion:.6g}; MSE = {d.mse:.6g}; "
        f"{d.iterations} iteration(s){'' if d.converged else ' (NOT converged)'}"
    )
    out = _out()
    out.print(table)
    out.print(Text("Multiply by the data's standard deviation to use these on real values."))
