"""The steps of an export (the command: edgessl.workflows.export): the fp32 ONNX file checked against PyTorch on real
images, its reference outputs for the device check, the int8 (static, searched until it meets its bound: int8search.py)
and fp16 copies, each with parity, task figures and speed here. Over 400 lines: one job, the steps of one export."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgessl.deploy import int8search as i8
from edgessl.deploy import manifest as mf
from edgessl.deploy import onnx as ox
from edgessl.deploy import quantize as qz
from edgessl.deploy import sensitivity as sn
from edgessl.deploy import speed as sp
from edgessl.deploy.images import Sample, spread, to_input
from edgessl.deploy.mobile import mobile_usability, write_ort
from edgessl.errors import UserError
from edgessl.evaluate.knn import KNN_T, knn_predict, loo_k
from edgessl.fileio import sha256_file

EVAL_IMAGES = 256  # parity is measured on up to this many images (all of them when the folder has fewer)
CALIB_IMAGES = 256  # int8 calibration images, spread over the calibration folder
REFERENCE_IMAGES = 48  # preprocessed images + PyTorch outputs shipped in <model>.reference.npz
SCRATCH: str | None = None  # parent folder of the int8 search's temporary files (None: the system's temp folder)


def torch_outputs(model, x: np.ndarray, batch: int = 64) -> np.ndarray:
    """PyTorch outputs (N, D) float32 of model for x (N, 3, S, S) float32, in chunks of `batch`."""
    with torch.no_grad():
        outs = [model(torch.from_numpy(x[i : i + batch])).float().numpy() for i in range(0, len(x), batch)]
    return np.concatenate(outs)


def _knn_labels(features: np.ndarray, labels: np.ndarray, classes: int, k: int) -> torch.Tensor:
    """Leave-one-out weighted kNN predictions (k neighbours, t = KNN_T) for every image."""
    f, y = torch.from_numpy(features), torch.from_numpy(labels)
    return knn_predict(f, f, y, classes, k=k, t=KNN_T, exclude_self=True).argmax(1)


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


def _task_figures(kind: str, sample: Sample, meta: dict[str, Any], outputs: dict[str, np.ndarray],
                  ref: np.ndarray) -> dict[str, Any]:
    """Per precision: encoder on a labelled sample: knn_accuracy (leave-one-out kNN top-1 of the exported model's
    outputs) and agreement_with_pytorch (the share of images whose leave-one-out kNN label is the one PyTorch's
    features give: 1 for a perfect export); classifier on folders named like its classes: accuracy."""
    if kind == "encoder" and sample.labels is not None and len(sample) > 2:
        classes, k, y = len(sample.classes), loo_k(sample.labels), torch.from_numpy(sample.labels)
        predicted = {p: _knn_labels(o, sample.labels, classes, k) for p, o in outputs.items()}  # one search each
        torch_labels = _knn_labels(ref, sample.labels, classes, k)
        res = {p: float((pred == y).float().mean()) for p, pred in predicted.items()}  # knn_top1's arithmetic
        agree = {p: float((pred == torch_labels).numpy().mean()) for p, pred in predicted.items()}
        return {"knn_accuracy": {**res, "k": k, "images": len(sample),
                                 "protocol": f"leave-one-out weighted kNN, cosine, t={KNN_T:g}, on the checked images"},
                "agreement_with_pytorch": {**agree, "k": k, "images": len(sample),
                                           "protocol": "share of the checked images whose leave-one-out kNN label "
                                                       "equals the one from PyTorch's features"}}
    if kind == "classifier":
        found = _classifier_targets(sample, meta["classes"])
        if found is not None:
            rows, targets = found
            res = {p: float((o[rows].argmax(1) == targets).mean()) for p, o in outputs.items()}
            return {"accuracy": {**res, "images": int(len(rows))}}
    return {}


EXPORT_SUFFIXES = (".onnx", ".int8.onnx", ".fp16.onnx", ".reference.npz", ".ort", ".int8.ort", ".fp16.ort")
# the files of one exported model (the .ort copies with --ort: an earlier one had stayed beside a newer .onnx)


def _remove_previous(out_dir: Path, base: str, wanted: set[str]) -> list[str]:
    """Files of an earlier export of the same model are stale once it is exported again: removed. Returns the names
    of those this export will not write again (their suffix is not in `wanted`: a precision not asked for now)."""
    gone = []
    for suffix in EXPORT_SUFFIXES:
        path = out_dir / f"{base}{suffix}"
        if path.exists():
            path.unlink()
            if suffix not in wanted:
                gone.append(path.name)
    mf.drop_missing(out_dir)
    return gone


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


def _validated(path: Path, precision: str, x: np.ndarray, ref: np.ndarray, logits: bool, threads: int | None = None):
    """check_model + ONNX Runtime outputs vs PyTorch. Returns (session, outputs, figures); the file is removed
    and ValidationFailed raised when it misses its bounds. threads: the session's (export --threads)."""
    try:
        ox.check_model(path)
        sess = ox.session(path, threads)
        out = ox.run(sess, x)
        figures = ox.compare(ref, out, logits=logits)
        ox.assert_within_bounds(figures, precision, path.name)
    except UserError:
        path.unlink(missing_ok=True)
        raise
    return sess, out, figures


