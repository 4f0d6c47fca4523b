"""`edgessl eval`: frozen-feature kNN and linear-probe accuracy of a run's encoder at a few labels per class.

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
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from rich import box
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn

from edgessl.data.folder import scan_images
from edgessl.errors import UserError
from edgessl.evaluate.features import extract_features
from edgessl.evaluate.knn import KNN_K, KNN_T, knn_predict_many
from edgessl.evaluate.labelled import (
    Split,
    check_labels_per_class,
    check_split_options,
    class_folders,
    load_labelled_folder,
    lpc_name,
    map_test_labels,
    parse_labels_per_class,
    split_folder,
)
from edgessl.evaluate.linear import L2_GRID, MAX_FOLDS, linear_probe
from edgessl.evaluate.metrics import classification_metrics
from edgessl.evaluate.subsets import stratified_subset
from edgessl.fileio import atomic_write_text, sha256_file
from edgessl.loggers import run_loggers
from edgessl.models.backbone import ENCODER_WEIGHTS, build_from_arch, load_encoder, read_encoder_meta
from edgessl.report.eval_plots import plot_eval
from edgessl.runtime import pick_device, use_threads
from edgessl.train.checkpoint import atomic_save

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


def folder_signature(root: Path, size: int) -> str:
    """Hash of the folder's resolved path, the image size and every image file's (relative path, bytes, mtime)."""
    h = hashlib.sha256(f"{root.resolve()}|{size}|v{CACHE_VERSION}".encode())
    for p in scan_images(root):
        st = p.stat()
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
    workers: int | str = "auto",
    cache_mb: float = 4096,
    say=None,
    cache_dir: str | Path | None = "auto",
) -> dict[str, FeatureSet]:
    """Features of a labelled folder under every encoder spec; the folder is decoded at most once, and not at all
    when every encoder's features are cached (in feature_dir; None: no feature cache). cache_dir: the decoded-image
    cache (edgessl.data.cache)."""
    size = int(meta["image_size"])
    signature = folder_signature(root, size) if feature_dir is not None else ""
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
                if say:
                    say(f"{what}: {spec.name} features of {len(cached.paths)} images (cached).")
                continue
        if images is None:
            images = load_labelled_folder(root, size, what, cache_mb=cache_mb, workers=workers, cache_dir=cache_dir)
            if images.skipped and say:
                say(f"[yellow]warning:[/yellow] {what}: skipped {len(images.skipped)} unreadable file(s), "
                    f"first: {images.skipped[0][0]} ({images.skipped[0][1]}).")
        t0 = time.time()
        model = spec.build().to(device)
        feats = extract_features(model, images, meta["mean"], meta["std"], device)
        fs = FeatureSet(feats, images.labels.clone(), list(images.classes),
                        [str(p.relative_to(images.root)) for p in images.paths], len(images.skipped))
        if say:
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


# ---------------------------------------------------------------- the command
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


@dataclass
class EvalResult:
    run_dir: Path
    results: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    short_classes: dict[int, dict[str, int]] = field(default_factory=dict)

    @property
    def json_path(self) -> Path:
        return self.run_dir / "eval.json"

    @property
    def plot_path(self) -> Path:
        return self.run_dir / "eval.png"


def evaluate_run(
    run_dir: str | Path,
    train: str | Path,
    test: str | Path | None = None,
    test_fraction: float | None = None,
    labels_per_class: str | Sequence | None = None,
    seeds: int = 3,
    baseline: str | None = None,
    split_seed: int = 0,
    device: str = "auto",
    cache: bool = True,
    workers: int | str = "auto",
    cache_dir: str | Path | None = "auto",
    cache_mb: float = 4096,
    console: Console | None = None,
    quiet: bool = False,
    threads: str | int = "auto",
) -> EvalResult:
    """Run the protocol of this module's docstring; write eval.json and eval.png into run_dir."""
    console = console or Console()
    say = None if quiet else (lambda msg: console.print(msg, highlight=False))
    t_start = time.time()
    cpu = use_threads(threads)
    if say:
        say(f"CPU: {cpu.describe()}")
    args = _check_arguments(run_dir, train, test, test_fraction, labels_per_class, seeds, baseline, device)
    loggers = run_loggers(args.run_dir)  # the run's --logger (a missing package fails here, before any work)
    specs = encoder_specs(args.run_dir, args.meta, args.baseline)
    feature_dir = args.run_dir / "features" if cache else None
    data = _train_test_features(args, specs, test_fraction, split_seed, feature_dir, workers, cache_mb, say,
                                cache_dir)
    per_class_values, short, dropped = _fit_to_features(args, data, say)
    rows = _grid(specs, data, per_class_values, args.seeds, args.device, say)
    summary = summarize(rows)
    result = EvalResult(args.run_dir, rows, summary, short)
    report = _report(args, data, per_class_values, dropped, short, cpu.threads, t_start, rows, summary)
    atomic_write_text(result.json_path, json.dumps(report, indent=2) + "\n")
    plot_eval(summary, result.plot_path, title=f"{args.meta['timm_name']} - {args.run_dir.name}")
    loggers.log(eval_scalars(summary), {"eval": result.plot_path}, step=int(args.meta.get("epochs_trained") or 0))
    loggers.close()
    if not quiet:
        _print_results(console, result)
    return result


