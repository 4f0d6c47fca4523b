"""The fine-tuning recipe of `edgessl finetune` (the command: edgessl.workflows.finetune): a classifier (the run's
encoder + a new linear layer) trained on a few labels per class.

Recipe
- Labels: a stratified subset of --train (labels per class, seeded). A stratified part of that subset
  (--val-fraction, default 0.2: round(0.2 n) images of a class of n, at least 1, at most n - 1) is held out for
  early stopping, so the label budget includes the validation images. Classes with a single labelled image
  keep it for training; when no class has two, nothing is held out and training runs all epochs.
- Model: Classifier(backbone, feature_dim, classes). Full fine-tuning: AdamW, the new layer at --lr, the backbone
  at --lr x --backbone-lr-scale (default 0.1). --freeze-backbone: the backbone stays in eval mode (BatchNorm
  statistics included) and only the layer trains.
- Training: the pretraining augmentation, milder (FINETUNE_AUGMENT), label smoothing, linear warm-up then cosine
  decay per step. Every epoch the held-out images are scored (test transform); the best epoch (lowest held-out
  cross-entropy, ties to the higher held-out top-1) is kept; training stops after --patience epochs without a
  better one. The loss, not the top-1, ranks epochs: with a few held-out images the top-1 moves in coarse steps
  and stalls early while the loss still improves.
- Output (<run dir>/finetune-<tag>/): classifier.safetensors + classifier.json, metrics.json (test top-1,
  balanced accuracy, macro F1, per-class precision/recall/F1, confusion matrix, history), confusion.png.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from edgessl.data.augment import AugmentConfig, augment_batch, test_transform
from edgessl.data.folder import ImageSet
from edgessl.errors import TrainingDiverged, UserError
from edgessl.evaluate.labelled import (
    check_labels_per_class,
    load_labelled_folder,
    lpc_name,
    map_test_labels,
    parse_labels_per_class,
    skipped_warning,
    split_folder,
)
from edgessl.evaluate.metrics import classification_metrics, confusion_matrix, per_class_scores
from edgessl.evaluate.subsets import stratified_split, stratified_subset
from edgessl.fileio import atomic_write_text
from edgessl.models.backbone import load_encoder
from edgessl.models.classifier import Classifier, save_classifier
from edgessl.models.init import load_init
from edgessl.options import FinetuneOptions, check_groups
from edgessl.report.eval_plots import plot_confusion
from edgessl.report.say import Say
from edgessl.rundir import plural
from edgessl.seeding import keyed_generator
from edgessl.train.crops import step_layout
from edgessl.train.meter import EpochMeter
from edgessl.train.optim import warmup_cosine
from edgessl.train.state import MAX_NONFINITE, TrainState

# Milder than pretraining (scale (0.2, 1), jitter 0.4/0.4/0.4/0.1 at p 0.8, grayscale 0.2).
FINETUNE_AUGMENT = AugmentConfig(scale=(0.5, 1.0), jitter=(0.2, 0.2, 0.2, 0.05), jitter_p=0.5, grayscale_p=0.0)


def finetune_tag(per_class: int | None, freeze_backbone: bool, init: str | None = None) -> str:
    """Output folder suffix: 'lpc10', 'all', plus '-frozen', plus '-init-timm' / '-init-<file or run name>'."""
    tag = ("all" if per_class is None else f"lpc{per_class}") + ("-frozen" if freeze_backbone else "")
    return tag if not init else f"{tag}-init-{init if init == 'timm' else Path(init).stem}"


def param_groups(model: Classifier, lr: float, backbone_lr_scale: float, freeze_backbone: bool) -> list[dict]:
    """Optimizer groups: the new layer at lr, the backbone at lr * backbone_lr_scale (absent when frozen)."""
    groups = [{"params": list(model.fc.parameters()), "lr": lr, "name": "head"}]
    if not freeze_backbone:
        groups.append({"params": [p for p in model.backbone.parameters() if p.requires_grad],
                       "lr": lr * backbone_lr_scale, "name": "backbone"})
    return groups


class EarlyStopping:
    """Tracks the best epoch by a score tuple (higher is better) and says when `patience` epochs have passed
    without a better one."""

    def __init__(self, patience: int):
        self.patience = patience
        self.best: tuple | None = None
        self.best_epoch = 0
        self.waited = 0

    def update(self, epoch: int, score: tuple) -> bool:
        """Record an epoch's score; True when it is the best so far."""
        if self.best is None or score > self.best:
            self.best, self.best_epoch, self.waited = score, epoch, 0
            return True
        self.waited += 1
        return False

    @property
    def stop(self) -> bool:
        return self.waited >= self.patience


