"""`edgessl export` and `edgessl check`, registered on the main typer app by `register(app)`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from edgessl import api
from edgessl.commands.common import console, friendly
from edgessl.deploy.check import run_device_check
from edgessl.slim.api import ensure_slimmed

EXPORT_HELP = """Export a pretrained encoder (features before the projection head) or a fine-tuned classifier (logits) to
ONNX, and check the file against PyTorch on real images.

**Examples**

    edgessl export runs/mobilenetv3_small-20261123-120000
    edgessl export runs/<name> --int8 --calib ./my_images --fp16
    edgessl export runs/<name> --int8-mode strict --calib-method percentile   # one int8 config
    edgessl export runs/<name> --classifier runs/<name>/finetune-pets --int8
    edgessl export runs/<name> --opset 17 --images ./val_images
    edgessl export runs/<name> --width 0.5                # one width of a --widths run (see `edgessl slim`)

Writes RUN/export/MODEL.onnx (+ MODEL.int8.onnx, MODEL.fp16.onnx), MODEL.reference.npz and manifest.json. Every file is
checked with onnx.checker (full_check) and against PyTorch with ONNX Runtime (fp32: max abs diff <= 1e-4 of the output
scale and cosine >= 0.99999 per image). --int8 searches calibration methods and float tails until the int8 bound
holds (mean cosine >= 0.93, min >= 0.75) and keeps fp32 with a one-line reason when none passes or int8 is not faster
on this machine; manifest.json lists every candidate. Then run `edgessl check` or export/device_check.py on the device.

Exit codes: 2 bad input; 3 an exported file fails its check or its parity bounds (the file is removed; int8 only
with --int8-mode strict).
"""

CHECK_HELP = """Measure an exported ONNX model the way export/device_check.py does on a device: batch-1 latency
(p50/p90/p99), throughput, size, peak memory, outputs on the shipped reference images, and accuracy (classifier) or
agreement (encoder) on labelled images.

**Examples**

    edgessl check runs/<name>/export/encoder.onnx
    edgessl check runs/<name>/export/encoder.int8.onnx --images ./val --threads 4 --json check.json

On the device itself, copy export/device_check.py (needs only onnxruntime, numpy and Pillow) with the export folder.

Exit codes: 1 outputs on the reference images outside the manifest's bounds; 2 bad input, a model that fails to load,
or a manifest that does not match the model.
"""


def register(app) -> None:
    """Add `export` and `check` to the typer app."""
    @app.command("export", help=EXPORT_HELP)
    @friendly
    def export_cmd(
        run: Path = typer.Argument(..., help="Run directory of `edgessl pretrain` (holds encoder.safetensors)."),
        classifier: Optional[Path] = typer.Option(None, help="Fine-tuned classifier folder (runs/NAME/finetune-TAG): export logits instead of features."),
        opset: int = typer.Option(18, help="ONNX opset to write."),
        int8: bool = typer.Option(False, "--int8", help="Also write a static int8 model (QDQ, per-channel weights), calibrated on --calib: searched until it meets the int8 bound, kept only when faster than fp32 here (see --int8-mode)."),
        int8_mode: Optional[str] = typer.Option(None, "--int8-mode", help="search (the default: try calibration methods, then keep the most sensitive tail of the network in float; write int8 only when it passes and is faster than fp32 on this machine) | keep-slow (search, write it even when slower) | strict (only --calib-method, exit 3 when it misses the bound). Implies --int8."),
        calib: Optional[Path] = typer.Option(None, help="Unlabeled images for int8 calibration (up to 256 used). [default: the training folder]"),
        calib_method: str = typer.Option("minmax", help="int8 activation ranges: minmax | moving-average | percentile | entropy (the search tries it first)."),
        fp16: bool = typer.Option(False, "--fp16", help="Also write a model with float16 weights (float32 input and output)."),
        images: Optional[Path] = typer.Option(None, help="Images for the parity check (up to 256 used). [default: the classifier's or the run's training folder]"),
        out: Optional[Path] = typer.Option(None, help="Export folder. [default: RUN/export]"),
        name: Optional[str] = typer.Option(None, help="Base name of the model files. [default: encoder or classifier]"),
        width: Optional[float] = typer.Option(None, help="Export this width of a `--widths` run: slimmed into RUN/width-W/ first (reused when up to date), exported to RUN/width-W/export."),
        quiet: bool = typer.Option(False, "--quiet", help="Print only the summary table."),
    ):
        if width is not None:
            run, reused = ensure_slimmed(run, width)
            if not quiet:
                console.print(f"Width {width:g}: {'using the slimmed encoder in' if reused else 'slimmed into'} {run}",
                              highlight=False, soft_wrap=True)
        wanted = int8_mode if int8_mode is not None else int8  # --int8 alone: "search"
        result = api.export(run, classifier=classifier, opset=opset, int8=wanted, calib=calib, fp16=fp16, images=images,
                            out=out, name=name, calib_method=calib_method, console=None if quiet else console)
        _print_summary(console, result, notes=quiet)  # without --quiet export printed them

    @app.command("check", help=CHECK_HELP)
    @friendly
    def check_cmd(
        model: Path = typer.Argument(..., help="The .onnx file."),
        manifest: Optional[Path] = typer.Option(None, help="manifest.json. [default: beside the model]"),
        images: Optional[Path] = typer.Option(None, help="Images (class subfolders = labels) for accuracy or agreement."),
        threads: Optional[int] = typer.Option(None, help="onnxruntime intra-op threads. [default: the runtime's choice]"),
        json_out: Optional[Path] = typer.Option(None, "--json", help="Write the report as JSON here."),
        runs: int = typer.Option(100, help="Timed batch-1 runs."),
        batch: int = typer.Option(32, help="Batch size of the throughput measurement."),
        max_images: Optional[int] = typer.Option(None, help="Use at most this many images of --images."),
    ):
        argv = [str(model), "--runs", str(runs), "--batch", str(batch)]
        for flag, value in (("--manifest", manifest), ("--images", images), ("--threads", threads),
                            ("--json", json_out), ("--max-images", max_images)):
            if value is not None:
                argv += [flag, str(value)]
        code = run_device_check(argv)
        if code:
            raise typer.Exit(code)


def _print_summary(console, result, notes: bool = True) -> None:
    table = Table(title=f"{result.export_dir} (exported by {result.models[0]['exporter']})", title_justify="left")
    for col in ("file", "precision", "MiB", "max abs diff", "min cosine", "mean cosine", "p50 ms", "p90 ms",
                "img/s b32", "kNN agree"):
        table.add_column(col, no_wrap=col == "file")
    for entry in result.models:
        parity, speed = entry["parity"], entry.get("speed")
        agree = entry.get("comparison", {}).get("knn_agreement", {}).get(entry["precision"])
        timing = ([f"{speed['batch1_ms']['p50']:.3g}", f"{speed['batch1_ms']['p90']:.3g}",
                   f"{speed['throughput']['images_per_s']:.0f}"] if speed else ["", "", ""])
        table.add_row(entry["file"], entry["precision"], f"{entry['bytes'] / 2**20:.2f}",
                      f"{parity['max_abs_diff']:.2g}", f"{parity['min_cosine']:.6f}", f"{parity['mean_cosine']:.6f}",
                      *timing, "" if agree is None else f"{agree:.4f}")
    console.print(table)
    for note in result.notes if notes else []:
        console.print(note, highlight=False, soft_wrap=True, markup=False)
    console.print(f"Manifest: {result.manifest}", highlight=False, soft_wrap=True)
