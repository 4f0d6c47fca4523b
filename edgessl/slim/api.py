"""`edgessl slim` and the per-width report of a `--widths` run.

slim_encoder: one width of a slimmable run -> a standalone, physically smaller timm model (torch-pruning removes
channels k.. of every channel group), saved like any encoder: encoder.safetensors + encoder.json, whose "pruned"
entry ({group root: kept channels}) lets `load_encoder` rebuild the architecture from timm alone. Its outputs
equal the width's sub-network (sliced shared weights + that width's private BatchNorm from widths.safetensors).

width_report: parameters, MACs, batch-1 latency (ONNX Runtime, else PyTorch eager) and kNN top-1 (+ a linear probe
per width when a labelled test split exists) of every width -> widths.json and the Pareto plot widths.png.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from rich.table import Table
from safetensors.torch import load_file
from torch import nn

from edgessl.deploy import onnx as ox
from edgessl.errors import UserError
from edgessl.evaluate.features import extract_features
from edgessl.evaluate.knn import KNN_K, KNN_T, knn_top1
from edgessl.evaluate.labelled import load_labelled_folder, map_test_labels
from edgessl.evaluate.linear import linear_probe
from edgessl.fileio import atomic_write_text, sha256_files
from edgessl.models.backbone import (
    ENCODER_META,
    ENCODER_WEIGHTS,
    load_encoder,
    output_dim,
    read_encoder_meta,
    save_encoder,
)
from edgessl.models.channels import channel_groups, check_width, group_counts, width_plan
from edgessl.models.prune import count_params_macs, prune_to_counts
from edgessl.models.slicing import sliced_tensors
from edgessl.report.plots import _plt

WIDTHS_BN = "widths.safetensors"
REPORT_JSON = "widths.json"
REPORT_PLOT = "widths.png"
LATENCY_RUNS = 30
LATENCY_WARMUP = 5


# ---------------------------------------------------------------- slimming
def width_folder(run_dir: str | Path, width: float) -> Path:
    """Default output folder of a width: <run_dir>/width-<w:g> (width-0.5, width-0.25, width-1)."""
    return Path(run_dir) / f"width-{width:g}"


def run_widths(run_dir: str | Path, meta: dict[str, Any] | None = None) -> list[float]:
    """The widths a run was trained at ([1.0] for a run without --widths)."""
    meta = meta if meta is not None else read_encoder_meta(run_dir)
    return [float(w) for w in (meta.get("widths") or [1.0])]


def _match_width(run_dir: Path, meta: dict[str, Any], width: float) -> float:
    """The run's own value of `width` (0.50 -> 0.5); UserError when the run was not trained at it."""
    check_width(width)
    widths = meta.get("widths")
    if not widths:
        if math.isclose(width, 1.0):
            return 1.0
        if "width" in meta:
            raise UserError(f"'{run_dir}' holds a slimmed encoder (width {float(meta['width']):g} of "
                            f"{meta.get('source_run')}): it cannot be slimmed further. Slim the source run instead.")
        raise UserError(f"'{run_dir}' was not trained with --widths: only its full width (1) exists. Pretrain with "
                        "`edgessl pretrain --widths 1.0,0.5,...` to get sub-networks to slim.")
    for w in widths:
        if math.isclose(float(w), width, abs_tol=1e-9):
            return float(w)
    raise UserError(f"width {width:g} was not trained in '{run_dir}': its widths are "
                    f"{', '.join(f'{float(w):g}' for w in widths)}.")


def source_digest(run_dir: str | Path, width: float) -> str:
    """sha256 of the files a width's encoder is made of (encoder.safetensors, + widths.safetensors below 1)."""
    run_dir = Path(run_dir)
    return sha256_files([run_dir / ENCODER_WEIGHTS] + ([run_dir / WIDTHS_BN] if width < 1 else []))


def _private_bn(run_dir: Path, width: float) -> dict[str, torch.Tensor]:
    """{backbone tensor name: the width's private BatchNorm tensor} from widths.safetensors."""
    path = run_dir / WIDTHS_BN
    if not path.is_file():
        raise UserError(f"'{run_dir}' has no {WIDTHS_BN} (each width's private BatchNorm, written by "
                        "`edgessl pretrain --widths` after every epoch): it cannot be slimmed.")
    prefix = f"{width:g}/"
    private = {k[len(prefix):]: v for k, v in load_file(str(path)).items() if k.startswith(prefix)}
    if not private:
        raise UserError(f"{path} holds no BatchNorm tensors for width {width:g}.")
    return private