@dataclass
class _Arguments:
    """evaluate_run's arguments once every check that needs no decoding has passed."""

    run_dir: Path  # the folder holding the encoder
    meta: dict[str, Any]  # encoder.json
    train_root: Path
    test_root: Path | None  # None: the test images are split off --train (--test-fraction)
    train_classes: list[str]  # the class folders of --train
    per_class_values: list[int | None]  # fitted to the image files of --train (None = all)
    explicit: bool  # labels per class given by the user: values above every class are refused, not dropped
    dropped: list[int]  # default values dropped: no class folder holds that many files
    seeds: list[int]
    baseline: str | None  # None | "random"
    device: torch.device


def _check_arguments(run_dir, train, test, test_fraction, labels_per_class, seeds, baseline, device) -> _Arguments:
    """Every check that needs no decoding, in evaluate_run's order, so bad input fails fast (UserError)."""
    run_dir = Path(run_dir)
    meta = read_encoder_meta(run_dir)
    run_dir = run_dir if run_dir.is_dir() else run_dir.parent
    explicit = labels_per_class is not None
    per_class_values = parse_labels_per_class(labels_per_class if explicit else DEFAULT_LABELS_PER_CLASS)
    if int(seeds) < 1:
        raise UserError(f"--seeds must be at least 1, not {seeds}.")
    seed_list = list(range(int(seeds)))
    baseline = None if baseline in (None, "", "none") else baseline
    if baseline not in (None, "random"):
        raise UserError(f"--baseline must be 'random' or 'none', not '{baseline}'.")
    check_split_options(test, test_fraction)
    train_root, train_classes = class_folders(train, "--train")
    test_root = None
    if test is not None:
        test_root, test_classes = class_folders(test, "--test")
        map_test_labels(train_classes, test_classes)
    file_counts = torch.tensor([len(scan_images(train_root / c)) for c in train_classes])
    per_class_values, _, dropped = fit_budgets(
        per_class_values, torch.arange(len(train_classes)).repeat_interleave(file_counts), train_classes, explicit)
    return _Arguments(run_dir, meta, train_root, test_root, train_classes, per_class_values, explicit, dropped,
                      seed_list, baseline, pick_device(device))


@dataclass
class _TrainTest:
    """Training and test features under every encoder spec ({spec name: FeatureSet})."""

    train: dict[str, FeatureSet]
    test: dict[str, FeatureSet]
    remap: Tensor  # (C_test,) test class index -> training class index
    split: Split | None  # the --test-fraction split of --train; None when --test was given

    @property
    def classes(self) -> list[str]:
        return self.train["pretrained"].classes


