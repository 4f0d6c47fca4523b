"""--teacher before training: one forward pass of the frozen teacher over the un-augmented training images.

open_teacher (before anything is written) resolves the source, or finds the features a resumed run stored;
teacher_bank (after the run directory is written) computes T once, or reads it back from the run or from the
decoded-image cache's folder, stores it, and returns the TeacherBank the objective uses.

Files: <run>/teacher.safetensors ("features": (N, d_t) float16 unit rows, row i = the i-th training image) and
<run>/teacher.json (the source, its input size and normalisation, the pass's seconds, the measured per-step cost).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from edgessl.config import PretrainConfig
from edgessl.data.augment import test_transform
from edgessl.data.cache import TEACHERS, cache_folder
from edgessl.data.folder import ImageSet, load_image_folder
from edgessl.errors import UserError
from edgessl.fileio import atomic_save_tensors, atomic_write_text
from edgessl.method.losses import relational_kl
from edgessl.method.teacher import TeacherBank
from edgessl.models.backbone import output_dim
from edgessl.models.teacher import TeacherSpec, load_teacher
from edgessl.rundir import absolute
from edgessl.runtime import autocast, inference_precision
from edgessl.train import distributed
from edgessl.train.prepare import forward_chunks

TEACHER_FEATURES = "teacher.safetensors"
TEACHER_RECORD = "teacher.json"
TEACHER_VERSION = 1  # change when what the features hold changes (transform, pooling, rounding)
TEACHER_BATCH = 256


@dataclass
class PendingTeacher:
    """A --teacher resolved before anything is written: the network to run (model, spec) and/or the features a
    resumed run stored (features (N, d_t), its teacher.json record)."""
    model: nn.Module | None
    spec: TeacherSpec | None
    features: Tensor | None = None
    record: dict[str, Any] | None = None

    def dim(self) -> int:
        """d_t, the teacher's feature dimension."""
        if self.features is not None:
            return self.features.shape[1]
        return output_dim(self.model, self.spec.image_size)


def open_teacher(cfg: PretrainConfig, resumed: Path | None, warn: Callable[[str], None]) -> PendingTeacher | None:
    """None without --teacher. A resumed run with teacher.safetensors reuses it (the source is not opened again,
    unless the per-step ablation needs the network); otherwise the source is loaded now, so a wrong --teacher
    fails before the run directory is touched."""
    if not cfg.teacher:
        return None
    if cfg.teacher_weight == 0 and not cfg.teacher_predictor and cfg.bank_init != "teacher":
        warn("--teacher-weight 0: the teacher's features are computed and stored but enter neither the loss nor the "
             "bank (an ablation); leave out --teacher to skip them.")
    if resumed is not None and (resumed / TEACHER_FEATURES).is_file():
        features, record = read_features(resumed)
        model = spec = None
        if cfg.teacher_per_step:
            model, spec = load_teacher(cfg.teacher, cfg.teacher_backbone, cfg.teacher_image_size, warn)
        return PendingTeacher(model, spec, features, record)
    model, spec = load_teacher(cfg.teacher, cfg.teacher_backbone, cfg.teacher_image_size, warn)
    return PendingTeacher(model, spec)


def read_features(folder: Path, name: str = TEACHER_FEATURES) -> tuple[Tensor, dict[str, Any]]:
    """(features (N, d_t) float32, the record stored beside them) from `folder`."""
    tensors = load_file(str(folder / name))
    record_path = folder / _record_name(name)
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    return tensors["features"].float(), record


def store_features(folder: Path, features: Tensor, record: dict[str, Any], name: str = TEACHER_FEATURES) -> list[Path]:
    return [atomic_save_tensors({"features": features.half().contiguous()}, folder / name),
            atomic_write_text(folder / _record_name(name), json.dumps(record, indent=1) + "\n")]


def _record_name(name: str) -> str:
    """The record beside features file `name`: teacher.json in a run, <key>.json in the cache."""
    return TEACHER_RECORD if name == TEACHER_FEATURES else Path(name).with_suffix(".json").name


