"""`edgessl prune`, registered on the main typer app by `register(app)`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from edgessl.commands.common import console, friendly
from edgessl.slim.recover import prune_run

PRUNE_HELP = """Make a single-width encoder smaller: torch-pruning removes --ratio of the channels of every coupled
channel group (magnitude or Taylor importance; the projection output is kept), then a short recovery pretraining
with the same single-branch loss plus distillation from the unpruned encoder (soft cross-entropy over the same
memory-bank columns, weight --distill) repairs it.

**Examples**

    edgessl prune runs/my-run --ratio 0.5
    edgessl prune runs/my-run --ratio 0.5 --criterion taylor --epochs 10 --val ./labeled/test

Writes a run directory (default `RUN/pruned-RATIO/`) like `edgessl pretrain`'s, whose encoder.json rebuilds the
pruned architecture (`edgessl eval` and `edgessl export` accept it), and its `widths.json` / `widths.png` report
(parameters, MACs, batch-1 latency, kNN) for the original and the pruned encoder, in the format of a `--widths`
run, so both routes to a smaller model compare directly.
"""


def register(app) -> None:
    """Add `prune` to the typer app."""
    @app.command("prune", help=PRUNE_HELP)
    @friendly
    def prune_cmd(
        run_dir: Path = typer.Argument(..., help="Run directory of `edgessl pretrain` (config.yaml + checkpoint.pt)."),
        ratio: float = typer.Option(..., help="Fraction of the channels of every group to remove, in (0, 1)."),
        criterion: str = typer.Option("magnitude", help="magnitude (L2 norm of the group's weights) | taylor (|w * dL/dw| on one batch)."),
        epochs: Optional[int] = typer.Option(None, help="Recovery epochs. [default: a quarter of the run's, at least 1]"),
        distill: float = typer.Option(0.5, help="Weight of the distillation from the unpruned encoder (0 = plain recovery)."),
        out: Optional[Path] = typer.Option(None, help="Output run directory. [default: RUN/pruned-RATIO]"),
        overwrite: bool = typer.Option(False, "--overwrite", help="Move a non-empty --out aside (to OUT.old-TIME) instead of refusing it."),
        quiet: bool = typer.Option(False, "--quiet", help="No progress bar; log lines only."),
    ):
        result = prune_run(run_dir, ratio, criterion, epochs, distill, out, quiet=quiet, console=console,
                           overwrite=overwrite)
        console.print(f"Pruned encoder: {result.run_dir}", highlight=False)