def _train_test_features(args: _Arguments, specs: Sequence[EncoderSpec], test_fraction: float | None,
                         split_seed: int, feature_dir: Path | None, workers: int | str, cache_mb: float, say,
                         cache_dir: str | Path | None = "auto") -> _TrainTest:
    """Features of --train and --test, or of the two parts of --train split by --test-fraction (cached)."""
    train_feats = folder_features(args.train_root, "--train", specs, args.meta, args.device, feature_dir, workers,
                                  cache_mb, say, cache_dir)
    if args.test_root is not None:
        test_feats = folder_features(args.test_root, "--test", specs, args.meta, args.device, feature_dir, workers,
                                     cache_mb, say, cache_dir)
        remap = map_test_labels(train_feats["pretrained"].classes, test_feats["pretrained"].classes)
        return _TrainTest(train_feats, test_feats, remap, None)
    split = split_folder(train_feats["pretrained"].labels, float(test_fraction), split_seed)
    test_feats = {name: fs.subset(split.test_idx) for name, fs in train_feats.items()}
    train_feats = {name: fs.subset(split.train_idx) for name, fs in train_feats.items()}
    return _TrainTest(train_feats, test_feats, torch.arange(len(args.train_classes)), split)


def _fit_to_features(args: _Arguments, data: _TrainTest, say) -> tuple[list[int | None], dict[int, dict[str, int]],
                                                                        list[int]]:
    """fit_budgets against the images actually read (and kept for training): (values, short classes, dropped),
    dropped including those fitted to the file counts; a note names the dropped default values."""
    per_class_values, short, dropped_now = fit_budgets(args.per_class_values, data.train["pretrained"].labels,
                                                       data.classes, args.explicit)
    dropped = sorted(set(args.dropped) | set(dropped_now))
    if dropped and say:
        say(f"note: default labels per class {', '.join(map(str, dropped))} dropped: no class of --train has that "
            "many images.")
    return per_class_values, short, dropped


def _grid(specs: Sequence[EncoderSpec], data: _TrainTest, per_class_values: Sequence[int | None],
          seeds: Sequence[int], device: torch.device, say) -> list[dict[str, Any]]:
    """evaluate_features rows of every encoder spec in turn, with progress lines when `say` is given."""
    rows: list[dict[str, Any]] = []
    for spec in specs:
        t0 = time.time()
        tr, te = data.train[spec.name], data.test[spec.name]
        rows += evaluate_features(tr, te.features, data.remap[te.labels], per_class_values, seeds, spec.name, device,
                                  on_subset=_subset_line(say, spec.name, t0) if say else None)
        if say:
            say(f"{spec.name}: kNN and linear probe at {len(per_class_values)} label budget(s) x {len(seeds)} "
                f"seed(s) ({time.time() - t0:.1f} s).")
    return rows


def _report(args: _Arguments, data: _TrainTest, per_class_values: Sequence[int | None], dropped: list[int],
            short: dict[int, dict[str, int]], threads: int, t_start: float, rows: list[dict[str, Any]],
            summary: list[dict[str, Any]]) -> dict[str, Any]:
    """The content of eval.json (key order is part of the format)."""
    return {
        "run_dir": str(args.run_dir),
        "encoder": {k: args.meta.get(k) for k in ("timm_name", "stem", "image_size", "feature_dim", "epochs_trained")},
        "train": str(args.train_root.resolve()),
        "test": str(args.test_root.resolve()) if args.test_root is not None else None,
        "split": data.split.describe() if data.split is not None else None,
        "classes": data.classes,
        "n_train": len(data.train["pretrained"].labels),
        "n_test": len(data.test["pretrained"].labels),
        "skipped_files": {"train": data.train["pretrained"].skipped,
                          "test": data.test["pretrained"].skipped if data.split is None else 0},
        "labels_per_class": [lpc_name(v) for v in per_class_values],
        "labels_per_class_dropped": dropped,
        "seeds": args.seeds,
        "baseline": args.baseline,
        "random_init_seed": RANDOM_INIT_SEED if args.baseline == "random" else None,
        "knn": {"k": list(KNN_K), "temperature": KNN_T, "similarity": "cosine", "k_clipped_to_subset_size": True},
        "linear": {"l2_grid": list(L2_GRID), "max_folds": MAX_FOLDS, "standardise": "labelled subset statistics",
                   "fallback_l2": "1/N when a class has a single labelled image (no cross-validation)"},
        "short_classes": {str(k): v for k, v in short.items()},
        "device": str(args.device),
        "threads": threads,
        "seconds": round(time.time() - t_start, 2),
        "results": rows,
        "summary": summary,
    }


