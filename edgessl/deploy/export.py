"""`edgessl export`: encoder (features) or fine-tuned classifier (logits) -> ONNX, checked against PyTorch on real
images, optionally with int8 (static, calibrated on the user's images) and fp16 copies, plus manifest.json and
reference outputs for the on-device check."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from rich.markup import escape

from edgessl.demo import demo_images
from edgessl.deploy import manifest as mf
from edgessl.deploy import onnx as ox
from edgessl.deploy import quantize as qz
from edgessl.deploy.images import Sample, sample_folder, spread, to_input
from edgessl.errors import UserError
from edgessl.evaluate.knn import KNN_K, KNN_T, knn_top1
from edgessl.fileio import sha256_file
from edgessl.models.backbone import load_encoder, read_encoder_meta
from edgessl.models.classifier import load_classifier

EVAL_IMAGES = 256  # parity is measured on up to this many images (all of them when the folder has fewer)
CALIB_IMAGES = 256  # int8 calibration images, spread over the calibration folder
REFERENCE_IMAGES = 48  # preprocessed images + PyTorch outputs shipped in <model>.reference.npz
LATENCY_RUNS = 30  # batch-1 runs per model for the size/latency ratios reported at export (device_check does more)


@dataclass
class ExportResult:
    export_dir: Path
    manifest: Path
    models: list[dict[str, Any]] = field(default_factory=list)


def _say(console, msg: str) -> None:
    if console is not None:
        console.print(escape(msg), highlight=False, soft_wrap=True)


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
    return model, model.edgessl_meta, "classifier"


def torch_outputs(model, x: np.ndarray, batch: int = 64) -> np.ndarray:
    """PyTorch outputs (N, D) float32 of model for x (N, 3, S, S) float32, in chunks of `batch`."""
    with torch.no_grad():
        outs = [model(torch.from_numpy(x[i : i + batch])).float().numpy() for i in range(0, len(x), batch)]
    return np.concatenate(outs)


def latency_ms(sess, x1: np.ndarray, runs: int = LATENCY_RUNS, warmup: int = 5) -> float:
    """Median batch-1 latency in ms."""
    name = sess.get_inputs()[0].name
    for _ in range(warmup):
        sess.run(None, {name: x1})
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, {name: x1})
        times.append((time.perf_counter() - t) * 1000)
    return float(np.median(times))


def _knn_top1(features: np.ndarray, labels: np.ndarray, classes: int) -> float:
    f, y = torch.from_numpy(features), torch.from_numpy(labels)
    return knn_top1(f, y, f, y, classes, k=min(KNN_K[0], len(y) - 1), t=KNN_T, exclude_self=True)


def _classifier_targets(sample: Sample, classes: list[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """(rows, targets) of the sample images whose folder is one of the classifier's classes, or None."""
    if sample.labels is None:
        return None
    lookup = {c: i for i, c in enumerate(classes)}
    pairs = [(r, lookup[sample.classes[c]]) for r, c in enumerate(sample.labels) if sample.classes[c] in lookup]
    if not pairs:
        return None
    rows, targets = zip(*pairs, strict=True)
    return np.array(rows), np.array(targets)


def _task_figures(kind: str, sample: Sample, meta: dict[str, Any], outputs: dict[str, np.ndarray]) -> dict[str, Any]:
    """kNN (encoder, labelled sample) or accuracy (classifier, folders named like its classes) per precision."""
    if kind == "encoder" and sample.labels is not None and len(sample) > 2:
        res = {p: _knn_top1(o, sample.labels, len(sample.classes)) for p, o in outputs.items()}
        return {"knn_top1": {**res, "k": min(KNN_K[0], len(sample) - 1), "images": len(sample),
                             "protocol": f"leave-one-out weighted kNN, cosine, t={KNN_T:g}, on the checked images"}}
    if kind == "classifier":
        found = _classifier_targets(sample, meta["classes"])
        if found is not None:
            rows, targets = found
            res = {p: float((o[rows].argmax(1) == targets).mean()) for p, o in outputs.items()}
            return {"accuracy": {**res, "images": int(len(rows))}}
    return {}