@dataclass
class Source:
    """What export reads before it writes anything: the model, its meta and the decoded image samples."""

    run_dir: Path
    model: Any  # eval-mode module: (B, 3, S, S) float32 -> (B, D) features or logits
    meta: dict[str, Any]  # the model's edgessl_meta
    kind: str  # "encoder" | "classifier"
    size: int  # input side S in pixels
    sample: Sample  # the parity-check images
    calib: Sample | None  # the int8 calibration images (None without int8)
    threads: int | None = None  # onnxruntime threads of the timed sessions (export --threads; None: its default)

    @property
    def logits(self) -> bool:
        return self.kind == "classifier"


@dataclass
class _Fp32:
    """The exported and validated fp32 file."""

    path: Path
    exporter: str  # which exporter wrote it (ox.DYNAMO | ox.TORCHSCRIPT)
    session: Any  # its ONNX Runtime session
    outputs: np.ndarray  # (N, D) on the parity images
    figures: dict[str, Any]  # parity against PyTorch (ox.compare)

    @property
    def input_name(self) -> str:
        return self.session.get_inputs()[0].name

    @property
    def output_name(self) -> str:
        return self.session.get_outputs()[0].name


def _export_fp32(src: Source, path: Path, opset: int, x: np.ndarray, ref: np.ndarray, say) -> _Fp32:
    """Export src.model to path and check it against PyTorch: ref (N, D) are its outputs for x (N, 3, S, S).
    ValidationFailed (the file removed) when it misses the fp32 bounds."""
    say(f"Exporting the {src.kind} ({src.meta['timm_name']}, {src.size} px) to {path} ...")
    exporter = ox.export_model(src.model, path, src.size, opset, "input", "logits" if src.logits else "features")
    sess, out, fig = _validated(path, "fp32", x, ref, src.logits, src.threads)
    say(f"  written by {exporter}; parity on {len(src.sample)} images: "
                  f"max abs diff {fig['max_abs_diff']:.3g}, min cosine {fig['min_cosine']:.7f}")
    return _Fp32(path, exporter, sess, out, fig)


def _common_keys(src: Source, fp32: _Fp32, reference: str, dim: int) -> dict[str, Any]:
    """The manifest keys every file of one export shares (dim: the output width D)."""
    return {
        "kind": src.kind, "exporter": fp32.exporter, "input": mf.input_spec(fp32.input_name, src.size),
        "preprocess": mf.preprocess_spec(src.meta),
        "output": mf.output_spec(src.kind, fp32.output_name, dim), "reference": reference,
        **({"classes": list(src.meta["classes"])} if src.logits else {}),
    }


def _convert(precision: str, path: Path, fp32: _Fp32, src: Source, calib_method: str) -> dict[str, Any]:
    """Write the int8 (calibrated on src.calib) or fp16 copy of the fp32 file; returns the conversion settings.
    ValidationFailed (nothing written) when the conversion fails."""
    if precision == "int8":
        calib_x = to_input(src.calib.images, src.meta["mean"], src.meta["std"])
        settings = qz.quantize_int8(fp32.path, path, calib_x, fp32.input_name, calib_method)
        settings["calibration_folder"] = str(src.calib.root)
        return settings
    return qz.convert_fp16(fp32.path, path)