@torch.no_grad()
def predict_logits(
    model: torch.nn.Module, images: ImageSet, idx: Tensor, mean, std, device, batch_size: int = 256
) -> Tensor:
    """Eval-mode logits of rows idx (M,) of an ImageSet with the test transform -> (M, C) float32 on CPU."""
    was_training = model.training
    model.eval()
    out = [torch.zeros(0, model.fc.out_features)]
    for chunk in idx.split(batch_size):
        out.append(model(test_transform(images.get(chunk).to(device), mean, std)).float().cpu())
    model.train(was_training)
    return torch.cat(out)


@dataclass
class FinetuneResult:
    out_dir: Path
    metrics: dict[str, Any]
    model: Classifier  # the saved classifier (best epoch), eval mode, on CPU


def check_options(opts: FinetuneOptions) -> int | None:
    """UserError for a bad value of the recipe; returns the labels per class (None: all)."""
    values = parse_labels_per_class(opts.labels_per_class)
    if len(values) != 1:
        raise UserError(
            f"finetune takes one --labels-per-class value (a number or 'all'), not '{opts.labels_per_class}'."
        )
    for name, value, ok, rule in (
        ("--epochs", opts.epochs, opts.epochs >= 1, "at least 1"),
        ("--batch-size", opts.batch_size, opts.batch_size >= 2, "at least 2"),
        ("--lr", opts.lr, opts.lr > 0, "positive"),
        ("--backbone-lr-scale", opts.backbone_lr_scale, opts.backbone_lr_scale >= 0, "0 or more"),
        ("--label-smoothing", opts.label_smoothing, 0 <= opts.label_smoothing < 1, "in [0, 1)"),
        ("--val-fraction", opts.val_fraction, 0 <= opts.val_fraction < 1, "in [0, 1)"),
        ("--patience", opts.patience, opts.patience >= 1, "at least 1"),
    ):
        if not ok:
            raise UserError(f"{name} must be {rule}, not {value}.")
    check_groups(opts)
    return values[0]


@dataclass
class FinetuneData:
    """The labelled images and who is what: fit_idx / val_idx / test_idx are rows of `images` / `test_images`."""

    images: ImageSet
    classes: list[str]
    labels: Tensor
    fit_idx: Tensor
    val_idx: Tensor
    test_images: ImageSet
    test_idx: Tensor
    test_labels: Tensor
    short: dict
    split: Any = None


def finetune_data(train_root: Path, test_root: Path | None, per_class: int | None, opts: FinetuneOptions,
                  size: int, warn=None) -> FinetuneData:
    """Decode the labelled folders (`warn`: the unreadable files each skipped); draw the labelled subset (seeded) and
    its held-out part for early stopping."""
    images = load_labelled_folder(train_root, size, "--train", opts.decode)
    classes, labels, split = list(images.classes), images.labels, None
    if warn is not None and (warning := skipped_warning(images, "--train")):
        warn(warning)
    if test_root is not None:
        test_images = load_labelled_folder(test_root, size, "--test", opts.decode)
        if warn is not None and (warning := skipped_warning(test_images, "--test")):
            warn(warning)
        test_idx = torch.arange(len(test_images))
        test_labels = map_test_labels(classes, test_images.classes)[test_images.labels]
        pool = torch.arange(len(images))
    else:
        split = split_folder(labels, float(opts.test_fraction), opts.split_seed)
        test_images, test_idx, test_labels = images, split.test_idx, labels[split.test_idx]
        pool = split.train_idx
    short = check_labels_per_class([per_class], labels[pool], classes)
    labelled = pool[stratified_subset(labels[pool], per_class, opts.seed)]
    fit_pos, val_pos = stratified_split(labels[labelled], opts.val_fraction, opts.seed)
    return FinetuneData(images, classes, labels, labelled[fit_pos], labelled[val_pos], test_images, test_idx,
                        test_labels, short, split)


