"""manifest.json: what a device needs to feed an exported model and to trust it.

Top level: format, edgessl_version, created, source (run, classifier, images used for the checks), input and
preprocess (those of the models listed; each model repeats its own), models: one entry per file.

Entry keys the tooling relies on (keep them): file, precision ("fp32" | "int8" | "fp16"), sha256,
parity {max_abs_diff, min_cosine, ...}. Further keys: kind (encoder | classifier), bytes, exporter, opset, input,
preprocess, output {name, shape, dtype, meaning}, classes (classifier), bounds, reference (npz file beside it),
speed on the exporting machine {batch1_ms {p50, p90, runs}, throughput {batch, images_per_s}}, comparison (kNN
top-1 and agreement with PyTorch, or accuracy, per precision), for int8/fp16 the conversion settings and a
comparison with fp32, and in the fp32 entry "int8_search" when --int8 searched (every candidate, the outcome).
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any

from edgessl._version import __version__
from edgessl.data.folder import BACKGROUND
from edgessl.errors import UserError
from edgessl.fileio import atomic_write_text, sha256_file

MANIFEST = "manifest.json"
FORMAT = "edgessl-onnx/1"
RESIZE_POLICY = "shorter_side_center_crop"
OUTPUT_MEANING = {
    "encoder": "pooled backbone features before the projection head (not L2-normalised); compare them with "
               "cosine similarity (kNN, retrieval) or train a linear layer on them",
    "classifier": "logits (unnormalised class scores) in the order of `classes`; softmax gives probabilities",
}


def input_spec(name: str, image_size: int) -> dict[str, Any]:
    return {"name": name, "shape": ["batch", 3, image_size, image_size], "dtype": "float32", "layout": "NCHW",
            "channels": "RGB"}


def preprocess_spec(meta: dict[str, Any]) -> dict[str, Any]:
    """How a file becomes the model input: edgessl.data.folder.decode_image + edgessl.data.augment.test_transform."""
    size = int(meta.get("image_size") or meta["input_size"][-1])
    return {
        "image_size": size,
        "resize_policy": RESIZE_POLICY,
        "resize": "shorter side to image_size then centre crop to image_size x image_size (PIL ImageOps.fit, "
                  "bicubic); JPEGs are decoded with draft('RGB', (image_size, image_size)) first",
        "interpolation": "bicubic",
        "jpeg_draft": True,
        "exif_transpose": True,
        "background": list(BACKGROUND),
        "alpha": "palette and alpha images are composited onto `background` (white)",
        "color": "16-bit, grayscale, CMYK and float images are converted to 8-bit RGB",
        "greyscale": bool(meta.get("greyscale", False)),
        "greyscale_rule": "when greyscale is true (the encoder was trained on a greyscale folder), the RGB image is "
                          "turned grey (PIL convert('L'), ITU-R 601 luma) and back to three equal channels, as its "
                          "training images were",
        "scale": 255.0,
        "mean": [float(v) for v in meta["mean"]],
        "std": [float(v) for v in meta["std"]],
        "formula": "x = (rgb_uint8 / 255 - mean) / std per channel, float32, channels first (NCHW)",
        "reference_implementation": "edgessl.data.folder.decode_image + edgessl.data.augment.test_transform",
    }


def output_spec(kind: str, name: str, dim: int) -> dict[str, Any]:
    return {"name": name, "shape": ["batch", int(dim)], "dtype": "float32", "meaning": OUTPUT_MEANING[kind]}


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Parse and minimally validate a manifest; UserError with one line when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Manifest '{path}' not found.")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"Manifest '{path}' is not valid JSON ({e}).") from None
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise UserError(f"Manifest '{path}' has no 'models' list (not written by `edgessl export`?).")
    for entry in data["models"]:
        missing = [k for k in ("file", "precision", "sha256", "parity") if k not in entry]
        if missing:
            raise UserError(f"Manifest '{path}': a model entry lacks {', '.join(missing)}.")
    return data


def find_entry(manifest: dict[str, Any], file_name: str) -> dict[str, Any] | None:
    return next((m for m in manifest["models"] if m["file"] == file_name), None)


def _still_valid(folder: Path, entry: dict[str, Any]) -> bool:
    path = folder / entry["file"]
    return path.is_file() and sha256_file(path) == entry["sha256"]


def drop_missing(folder: str | Path) -> None:
    """Rewrite folder/manifest.json without the entries whose file is gone (no-op without a manifest)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return
    try:
        data = read_manifest(path)
    except UserError:
        return
    kept = [m for m in data["models"] if (Path(folder) / m["file"]).is_file()]
    if len(kept) != len(data["models"]):
        data["models"] = kept
        atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def write_manifest(folder: str | Path, entries: list[dict[str, Any]], source: dict[str, Any]) -> Path:
    """Write folder/manifest.json listing `entries`, keeping earlier entries for other files that still exist
    unchanged and share the same input and preprocessing (e.g. an encoder exported before a classifier). Each entry
    carries the "source" of the export that wrote it; the top-level "source" is this export's."""
    folder = Path(folder)
    path = folder / MANIFEST
    new_files = {e["file"] for e in entries}
    entries = [{**e, "source": source} for e in entries]  # each file names what it was exported from
    kept: list[dict[str, Any]] = []
    if path.is_file():
        try:
            old = read_manifest(path)
        except UserError:
            old = {"models": []}
        for entry in old["models"]:
            same_io = entry.get("input") == entries[0]["input"] and entry.get("preprocess") == entries[0]["preprocess"]
            if entry["file"] not in new_files and same_io and _still_valid(folder, entry):
                kept.append({**entry, "source": entry.get("source", old.get("source"))})  # older: the file's export
    manifest = {
        "format": FORMAT,
        "edgessl_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": source,
        "input": entries[0]["input"],
        "preprocess": entries[0]["preprocess"],
        "models": kept + entries,
    }
    return atomic_write_text(path, json.dumps(manifest, indent=2) + "\n")
