"""The few-label protocol of `edgessl eval` (the command: edgessl.workflows.eval): frozen-feature kNN and
linear-probe accuracy of an encoder at a few labels per class.

Protocol
- Features: the backbone's pooled features (before the projection head) in eval mode, test transform only (the
  cached shorter-side resize + center crop, normalisation); computed once per (folder, image size, encoder) and
  cached in <run dir>/features/<hash>.pt.
- Few labels: for every labels-per-class value and seed, a stratified subset of the training images
  (evaluate.subsets); a class with fewer images uses all it has (reported).
- kNN: weighted kNN on cosine similarity, k = 20 and 200 (clipped to the subset size), temperature 0.1.
- Linear: logistic regression on features standardised with the subset's statistics, L2 strength by
  cross-validation on the subset (evaluate.linear).
- Baseline: `baseline="random"` runs the same grid on a randomly initialised encoder of the same architecture
  (seeded), so the gain from pretraining is measured, not guessed.
Results: one row per (encoder, protocol, k, labels per class, seed) in eval.json, mean and std (sample std over
seeds, 0 for one seed) in its "summary", a table on the terminal and eval.png.
"""

from __future__ import annotations

import hashlib
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn

from edgessl.data.signature import listed_stat, scan_images
from edgessl.evaluate.features import extract_features
from edgessl.evaluate.knn import KNN_K, KNN_T, knn_predict_many
from edgessl.evaluate.labelled import (
    check_labels_per_class,
    load_labelled_folder,
    lpc_name,
    skipped_warning,
)
from edgessl.evaluate.linear import linear_probe
from edgessl.evaluate.metrics import classification_metrics
from edgessl.evaluate.subsets import stratified_subset
from edgessl.fileio import atomic_save, sha256_file
from edgessl.models.backbone import ENCODER_WEIGHTS, build_from_arch, load_encoder
from edgessl.options import Decode
from edgessl.report.say import Say

RANDOM_INIT_SEED = 0
CV_FOLD_SEED = 0  # the probe's CV folds depend on the labelled subset only
CACHE_VERSION = 1
METRICS = ("top1", "balanced_accuracy", "macro_f1")
DEFAULT_LABELS_PER_CLASS = "1,5,10,all"  # values above the largest class are dropped (explicit ones are refused)


# ---------------------------------------------------------------- features, cached per run
@dataclass
class FeatureSet:
    """Frozen features of one labelled folder under one encoder."""

    features: Tensor  # (N, D) float32
    labels: Tensor  # (N,) long, indices into classes
    classes: list[str]
    paths: list[str]  # relative to the folder, row order
    skipped: int = 0

    def subset(self, idx: Tensor) -> FeatureSet:
        return FeatureSet(self.features[idx], self.labels[idx], self.classes, [self.paths[i] for i in idx.tolist()],
                          self.skipped)