def build_classifier(run_dir: Path, meta: dict[str, Any], num_classes: int, opts: FinetuneOptions,
                     dev: torch.device, say: Say | None = None) -> Classifier:
    """The run's encoder (or opts.init's weights in its architecture) + a new linear layer seeded by opts.seed (the
    global RNG is left as it was)."""
    encoder = load_encoder(run_dir)
    if opts.init:
        meta["init"] = load_init(encoder, opts.init, meta["timm_name"], (say if say is not None else Say()).warn)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(opts.seed)
        model = Classifier(encoder, int(meta["feature_dim"]), num_classes)
    if opts.freeze_backbone:
        model.backbone.requires_grad_(False)
    return model.to(dev)


def train_classifier(model: Classifier, data: FinetuneData, opts: FinetuneOptions, mean, std, dev: torch.device,
                     say, between=None) -> tuple[list[dict[str, Any]], int]:
    """The recipe's training with the pretraining loop's step (TrainState.step: the same skip-and-stop rule for
    non-finite losses) and EpochMeter; early stopping on the held-out images. `between` (runtime.between_batches)
    runs after every step. Leaves the best epoch's weights in `model`. Returns (history, best epoch)."""
    optimizer = torch.optim.AdamW(param_groups(model, opts.lr, opts.backbone_lr_scale, opts.freeze_backbone),
                                  lr=opts.lr, weight_decay=opts.weight_decay)
    batch = min(opts.batch_size, len(data.fit_idx))
    steps = max(1, math.ceil(len(data.fit_idx) / batch))
    total = opts.epochs * steps
    scheduler = warmup_cosine(optimizer, max(1, min(steps, total // 5)), total)
    state = TrainState(model, None, optimizer, scheduler, torch.amp.GradScaler(dev.type, enabled=False), batch)
    stopper, best_state, history = EarlyStopping(opts.patience), copy.deepcopy(model.state_dict()), []
    for epoch in range(opts.epochs):
        row = _finetune_epoch(state, data, opts, epoch, steps, mean, std, dev, between)
        if len(data.val_idx):
            val_logits = predict_logits(model, data.images, data.val_idx, mean, std, dev)
            val_y = data.labels[data.val_idx]
            row["val_top1"] = float((val_logits.argmax(dim=1) == val_y).float().mean())
            row["val_loss"] = float(F.cross_entropy(val_logits, val_y))
            if stopper.update(epoch + 1, (-row["val_loss"], row["val_top1"])):
                best_state = copy.deepcopy(model.state_dict())
        history.append(row)
        val_text = f"  held-out top-1 {row['val_top1']:.3f} loss {row['val_loss']:.3f}" if "val_top1" in row else ""
        say(f"epoch {epoch + 1:>3}/{opts.epochs}  loss {row['train_loss']:.4f}  train top-1 {row['train_top1']:.3f}"
            f"{val_text}  {row['seconds']:.1f} s")
        if len(data.val_idx) and stopper.stop:
            say(f"Early stop: no lower held-out loss for {plural(opts.patience, 'epoch')}; keeping epoch "
                f"{stopper.best_epoch}.")
            break
    if len(data.val_idx):
        model.load_state_dict(best_state)
    return history, stopper.best_epoch if len(data.val_idx) else len(history)


def _finetune_epoch(state: TrainState, data: FinetuneData, opts: FinetuneOptions, epoch: int, steps: int, mean, std,
                    dev: torch.device, between=None) -> dict[str, Any]:
    """One epoch over the labelled training images in a seeded order; returns its history row."""
    model = state.model
    model.train()
    if opts.freeze_backbone:
        model.backbone.eval()
    order = data.fit_idx[torch.randperm(len(data.fit_idx), generator=keyed_generator(opts.seed, epoch, 0xF17E))]
    meter, correct = EpochMeter(), 0
    diverged = lambda: TrainingDiverged(  # noqa: E731
        f"Fine-tuning diverged: {MAX_NONFINITE} non-finite losses in a row (epoch {epoch + 1}). Lower --lr.")
    for chunk in order.tensor_split(steps):
        x = augment_batch(data.images.get(chunk).to(dev), chunk, epoch, opts.seed, FINETUNE_AUGMENT, mean, std)
        x = step_layout(x, dev.type)  # the pretraining step's layout: faster convolutions
        y = data.labels[chunk].to(dev)
        logits = model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=opts.label_smoothing)
        value = float(loss.detach())
        if state.step(loss, value, diverged):
            meter.add({"loss": value}, len(chunk))
            correct += int((logits.detach().argmax(dim=1) == y).sum())
        if between is not None:
            between()
    return {"epoch": epoch + 1, "train_loss": meter.means()["loss"], "train_top1": correct / max(meter.images, 1),
            "lr": state.optimizer.param_groups[0]["lr"], "seconds": time.time() - meter.t0}


def per_class_rows(cm, classes: list[str]) -> dict[str, dict[str, Any]]:
    """metrics.json's per_class: precision, recall, F1 and support per class; a class with no test image has no
    recall or F1 (null, not 0), and one never predicted on no test image no precision either."""
    scores = per_class_scores(cm)
    predicted = cm.sum(dim=0)
    rows = {}
    for i, c in enumerate(classes):
        seen = int(scores["support"][i]) > 0
        rows[c] = {"precision": float(scores["precision"][i]) if seen or int(predicted[i]) else None,
                   "recall": float(scores["recall"][i]) if seen else None,
                   "f1": float(scores["f1"][i]) if seen else None, "support": int(scores["support"][i])}
    return rows


def write_finetune(model: Classifier, data: FinetuneData, opts: FinetuneOptions, per_class: int | None,
                   meta: dict[str, Any], run_dir: Path, train_root: Path, test_root: Path | None, out_dir: Path,
                   history: list[dict[str, Any]], best_epoch: int, dev: torch.device, t_start: float) -> dict[str, Any]:
    """Score the test images (CPU) and write classifier.safetensors + .json, metrics.json and confusion.png."""
    test_labels, num_classes, classes = data.test_labels, len(data.classes), data.classes
    test_logits = predict_logits(model, data.test_images, data.test_idx, meta["mean"], meta["std"], "cpu")
    pred = test_logits.argmax(dim=1)
    cm = confusion_matrix(test_labels, pred, num_classes)
    tag = finetune_tag(per_class, opts.freeze_backbone)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_data = str(train_root.resolve())
    cls_meta = {
        **meta,
        "classes": classes,
        "train_data": train_data,
        "finetune": {"labels_per_class": lpc_name(per_class), "freeze_backbone": opts.freeze_backbone,
                     "seed": opts.seed, "best_epoch": best_epoch, "encoder_run": str(run_dir.resolve())},
    }
    save_classifier(model, out_dir, cls_meta)
    metrics = {
        **classification_metrics(test_labels, pred, num_classes),
        "per_class": per_class_rows(cm, classes),
        "confusion": cm.tolist(),
        "classes": classes,
        "n_train": len(data.fit_idx),
        "n_val": len(data.val_idx),
        "n_test": len(data.test_idx),
        "labels_per_class": lpc_name(per_class),
        "short_classes": data.short.get(per_class, {}) if per_class is not None else {},
        "freeze_backbone": opts.freeze_backbone,
        "init": meta.get("init"),
        "early_stopping": bool(len(data.val_idx)),
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "train_data": train_data,
        "test_data": str(test_root.resolve()) if test_root is not None else None,
        "split": data.split.describe() if data.split is not None else None,
        "options": {"epochs": opts.epochs, "batch_size": opts.batch_size, "lr": opts.lr,
                    "backbone_lr_scale": opts.backbone_lr_scale, "weight_decay": opts.weight_decay,
                    "label_smoothing": opts.label_smoothing, "val_fraction": opts.val_fraction,
                    "patience": opts.patience, "seed": opts.seed, "split_seed": opts.split_seed,
                    "augment": {k: getattr(FINETUNE_AUGMENT, k) for k in FINETUNE_AUGMENT.__dataclass_fields__}},
        "device": str(dev),
        "seconds": round(time.time() - t_start, 2),
        "history": history,
    }
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    plot_confusion(cm, classes, out_dir / "confusion.png",
                   title=f"{meta['timm_name']} {tag}: test top-1 {100 * metrics['top1']:.1f}%")
    return metrics