def cache_key(spec: TeacherSpec, signature: dict[str, Any]) -> str:
    """Names one teacher's features of one folder's files: the files' hash, the weights, input size and
    normalisation, and TEACHER_VERSION."""
    key = json.dumps([signature["sha256"], spec.identity, spec.image_size, spec.mean, spec.std, TEACHER_VERSION])
    return hashlib.sha256(key.encode()).hexdigest()[:24]


@torch.no_grad()
def teacher_features(model: nn.Module, images: ImageSet, device: torch.device, precision: str, mean, std,
                     batch_size: int = TEACHER_BATCH, d: distributed.Dist | None = None, exact: bool = False) -> Tensor:
    """(N, d_t) unit features of every image, rounded to float16 (as stored, so a resumed run reads back the same
    values): the test transform at the images' size, `model` in eval mode, in row order, channels_last at
    runtime.inference_precision (bf16 on a CPU that has it). Under torchrun each chunk is split over the processes
    and gathered, so every process holds all of T. exact (--deterministic): `precision` itself and NCHW inputs,
    whose convolutions round the same at any batch size, so any number of processes computes the same T."""
    d = d or distributed.Dist()
    layout = torch.contiguous_format if exact else torch.channels_last
    model.eval().to(memory_format=layout)
    precision = precision if exact else inference_precision(device, precision)
    rows = []
    for idx, raw in forward_chunks(images, torch.arange(len(images)), batch_size, d, device):
        with autocast(device, precision):
            t = model(test_transform(raw, mean, std).contiguous(memory_format=layout))
        t = F.normalize(t.float(), dim=1)
        rows.append(distributed.all_gather_cat(t, d, distributed.split_sizes(len(idx), d.world)))
    return torch.cat(rows).half().float()


def teacher_bank(cfg: PretrainConfig, pending: PendingTeacher, run_dir: Path, images: ImageSet,
                 signature: dict[str, Any], device: torch.device, precision: str, d: distributed.Dist, batch: int,
                 say: Callable[[str], None], warn: Callable[[str], None]) -> tuple[TeacherBank, dict[str, float]]:
    """The TeacherBank of this run, and the metrics its first row logs: {"teacher_pass_seconds" (0 when T was
    reused), "teacher_ms_per_step" (the distillation term's measured cost per step)}. T is computed once
    (compute_or_find), or read back from the run on resume; rank 0 writes it into the run directory."""
    features, record, seconds = pending.features, dict(pending.record or {}), 0.0
    if features is not None:
        if features.shape[0] != len(images):
            raise UserError(f"{run_dir / TEACHER_FEATURES} has {features.shape[0]} rows for {len(images)} images: "
                            "it belongs to other data. Start a new run.")
        say(f"Teacher: the features of {len(images)} images are read back from {run_dir / TEACHER_FEATURES} "
            "(no teacher pass).")
    else:
        features, record, seconds = compute_or_find(cfg, pending, images, signature, device, precision, d, say, warn)
    per_step = per_step_teacher(pending.model.to(device), pending.spec, images.size, device, precision) \
        if cfg.teacher_per_step else None
    bank = TeacherBank(features.to(device), cfg.teacher_weight, cfg.teacher_temperature, per_step)
    ms = step_cost_ms(bank, batch, min(len(images), batch + cfg.negatives), images.size, cfg.temperature, device)
    if d.main:
        record["ms_per_step"] = ms
        store_features(run_dir, features, record)
    return bank, {"teacher_pass_seconds": seconds, "teacher_ms_per_step": ms}