@torch.no_grad()
def build_slim(run_dir: str | Path, width: float) -> tuple[nn.Module, dict[str, Any]]:
    """(physically pruned backbone in eval mode, its encoder.json meta) of the run's width-`width` sub-network.

    Width 1.0 is the run's encoder unchanged. UserError for a width outside (0, 1], a width the run was not trained
    at, a run without --widths (width < 1) or without widths.safetensors."""
    run_dir = Path(run_dir)
    check_width(width)
    meta = read_encoder_meta(run_dir)
    width = _match_width(run_dir, meta, width)
    full = load_encoder(run_dir)  # rebuilds an already pruned architecture (a pruned run pretrained with --widths)
    size = int(meta["image_size"])
    example = torch.zeros(2, 3, size, size)
    pruned = dict(meta.get("pruned") or {})
    if width == 1.0:
        model = full
    else:
        groups = channel_groups(full, example)
        counts = group_counts(groups, width)
        state = dict(full.state_dict())
        state.update(sliced_tensors(full, width_plan(groups, width)))
        private = _private_bn(run_dir, width)
        unknown = sorted(set(private) - set(state))
        if unknown:
            raise UserError(f"{run_dir / WIDTHS_BN} does not match the encoder: it names {', '.join(unknown[:3])}.")
        state.update(private)
        model = prune_to_counts(copy.deepcopy(full), example, counts)
        model.load_state_dict({k: v.detach().clone().contiguous() for k, v in state.items()})
        channels = {g.root: g.channels for g in groups}
        pruned.update({root: int(k) for root, k in counts.items() if k != channels[root]})
    model.eval()
    slim_meta = {k: v for k, v in meta.items() if k not in ("widths", "edgessl_meta")}
    slim_meta.update({
        "width": width,
        "pruned": pruned,
        "feature_dim": output_dim(model, size),
        "source_run": str(run_dir.resolve()),
        "source_widths": run_widths(run_dir, meta),
        "source_digest": source_digest(run_dir, width),
    })
    model.edgessl_meta = slim_meta
    return model, slim_meta


def save_slim(model: nn.Module, meta: dict[str, Any], run_dir: str | Path, out: str | Path) -> Path:
    """Save build_slim's result into `out` (encoder files + a copy of the run's config.yaml). Returns `out`."""
    run_dir, out = Path(run_dir), Path(out)
    if out.resolve() == run_dir.resolve():
        raise UserError(f"the slimmed encoder cannot be written into the run directory '{run_dir}' itself "
                        "(it would replace the run's encoder): choose another --out.")
    save_encoder(model, out, meta)
    config = run_dir / "config.yaml"  # export/eval find the training images through it, as for a run
    if config.is_file() and config.resolve() != (out / "config.yaml").resolve():
        shutil.copyfile(config, out / "config.yaml")
    return out


def slim_encoder(run_dir: str | Path, width: float, out: str | Path | None = None) -> Path:
    """Write the run's width-`width` sub-network as a standalone encoder into `out` (default <run_dir>/width-<w>/):
    encoder.safetensors + encoder.json (run meta + "width", "pruned", updated "feature_dim", "source_run") and a
    copy of the run's config.yaml. Returns the folder. `load_encoder(folder)` rebuilds it."""
    run_dir = Path(run_dir)
    model, meta = build_slim(run_dir, width)
    return save_slim(model, meta, run_dir, Path(out) if out is not None else width_folder(run_dir, meta["width"]))


def is_up_to_date(folder: str | Path, run_dir: str | Path, width: float) -> bool:
    """Whether `folder` holds the run's width-`width` encoder made from the run's current weights."""
    folder = Path(folder)
    if not (folder / ENCODER_META).is_file() or not (folder / ENCODER_WEIGHTS).is_file():
        return False
    try:
        meta = json.loads((folder / ENCODER_META).read_text())
        return (math.isclose(float(meta.get("width", -1)), width)
                and meta.get("source_digest") == source_digest(run_dir, width))
    except (OSError, ValueError):
        return False


def ensure_slimmed(run_dir: str | Path, width: float) -> tuple[Path, bool]:
    """(<run_dir>/width-<w>/, reused): slim into it unless it already holds this width of the current weights.
    Width 1 is the run itself: (run_dir, True)."""
    run_dir = Path(run_dir)
    meta = read_encoder_meta(run_dir)
    width = _match_width(run_dir, meta, width)
    if width == 1.0:
        return run_dir, True
    folder = width_folder(run_dir, width)
    if is_up_to_date(folder, run_dir, width):
        return folder, True
    return slim_encoder(run_dir, width, folder), False


# ---------------------------------------------------------------- the per-width report
def _runtime_available() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


