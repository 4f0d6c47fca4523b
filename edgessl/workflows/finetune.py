"""`edgessl finetune`: the fine-tuning recipe (edgessl.evaluate.finetune) on a run's encoder and a labelled folder;
writes <run>/finetune-<tag>/ (classifier, metrics.json, confusion.png) and logs to the run's loggers."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from edgessl.deploy.manifest import MANIFEST
from edgessl.errors import UserError, stopped
from edgessl.evaluate.finetune import (
    FinetuneResult,
    build_classifier,
    check_options,
    finetune_data,
    finetune_tag,
    train_classifier,
    write_finetune,
)
from edgessl.evaluate.labelled import check_labels_per_class, labelled_folders, lpc_name, untested_note
from edgessl.loggers import run_loggers
from edgessl.models.backbone import ENCODER_WEIGHTS, run_encoder_meta
from edgessl.options import FinetuneOptions, takes_options
from edgessl.report.say import Say
from edgessl.rundir import CHECKPOINT, move_aside, plural
from edgessl.runtime import between_batches, pick_device, thread_governor, use_threads


@takes_options(FinetuneOptions, lead=("run_dir",),
               positional=("train", "test", "test_fraction", "labels_per_class", "epochs", "freeze_backbone"),
               extra={"console": None})
def finetune(run_dir: str | Path, opts: FinetuneOptions, console=None) -> FinetuneResult:
    """Fine-tune a run's encoder plus a new linear layer on `labels_per_class` labels per class (or "all").
    Options: edgessl.options.FinetuneOptions (the same as `edgessl finetune`'s flags); init: start the encoder (the
    run's architecture) from other weights instead: timm, a weights file or another run (as `pretrain --init`).
    Writes <run_dir>/finetune-<tag>/ (classifier.safetensors + classifier.json, metrics.json, confusion.png).
    Returns a FinetuneResult (out_dir, metrics, model)."""
    say = Say(console, opts.quiet)
    t_start = time.time()
    per_class = check_options(opts)  # every check that needs no decoding first: an error is the only line printed
    run_dir, meta = run_encoder_meta(run_dir)
    loggers = run_loggers(run_dir)  # the run's --logger (a missing package fails here, before any work)
    folders = labelled_folders(opts.train, opts.test, opts.test_fraction)
    check_labels_per_class([per_class], folders.file_labels, folders.train_classes)
    tag = f"finetune-{finetune_tag(per_class, opts.freeze_backbone, opts.init)}"
    out_dir = Path(opts.out) if opts.out else run_dir / tag
    check_finetune_out(out_dir)
    cpu = use_threads(opts.threads)
    say(f"CPU: {cpu.describe()}")
    governor = thread_governor(cpu)  # --threads auto: the count follows the load between steps
    dev = pick_device(opts.device)
    data = finetune_data(folders.train_root, folders.test_root, per_class, opts, int(meta["image_size"]), say.warn)
    if note := untested_note(data.split, data.classes):
        say(note)
    model = build_classifier(run_dir, meta, len(data.classes), opts, dev, say)
    say(f"[bold]edgessl finetune[/bold] {meta['timm_name']} | {len(data.classes)} classes | "
        f"{len(data.fit_idx)} training + {len(data.val_idx)} held-out labelled images "
        f"({lpc_name(per_class)} per class) | {len(data.test_idx)} test images "
        f"| {'frozen backbone' if opts.freeze_backbone else 'full fine-tuning'} | {plural(opts.epochs, 'epoch')} "
        f"| {dev.type}")
    try:
        history, best_epoch = train_classifier(model, data, opts, meta["mean"], meta["std"], dev, say,
                                               between_batches(governor, say))
    except KeyboardInterrupt as e:  # nothing is written before the last epoch: say so, and that --out is untouched
        earlier = f"; the earlier {out_dir} is as it was" if out_dir.is_dir() and any(out_dir.iterdir()) else ""
        raise stopped(e, f": a fine-tuning writes nothing until its last epoch, so nothing was written{earlier}. "
                         "Run the same command again.") from None
    if out_dir.is_dir() and any(out_dir.iterdir()):  # an earlier fine-tuning is kept, never overwritten
        say(f"An earlier {out_dir.name} is kept as {move_aside(out_dir).name}.")
    metrics = write_finetune(model.cpu().eval(), data, opts, per_class, meta, run_dir, folders.train_root,
                             folders.test_root, out_dir, history, best_epoch, dev, t_start)
    loggers.log({f"{tag}/{k}": metrics[k] for k in ("top1", "balanced_accuracy", "macro_f1")},
                {f"{tag}/confusion": out_dir / "confusion.png"}, step=int(meta.get("epochs_trained") or 0))
    loggers.close()
    if data.short.get(per_class):
        lacking = data.short[per_class]
        say(f"note: {len(lacking)} class(es) have fewer than {per_class} images and use all they have: "
            + ", ".join(f"{n} ({k})" for n, k in lacking.items()))
    chosen = f"best epoch {best_epoch}/{len(history)}" if len(data.val_idx) else \
        f"the last epoch, {len(history)}: no held-out images to choose one by"
    say(f"Test top-1 {100 * metrics['top1']:.1f}%  balanced accuracy {100 * metrics['balanced_accuracy']:.1f}%  "
        f"macro F1 {100 * metrics['macro_f1']:.1f}%  ({chosen}). Wrote {out_dir}.")
    if still_improving(history, best_epoch):
        say(f"note: the held-out loss still fell in the last epochs ({history[-3]['val_loss']:.3f} -> "
            f"{history[-1]['val_loss']:.3f}): more --epochs (now {len(history)}) may help.")
    return FinetuneResult(out_dir, metrics, model)


def still_improving(history: list[dict[str, Any]], best_epoch: int) -> bool:
    """The best epoch is the last and the held-out loss fell over the last three epochs (the run stopped early
    enough that more epochs may pay; a fine-tuning had ended at 'best epoch 30/30' without a word)."""
    losses = [h.get("val_loss") for h in history[-3:]]
    return (best_epoch == len(history) and len(losses) == 3 and None not in losses
            and losses[0] > losses[1] > losses[2])


def check_finetune_out(out: Path) -> None:
    """UserError when --out is a file or holds a run or an encoder (a run's folder, not a fine-tuning's); an earlier
    fine-tuning there is moved aside (<name>.old-<time>) once the new one is trained."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out '{out}' is a file; pass a folder for the fine-tuned classifier.")
    held = [name for name in (CHECKPOINT, ENCODER_WEIGHTS) if (out / name).exists()]
    if held:
        raise UserError(f"--out '{out}' holds a run or an encoder ({held[0]}): choose another --out (fine-tuning "
                        "writes classifier.safetensors, metrics.json and confusion.png into its own folder).")
    exported = [name for name in (MANIFEST, *sorted(f.name for f in out.glob("*.onnx"))) if (out / name).is_file()]
    if exported:  # an export folder had been moved aside whole as if it were an earlier fine-tuning
        raise UserError(f"--out '{out}' holds an ONNX export ({exported[0]}): choose another --out (fine-tuning "
                        "writes classifier.safetensors, metrics.json and confusion.png into its own folder).")