def _print_results(console: Console, result: EvalResult) -> None:
    """The results table, the notes on classes short of a labels-per-class value and the files written."""
    console.print(results_table(result.summary))
    for line in short_notes(result.short_classes):
        console.print(line, highlight=False)
    console.print(f"Wrote {result.json_path} and {result.plot_path}.", highlight=False)


def _subset_line(say, name: str, t0: float):
    """A progress line per scored subset:
    '  pretrained | 10 labels/class, seed 1: kNN@20 0.412, linear 0.455 (3.1 s)'."""

    def line(rows: list[dict[str, Any]]) -> None:
        knn = next(r for r in rows if r["protocol"] == "knn")
        lin = next(r for r in rows if r["protocol"] == "linear")
        say(f"  {name} | {knn['labels_per_class']} labels/class, seed {knn['seed']}: kNN@{knn['k']} {knn['top1']:.3f}, "
            f"linear {lin['top1']:.3f} ({time.time() - t0:.1f} s)")

    return line


def short_notes(short: dict[int, dict[str, int]]) -> list[str]:
    """One line per labels-per-class value that some class could not fill."""
    return [
        f"note: at {v} labels per class, {len(lacking)} class(es) used all they have: "
        + ", ".join(f"{name} ({n})" for name, n in lacking.items())
        for v, lacking in sorted(short.items())
    ]


def _pct(mean: float, std: float) -> str:
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def results_table(summary: Sequence[dict[str, Any]]):
    """A rich Table: one line per (protocol, labels per class) with the training images used, top-1 % (mean ± std
    over seeds) of the pretrained encoder, of the random-init one and the gain, and the pretrained balanced accuracy."""
    by = {(s["encoder"], s["protocol"], s["k"], s["labels_per_class"]): s for s in summary}
    has_random = any(s["encoder"] == "random" for s in summary)
    seeds = max((s["seeds"] for s in summary), default=0)
    table = Table(title=f"Test top-1 (%), mean ± std over {seeds} seed(s)", box=box.SIMPLE_HEAD)
    columns = ["protocol", "labels", "n", "pretrained", *(["random init", "gain"] if has_random else []), "bal. acc."]
    for col in columns:
        table.add_column(col, justify="left" if col == "protocol" else "right", no_wrap=True)
    protocols = [("knn", k) for k in KNN_K] + [("linear", None)]
    lpcs = list(dict.fromkeys(s["labels_per_class"] for s in summary))
    for proto, k in protocols:
        for lpc in lpcs:
            p = by.get(("pretrained", proto, k, lpc))
            if p is None:
                continue
            name = f"kNN k={k}" if proto == "knn" else "linear"
            cells = [name, str(lpc), str(p["n_train"]), _pct(p["top1_mean"], p["top1_std"])]
            if has_random:
                r = by.get(("random", proto, k, lpc))
                cells += [_pct(r["top1_mean"], r["top1_std"]), f"{100 * (p['top1_mean'] - r['top1_mean']):+.1f}"]
            cells.append(_pct(p["balanced_accuracy_mean"], p["balanced_accuracy_std"]))
            table.add_row(*cells)
        if (proto, k) != protocols[-1]:
            table.add_section()
    table.caption = ("labels: per class; n: labelled training images; bal. acc.: pretrained balanced accuracy"
                     + ("; gain: pretrained - random init" if has_random else ""))
    return table
