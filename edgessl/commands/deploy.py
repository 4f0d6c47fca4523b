"""`edgessl export` and `edgessl check`, registered on the main typer app by `register(app)`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from edgessl.commands.common import api, argument, console, friendly, given, options_command
from edgessl.options import CheckOptions, ExportOptions, flag_name, specs

EXPORT_HELP = """Export a pretrained encoder (features before the projection head) or a fine-tuned classifier (logits) to
ONNX, and check the file against PyTorch on real images.

**Examples**

    edgessl export runs/mobilenetv3_small-20261123-120000
    edgessl export runs/<name> --int8 --calib ./my_images --fp16
    edgessl export runs/<name> --int8-mode strict --calib-method percentile   # one int8 config
    edgessl export runs/<name> --classifier runs/<name>/finetune-pets --int8
    edgessl export runs/<name> --opset 17 --images ./val_images
    edgessl export runs/<name> --width 0.5                # one width of a --widths run (see `edgessl slim`)
    edgessl export runs/<name> --int8 --ort               # + the .ort files mobile builds of onnxruntime load

Writes RUN/export/MODEL.onnx (+ MODEL.int8.onnx, MODEL.fp16.onnx, MODEL*.ort), MODEL.reference.npz and manifest.json.
Every file is checked with onnx.checker (full_check) and against PyTorch with ONNX Runtime (fp32: max abs diff <= 1e-4
of the output scale and cosine >= 0.99999 per image). --int8 searches calibration methods and float tails until the
int8 bound holds (mean cosine >= 0.93, min >= 0.75) and writes int8 whenever it does: this machine's speed is
reported (every file timed in the same alternating rounds, "no clear difference" when the spreads overlap), never a
reason to withhold it; when no candidate passes, one line says which bound it missed. manifest.json lists every
candidate, each file's speed and what onnxruntime's mobile checker says of NNAPI and Core ML. Then run `edgessl
check` or export/device_check.py on the device.

Exit codes: 2 bad input; 3 an exported file fails its check or its parity bounds (the file is removed; int8 only
with --int8-mode strict).
"""

CHECK_HELP = """Measure an exported ONNX model the way export/device_check.py does on a device: batch-1 latency
(p50/p90/p99), throughput, size, peak memory, outputs on the shipped reference images, and on labelled images the
accuracy (classifier) or, for an encoder, the kNN accuracy among the images and the vote of the reference embeddings
(the export's own images) for each image's class.

**Examples**

    edgessl check runs/<name>/export/encoder.onnx
    edgessl check runs/<name>/export/encoder.int8.onnx --images ./val --threads 4 --json check.json

On the device itself, copy export/device_check.py (needs only onnxruntime, numpy and Pillow) with the export folder.

Exit codes: 1 outputs on the reference images outside the manifest's bounds; 2 bad input, a model that fails to load,
or a manifest that does not match the model.
"""


def export_cmd(run: Path, **values) -> None:
    options = given(values)
    result = api.export(run, console=console, **options)
    _print_summary(console, result, notes=bool(options.get("quiet")))  # without --quiet export printed them


def check_cmd(model: Path, **values) -> None:
    options = given(values)
    argv = [str(model)]
    for f, spec in specs(CheckOptions):
        value = options.get(f.name, f.default)
        if value is not None:
            argv += [spec.flag or flag_name(f.name), str(value)]
    code = api.run_device_check(argv)
    if code:
        raise typer.Exit(code)


def register(app) -> None:
    """Add `export` and `check` to the typer app."""
    run = [argument("run", Path, "Run directory of `edgessl pretrain` (holds encoder.safetensors).")]
    app.command("export", help=EXPORT_HELP)(friendly(options_command(export_cmd, ExportOptions, leading=run)))
    model = [argument("model", Path, "The .onnx (or .ort) file.")]
    app.command("check", help=CHECK_HELP)(friendly(options_command(check_cmd, CheckOptions, leading=model)))


def _print_summary(console, result, notes: bool = True) -> None:
    table = Table(title=f"{result.export_dir} (exported by {result.models[0]['exporter']})", title_justify="left")
    for col in ("file", "precision", "MiB", "min cosine", "mean cosine", "batch-1 ms", "vs fp32", "img/s b32",
                "agrees with PyTorch", "mobile (NNAPI / Core ML)"):
        table.add_column(col, no_wrap=col == "file")
    for entry in result.models:
        parity, speed, comparison = entry["parity"], entry.get("speed"), entry.get("comparison", {})
        agree = comparison.get("agreement_with_pytorch", {}).get(entry["precision"])
        timing = ([f"{speed['batch1_ms']['p50']:.3g}", comparison.get("latency_verdict", "") or "",
                   f"{speed['throughput']['images_per_s']:.0f}"] if speed else ["", "", ""])
        table.add_row(entry["file"], entry["precision"], f"{entry['bytes'] / 2**20:.2f}",
                      f"{parity['min_cosine']:.6f}", f"{parity['mean_cosine']:.6f}", *timing,
                      "" if agree is None else f"{agree:.4f}", _mobile(entry.get("mobile")))
    console.print(table)
    for note in [*result.notes, *result.warnings] if notes else []:
        console.print(note, highlight=False, soft_wrap=True, markup=False)
    console.print(f"Manifest: {result.manifest}", highlight=False, soft_wrap=True)


def _mobile(report) -> str:
    """'NNAPI 80 % NO / CoreML-NN 73 % NO / CoreML-ML 100 % YES' from an entry's "mobile"."""
    if not report or "error" in report:
        return "" if not report else "n/a"
    names = {"nnapi": "NNAPI", "coreml_neuralnetwork": "CoreML-NN", "coreml_mlprogram": "CoreML-ML"}
    return " / ".join(f"{names[k]} {v['coverage']:.0%} {v['verdict']}" for k, v in report.items() if k in names)