def _timed(fn, runs: int, min_seconds: float = 0.5, max_runs: int = 2000) -> float:
    """Median ms of fn() over at least `runs` runs and `min_seconds` (sub-millisecond models get more runs), after
    warm-up."""
    for _ in range(LATENCY_WARMUP):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_runs and (len(times) < runs or time.perf_counter() - start < min_seconds):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    times.sort()
    return float(times[len(times) // 2])


def _onnx_file(model: nn.Module, path: Path, image_size: int) -> None:
    """Export for timing: the TorchScript exporter first (a fraction of a second; the graph runs the same operators
    as `edgessl export`'s), torch.export as the fallback."""
    try:
        with ox._quiet(), torch.no_grad():
            ox._export_torchscript(model, torch.zeros(2, 3, image_size, image_size), path, 18, "input", "features")
    except Exception:  # noqa: BLE001 - the exporter may fail in many ways; try the other one
        ox.export_model(model, path, image_size, 18)


def batch1_latency(model: nn.Module, image_size: int, threads: int | None = None,
                   runs: int = LATENCY_RUNS) -> tuple[float, str]:
    """(median batch-1 latency in ms, runtime): ONNX Runtime CPU fp32 on the exported model when onnx, onnxruntime
    and onnxscript are installed and the export succeeds, else PyTorch eager on CPU. threads: intra-op threads
    [default: the runtime's choice]."""
    x = torch.randn(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    model = model.cpu().eval()
    if _runtime_available():
        import onnxruntime as ort

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.onnx"
            try:
                _onnx_file(model, path, image_size)
                sess = ox.session(path, threads=threads)
                feed = {sess.get_inputs()[0].name: x.numpy()}
                return _timed(lambda: sess.run(None, feed), runs), f"onnxruntime {ort.__version__} CPU fp32"
            except UserError:
                pass  # fall back to PyTorch
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            return _timed(lambda: model(x), runs), f"pytorch {torch.__version__} eager CPU"
    finally:
        torch.set_num_threads(previous)


def _images(value, size: int, what: str):
    """An ImageSet with labels, from an ImageSet or a labelled folder; None stays None (so does an unlabelled set)."""
    if value is None:
        return None
    if isinstance(value, (str, Path)):
        return load_labelled_folder(value, size, what)
    return value if getattr(value, "labels", None) is not None else None


class _Accuracy:
    """kNN top-1 (k = KNN_K[0] = 20, t = KNN_T = 0.1) and optionally a linear probe of one backbone, on the report's
    labelled data."""

    def __init__(self, labelled, test):
        self.memory, self.query, self.loo, self.query_labels = None, None, True, None
        if labelled is not None and test is not None:
            self.memory, self.query, self.loo = labelled, test, False
            self.query_labels = map_test_labels(labelled.classes, test.classes, "the labelled test images")[test.labels]
        elif labelled is not None or test is not None:
            self.memory = self.query = labelled if labelled is not None else test
            self.query_labels = self.memory.labels
        self.num_classes = len(self.memory.classes) if self.memory is not None else 0

    def describe(self) -> str:
        if self.memory is None:
            return "no labelled images: accuracy not measured"
        if self.loo:
            return f"kNN leave-one-out on {len(self.memory)} labelled images"
        return f"kNN and linear probe: {len(self.query)} test images against {len(self.memory)} labelled images"

    def __call__(self, model: nn.Module, mean, std, device) -> tuple[float | None, float | None]:
        if self.memory is None:
            return None, None
        mem = extract_features(model, self.memory, mean, std, device)
        qry = mem if self.loo else extract_features(model, self.query, mean, std, device)
        knn = knn_top1(qry, self.query_labels, mem, self.memory.labels, self.num_classes, KNN_K[0], KNN_T, self.loo)
        linear = None
        if not self.loo:
            probe = linear_probe(mem, self.memory.labels, qry, self.num_classes, seed=0)
            linear = float((probe.logits.argmax(1).cpu() == self.query_labels).float().mean())
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
    widths = sorted({_match_width(run_dir, meta, float(w)) for w in wanted}, reverse=True)
    size = int(image_size or meta["image_size"])
    train_size = int(meta["image_size"])
    accuracy = _Accuracy(_images(labelled, train_size, "the labelled images"),
                         _images(test, train_size, "the test images"))
    say = console.print if console is not None else (lambda *a, **k: None)
    say(f"Width report ({', '.join(f'{w:g}' for w in widths)}): {accuracy.describe()}.", highlight=False)
    entries = []
    for w in widths:
        if w == 1.0:
            model, folder, model_meta = load_encoder(run_dir), run_dir, meta
        else:
            model, model_meta = build_slim(run_dir, w)
            folder = save_slim(model, model_meta, run_dir, width_folder(run_dir, w))
        entries.append(_measure(w, model, model_meta, folder, size, accuracy, meta, device, threads, say))
    atomic_write_text(run_dir / REPORT_JSON, json.dumps(entries, indent=2) + "\n")
    plot_widths(entries, run_dir / REPORT_PLOT, title=f"{meta['timm_name']} - {run_dir.name}")
    return entries


def _measure(w: float, model: nn.Module, model_meta: dict[str, Any], folder: Path, size: int, accuracy, meta,
             device, threads, say) -> dict[str, Any]:
    """One entry of widths.json for an encoder."""
    t0 = time.time()
    params, macs = count_params_macs(model, torch.zeros(1, 3, size, size))
    latency, runtime = batch1_latency(model, size, threads)
    knn, linear = accuracy(model.to(device), meta["mean"], meta["std"], device)
    model.cpu()
    say(f"  width {w:g}: {params / 1e6:.2f} M params, {macs / 1e6:.1f} M MACs, {latency:.2f} ms "
        f"({time.time() - t0:.1f} s)", highlight=False)
    return {"width": float(w), "params": int(params), "macs": int(macs), "latency_ms": float(latency),
            "knn_top1": knn, "linear_top1": linear, "latency_runtime": runtime,
            "feature_dim": int(model_meta["feature_dim"]), "folder": str(folder)}


def encoders_report(out_dir: str | Path, encoders: list[tuple[float, str | Path]], labelled=None, test=None,
                    device: str | torch.device = "cpu", threads: int | None = None,
                    console=None) -> list[dict[str, Any]]:
    """widths.json + widths.png in out_dir for given encoder folders [(width, folder)], e.g. `edgessl prune`'s
    original (1.0) and pruned (1 - ratio) encoders: the same entries and plot as a `--widths` run's report."""
    out_dir = Path(out_dir)
    metas = [read_encoder_meta(f) for _, f in encoders]
    train_size = int(metas[0]["image_size"])
    accuracy = _Accuracy(_images(labelled, train_size, "the labelled images"),
                         _images(test, train_size, "the test images"))
    say = console.print if console is not None else (lambda *a, **k: None)
    say(f"Report ({len(encoders)} encoders): {accuracy.describe()}.", highlight=False)
    entries = [_measure(w, load_encoder(f), m, Path(f), train_size, accuracy, metas[0], device, threads, say)
               for (w, f), m in zip(encoders, metas, strict=True)]
    atomic_write_text(out_dir / REPORT_JSON, json.dumps(entries, indent=2) + "\n")
    plot_widths(entries, out_dir / REPORT_PLOT, title=f"{metas[0]['timm_name']} - {out_dir.name}")
    return entries


def plot_widths(entries: list[dict[str, Any]], path: str | Path, title: str = "") -> None:
    """widths.png: accuracy (kNN top-1, else linear probe) against batch-1 latency, one labelled point per width;
    parameters against latency when no accuracy was measured."""
    plt = _plt()
    key = next((k for k in ("knn_top1", "linear_top1") if all(e.get(k) is not None for e in entries)), None)
    ylabel = {"knn_top1": f"kNN top-1 (k={KNN_K[0]})", "linear_top1": "linear probe top-1", None: "parameters (M)"}[key]
    pts = sorted(((e["latency_ms"], e[key] if key else e["params"] / 1e6, e) for e in entries), key=lambda p: p[0])
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot([p[0] for p in pts], [p[1] for p in pts], color="0.7", zorder=1)
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], zorder=2)
    for x, y, e in pts:
        ax.annotate(f"w={e['width']:g}\n{e['params'] / 1e6:.2f}M, {e['macs'] / 1e6:.1f}M MACs", (x, y),
                    textcoords="offset points", xytext=(6, 4), fontsize=8)
    runtime = entries[0].get("latency_runtime", "") if entries else ""
    ax.set_xlabel(f"batch-1 latency (ms, {runtime.split(' ')[0] if runtime else 'CPU'})")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.margins(x=0.25, y=0.2)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report_table(entries: list[dict[str, Any]]):
    """A rich Table of width_report's entries."""
    table = Table(title="Widths (widths.json, widths.png)", title_justify="left")
    for col in ("width", "params", "MACs", "latency ms", "kNN top-1", "linear top-1"):
        table.add_column(col, justify="right")
    for e in entries:
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        table.add_row(f"{e['width']:g}", f"{e['params'] / 1e6:.2f} M", f"{e['macs'] / 1e6:.1f} M",
                      f"{e['latency_ms']:.2f}", fmt(e.get("knn_top1")), fmt(e.get("linear_top1")))
    return table