def _remove_previous(out_dir: Path, base: str) -> None:
    """Files of an earlier export of the same model are stale once it is exported again."""
    for suffix in (".onnx", ".int8.onnx", ".fp16.onnx", ".reference.npz"):
        (out_dir / f"{base}{suffix}").unlink(missing_ok=True)
    mf.drop_missing(out_dir)


def _write_reference(path: Path, sample: Sample, outputs: np.ndarray) -> None:
    idx = spread(len(sample), REFERENCE_IMAGES)
    labels = sample.labels[idx] if sample.labels is not None else np.full(len(idx), -1, dtype=np.int64)
    np.savez_compressed(
        path, images=sample.images[idx], paths=np.array([sample.relative()[i] for i in idx]),
        labels=labels, classes=np.array(sample.classes or [], dtype=str), outputs=outputs[idx].astype(np.float32),
    )


def _entry(file: Path, precision: str, base: dict[str, Any], parity: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "file": file.name, "precision": precision, "sha256": sha256_file(file), "bytes": file.stat().st_size,
        "parity": parity, "bounds": ox.BOUNDS[precision], "opset": ox.model_opset(file), **base, **extra,
    }


def _validated(path: Path, precision: str, x: np.ndarray, ref: np.ndarray, logits: bool):
    """check_model + ONNX Runtime outputs vs PyTorch. Returns (session, outputs, figures); the file is removed
    and ValidationFailed raised when it misses its bounds."""
    try:
        ox.check_model(path)
        sess = ox.session(path)
        out = ox.run(sess, x)
        figures = ox.compare(ref, out, logits=logits)
        ox.assert_within_bounds(figures, precision, path.name)
    except UserError:
        path.unlink(missing_ok=True)
        raise
    return sess, out, figures


def export(
    run: str | Path,
    classifier: str | Path | None = None,
    opset: int = 18,
    int8: bool = False,
    calib: str | Path | None = None,
    fp16: bool = False,
    images: str | Path | None = None,
    out: str | Path | None = None,
    name: str | None = None,
    calib_method: str = "minmax",
    console=None,
) -> ExportResult:
    """Export, validate and describe one model. See the module docstring and docs/export.md.

    run: a pretraining run directory; classifier: a fine-tuned classifier folder (exports logits instead of
    features); images: folder for the parity check (default: the classifier's labelled folder or the run's training
    folder); calib: int8 calibration folder (default: the training folder); out: export folder (default
    <run>/export); name: model file base name (default encoder / classifier); calib_method: minmax | moving-average |
    percentile | entropy (int8 activation ranges).
    Raises UserError (bad input, exit 2) or ValidationFailed (a file misses its check, exit 3)."""
    src = _prepare(run, classifier, opset, int8, calib, images, calib_method)
    out_dir = Path(out) if out else src.run_dir / "export"
    out_dir.mkdir(parents=True, exist_ok=True)
    base_name = name or src.kind
    _remove_previous(out_dir, base_name)
    x = to_input(src.sample.images, src.meta["mean"], src.meta["std"])
    ref = torch_outputs(src.model, x)
    fp32 = _export_fp32(src, out_dir / f"{base_name}.onnx", int(opset), x, ref, console)
    reference = out_dir / f"{base_name}.reference.npz"
    _write_reference(reference, src.sample, ref)
    common = _common_keys(src, fp32, reference.name, ref.shape[1])
    entries = [_entry(fp32.path, "fp32", common, fp32.figures)]
    failures: list[str] = []
    outputs = {"fp32": fp32.outputs}
    fp32.latency = latency_ms(fp32.session, x[:1])
    for precision, wanted in (("int8", int8), ("fp16", fp16)):
        if not wanted:
            continue
        path = out_dir / f"{base_name}.{precision}.onnx"
        try:
            entry, outputs[precision] = _reduced_copy(precision, path, fp32, src, x, ref, common, calib_method,
                                                      console)
        except ox.ValidationFailed as e:
            failures.append(str(e))
            _say(console, f"  failed: {e}")
            continue
        entries.append(entry)
    _add_task_figures(src, outputs, entries, console)
    manifest = mf.write_manifest(out_dir, entries, _source(src, classifier))
    if failures:
        raise ox.ValidationFailed(" ".join(failures) + f" The other files are listed in {manifest}.")
    return ExportResult(out_dir, manifest, entries)