def _reduced_copy(precision: str, path: Path, fp32: _Fp32, src: Source, x: np.ndarray, ref: np.ndarray,
                  common: dict[str, Any], calib_method: str, say) -> tuple[dict[str, Any], np.ndarray]:
    """Convert, validate and compare one int8 (single configuration) or fp16 copy: (its manifest entry, its outputs
    (N, D) on x). ValidationFailed when the conversion fails or the copy misses its bounds (the file is removed)."""
    say(f"Converting to {precision}: {path} ...")
    settings = _convert(precision, path, fp32, src, calib_method)
    return _described(precision, path, fp32, src, x, ref, common, settings, say)


def _described(precision: str, path: Path, fp32: _Fp32, src: Source, x: np.ndarray, ref: np.ndarray,
               common: dict[str, Any], settings: dict[str, Any], say) -> tuple[dict[str, Any], np.ndarray]:
    """Validate the written int8 or fp16 file and compare it with fp32: (its manifest entry, its outputs). Its speed
    is measured later, with every other file of the export (timed_speeds)."""
    sess, outp, fig = _validated(path, precision, x, ref, src.logits)
    cos = ox.cosines(fp32.outputs, outp)
    comparison = {
        "cosine_to_fp32": {"min": float(cos.min()), "mean": float(cos.mean())},
        "size_ratio": path.stat().st_size / fp32.path.stat().st_size,
    }
    entry = _entry(path, precision, common, fig, conversion=settings, comparison=comparison)
    say(f"  parity: min cosine {fig['min_cosine']:.5f} (mean {fig['mean_cosine']:.5f}); "
        f"size x{comparison['size_ratio']:.2f} of fp32")
    return entry, outp


def _attempt(candidate: i8.Candidate, file: Path, prepared: tuple[Path, bool], fp32: _Fp32, calib_x: np.ndarray,
             x: np.ndarray, ref: np.ndarray, logits: bool) -> i8.Attempt:
    """Quantise one candidate into `file` (a temporary path) and check it against PyTorch."""
    source, pre_processed = prepared
    try:
        settings = qz.quantize_int8(fp32.path, file, calib_x, fp32.input_name, candidate.method,
                                    candidate.nodes_in_float, source, pre_processed)
        ox.check_model(file)
        sess = ox.session(file)
        figures = ox.compare(ref, ox.run(sess, x), logits=logits)
    except Exception as e:  # noqa: BLE001 - a candidate that cannot be built or run is a failed candidate
        file.unlink(missing_ok=True)
        return i8.Attempt(candidate, missed=[str(e) if isinstance(e, UserError) else ox.first_line(e)])
    return i8.Attempt(candidate, figures, ox.failed_bounds(figures, "int8"), file, settings)


