"""The per-width report of a `--widths` run (and of `edgessl prune`): parameters, MACs, batch-1 latency (ONNX Runtime,
else PyTorch eager) and kNN top-1 (+ a linear probe per width when a labelled test split exists) of every width ->
widths.json and the Pareto plot widths.png."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgessl.deploy import onnx as ox
from edgessl.deploy.speed import timed_ms
from edgessl.errors import UserError
from edgessl.evaluate.features import extract_features
from edgessl.evaluate.knn import KNN_K, KNN_T, knn_top1, loo_k
from edgessl.evaluate.labelled import load_labelled_folder
from edgessl.evaluate.linear import linear_probe
from edgessl.evaluate.monitor import knn_sets
from edgessl.fileio import atomic_write_text
from edgessl.models.backbone import load_encoder, read_encoder_meta
from edgessl.models.prune import count_params_macs
from edgessl.models.widths import (
    build_slim,
    is_up_to_date,
    match_width,
    run_widths,
    save_slim,
    slim_encoder,
    width_folder,
)
from edgessl.report.plots import plot_widths
from edgessl.report.say import Say

REPORT_JSON = "widths.json"
REPORT_PLOT = "widths.png"
LATENCY_RUNS = 30


def batch1_latency(model: nn.Module, image_size: int, threads: int | None = None,
                   runs: int = LATENCY_RUNS) -> tuple[float, str]:
    """(median batch-1 latency in ms, runtime): ONNX Runtime CPU fp32 on the exported model when onnx, onnxruntime
    and onnxscript are installed and the export succeeds, else PyTorch eager on CPU. threads: intra-op threads
    [default: the runtime's choice]."""
    x = torch.randn(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    model = model.cpu().eval()
    if ox.runtime_available():
        import onnxruntime as ort

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.onnx"
            try:
                ox.export_model(model, path, image_size, 18, fast=True)
                sess = ox.session(path, threads=threads)
                feed = {sess.get_inputs()[0].name: x.numpy()}
                return timed_ms(lambda: sess.run(None, feed), runs), f"onnxruntime {ort.__version__} CPU fp32"
            except UserError:
                pass  # fall back to PyTorch
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            return timed_ms(lambda: model(x), runs), f"pytorch {torch.__version__} eager CPU"
    finally:
        torch.set_num_threads(previous)


def _images(value, size: int, what: str):
    """An ImageSet with labels, from an ImageSet or a labelled folder; None stays None (so does an unlabelled set)."""
    if value is None:
        return None
    if isinstance(value, (str, Path)):
        return load_labelled_folder(value, size, what)
    return value if getattr(value, "labels", None) is not None else None


class Accuracy:
    """kNN top-1 (k = KNN_K[0] = 20, t = KNN_T = 0.1; leave-one-out among the labelled images: loo_k, below the
    smallest class) and, with a labelled test split, a linear probe of one backbone on the report's labelled images
    (the kNN monitor's choice of memory and queries: knn_sets)."""

    def __init__(self, labelled, test):
        self.sets = knn_sets(labelled, test, "the labelled test images", "the labelled images")
        loo = self.sets is not None and self.sets.loo
        self.k = loo_k(self.sets.memory.labels) if loo else KNN_K[0]

    def describe(self) -> str:
        if self.sets is None:
            return "no labelled images: accuracy not measured"
        what = "kNN" if self.sets.loo else "kNN and linear probe"
        return f"{what}: {self.sets.describe()}"

    def __call__(self, model: nn.Module, mean, std, device) -> tuple[float | None, float | None]:
        if self.sets is None:
            return None, None
        s, classes = self.sets, len(self.sets.memory.classes)
        mem = extract_features(model, s.memory, mean, std, device)
        qry = mem if s.loo else extract_features(model, s.query, mean, std, device)
        knn = knn_top1(qry, s.query_labels, mem, s.memory.labels, classes, self.k, KNN_T, s.loo)
        linear = None
        if not s.loo:
            probe = linear_probe(mem, s.memory.labels, qry, classes, seed=0)
            linear = float((probe.logits.argmax(1).cpu() == s.query_labels).float().mean())
        return float(knn), linear


def width_report(
    run_dir: str | Path,
    widths: list[float] | None = None,
    labelled=None,
    test=None,
    image_size: int | None = None,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    console=None,
) -> list[dict[str, Any]]:
    """Measure every width of a `--widths` run; write widths.json and widths.png into run_dir and return the entries.

    widths: default the run's; labelled: labelled training images (ImageSet with labels, or a folder with one
    subfolder per class) for kNN leave-one-out, or the kNN memory set when `test` (labelled test images) is given,
    which also enables one linear probe per width (SlimCLR's switchable probe); neither: accuracy null.
    image_size: resolution of params/MACs/latency [default: the training resolution]. Sub-widths are written to
    <run_dir>/width-<w>/ (reused by `edgessl export --width`).
    Entries: {"width", "params", "macs", "latency_ms", "knn_top1"} + "latency_runtime", "linear_top1",
    "feature_dim", "folder"."""

    run_dir = Path(run_dir)
    meta = read_encoder_meta(run_dir)
    wanted = widths or run_widths(run_dir, meta)
    widths = sorted({match_width(run_dir, meta, float(w)) for w in wanted}, reverse=True)
    size = int(image_size or meta["image_size"])
    train_size = int(meta["image_size"])
    accuracy = Accuracy(_images(labelled, train_size, "the labelled images"),
                         _images(test, train_size, "the test images"))
    say = Say(console)
    say(f"Width report ({', '.join(f'{w:g}' for w in widths)}): {accuracy.describe()}.")
    entries = []
    for w in widths:
        if w == 1.0:
            model, folder, model_meta = load_encoder(run_dir), run_dir, meta
            refresh_full_copy(run_dir)
        else:
            model, model_meta = build_slim(run_dir, w)
            folder = save_slim(model, model_meta, run_dir, width_folder(run_dir, w))
        entries.append(_measure(w, model, model_meta, folder, size, accuracy, meta, device, threads, say))
    atomic_write_text(run_dir / REPORT_JSON, json.dumps(entries, indent=2) + "\n")
    plot_widths(entries, run_dir / REPORT_PLOT, title=f"{meta['timm_name']} - {run_dir.name}", knn_k=accuracy.k)
    return entries


def refresh_full_copy(run_dir: Path) -> None:
    """A `slim --width 1` copy (RUN/width-1/) made from earlier weights is made again, as the other widths' folders
    are: after a --resume it had kept the old weights."""
    folder = width_folder(run_dir, 1.0)
    if (folder / "encoder.json").is_file() and not is_up_to_date(folder, run_dir, 1.0):
        slim_encoder(run_dir, 1.0, folder)


def _measure(w: float, model: nn.Module, model_meta: dict[str, Any], folder: Path, size: int, accuracy, meta,
             device, threads, say) -> dict[str, Any]:
    """One entry of widths.json for an encoder."""
    t0 = time.time()
    params, macs = count_params_macs(model, torch.zeros(1, 3, size, size))
    latency, runtime = batch1_latency(model, size, threads)
    knn, linear = accuracy(model.to(device), meta["mean"], meta["std"], device)
    model.cpu()
    say(f"  width {w:g}: {params / 1e6:.2f} M params, {macs / 1e6:.1f} M MACs, {latency:.2f} ms "
        f"({time.time() - t0:.1f} s)")
    return {"width": float(w), "params": int(params), "macs": int(macs), "latency_ms": float(latency),
            "knn_top1": knn, "knn_k": accuracy.k if knn is not None else None, "linear_top1": linear,
            "latency_runtime": runtime,
            "feature_dim": int(model_meta["feature_dim"]), "folder": str(folder)}


def encoders_report(out_dir: str | Path, encoders: list[tuple[float, str | Path]], labelled=None, test=None,
                    device: str | torch.device = "cpu", threads: int | None = None,
                    console=None) -> list[dict[str, Any]]:
    """widths.json + widths.png in out_dir for given encoder folders [(width, folder)], e.g. `edgessl prune`'s
    original (1.0) and pruned (1 - ratio) encoders: the same entries and plot as a `--widths` run's report."""
    out_dir = Path(out_dir)
    metas = [read_encoder_meta(f) for _, f in encoders]
    train_size = int(metas[0]["image_size"])
    accuracy = Accuracy(_images(labelled, train_size, "the labelled images"),
                         _images(test, train_size, "the test images"))
    say = Say(console)
    say(f"Report ({len(encoders)} encoders): {accuracy.describe()}.")
    entries = [_measure(w, load_encoder(f), m, Path(f), train_size, accuracy, metas[0], device, threads, say)
               for (w, f), m in zip(encoders, metas, strict=True)]
    atomic_write_text(out_dir / REPORT_JSON, json.dumps(entries, indent=2) + "\n")
    plot_widths(entries, out_dir / REPORT_PLOT, title=f"{metas[0]['timm_name']} - {out_dir.name}",
                knn_k=accuracy.k)
    return entries