@dataclass
class _Source:
    """What export reads before it writes anything: the model, its meta and the decoded image samples."""

    run_dir: Path
    model: Any  # eval-mode module: (B, 3, S, S) float32 -> (B, D) features or logits
    meta: dict[str, Any]  # the model's edgessl_meta
    kind: str  # "encoder" | "classifier"
    size: int  # input side S in pixels
    sample: Sample  # the parity-check images
    calib: Sample | None  # the int8 calibration images (None without int8)

    @property
    def logits(self) -> bool:
        return self.kind == "classifier"


def _prepare(run, classifier, opset, int8: bool, calib, images, calib_method: str) -> _Source:
    """Every check and decode that comes before a file is written: the export extra, the opset, the calibration
    method, the model, the parity sample and (int8) the calibration sample. UserError on bad input."""
    ox.require_export_deps()
    ox.check_opset(int(opset))
    qz.check_calibration_method(calib_method)
    run_dir = Path(run)
    model, meta, kind = _load_model(run_dir, classifier)
    size = int(meta.get("image_size") or meta["input_size"][-1])
    default = _default_folder(run_dir, meta, kind)
    eval_root = _resolve_folder(images, default, run_dir, "--images", "for the parity check")
    sample = sample_folder(eval_root, size, EVAL_IMAGES, "--images")
    calib_sample = None
    if int8:
        usable = default is not None and default.is_dir()
        calib_default = default if usable or images is None else eval_root  # else: the --images folder
        calib_root = _resolve_folder(calib, calib_default, run_dir, "--calib", "to calibrate int8")
        calib_sample = sample_folder(calib_root, size, CALIB_IMAGES, "--calib")
    return _Source(run_dir, model, meta, kind, size, sample, calib_sample)


@dataclass
class _Fp32:
    """The exported and validated fp32 file."""

    path: Path
    exporter: str  # which exporter wrote it (ox.DYNAMO | ox.TORCHSCRIPT)
    session: Any  # its ONNX Runtime session
    outputs: np.ndarray  # (N, D) on the parity images
    figures: dict[str, Any]  # parity against PyTorch (ox.compare)
    latency: float = 0.0  # median batch-1 ms, measured once the reference file is written

    @property
    def input_name(self) -> str:
        return self.session.get_inputs()[0].name

    @property
    def output_name(self) -> str:
        return self.session.get_outputs()[0].name


def _export_fp32(src: _Source, path: Path, opset: int, x: np.ndarray, ref: np.ndarray, console) -> _Fp32:
    """Export src.model to path and check it against PyTorch: ref (N, D) are its outputs for x (N, 3, S, S).
    ValidationFailed (the file removed) when it misses the fp32 bounds."""
    _say(console, f"Exporting the {src.kind} ({src.meta['timm_name']}, {src.size} px) to {path} ...")
    exporter = ox.export_model(src.model, path, src.size, opset, "input", "logits" if src.logits else "features")
    sess, out, fig = _validated(path, "fp32", x, ref, src.logits)
    _say(console, f"  written by {exporter}; parity on {len(src.sample)} images: "
                  f"max abs diff {fig['max_abs_diff']:.3g}, min cosine {fig['min_cosine']:.7f}")
    return _Fp32(path, exporter, sess, out, fig)


