"""`edgessl export`: a run's encoder (features) or a fine-tuned classifier (logits) -> ONNX, checked against PyTorch
on real images, optionally with int8 (static, calibrated on the user's images, searched until it meets its bound:
edgessl.deploy.int8search) and fp16 copies, plus manifest.json, reference outputs for the on-device check and each
file's speed on this machine (the steps: edgessl.deploy.convert)."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from edgessl.demo import demo_images
from edgessl.deploy import int8search as i8
from edgessl.deploy import manifest as mf
from edgessl.deploy import onnx as ox
from edgessl.deploy import quantize as qz
from edgessl.deploy.convert import CALIB_IMAGES, EVAL_IMAGES, EXPORT_SUFFIXES, Source, write_models
from edgessl.deploy.images import sample_folder
from edgessl.errors import UserError
from edgessl.fileio import check_folder_path
from edgessl.models.backbone import load_encoder, read_encoder_meta
from edgessl.models.classifier import load_classifier
from edgessl.models.widths import ensure_slimmed
from edgessl.options import ExportOptions, takes_options
from edgessl.report.say import Say


@dataclass
class ExportResult:
    export_dir: Path
    manifest: Path
    models: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # one line each, e.g. why int8 was not written
    warnings: list[str] = field(default_factory=list)  # one line each: what to look at before shipping


@takes_options(ExportOptions, lead=("run",), extra={"console": None})
def export(run: str | Path, opts: ExportOptions, console=None) -> ExportResult:
    """Export, validate and describe one model. See the module docstring and docs/export.md. Options:
    edgessl.options.ExportOptions (the same as `edgessl export`'s flags).

    run: a pretraining run directory; classifier: a fine-tuned classifier folder (exports logits instead of
    features); images: folder for the parity check (default: the classifier's labelled folder or the run's training
    folder); int8: True (= int8_mode "search"); int8_mode: "search", "faster-here" or "strict" ("keep-slow":
    search's old name; see edgessl.deploy.int8search); calib: int8 calibration folder (default: the training
    folder); out: export folder (default <run>/export); name: model file base name (default encoder /
    classifier); calib_method: minmax | moving-average | percentile | entropy (int8 activation ranges; the search
    tries it first); width: one width of a --widths run (slimmed into <run>/width-W/ first).
    Returns an ExportResult (export_dir, manifest, models: the manifest entries written). Raises UserError (bad
    input, exit 2) or ValidationFailed (a file misses its check, exit 3; int8 only in "strict" mode, the search
    keeps fp32 and says why in ExportResult.notes)."""
    say = Say(console, opts.quiet)
    if opts.width is not None:
        run, reused = ensure_slimmed(run, opts.width)
        say(f"Width {opts.width:g}: {'using the slimmed encoder in' if reused else 'slimmed into'} {run}", markup=False)
    mode = i8.int8_mode(opts.int8_mode if opts.int8_mode is not None else opts.int8)
    if opts.out:  # the run's own export folder is always its own (even when the run has moved since)
        check_out_folder(Path(opts.out), Path(run), opts.name or ("classifier" if opts.classifier else "encoder"))
    src = _prepare(run, opts, mode is not None)
    out_dir = Path(opts.out) if opts.out else src.run_dir / "export"
    out_dir.mkdir(parents=True, exist_ok=True)
    entries, notes, failures = write_models(src, out_dir, opts.name or src.kind, int(opts.opset), mode, opts.fp16,
                                            opts.calib_method, functools.partial(say, markup=False), opts.ort)
    cautions = export_warnings(src, entries)
    for line in cautions:
        say(line, markup=False)
    manifest = mf.write_manifest(out_dir, entries, _source(src, opts.classifier))
    if failures:
        raise ox.ValidationFailed(" ".join(failures) + f" The other files are listed in {manifest}.")
    return ExportResult(out_dir, manifest, entries, notes, cautions)


CALIB_FEW = 50  # int8 calibrated on fewer images than this: a warning (its activation ranges rest on so few)
AGREEMENT_LOW = 0.8  # an int8 / fp16 file giving fewer checked images PyTorch's kNN label than this: a warning


def export_warnings(src: Source, entries: list[dict[str, Any]]) -> list[str]:
    """What the user should look at before shipping, one line each: an int8 calibrated on few images, a reduced
    copy whose kNN labels on the labelled images differ from PyTorch's though its cosines meet the bound (cosines
    of pooled features stay high when a shared component dominates them)."""
    lines = []
    if src.calib is not None and len(src.calib) < CALIB_FEW:
        lines.append(f"warning: int8 was calibrated on {len(src.calib)} image{'s' if len(src.calib) > 1 else ''} "
                     f"from {src.calib.root}: activation ranges from so few may miss what the device sees; pass "
                     "--calib with a few hundred typical images.")
    for e in entries:
        figures = e.get("comparison", {}).get("agreement_with_pytorch") or {}
        agree, fp32 = figures.get(e["precision"]), figures.get("fp32")
        if e["precision"] == "fp32" or agree is None or agree >= AGREEMENT_LOW:
            continue
        n = figures["images"]
        if fp32 is not None and fp32 < 1:  # fp32's outputs equal PyTorch's to rounding: the labels sit on ties
            lines.append(f"note: {e['file']} gives {agree:.0%} of the {n} labelled images the kNN label PyTorch's "
                         f"features give, but fp32 itself only {fp32:.0%}: these images' kNN labels sit on near "
                         "ties (as a barely trained encoder's do), so this figure says little; judge the file by "
                         "its cosines.")
            continue
        lines.append(f"warning: {e['file']} gives {agree:.0%} of the {n} labelled images the kNN label PyTorch's "
                     f"features give (below {AGREEMENT_LOW:.0%}): its cosines meet the bound, but the neighbours "
                     "it finds differ; calibrate on more typical images (--calib) or ship fp32.")
    return lines


def training_folder(run_dir: Path) -> Path | None:
    """The folder a run was trained on (config.yaml `data`; null = the bundled demo images), None without config."""
    cfg = run_dir / "config.yaml"
    if not cfg.is_file():
        return None
    data = (yaml.safe_load(cfg.read_text()) or {}).get("data")
    if data:
        return Path(data)
    return demo_images()


def _default_folder(run_dir: Path, meta: dict[str, Any], kind: str) -> Path | None:
    """Classifier: the labelled folder it was fine-tuned on when it still exists; else the run's training folder."""
    if kind == "classifier" and meta.get("train_data") and Path(meta["train_data"]).is_dir():
        return Path(meta["train_data"])
    return training_folder(run_dir)


