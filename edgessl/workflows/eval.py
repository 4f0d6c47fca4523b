"""`edgessl eval`: the few-label protocol (edgessl.evaluate.protocol) on a run's frozen encoder, against an optional
random-init baseline; writes eval.json and eval.png into the run directory and prints the results table."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich import box
from rich.table import Table
from torch import Tensor

from edgessl.errors import UserError
from edgessl.evaluate.knn import KNN_K, KNN_T
from edgessl.evaluate.labelled import (
    LabelledFolders,
    Split,
    labelled_folders,
    lpc_name,
    map_test_labels,
    parse_labels_per_class,
    split_folder,
    untested_note,
)
from edgessl.evaluate.linear import L2_GRID, MAX_FOLDS
from edgessl.evaluate.protocol import (
    DEFAULT_LABELS_PER_CLASS,
    RANDOM_INIT_SEED,
    EncoderSpec,
    FeatureSet,
    encoder_specs,
    eval_scalars,
    evaluate_features,
    fit_budgets,
    folder_features,
    summarize,
)
from edgessl.fileio import atomic_write_text
from edgessl.loggers import run_loggers
from edgessl.models.backbone import run_encoder_meta
from edgessl.options import EvalOptions, check_groups, takes_options
from edgessl.report.eval_plots import plot_eval
from edgessl.report.say import Say
from edgessl.rundir import keep_aside
from edgessl.runtime import between_batches, changes_without_epoch, pick_device, thread_governor, use_threads


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


@takes_options(EvalOptions, lead=("run_dir",),
               positional=("train", "test", "test_fraction", "labels_per_class", "seeds", "baseline"),
               extra={"console": None})
def evaluate_encoder(run_dir: str | Path, opts: EvalOptions, console=None) -> EvalResult:
    """Few-label evaluation of a run's frozen encoder: weighted kNN (k = 20, 200) and a cross-validated linear
    probe at each labels-per-class value ("1,5,all", a list, or None: 1,5,10,all without the values no class
    reaches) and seed, optionally next to a random-init baseline (baseline="random"). Writes eval.json and
    eval.png into run_dir. Options: edgessl.options.EvalOptions (the same as `edgessl eval`'s flags).
    Returns an EvalResult (results: the eval.json rows, summary: mean/std over seeds).
    Named evaluate_encoder, not evaluate: `edgessl.evaluate` is the subpackage."""
    say = Say(console, opts.quiet)
    t_start = time.time()
    check_groups(opts)
    args = _check_arguments(run_dir, opts)  # every check first: an error is the only line printed
    cpu = use_threads(opts.threads)
    say(f"CPU: {cpu.describe()}")
    governor = thread_governor(cpu)  # --threads auto: the count follows the load between batches and fits
    tick = between_batches(governor, say)
    loggers = run_loggers(args.run_dir)  # the run's --logger (a missing package fails here, before any work)
    specs = encoder_specs(args.run_dir, args.meta, args.baseline)
    feature_dir = args.run_dir / "features" if opts.cache else None
    data = _train_test_features(args, specs, opts, feature_dir, say, tick)
    per_class_values, short, dropped = _fit_to_features(args, data, say)
    rows = _grid(specs, data, per_class_values, args.seeds, args.device, say, tick)
    summary = summarize(rows)
    result = EvalResult(args.run_dir, rows, summary, short)
    report = _report(args, data, per_class_values, dropped, short, cpu.threads, t_start, rows, summary)
    report["thread_changes"] = changes_without_epoch(governor)
    for earlier in (result.json_path, result.plot_path):  # an earlier evaluation is kept, never overwritten
        if earlier.exists():
            say(f"An earlier {earlier.name} is kept as {keep_aside(earlier).name}.")
    atomic_write_text(result.json_path, json.dumps(report, indent=2) + "\n")
    plot_eval(summary, result.plot_path, title=f"{args.meta['timm_name']} - {args.run_dir.name}")
    loggers.log(eval_scalars(summary), {"eval": result.plot_path}, step=int(args.meta.get("epochs_trained") or 0))
    loggers.close()
    _print_results(say, result, data.classes)
    return result


@dataclass
class _Arguments:
    """evaluate_encoder's arguments once every check that needs no decoding has passed."""

    run_dir: Path  # the folder holding the encoder
    meta: dict[str, Any]  # encoder.json
    folders: LabelledFolders
    per_class_values: list[int | None]  # fitted to the image files of --train (None = all)
    explicit: bool  # labels per class given by the user: values above every class are refused, not dropped
    dropped: list[int]  # default values dropped: no class folder holds that many files
    seeds: list[int]
    baseline: str | None  # None | "random"
    device: torch.device


def _check_arguments(run_dir, opts: EvalOptions) -> _Arguments:
    """Every check that needs no decoding, so bad input fails fast (UserError)."""
    run_dir, meta = run_encoder_meta(run_dir)
    if not os.access(run_dir, os.W_OK):  # found before the features are computed, not after
        raise UserError(f"'{run_dir}' cannot be written: eval writes eval.json, eval.png and its feature cache "
                        "there. Evaluate a copy of the run (cp -r RUN COPY), or make the folder writable.")
    explicit = opts.labels_per_class is not None
    per_class_values = parse_labels_per_class(opts.labels_per_class if explicit else DEFAULT_LABELS_PER_CLASS)
    if int(opts.seeds) < 1:
        raise UserError(f"--seeds must be at least 1, not {opts.seeds}.")
    baseline = None if opts.baseline in (None, "", "none") else opts.baseline
    if baseline not in (None, "random"):
        raise UserError(f"--baseline must be 'random' or 'none', not '{baseline}'.")
    folders = labelled_folders(opts.train, opts.test, opts.test_fraction)
    per_class_values, _, dropped = fit_budgets(per_class_values, folders.file_labels, folders.train_classes, explicit)
    return _Arguments(run_dir, meta, folders, per_class_values, explicit, dropped, list(range(int(opts.seeds))),
                      baseline, pick_device(opts.device))


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


def _train_test_features(args: _Arguments, specs: Sequence[EncoderSpec], opts: EvalOptions,
                         feature_dir: Path | None, say: Say, tick=None) -> _TrainTest:
    """Features of --train and --test, or of the two parts of --train split by --test-fraction (cached)."""
    f = args.folders
    train_feats = folder_features(f.train_root, "--train", specs, args.meta, args.device, feature_dir, opts.decode,
                                  say, tick)
    if f.test_root is not None:
        test_feats = folder_features(f.test_root, "--test", specs, args.meta, args.device, feature_dir, opts.decode,
                                     say, tick)
        remap = map_test_labels(train_feats["pretrained"].classes, test_feats["pretrained"].classes)
        return _TrainTest(train_feats, test_feats, remap, None)
    split = split_folder(train_feats["pretrained"].labels, float(opts.test_fraction), opts.split_seed)
    if note := untested_note(split, f.train_classes):
        say(note)
    test_feats = {name: fs.subset(split.test_idx) for name, fs in train_feats.items()}
    train_feats = {name: fs.subset(split.train_idx) for name, fs in train_feats.items()}
    return _TrainTest(train_feats, test_feats, torch.arange(len(f.train_classes)), split)


def _fit_to_features(args: _Arguments, data: _TrainTest, say) -> tuple[list[int | None], dict[int, dict[str, int]],
                                                                        list[int]]:
    """fit_budgets against the images actually read (and kept for training): (values, short classes, dropped),
    dropped including those fitted to the file counts; a note names the dropped default values."""
    per_class_values, short, dropped_now = fit_budgets(args.per_class_values, data.train["pretrained"].labels,
                                                       data.classes, args.explicit)
    dropped = sorted(set(args.dropped) | set(dropped_now))
    if dropped:
        say(f"note: default labels per class {', '.join(map(str, dropped))} dropped: no class of --train has that "
            "many images.")
    return per_class_values, short, dropped


def _grid(specs: Sequence[EncoderSpec], data: _TrainTest, per_class_values: Sequence[int | None],
          seeds: Sequence[int], device: torch.device, say, tick=None) -> list[dict[str, Any]]:
    """evaluate_features rows of every encoder spec in turn, with progress lines (unless `say` is quiet); `tick`
    (runtime.between_batches) runs after every scored subset."""
    rows: list[dict[str, Any]] = []
    for spec in specs:
        t0 = time.time()
        tr, te = data.train[spec.name], data.test[spec.name]
        rows += evaluate_features(tr, te.features, data.remap[te.labels], per_class_values, seeds, spec.name, device,
                                  on_subset=_subset_line(say if say else None, spec.name, t0, tick))
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
        "train": str(args.folders.train_root.resolve()),
        "test": str(args.folders.test_root.resolve()) if args.folders.test_root is not None else None,
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


def _print_results(say: Say, result: EvalResult, classes: list[str]) -> None:
    """The classes, the results table, the notes on classes short of a labels-per-class value and the files
    written."""
    say(f"{len(classes)} classes: {', '.join(classes)}", markup=False)
    say.table(results_table(result.summary))
    for line in short_notes(result.short_classes) + uncrossed_notes(result.results):
        say(line)
    say(f"Wrote {result.json_path} and {result.plot_path}.")


def _subset_line(say, name: str, t0: float, tick=None):
    """A progress line per scored subset (none when `say` is None), then `tick()`:
    '  pretrained | 10 labels/class, seed 1: kNN@20 0.412, linear 0.455 (3.1 s so far)'."""

    def line(rows: list[dict[str, Any]]) -> None:
        if tick is not None:
            tick()
        if say is None:
            return
        knn = next(r for r in rows if r["protocol"] == "knn")
        lin = next(r for r in rows if r["protocol"] == "linear")
        lpc = knn["labels_per_class"]
        say(f"  {name} | {lpc} label{'' if lpc == 1 else 's'}/class, seed {knn['seed']}: kNN@{knn['k']} "
            f"{knn['top1']:.3f}, linear {lin['top1']:.3f} ({time.time() - t0:.1f} s so far)")

    return line


def short_notes(short: dict[int, dict[str, int]]) -> list[str]:
    """One line per labels-per-class value that some class could not fill."""
    return [
        f"note: at {v} labels per class, {len(lacking)} class(es) used all they have: "
        + ", ".join(f"{name} ({n})" for name, n in lacking.items())
        for v, lacking in sorted(short.items())
    ]


def uncrossed_notes(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One line per labels-per-class value above 1 whose linear probe could not cross-validate its strength (a class
    with a single labelled image: l2 = 1/N; at 1 label per class always, as docs/evaluation.md says)."""
    values = sorted({r["labels_per_class"] for r in rows if r["protocol"] == "linear" and r["labels_per_class"] != 1
                     and not r.get("l2_cross_validated", True)}, key=lambda v: (v == "all", v if v != "all" else 0))
    return [f"note: at {v} labels per class a class has a single labelled image, so the linear probe took l2 = 1/N "
            "without cross-validation (eval.json: l2_cross_validated false)." for v in values]


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
            capped = f" ({p['n_train']} used)" if proto == "knn" and k > p["n_train"] else ""
            name = f"kNN k={k}{capped}" if proto == "knn" else "linear"
            cells = [name, str(lpc), str(p["n_train"]), _pct(p["top1_mean"], p["top1_std"])]
            if has_random:
                r = by.get(("random", proto, k, lpc))
                cells += [_pct(r["top1_mean"], r["top1_std"]), f"{100 * (p['top1_mean'] - r['top1_mean']):+.1f}"]
            cells.append(_pct(p["balanced_accuracy_mean"], p["balanced_accuracy_std"]))
            table.add_row(*cells)
        if (proto, k) != protocols[-1]:
            table.add_section()
    table.caption = ("labels: per class; n: labelled training images (k is capped at n); bal. acc.: pretrained "
                     "balanced accuracy"
                     + ("; gain: pretrained - random init" if has_random else ""))
    return table
