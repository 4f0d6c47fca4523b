"""Where `edgessl embed`'s embeddings come from: a run's encoder (PyTorch) or an exported .onnx encoder (the torch-free
export/embed_onnx.py with manifest.json's preprocessing). A Source embeds any folder the same way (the user's, and
the planted copies the duplicate search calibrates on) and gives its decoded pixel rows (the copy score's input)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgessl.data.folder import ImageSet, load_image_folder
from edgessl.errors import UserError
from edgessl.evaluate.features import extract_features
from edgessl.models.backbone import load_encoder
from edgessl.options import Decode, EmbedOptions, check_groups
from edgessl.runtime import between_batches, pick_device, thread_governor, use_threads
from edgessl.scripts import load_script


@dataclass
class Embedded:
    """One folder, embedded: paths and (N, D) float32 embeddings of its readable images, the skipped files, and
    the images' decoded pixel rows (an ImageSet at the encoder's input size; None until asked for)."""

    paths: list[str]
    embeddings: np.ndarray
    skipped: list[tuple[Path, str]]
    images: ImageSet | None = None


class RunSource:
    """A run directory's encoder on `device`: images through the decoded-image cache (`decode`); CPU threads as
    `threads` says (None: auto, following the load between batches; changes go to `say`)."""

    def __init__(self, run_dir: Path, opts: EmbedOptions, say=None):
        if opts.manifest is not None:
            raise UserError("--manifest is for an .onnx source; SOURCE here is a run directory.")
        check_groups(opts)
        self.threads = use_threads("auto" if opts.threads is None else opts.threads)
        self.governor = thread_governor(self.threads)
        self.tick = between_batches(self.governor, say or (lambda _: None))
        self.model = load_encoder(run_dir)
        self.meta = self.model.edgessl_meta
        self.size = int(self.meta["image_size"])
        self.device = pick_device(opts.device)
        self.model.to(self.device)
        self.batch, self.decode = opts.batch_size, opts.decode

    def __call__(self, folder: Path, cache: bool = True) -> Embedded:
        decode = self.decode if cache else Decode(cache_dir="none", workers=self.decode.workers)
        images = load_image_folder(folder, self.size, decode=decode, min_images=1)
        feats = extract_features(self.model, images, self.meta["mean"], self.meta["std"], self.device, self.batch,
                                 between=self.tick)
        return Embedded([str(p) for p in images.paths], feats.numpy().astype(np.float32), images.skipped, images)


class OnnxSource:
    """An exported .onnx encoder run by export/embed_onnx.py (no torch in the embedding); pixel rows, when asked
    for, are decoded by edgessl at the model's input size."""

    def __init__(self, model: Path, opts: EmbedOptions):
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise UserError("Embedding with an .onnx needs onnxruntime: pip install 'edgessl[export]'.") from None
        self.script = load_script("embed_onnx.py")
        try:
            self.sess, entry = self.script.open_model(model, Path(opts.manifest) if opts.manifest else None,
                                                      opts.threads)
        except self.script.device_check().CheckError as e:  # a classifier's file among them
            raise UserError(str(e)) from None
        self.pre, self.batch, self.decode = entry["preprocess"], max(1, int(opts.batch_size)), opts.decode
        self.size = int(self.pre["image_size"])

    def __call__(self, folder: Path, cache: bool = True) -> Embedded:
        try:
            paths, emb, skipped = self.script.embed_folder(self.sess, self.pre, Path(folder), self.batch)
        except self.script.device_check().CheckError as e:
            raise UserError(str(e)) from None
        return Embedded([str(p) for p in paths], emb, skipped)

    def rows(self, folder: Path, cache: bool = True) -> ImageSet:
        decode = self.decode if cache else Decode(cache_dir="none", workers=self.decode.workers)
        return load_image_folder(folder, self.size, decode=decode, min_images=1)


def open_source(source: Path, opts: EmbedOptions, say=None) -> RunSource | OnnxSource:
    return OnnxSource(source, opts) if source.suffix == ".onnx" else RunSource(source, opts, say)


def with_rows(src: RunSource | OnnxSource, embedded: Embedded, folder: Path, cache: bool = True) -> ImageSet:
    """The pixel rows of an embedded folder, in the order of its paths (decoded now for an .onnx source)."""
    if embedded.images is None:
        embedded.images = src.rows(folder, cache)
        if [str(p) for p in embedded.images.paths] != embedded.paths:
            raise UserError(f"'{folder}' changed while it was embedded; run the command again.")
    return embedded.images
