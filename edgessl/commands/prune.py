"""`edgessl prune`, registered on the main typer app by `register(app)`."""

from __future__ import annotations

from pathlib import Path

from edgessl.commands.common import api, argument, console, friendly, given, options_command
from edgessl.options import PruneOptions

PRUNE_HELP = """Make a single-width encoder smaller: torch-pruning removes --ratio of the channels of every coupled
channel group (magnitude or Taylor importance; the projection output is kept), then a short recovery pretraining
with the same single-branch loss plus distillation from the unpruned encoder (soft cross-entropy over the same
memory-bank columns, weight --distill) repairs it.

**Examples**

    edgessl prune runs/my-run --ratio 0.5
    edgessl prune runs/my-run --ratio 0.5 --criterion taylor --epochs 10

Writes a run directory (default `RUN/pruned-RATIO/`) like `edgessl pretrain`'s, whose encoder.json rebuilds the
pruned architecture (`edgessl eval` and `edgessl export` accept it), and its `widths.json` / `widths.png` report
(parameters, MACs, batch-1 latency, kNN) for the original and the pruned encoder, in the format of a `--widths`
run, so both routes to a smaller model compare directly.
"""


def prune_cmd(run_dir: Path, **values) -> None:
    result = api.prune_encoder(run_dir, console=console, **given(values))
    console.print(f"Pruned encoder: {result.run_dir}", highlight=False)


def register(app) -> None:
    """Add `prune` to the typer app."""
    run = [argument("run_dir", Path, "Run directory of `edgessl pretrain` (config.yaml + checkpoint.pt).")]
    app.command("prune", help=PRUNE_HELP)(friendly(options_command(prune_cmd, PruneOptions, leading=run)))
