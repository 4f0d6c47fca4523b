"""The Python API; the CLI calls these and nothing else."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgessl.config import resolve
from edgessl.data.cache import cache_folder, clear_entries, list_entries, teacher_entries
from edgessl.deploy.export import export as _export
from edgessl.errors import UserError
from edgessl.evaluate.embed import EmbedResult, embed_folder
from edgessl.evaluate.finetune import finetune_run
from edgessl.evaluate.monitor import standard_evaluation
from edgessl.evaluate.protocol import evaluate_run
from edgessl.models.backbone import load_encoder, read_encoder_meta
from edgessl.models.classifier import load_classifier as _load_classifier
from edgessl.rundir import resume_problem
from edgessl.slim.api import slim_encoder as _slim_encoder
from edgessl.slim.recover import prune_run
from edgessl.train.loop import pretrain as _pretrain

__all__ = ["pretrain", "load_encoder", "read_encoder_meta", "evaluate_encoder", "finetune", "load_classifier", "export",
           "cache_entries", "clear_cache", "embed"]


def pretrain(
    recipe: str | None = None,
    config: str | Path | None = None,
    resume: str | Path | None = None,
    console=None,
    on_step=None,
    overwrite: bool = False,
    **options: Any,
):
    """Pretrain an encoder. Options are PretrainConfig fields (backbone, data, epochs, bank_lr, ...).

    resume: a run directory; its config.yaml is reloaded and `options` override it. A different data folder
    (other files than the run recorded) is refused; a moved copy of the same files is accepted.
    overwrite: a non-empty `out` is moved aside to <out>.old-<time> (otherwise it is refused).
    Nothing is written before every check has passed. Returns a PretrainResult (run_dir, history)."""
    if resume is not None:
        problem = resume_problem(resume)
        if problem:
            raise UserError(problem)
        if overwrite:
            raise UserError("--resume continues a run and --overwrite starts a new one: pass one of them.")
        if config is None:
            config = Path(resume) / "config.yaml"
        options.pop("out", None)
    cfg = resolve(options, recipe=recipe, config=str(config) if config else None)
    return _pretrain(cfg, resume=resume, console=console, on_step=on_step, overwrite=overwrite,
               evaluation=standard_evaluation())


def evaluate_encoder(
    run_dir: str | Path,
    train: str | Path,
    test: str | Path | None = None,
    test_fraction: float | None = None,
    labels_per_class=None,
    seeds: int = 3,
    baseline: str | None = None,
    console=None,
    **options: Any,
):
    """Few-label evaluation of a run's frozen encoder: weighted kNN (k = 20, 200) and a cross-validated linear
    probe at each labels-per-class value ("1,5,all", a list, or None: 1,5,10,all without the values no class
    reaches) and seed, optionally next to a random-init baseline (baseline="random"). Writes eval.json and
    eval.png into run_dir.

    options: split_seed, device, cache (feature cache on/off), workers, cache_mb, cache_dir (decoded images), quiet.
    Returns an EvalResult (results: the eval.json rows, summary: mean/std over seeds).
    Named evaluate_encoder, not evaluate: `edgessl.evaluate` is the subpackage."""
    return evaluate_run(run_dir, train, test, test_fraction, labels_per_class, seeds, baseline,
                        console=console, **options)


def finetune(
    run_dir: str | Path,
    train: str | Path,
    test: str | Path | None = None,
    test_fraction: float | None = None,
    labels_per_class=10,
    epochs: int = 30,
    freeze_backbone: bool = False,
    console=None,
    **options: Any,
):
    """Fine-tune a run's encoder plus a new linear layer on `labels_per_class` labels per class (or "all").

    options: batch_size, lr, backbone_lr_scale, weight_decay, label_smoothing, val_fraction, patience, seed,
    split_seed, device, out, workers, cache_mb, cache_dir (decoded images), quiet, init (timm, a weights file or
    another run: the encoder's weights instead of the run's). Writes <run_dir>/finetune-<tag>/
    (classifier.safetensors + classifier.json, metrics.json, confusion.png). Returns a FinetuneResult (out_dir,
    metrics, model)."""
    return finetune_run(run_dir, train, test, test_fraction, labels_per_class, epochs, freeze_backbone,
                        console=console, **options)


def load_classifier(path: str | Path, device: str = "cpu"):
    """A fine-tuned classifier folder (classifier.safetensors + classifier.json) -> nn.Module in eval mode;
    `.edgessl_meta` holds classes (logit order), input size, mean/std and train_data."""
    return _load_classifier(path, device=device)


def export(
    run: str | Path,
    classifier: str | Path | None = None,
    opset: int = 18,
    int8: bool | str = False,
    calib: str | Path | None = None,
    fp16: bool = False,
    images: str | Path | None = None,
    out: str | Path | None = None,
    name: str | None = None,
    calib_method: str = "minmax",
    console=None,
):
    """Export a run's encoder (features) or a fine-tuned classifier (logits) to ONNX in <run>/export, check it
    against PyTorch, optionally add int8 (calibrated on `calib`) and fp16 copies, and write manifest.json.

    int8: False (none); True or "search" (calibration methods, then float tails, until the int8 bound holds; written
    only when faster than fp32 on this machine, else fp32 is kept with a one-line reason); "keep-slow" (the same
    search, written even when not faster); "strict" (one configuration, `calib_method`: a miss is ValidationFailed).
    manifest.json's fp32 entry records every candidate under "int8_search" (docs/export.md).

    Returns an ExportResult (export_dir, manifest, models: the manifest entries written). Raises UserError on bad
    input and edgessl.deploy.onnx.ValidationFailed (exit code 3 in the CLI) when a file misses its parity bounds."""
    return _export(run, classifier=classifier, opset=opset, int8=int8, calib=calib, fp16=fp16, images=images,
                   out=out, name=name, calib_method=calib_method, console=console)


def slim_encoder(run_dir: str | Path, width: float, out: str | Path | None = None) -> Path:
    """One width of a `--widths` run as a standalone, physically smaller encoder (default <run_dir>/width-<w>/).
    Returns the folder; `load_encoder(folder)` rebuilds it. See `edgessl slim --help`."""
    return _slim_encoder(run_dir, width, out)


def prune_encoder(run_dir: str | Path, ratio: float, criterion: str = "magnitude", epochs: int | None = None,
          distill: float = 0.5, out: str | Path | None = None, quiet: bool = False):
    """Prune `ratio` of every channel group of a run's encoder and recover it (see `edgessl prune --help`).
    Returns the recovery's PretrainResult (`.run_dir`, `.history`, `.report` = its widths.json entries)."""
    return prune_run(run_dir, ratio, criterion, epochs, distill, out, quiet=quiet)