def compute_or_find(cfg: PretrainConfig, pending: PendingTeacher, images: ImageSet, signature: dict[str, Any],
                    device: torch.device, precision: str, d: distributed.Dist, say: Callable[[str], None],
                    warn: Callable[[str], None]) -> tuple[Tensor, dict[str, Any], float]:
    """(T (N, d_t), its record, seconds of the pass): from the decoded-image cache's folder (teachers/<key>) when
    this teacher already saw these files, else one forward pass at the teacher's input size (decoding included),
    then kept in that folder for the next run."""
    spec, n = pending.spec, len(images)
    store = cache_folder(cfg.cache_dir)
    key = cache_key(spec, signature)
    cached = store.parent / TEACHERS / f"{key}.safetensors" if store is not None else None
    if cached is not None and cached.is_file():
        features, record = read_features(cached.parent, cached.name)
        if features.shape[0] == n:
            say(f"Teacher {spec.timm_name}: the features of {n} images come from the cache ({cached}; the pass took "
                f"{record.get('seconds', 0):.1f} s when computed).")
            return features, {**spec.record(), **{k: record[k] for k in ("seconds", "rows", "dim") if k in record},
                              "key": key, "reused": str(cached)}, 0.0
    t0 = time.time()
    timgs = images if spec.image_size == images.size else load_image_folder(
        images.root, spec.image_size, paths=images.paths, decode=cfg.decode, warn=warn)
    if len(timgs) != n:
        raise UserError(f"--teacher: {n} images decode at {images.size} px but {len(timgs)} at the teacher's "
                        f"{spec.image_size} px. Remove the unreadable files from '{images.root}'.")
    features = teacher_features(pending.model.to(device), timgs, device, precision, spec.mean, spec.std,
                                TEACHER_BATCH, d, exact=cfg.deterministic)
    seconds = time.time() - t0
    record = {**spec.record(), "rows": n, "dim": features.shape[1], "seconds": seconds, "device": device.type,
              "key": key, "version": TEACHER_VERSION, "data_root": absolute(images.root),
              "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    if cached is not None and d.main:
        cached.parent.mkdir(parents=True, exist_ok=True)
        store_features(cached.parent, features, record, cached.name)
    say(f"Teacher {spec.timm_name}: one pass over {n} images at {spec.image_size} px in {seconds:.1f} s "
        f"({features.shape[1]}-d features; no teacher forward pass during training).")
    return features, record, seconds


def per_step_teacher(model: nn.Module, spec: TeacherSpec, size: int, device: torch.device,
                     precision: str) -> Callable[[Tensor], Tensor]:
    """The per-step teacher (ablation): x (B, 3, size, size) crops normalised with ImageNet statistics -> (B, d_t)
    unit features of the teacher, the crops resized to its input size and normalised its way."""
    from edgessl.data.augment import IMAGENET_MEAN, IMAGENET_STD

    def stats(v):
        return torch.tensor(v, device=device).view(1, 3, 1, 1)

    m_s, s_s, m_t, s_t = stats(IMAGENET_MEAN), stats(IMAGENET_STD), stats(spec.mean), stats(spec.std)

    @torch.no_grad()
    def run(x: Tensor) -> Tensor:
        raw = x.float() * s_s + m_s
        if size != spec.image_size:
            raw = F.interpolate(raw, size=(spec.image_size, spec.image_size), mode="bilinear", antialias=True)
        with autocast(device, precision):
            return F.normalize(model((raw - m_t) / s_t).float(), dim=1)

    return run


def step_cost_ms(bank: TeacherBank, batch: int, cols: int, size: int, tau: float, device: torch.device,
                 reps: int = 5) -> float:
    """Milliseconds the distillation term adds to one step (targets + relational KL, forward and backward) at
    batch `batch` and `cols` bank columns, the median of `reps` timings after one warm-up."""
    n = bank.features.shape[0]
    index = torch.arange(batch, device=device) % n
    col_ids = None if cols >= n else torch.arange(cols, device=device)
    sim = torch.randn(batch, min(cols, n), generator=torch.Generator().manual_seed(0)).to(device).requires_grad_()
    x = torch.zeros(batch, 3, size, size, device=device) if bank.per_step is not None else None
    times = []
    for _ in range(reps + 1):
        _sync(device)
        t0 = time.perf_counter()
        relational_kl(sim, bank.targets(index, col_ids, x=x), tau).backward()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 1000 * sorted(times[1:])[reps // 2]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
