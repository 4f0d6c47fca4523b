"""`edgessl export`: encoder (features) or fine-tuned classifier (logits) -> ONNX, checked against PyTorch on real
images, optionally with int8 (static, calibrated on the user's images) and fp16 copies, plus manifest.json and
reference outputs for the on-device check."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgessl.deploy import manifest as mf
from edgessl.deploy import onnx as ox
from edgessl.deploy import quantize as qz
from edgessl.deploy.images import Sample, sample_folder, spread, to_input
from edgessl.errors import UserError
from edgessl.evaluate.knn import KNN_K, KNN_T, knn_top1
from edgessl.fileio import sha256_file

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
        from rich.markup import escape

        console.print(escape(msg), highlight=False, soft_wrap=True)


def training_folder(run_dir: Path) -> Path | None:
    """The folder a run was trained on (config.yaml `data`; null = the bundled demo images), None without config."""
    import yaml

    cfg = run_dir / "config.yaml"
    if not cfg.is_file():
        return None
    data = (yaml.safe_load(cfg.read_text()) or {}).get("data")
    if data:
        return Path(data)
    from edgessl.demo import demo_images

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
    from edgessl.models.backbone import load_encoder, read_encoder_meta

    read_encoder_meta(run_dir)  # the run must hold an encoder, whatever is exported
    if classifier is None:
        model = load_encoder(run_dir)
        return model, model.edgessl_meta, "encoder"
    from edgessl.models.classifier import load_classifier

    model = load_classifier(classifier)
    return model, model.edgessl_meta, "classifier"


def torch_outputs(model, x: np.ndarray, batch: int = 64) -> np.ndarray:
    import torch

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
    import torch

    f, y = torch.from_numpy(features), torch.from_numpy(labels)
    return knn_top1(f, y, f, y, classes, k=min(KNN_K[0], len(y) - 1), t=KNN_T, exclude_self=True)


def _classifier_targets(sample: Sample, classes: list[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """(rows, targets) of the sample images whose folder is one of the classifier's classes, or None."""
    if sample.labels is None:
        return None
    lookup = {c: i for i, c in enumerate(classes)}
    pairs = [(r, lookup[sample.classes[l]]) for r, l in enumerate(sample.labels) if sample.classes[l] in lookup]
    if not pairs:
        return None
    rows, targets = zip(*pairs)
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

    out_dir = Path(out) if out else run_dir / "export"
    out_dir.mkdir(parents=True, exist_ok=True)
    base_name = name or kind
    _remove_previous(out_dir, base_name)
    x = to_input(sample.images, meta["mean"], meta["std"])
    ref = torch_outputs(model, x)
    logits = kind == "classifier"
    output_name = "logits" if logits else "features"

    fp32 = out_dir / f"{base_name}.onnx"
    _say(console, f"Exporting the {kind} ({meta['timm_name']}, {size} px) to {fp32} ...")
    exporter = ox.export_model(model, fp32, size, int(opset), "input", output_name)
    sess32, out32, fig32 = _validated(fp32, "fp32", x, ref, logits)
    in_name, out_name = sess32.get_inputs()[0].name, sess32.get_outputs()[0].name
    _say(console, f"  written by {exporter}; parity on {len(sample)} images: max abs diff {fig32['max_abs_diff']:.3g}, "
                  f"min cosine {fig32['min_cosine']:.7f}")
    reference = out_dir / f"{base_name}.reference.npz"
    _write_reference(reference, sample, ref)
    common = {
        "kind": kind, "exporter": exporter, "input": mf.input_spec(in_name, size),
        "preprocess": mf.preprocess_spec(meta),
        "output": mf.output_spec(kind, out_name, ref.shape[1]), "reference": reference.name,
        **({"classes": list(meta["classes"])} if logits else {}),
    }
    entries = [_entry(fp32, "fp32", common, fig32)]
    failures: list[str] = []
    outputs = {"fp32": out32}
    lat32 = latency_ms(sess32, x[:1])
    for precision, wanted in (("int8", int8), ("fp16", fp16)):
        if not wanted:
            continue
        path = out_dir / f"{base_name}.{precision}.onnx"
        _say(console, f"Converting to {precision}: {path} ...")
        try:
            if precision == "int8":
                calib_x = to_input(calib_sample.images, meta["mean"], meta["std"])
                settings = qz.quantize_int8(fp32, path, calib_x, in_name, calib_method)
                settings["calibration_folder"] = str(calib_sample.root)
            else:
                settings = qz.convert_fp16(fp32, path)
            sess, outp, fig = _validated(path, precision, x, ref, logits)
        except ox.ValidationFailed as e:
            failures.append(str(e))
            _say(console, f"  failed: {e}")
            continue
        outputs[precision] = outp
        cos = ox.cosines(out32, outp)
        lat = latency_ms(sess, x[:1])
        comparison = {
            "cosine_to_fp32": {"min": float(cos.min()), "mean": float(cos.mean())},
            "size_ratio": path.stat().st_size / fp32.stat().st_size,
            "latency_ms_batch1": {"fp32": lat32, precision: lat},
            "latency_ratio": lat / lat32,
        }
        entries.append(_entry(path, precision, common, fig, conversion=settings, comparison=comparison))
        _say(console, f"  parity: min cosine {fig['min_cosine']:.5f} (mean {fig['mean_cosine']:.5f}); "
                      f"size x{comparison['size_ratio']:.2f}, batch-1 latency x{comparison['latency_ratio']:.2f} of fp32")
    task = _task_figures(kind, sample, meta, outputs)
    for entry in entries:
        if task:
            entry.setdefault("comparison", {}).update(task)
    for key, label in (("knn_top1", "kNN top-1 (leave-one-out)"), ("accuracy", "accuracy")):
        if key in task:
            values = ", ".join(f"{p} {task[key][p]:.4f}" for p in outputs)
            _say(console, f"{label} on {task[key]['images']} labelled images: {values}")
    source = {
        "run": str(run_dir.resolve()), "classifier": str(Path(classifier).resolve()) if classifier else None,
        "images": str(sample.root.resolve()), "timm_name": meta["timm_name"], "stem": meta.get("stem"),
        "epochs_trained": meta.get("epochs_trained"), "method": meta.get("method"),
    }
    manifest = mf.write_manifest(out_dir, entries, source)
    if failures:
        raise ox.ValidationFailed(" ".join(failures) + f" The other files are listed in {manifest}.")
    return ExportResult(out_dir, manifest, entries)