def _common_keys(src: _Source, fp32: _Fp32, reference: str, dim: int) -> dict[str, Any]:
    """The manifest keys every file of one export shares (dim: the output width D)."""
    return {
        "kind": src.kind, "exporter": fp32.exporter, "input": mf.input_spec(fp32.input_name, src.size),
        "preprocess": mf.preprocess_spec(src.meta),
        "output": mf.output_spec(src.kind, fp32.output_name, dim), "reference": reference,
        **({"classes": list(src.meta["classes"])} if src.logits else {}),
    }


def _convert(precision: str, path: Path, fp32: _Fp32, src: _Source, calib_method: str) -> dict[str, Any]:
    """Write the int8 (calibrated on src.calib) or fp16 copy of the fp32 file; returns the conversion settings.
    ValidationFailed (nothing written) when the conversion fails."""
    if precision == "int8":
        calib_x = to_input(src.calib.images, src.meta["mean"], src.meta["std"])
        settings = qz.quantize_int8(fp32.path, path, calib_x, fp32.input_name, calib_method)
        settings["calibration_folder"] = str(src.calib.root)
        return settings
    return qz.convert_fp16(fp32.path, path)


def _reduced_copy(precision: str, path: Path, fp32: _Fp32, src: _Source, x: np.ndarray, ref: np.ndarray,
                  common: dict[str, Any], calib_method: str, console) -> tuple[dict[str, Any], np.ndarray]:
    """Convert, validate and compare one int8 or fp16 copy: (its manifest entry, its outputs (N, D) on x).
    ValidationFailed when the conversion fails or the copy misses its bounds (the file is then removed)."""
    _say(console, f"Converting to {precision}: {path} ...")
    settings = _convert(precision, path, fp32, src, calib_method)
    sess, outp, fig = _validated(path, precision, x, ref, src.logits)
    cos = ox.cosines(fp32.outputs, outp)
    lat = latency_ms(sess, x[:1])
    comparison = {
        "cosine_to_fp32": {"min": float(cos.min()), "mean": float(cos.mean())},
        "size_ratio": path.stat().st_size / fp32.path.stat().st_size,
        "latency_ms_batch1": {"fp32": fp32.latency, precision: lat},
        "latency_ratio": lat / fp32.latency,
    }
    entry = _entry(path, precision, common, fig, conversion=settings, comparison=comparison)
    _say(console, f"  parity: min cosine {fig['min_cosine']:.5f} (mean {fig['mean_cosine']:.5f}); "
                  f"size x{comparison['size_ratio']:.2f}, batch-1 latency x{comparison['latency_ratio']:.2f} of fp32")
    return entry, outp


def _add_task_figures(src: _Source, outputs: dict[str, np.ndarray], entries: list[dict[str, Any]], console) -> None:
    """Add the task figures (kNN top-1 or accuracy per precision) to every entry's "comparison" and print them."""
    task = _task_figures(src.kind, src.sample, src.meta, outputs)
    for entry in entries:
        if task:
            entry.setdefault("comparison", {}).update(task)
    for key, label in (("knn_top1", "kNN top-1 (leave-one-out)"), ("accuracy", "accuracy")):
        if key in task:
            values = ", ".join(f"{p} {task[key][p]:.4f}" for p in outputs)
            _say(console, f"{label} on {task[key]['images']} labelled images: {values}")


def _source(src: _Source, classifier) -> dict[str, Any]:
    """manifest.json's "source": what was exported and which images checked it."""
    return {
        "run": str(src.run_dir.resolve()), "classifier": str(Path(classifier).resolve()) if classifier else None,
        "images": str(src.sample.root.resolve()), "timm_name": src.meta["timm_name"], "stem": src.meta.get("stem"),
        "epochs_trained": src.meta.get("epochs_trained"), "method": src.meta.get("method"),
    }
