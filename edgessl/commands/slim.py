"""`edgessl slim`, registered on the main typer app by `register(app)`."""

from __future__ import annotations

from pathlib import Path

from rich.markup import escape
from rich.table import Table

from edgessl.commands.common import api, argument, console, friendly, given, options_command
from edgessl.options import SlimOptions

SLIM_HELP = """Cut one width out of a `--widths` run: a standalone, physically smaller timm model (torch-pruning removes
the channels beyond the width's share of every channel group), whose outputs equal that width's sub-network.

**Examples**

    edgessl slim runs/<name> --width 0.5
    edgessl slim runs/<name> --width 0.25 --out ./mobilenet-quarter
    edgessl export runs/<name> --width 0.5          # slims into RUN/width-0.5/ (if needed) and exports that

Writes encoder.safetensors + encoder.json (with the kept channels per group, so `edgessl.load_encoder` rebuilds the
pruned architecture from timm) and a copy of config.yaml into --out (default RUN/width-W/). The folder works like a
run directory with `edgessl eval`, `edgessl finetune` and `edgessl export`. Every width's parameters, MACs, latency
and kNN accuracy are in RUN/widths.json and RUN/widths.png (written at the end of training).

Exit codes: 2 bad input (a width the run was not trained at, a width below 1 of a run without --widths, a width outside (0, 1]).
"""


def slim_cmd(run: Path, **values) -> None:
    result = api.slim(run, **given(values))
    _print_summary(console, run, result)


def register(app) -> None:
    """Add `slim` to the typer app."""
    run = [argument("run", Path, "Run directory of `edgessl pretrain --widths ...`.")]
    app.command("slim", help=SLIM_HELP)(friendly(options_command(slim_cmd, SlimOptions, leading=run)))


def _print_summary(console, run: Path, result) -> None:
    folder, size, rows = result.folder, result.size, result.rows
    table = Table(title=f"{escape(rows[-1][0])} of {escape(str(run))} (MACs at {size} px)", title_justify="left")
    for col in ("model", "params", "MACs", "features"):
        table.add_column(col, justify="left" if col == "model" else "right")
    (_, p0, m0, _), *_ = rows
    for name, params, macs, dim in rows:
        table.add_row(name, f"{params / 1e6:.3f} M ({params / p0:.0%})", f"{macs / 1e6:.2f} M ({macs / m0:.0%})",
                      str(dim))
    console.print(table)
    where = escape(str(folder))
    console.print(f"Encoder: {where} (load with edgessl.load_encoder; export with `edgessl export {where}`)",
                  highlight=False, soft_wrap=True)
