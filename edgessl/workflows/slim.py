"""`edgessl slim`: one width of a `--widths` run as a standalone, physically smaller encoder (edgessl.models.widths),
with its size next to the full width's; and the table of a per-width report (pretrain --widths, prune)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from edgessl.errors import UserError
from edgessl.fileio import check_folder_path
from edgessl.models.backbone import ENCODER_META, ENCODER_WEIGHTS, load_encoder
from edgessl.models.prune import count_params_macs
from edgessl.models.widths import build_slim, save_slim, width_folder
from edgessl.options import SlimOptions, takes_options
from edgessl.rundir import CHECKPOINT


@dataclass
class SlimResult:
    """folder: the slimmed encoder; size: its input size; rows: (name, params, MACs, feature dim) of the run's full
    width and of the slimmed width."""

    folder: Path
    width: float
    size: int
    rows: list[tuple[str, int, int, int]]


@takes_options(SlimOptions, lead=("run_dir",), positional=("width", "out"))
def slim(run_dir: str | Path, opts: SlimOptions) -> SlimResult:
    """Write the run's width-`width` sub-network into `out` (default <run_dir>/width-<w>/) and measure both sizes
    (options: edgessl.options.SlimOptions, `edgessl slim`'s flags)."""
    model, meta = build_slim(run_dir, opts.width)
    out = Path(opts.out) if opts.out is not None else width_folder(run_dir, meta["width"])
    check_slim_out(out, Path(run_dir), meta["width"])
    folder = save_slim(model, meta, run_dir, out)
    size = int(meta["image_size"])
    example = torch.zeros(1, 3, size, size)
    full = load_encoder(run_dir)
    rows = [("run (width 1)", full, full.edgessl_meta["feature_dim"]),
            (f"width {meta['width']:g}", model, meta["feature_dim"])]
    return SlimResult(Path(folder), meta["width"], size,
                      [(name, *count_params_macs(m, example), dim) for name, m, dim in rows])


def check_slim_out(out: Path, run_dir: Path, width: float) -> None:
    """UserError when --out holds something slim would replace that is not this run's own width-`width` encoder
    (an earlier slim of it is refreshed): a file in the way, a run (checkpoint.pt), another encoder, or a folder of
    other files. It had replaced another run's encoder.safetensors, encoder.json and config.yaml without a word. The
    run's own folder: save_slim refuses it."""
    if out.resolve() == run_dir.resolve():
        return
    check_folder_path(out, out)
    if (out / CHECKPOINT).exists():
        raise UserError(f"--out '{out}' holds a run (checkpoint.pt): slim writes encoder.safetensors, encoder.json "
                        "and config.yaml there. Choose another --out (an empty or new folder).")
    if not (out / ENCODER_META).exists() and not (out / ENCODER_WEIGHTS).exists():
        if out.is_dir() and any(out.iterdir()):
            raise UserError(f"--out '{out}' is a folder of other files: slim writes encoder.safetensors, encoder.json "
                            "and config.yaml there. Choose another --out (an empty or new folder).")
        return
    try:
        meta = json.loads((out / ENCODER_META).read_text())
    except (OSError, ValueError):
        meta = {}
    if meta.get("source_run") != str(run_dir.resolve()) or not math.isclose(float(meta.get("width", -1)), width):
        raise UserError(f"--out '{out}' holds another encoder (encoder.json, encoder.safetensors), not this run's "
                        f"width {width:g}: choose another --out (an empty or new folder).")


def widths_table(entries: list[dict[str, Any]]) -> Table:
    """A rich Table of a per-width report's entries (edgessl.deploy.widths)."""
    table = Table(title="Widths (widths.json, widths.png)", title_justify="left")
    for col in ("width", "params", "MACs", "latency ms", "kNN top-1", "linear top-1"):
        table.add_column(col, justify="right")
    for e in entries:
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        table.add_row(f"{e['width']:g}", f"{e['params'] / 1e6:.2f} M", f"{e['macs'] / 1e6:.1f} M",
                      f"{e['latency_ms']:.2f}", fmt(e.get("knn_top1")), fmt(e.get("linear_top1")))
    return table