def _searched_int8(path: Path, fp32: _Fp32, src: Source, x: np.ndarray, ref: np.ndarray, common: dict[str, Any],
                   mode: str, calib_method: str, fallback: str, fp32_entry: dict[str, Any],
                   say) -> tuple[dict[str, Any] | None, np.ndarray | None, str]:
    """The int8 search (edgessl.deploy.int8search): (the int8 entry and its outputs, or None, None when fp32 is
    kept; the one line saying which). Candidates live in a temporary folder that is removed whatever happens; only
    the shipped one is moved to `path`. The search's record goes into the fp32 entry's "int8_search"."""
    say(f"Searching int8 for {path} (bound: mean cosine >= {ox.BOUNDS['int8']['mean_cosine']:g}, "
                  f"min cosine >= {ox.BOUNDS['int8']['min_cosine']:g}) ...")
    calib_x = to_input(src.calib.images, src.meta["mean"], src.meta["std"])
    measured: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="edgessl-int8-", dir=SCRATCH) as tmp:
        work = Path(tmp)
        prepared = (work / "source.onnx", qz.prepare_source(fp32.path, work / "source.onnx"))
        names: list[str] = []

        def attempt(candidate: i8.Candidate) -> i8.Attempt:
            done = _attempt(candidate, work / f"candidate-{len(names)}.onnx", prepared, fp32, calib_x, x, ref,
                            src.logits)
            names.append(candidate.label)
            say("  " + _attempt_line(len(names), done))
            return done

        def tails_for(closest: i8.Attempt) -> list[dict[str, Any]]:
            try:
                found = sn.sensitivity(prepared[0], closest.path, calib_x, fp32.input_name)
            except Exception as e:  # noqa: BLE001 - without a measurement the search ends with the methods
                measured["error"] = ox.first_line(e)
                return []
            measured.update(found["record"])
            return found["tails"]

        tried = i8.search(calib_method, attempt, tails_for)
        for failed in tried[:-1] if tried and tried[-1].passed else tried:
            if failed.path is not None:
                failed.path.unlink(missing_ok=True)
        speed = None
        if mode == "faster-here" and tried and tried[-1].passed:
            both = sp.measure({"fp32": fp32.session, "int8": ox.session(tried[-1].path, src.threads)}, x)
            speed = (both["fp32"], both["int8"], sp.verdict(both["int8"], both["fp32"]))
        ship, line = i8.decide(tried, mode, speed, fallback)
        fp32_entry["int8_search"] = i8.search_record(mode, tried, ship, line, measured or None, speed)
        if not ship:
            return None, None, line
        part = path.with_name(path.name + ".part")
        shutil.copyfile(tried[-1].path, part)
        os.replace(part, path)
    settings = {**tried[-1].settings, "calibration_folder": str(src.calib.root), "candidate": tried[-1].candidate.label,
                "search": "manifest entry of the fp32 file, key int8_search"}
    entry, outp = _described("int8", path, fp32, src, x, ref, common, settings, say)
    return entry, outp, line


def _attempt_line(number: int, a: i8.Attempt) -> str:
    if a.parity is None:
        return f"{number}. {a.candidate.label}: {a.missed[0] if a.missed else 'failed'}"
    verdict = "passes" if a.passed else "misses " + "; ".join(a.missed)
    return (f"{number}. {a.candidate.label}: mean cosine {a.parity['mean_cosine']:.4f}, min "
            f"{a.parity['min_cosine']:.4f}: {verdict}")


def _add_task_figures(src: Source, outputs: dict[str, np.ndarray], ref: np.ndarray, entries: list[dict[str, Any]],
                      say) -> None:
    """Add the task figures (kNN accuracy and agreement with PyTorch, or accuracy, per precision) to every entry's
    "comparison" and print them."""
    task = _task_figures(src.kind, src.sample, src.meta, outputs, ref)
    for entry in entries:
        if task:
            entry.setdefault("comparison", {}).update(task)
    for key, label in (("knn_accuracy", "kNN accuracy (leave-one-out)"), ("agreement_with_pytorch",
                       "kNN agreement with PyTorch"), ("accuracy", "accuracy")):
        if key in task:
            values = ", ".join(f"{p} {task[key][p]:.4f}" for p in outputs)
            say(f"{label} on {task[key]['images']} labelled images: {values}")


def timed_speeds(entries: list[dict[str, Any]], out_dir: Path, x: np.ndarray, say, threads: int | None = None) -> None:
    """Every file timed in the same alternating rounds (speed.measure) at `threads`: each entry's "speed" (and its
    "threads", None: onnxruntime's default), for int8 and fp16 its latency against fp32 with a verdict (faster /
    slower / no clear difference). One line per file: one figure per batch size."""
    speeds = sp.measure({e["precision"]: ox.session(out_dir / e["file"], threads) for e in entries}, x)
    for entry in entries:
        p, mine = entry["precision"], speeds[entry["precision"]]
        entry["speed"] = {**mine, "threads": threads}
        how = ""
        if p != "fp32":
            base = speeds["fp32"]["batch1_ms"]["p50"]
            verdict = sp.verdict(mine, speeds["fp32"])
            entry.setdefault("comparison", {}).update({
                "latency_ms_batch1": {"fp32": base, p: mine["batch1_ms"]["p50"]},
                "latency_ratio": mine["batch1_ms"]["p50"] / base, "latency_verdict": verdict})
            how = f" ({verdict} than fp32)" if verdict != "no clear difference" else " (no clear difference from fp32)"
        b1, tp, at = mine["batch1_ms"], mine["throughput"], (f" (threads: {threads})" if threads else "")
        say(f"{p} on this machine{at}: batch 1 {b1['p50']:.3g} ms [{b1['low']:.3g}-{b1['high']:.3g}]{how}; batch "
            f"{tp['batch']} {tp['images_per_s']:.0f} images/s; {entry['bytes'] / 2**20:.2f} MiB")