def embed(source: str | Path, data: str | Path, out: str | Path, neighbours: int | None = None,
          duplicates: float | None = None, gallery_rows: int = 8, use_faiss: bool | None = None, warn=None,
          whiten: int | None = None, mutual: float | None = None, **options) -> EmbedResult:
    """One embedding per readable image of `data` into `out` (.npz, or .parquet with the `parquet` extra).

    source: a run directory (its encoder; options device, batch_size, cache_mb, workers, cache_dir) or an exported
    .onnx encoder (the torch-free export/embed_onnx.py with manifest.json's preprocessing; options manifest,
    batch_size, threads). Beside `out`: skipped_files.txt (unreadable files), neighbours.csv + neighbours.png
    (neighbours=K: every image's K nearest by cosine; gallery_rows queries in the picture) and duplicates.csv
    (duplicates=T: the pairs with cosine >= T, grouped). whiten=K: both search the embeddings PCA-whitened on this
    folder (K directions; the stored embeddings stay raw). mutual=R: keep only the pairs whose images are each
    (nearly) the other's nearest: distance 1 - cosine within (1 + R) x each one's distance to its nearest other
    image (pixel twins count as one). use_faiss: None = when installed. warn: callable(message).
    Returns an EmbedResult (paths, embeddings (N, D), skipped, written, neighbours, pairs, pair_groups, whitening,
    candidates)."""
    return embed_folder(source, data, out, neighbours, duplicates, gallery_rows, use_faiss, warn, whiten, mutual,
                        **options)


def cache_entries(cache_dir: str | Path | None = "auto") -> tuple[Path, list[dict[str, Any]]]:
    """(the decoded-image cache folder, one dict per cached folder: name, root, size, images, skipped, bytes,
    created; then one per stored --teacher bank, with "teacher": its timm name). cache_dir: "auto"
    (EDGESSL_CACHE_DIR, else ~/.cache/edgessl) or a folder."""
    folder = _cache_folder(cache_dir)
    return folder, list_entries(folder) + teacher_entries(folder)


def clear_cache(cache_dir: str | Path | None = "auto", folder: str | Path | None = None) -> tuple[int, int]:
    """Delete the decoded images (and stored --teacher banks) of every folder, or of image folder `folder` only.
    -> (files, bytes) freed."""
    return clear_entries(_cache_folder(cache_dir), folder)


def _cache_folder(cache_dir: str | Path | None) -> Path:
    folder = cache_folder(cache_dir)
    if folder is None:
        raise UserError("--cache-dir none means no cache: pass a folder, or leave the flag out for the default.")
    return folder