def features_signature(root: Path, size: int) -> str:
    """The feature cache's key for a folder: a hash of its resolved path, the image size and every image file's
    (relative path, bytes, mtime)."""
    h = hashlib.sha256(f"{root.resolve()}|{size}|v{CACHE_VERSION}".encode())
    for p in scan_images(root):
        st = listed_stat(p)
        h.update(f"\n{p.relative_to(root)}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


def random_encoder(meta: dict[str, Any], seed: int = RANDOM_INIT_SEED) -> nn.Module:
    """The run's architecture with a seeded random initialisation (global RNG state left untouched), eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_from_arch(meta)
    return model.eval()


@dataclass
class EncoderSpec:
    name: str  # "pretrained" | "random"
    identity: str  # what the feature cache keys on
    build: Any  # () -> nn.Module


def encoder_specs(run_dir: Path, meta: dict[str, Any], baseline: str | None) -> list[EncoderSpec]:
    specs = [EncoderSpec("pretrained", "weights:" + sha256_file(run_dir / ENCODER_WEIGHTS),
                         lambda: load_encoder(run_dir))]
    if baseline == "random":
        ident = (f"random:{meta['timm_name']}:{meta.get('stem')}:seed{RANDOM_INIT_SEED}"
                 f":timm{timm.__version__}:torch{torch.__version__}")
        specs.append(EncoderSpec("random", ident, lambda: random_encoder(meta)))
    return specs


def folder_features(
    root: Path,
    what: str,
    specs: Sequence[EncoderSpec],
    meta: dict[str, Any],
    device: torch.device,
    feature_dir: Path | None,
    decode: Decode | None = None,
    say: Say | None = None,
    between=None,
) -> dict[str, FeatureSet]:
    """Features of a labelled folder under every encoder spec; the folder is decoded at most once (`decode`: how,
    edgessl.options.Decode), and not at all when every encoder's features are cached (in feature_dir; None: no
    feature cache). `between`: called after every batch (extract_features)."""
    say = say if say is not None else Say()
    size = int(meta["image_size"])
    signature = features_signature(root, size) if feature_dir is not None else ""
    out: dict[str, FeatureSet] = {}
    images = None
    for spec in specs:
        path = None
        if feature_dir is not None:
            key = hashlib.sha256(f"{signature}|{spec.identity}".encode()).hexdigest()[:20]
            path = feature_dir / f"{key}.pt"
            cached = _read_cache(path)
            if cached is not None:
                out[spec.name] = cached
                say(f"{what}: {spec.name} features of {len(cached.paths)} images (cached).")
                continue
        if images is None:
            images = load_labelled_folder(root, size, what, decode)
            if warning := skipped_warning(images, what):
                say.warn(warning)
        t0 = time.time()
        model = spec.build().to(device)
        feats = extract_features(model, images, meta["mean"], meta["std"], device, between=between)
        fs = FeatureSet(feats, images.labels.clone(), list(images.classes),
                        [str(p.relative_to(images.root)) for p in images.paths], len(images.skipped))
        say(f"{what}: {spec.name} features of {len(fs.paths)} images ({time.time() - t0:.1f} s).")
        if path is not None:
            _write_cache(path, fs, spec.identity, root)
        out[spec.name] = fs
    return out


def _read_cache(path: Path) -> FeatureSet | None:
    if not path.is_file():
        return None
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
        return FeatureSet(d["features"], d["labels"], list(d["classes"]), list(d["paths"]), int(d["skipped"]))
    except Exception:  # a damaged or foreign cache file is recomputed, never fatal
        return None


def _write_cache(path: Path, fs: FeatureSet, identity: str, root: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save({"features": fs.features, "labels": fs.labels, "classes": fs.classes, "paths": fs.paths,
                 "skipped": fs.skipped, "encoder": identity, "folder": str(root.resolve()),
                 "version": CACHE_VERSION}, path)


# ---------------------------------------------------------------- the grid
def evaluate_features(
    train: FeatureSet,
    test_x: Tensor,
    test_y: Tensor,
    per_class_values: Sequence[int | None],
    seeds: Sequence[int],
    encoder: str,
    device: torch.device | str = "cpu",
    on_subset=None,
) -> list[dict[str, Any]]:
    """kNN (k in KNN_K) and linear-probe rows for every labels-per-class value and seed.

    train: training features (N, D) with labels (N,); test_x: (M, D), test_y: (M,) in the training classes.
    Every result is a function of the labelled subset alone (the probe's CV folds are keyed by the subset, not
    the seed), so a subset drawn again (e.g. 'all' under every seed) is scored once and its rows repeated.
    on_subset(rows): called with the new rows of every subset scored (progress display)."""
    num_classes = len(train.classes)
    device = torch.device("cpu") if torch.device(device).type == "mps" else device  # the probe fits in float64
    x_all = train.features.to(device)
    y_all = train.labels.to(device)
    test_x, test_y = test_x.to(device), test_y.to(device)
    rows: list[dict[str, Any]] = []
    scored: dict[bytes, list[dict[str, Any]]] = {}
    for per_class in per_class_values:
        for seed in seeds:
            idx = stratified_subset(train.labels, per_class, seed)
            key = idx.numpy().tobytes()
            if key in scored:
                rows += [{**r, "labels_per_class": lpc_name(per_class), "seed": seed} for r in scored[key]]
                continue
            idx = idx.to(device)
            x, y = x_all[idx], y_all[idx]
            base = {"encoder": encoder, "labels_per_class": lpc_name(per_class), "seed": seed,
                    "n_train": len(idx), "n_test": len(test_y)}
            new = []
            knn = knn_predict_many(test_x, x, y, num_classes, KNN_K, KNN_T)  # one top-200 search for both k
            for k in KNN_K:
                pred = knn[k].argmax(dim=1)
                new.append({**base, "protocol": "knn", "k": k, **classification_metrics(test_y, pred, num_classes),
                            "k_used": min(k, len(idx))})
            probe = linear_probe(x, y, test_x, num_classes, seed=CV_FOLD_SEED)
            pred = probe.logits.argmax(dim=1)
            new.append({**base, "protocol": "linear", "k": None, **classification_metrics(test_y, pred, num_classes),
                        "l2": probe.choice.l2, "l2_cross_validated": probe.choice.cross_validated,
                        "cv_folds": probe.choice.folds})
            scored[key] = new
            rows += new
            if on_subset is not None:
                on_subset(new)
    return [_ordered(r) for r in rows]


_KEY_ORDER = ("encoder", "protocol", "k", "labels_per_class", "seed", "top1", "balanced_accuracy", "macro_f1",
              "n_train", "n_test")


def _ordered(row: dict[str, Any]) -> dict[str, Any]:
    return {**{k: row[k] for k in _KEY_ORDER}, **{k: v for k, v in row.items() if k not in _KEY_ORDER}}


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample std over seeds of every metric per (encoder, protocol, k, labels_per_class)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["encoder"], r["protocol"], r["k"], r["labels_per_class"]), []).append(r)
    out = []
    for (enc, proto, k, lpc), rs in groups.items():
        s: dict[str, Any] = {"encoder": enc, "protocol": proto, "k": k, "labels_per_class": lpc,
                             "seeds": len(rs), "n_train": rs[0]["n_train"], "n_test": rs[0]["n_test"]}
        for m in METRICS:
            vals = [r[m] for r in rs]
            s[f"{m}_mean"] = statistics.fmean(vals)
            s[f"{m}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        out.append(s)
    return out


def eval_scalars(summary: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The experiment loggers' view of a summary: eval/<encoder>/<knn_k20|linear>/<lpc10|all>/<metric> = mean."""
    out = {}
    for s in summary:
        proto = f"knn_k{s['k']}" if s["protocol"] == "knn" else s["protocol"]
        lpc = s["labels_per_class"] if s["labels_per_class"] == "all" else f"lpc{s['labels_per_class']}"
        out.update({f"eval/{s['encoder']}/{proto}/{lpc}/{m}": s[f"{m}_mean"] for m in METRICS})
    return out


def fit_budgets(
    values: Sequence[int | None], labels: Tensor, classes: Sequence[str], explicit: bool
) -> tuple[list[int | None], dict[int, dict[str, int]], list[int]]:
    """Labels-per-class values against the training labels (N,): explicit values above every class are refused
    (UserError); default ones are dropped. Returns (values kept, classes short of each value, values dropped)."""
    dropped: list[int] = []
    if not explicit:
        largest = int(torch.bincount(labels, minlength=len(classes)).max())
        dropped = [v for v in values if v is not None and v > largest]
        values = [v for v in values if v is None or v <= largest]
    return list(values), check_labels_per_class(values, labels, classes), dropped