def mobile_and_ort(entries: list[dict[str, Any]], out_dir: Path, ort: bool, say) -> None:
    """Each entry's "mobile" (onnxruntime's NNAPI / Core ML usability report) and, with ort, its .ort copy ("ort")."""
    for entry in entries:
        entry["mobile"] = mobile_usability(out_dir / entry["file"])
        if ort:
            made = write_ort(out_dir / entry["file"], out_dir)
            entry["ort"] = {"file": made.name, "sha256": sha256_file(made), "bytes": made.stat().st_size}
            say(f"{entry['precision']}: {made} (ORT format)")


def write_models(src: Source, out_dir: Path, base_name: str, opset: int, mode: str | None, fp16: bool,
                 calib_method: str, say, ort: bool = False) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """The files of one export in out_dir: <base>.onnx (checked against PyTorch), <base>.reference.npz, and the
    int8 (mode: edgessl.deploy.int8search's, None: none) and fp16 copies, each timed, checked for mobile execution
    providers and (ort) written in the .ort format too. Returns (manifest entries, notes: one line each, e.g. why
    int8 was not written, failures: the copies that missed their check). say(line): the progress."""
    wanted = {".onnx", ".reference.npz"} | ({".int8.onnx"} if mode else set()) | ({".fp16.onnx"} if fp16 else set())
    wanted |= {w.replace(".onnx", ".ort") for w in wanted if w.endswith(".onnx")} if ort else set()
    gone = _remove_previous(out_dir, base_name, wanted)
    if gone:
        say(f"Removed the earlier export's {' and '.join(gone)} from {out_dir}: this export was not asked for "
            f"{'it' if len(gone) == 1 else 'them'} (--int8, --fp16, --ort write them again).")
    x = to_input(src.sample.images, src.meta["mean"], src.meta["std"])
    ref = torch_outputs(src.model, x)
    fp32 = _export_fp32(src, out_dir / f"{base_name}.onnx", int(opset), x, ref, say)
    reference = out_dir / f"{base_name}.reference.npz"
    _write_reference(reference, src.sample, ref)
    common = _common_keys(src, fp32, reference.name, ref.shape[1])
    entries = [_entry(fp32.path, "fp32", common, fp32.figures)]
    failures: list[str] = []
    notes: list[str] = []
    outputs = {"fp32": fp32.outputs}
    for precision, wanted in (("int8", mode), ("fp16", fp16)):
        if not wanted:
            continue
        path = out_dir / f"{base_name}.{precision}.onnx"
        try:
            if precision == "int8" and mode != "strict":
                fallback = "fp32 and fp16" if fp16 else "fp32"
                entry, outp, note = _searched_int8(path, fp32, src, x, ref, common, mode, calib_method, fallback,
                                                   entries[0], say)
                notes.append(note)
                if entry is None:
                    continue
            else:
                entry, outp = _reduced_copy(precision, path, fp32, src, x, ref, common, calib_method, say)
        except ox.ValidationFailed as e:
            failures.append(str(e))
            say(f"  failed: {e}")
            continue
        entries.append(entry)
        outputs[precision] = outp
    _add_task_figures(src, outputs, ref, entries, say)
    timed_speeds(entries, out_dir, x, say, src.threads)
    mobile_and_ort(entries, out_dir, ort, say)
    for note in notes:
        say(note)
    return entries, notes, failures