def _resolve_folder(explicit, default: Path | None, run_dir: Path, option: str, purpose: str) -> Path:
    if explicit is not None:
        return Path(explicit)
    if default is None:
        raise UserError(f"'{run_dir}' has no config.yaml naming its training images; pass {option} ./images {purpose}.")
    if not default.is_dir():
        raise UserError(f"The run's training folder '{default}' no longer exists; pass {option} ./images {purpose}.")
    return default


def _load_model(run_dir: Path, classifier):
    """(model, meta, kind); UserError when the run has no encoder or the classifier folder is not one."""
    read_encoder_meta(run_dir)  # the run must hold an encoder, whatever is exported
    if classifier is None:
        model = load_encoder(run_dir)
        return model, model.edgessl_meta, "encoder"
    model = load_classifier(classifier)
    origin = (model.edgessl_meta.get("finetune") or {}).get("encoder_run")
    if origin and Path(origin).is_dir() and not Path(origin).samefile(run_dir):  # a moved run cannot be checked
        raise UserError(f"--classifier '{classifier}' was fine-tuned from the run '{origin}', not '{run_dir}': the "
                        f"manifest would name the wrong run. Export it with its own: edgessl export {origin} "
                        f"--classifier {classifier}")
    return model, model.edgessl_meta, "classifier"


def _prepare(run, opts: ExportOptions, int8: bool) -> Source:
    """Every check and decode that comes before a file is written: the export extra, the opset, the calibration
    method, the model, the parity sample and (int8) the calibration sample. UserError on bad input."""
    ox.require_export_deps()
    ox.check_opset(int(opts.opset), int8)
    if opts.threads is not None and int(opts.threads) < 1:
        raise UserError(f"--threads must be positive (leave it out for onnxruntime's default), not {opts.threads}.")
    qz.check_calibration_method(opts.calib_method)
    run_dir = Path(run)
    model, meta, kind = _load_model(run_dir, opts.classifier)
    size = int(meta.get("image_size") or meta["input_size"][-1])
    default = _default_folder(run_dir, meta, kind)
    images = opts.images
    eval_root = _resolve_folder(images, default, run_dir, "--images", "for the parity check")
    sample = sample_folder(eval_root, size, EVAL_IMAGES, "--images")
    calib_sample = None
    if int8:
        usable = default is not None and default.is_dir()
        calib_default = default if usable or images is None else eval_root  # else: the --images folder
        calib_root = _resolve_folder(opts.calib, calib_default, run_dir, "--calib", "to calibrate int8")
        calib_sample = sample_folder(calib_root, size, CALIB_IMAGES, "--calib")
    return Source(run_dir, model, meta, kind, size, sample, calib_sample, opts.threads)


def _source(src: Source, classifier) -> dict[str, Any]:
    """manifest.json's "source": what was exported and which images checked it."""
    return {
        "run": str(src.run_dir.resolve()), "classifier": str(Path(classifier).resolve()) if classifier else None,
        "images": str(src.sample.root.resolve()), "timm_name": src.meta["timm_name"], "stem": src.meta.get("stem"),
        "epochs_trained": src.meta.get("epochs_trained"), "method": src.meta.get("method"),
    }


def check_out_folder(out_dir: Path, run_dir: Path, base: str) -> None:
    """Before any work, UserError when --out `out_dir` is a file or lies below one, holds the export of another run,
    or holds files this export of `base` would replace with no manifest.json to show an edgessl export wrote them."""
    check_folder_path(out_dir, out_dir)
    if (out_dir / mf.MANIFEST).is_file():
        check_not_another_export(out_dir, {"run": str(run_dir.resolve())})
        return
    theirs = [f"{base}{s}" for s in EXPORT_SUFFIXES if (out_dir / f"{base}{s}").exists()]
    if theirs:
        raise UserError(f"--out '{out_dir}' holds {', '.join(theirs)} but no manifest.json: files that no edgessl "
                        "export wrote (or whose manifest is gone) would be replaced; choose another --out, or move "
                        "them first.")


def check_not_another_export(out_dir: Path, source: dict[str, Any]) -> None:
    """UserError when out_dir holds the export of another run's model (its manifest's source names another run):
    exporting there would replace that run's files and manifest. The same run's earlier exports (its encoder, its
    classifiers) are kept or refreshed as in its own export folder."""
    try:
        earlier = json.loads((out_dir / mf.MANIFEST).read_text()).get("source") or {}
    except (OSError, ValueError, AttributeError):  # none, or not a manifest: nothing of another run's to keep
        return
    if not isinstance(earlier, dict) or not earlier.get("run"):  # written before manifests named their source
        return
    if earlier["run"] != source["run"]:
        raise UserError(f"--out '{out_dir}' holds the export of another run ({earlier['run']}): exporting here would "
                        "replace its files; choose another --out, or remove that folder first.")
