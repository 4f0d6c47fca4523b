"""What a run is built from before its first step: the model, the TrainState (bank, optimiser, schedule, scaler),
the initial bank, encoder.json's description and the determinism switches."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from edgessl.config import PretrainConfig, replace
from edgessl.data.augment import IMAGENET_MEAN, IMAGENET_STD
from edgessl.errors import UserError
from edgessl.method.bank import project_rows
from edgessl.method.instance import InstanceDiscrimination
from edgessl.method.teacher import teacher_predictor
from edgessl.models.backbone import ENCODER_WEIGHTS, output_dim, read_encoder_meta
from edgessl.models.channels import parse_widths
from edgessl.models.head import build_encoder
from edgessl.models.slimmable import SlimmableEncoder
from edgessl.report.progress import file_progress
from edgessl.seeding import keyed_generator
from edgessl.train import distributed
from edgessl.train.objective import Teacher
from edgessl.train.optim import build_optimizer, warmup_cosine
from edgessl.train.prepare import (
    forward_init_bank,
)
from edgessl.train.state import TrainState
from edgessl.train.types import Run, WarmStart


def set_determinism(on: bool, device: torch.device) -> None:
    """--deterministic: PyTorch's deterministic algorithms where it has them (an op without one warns once instead
    of stopping the run), cuDNN autotuning off and, on CUDA, a fixed cuBLAS workspace (CUBLAS_WORKSPACE_CONFIG,
    unless set). Bit-exact resume is tested on CPU; on a GPU, ops that only warn can still differ between runs."""
    if not on:
        return
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def init_for_resume(cfg: PretrainConfig, resume: str | Path | None) -> tuple[PretrainConfig, Any]:
    """A resumed run's --init: its weights are in the checkpoint, so the run's own encoder (the same architecture,
    from its encoder.json) stands in for the --init source, which may be gone since, or relative to another folder.
    -> (the config to build from, the run's encoder.json "init" record to keep), or (cfg, None) when there is
    nothing to stand in (not a resume, no --init, or no encoder saved yet)."""
    if resume is None or not cfg.init:
        return cfg, None
    run = Path(resume).expanduser()
    if not (run / "encoder.json").is_file() or not (run / ENCODER_WEIGHTS).is_file():
        return cfg, None
    return replace(cfg, init=str(run)), read_encoder_meta(run).get("init")


def build_model(cfg: PretrainConfig, warm: WarmStart | None, d: distributed.Dist, device: torch.device,
                warn: Callable[[str], None] | None = None, resume: str | Path | None = None):
    """(model: the Encoder or its SlimmableEncoder on `device`, arch, backbone feature dim, widths, Teacher or None).
    Weights from torch's global RNG seeded with cfg.seed, then cfg.init's (or warm.encoder's; on a resume with
    --init, the run's own encoder's: init_for_resume)."""
    torch.manual_seed(cfg.seed)
    build_cfg, kept = init_for_resume(cfg, resume)
    model, arch, feat_dim = build_encoder(build_cfg, warn)
    if kept is not None:
        arch["init"] = kept
    if warm is not None:
        model = warm.encoder
        feat_dim = output_dim(model.backbone, cfg.image_size)
    widths = [1.0]
    if cfg.widths:

        widths = parse_widths(cfg.widths)
        model = SlimmableEncoder(model, widths, torch.zeros(2, 3, cfg.image_size, cfg.image_size))
    teacher = None
    if warm is not None and warm.teacher is not None:
        teacher = Teacher(warm.teacher.to(device).eval().requires_grad_(False), warm.distill)
    if cfg.sync_bn and d.active:
        model = distributed.convert_sync_batchnorm(model, device)
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model, arch, feat_dim, widths, teacher


def add_predictor(cfg: PretrainConfig, model: torch.nn.Module, pending, d: distributed.Dist,
                  device: torch.device) -> torch.nn.Module | None:
    """The --teacher-predictor variant's predictor d -> d_t, added to the model as `teacher_predictor` (so the
    optimiser, the checkpoint and resume carry it; the saved encoder does not). One process only: it is used
    outside the model's forward, which DDP does not synchronise."""
    if pending is None or cfg.teacher_predictor <= 0:
        return None
    if d.active:
        raise UserError("--teacher-predictor runs in one process only; drop it under torchrun.")
    with torch.random.fork_rng(devices=[]):  # the global RNG stays as it was
        torch.manual_seed(cfg.seed + 1)
        model.add_module("teacher_predictor", teacher_predictor(cfg.feature_dim, pending.dim()).to(device))
    return model.teacher_predictor


def new_state(cfg: PretrainConfig, model: torch.nn.Module, n: int, batch: int, device: torch.device,
              precision: str) -> TrainState:
    """A fresh TrainState: the method's bank (random rows until init_bank), SGD/AdamW/LARS at lr x batch / 256,
    warm-up + cosine per step, and a gradient scaler for fp16."""
    method = InstanceDiscrimination(
        n, cfg.feature_dim, cfg.temperature, cfg.negatives, cfg.bank_update, cfg.bank_lr, cfg.bank_momentum,
        cfg.sd_weight, cfg.sd_temperature, cfg.sd_alpha, generator=keyed_generator(cfg.seed, 0xBA4C),
    ).to(device)
    steps = n // batch
    optimizer = build_optimizer(cfg.optimizer, model.parameters(), cfg.lr * batch / 256, cfg.momentum, cfg.weight_decay)
    scheduler = warmup_cosine(optimizer, round(cfg.warmup_epochs * steps), cfg.epochs * steps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    return TrainState(model, method, optimizer, scheduler, scaler, batch)


def init_bank(run: Run, state: TrainState, warm: WarmStart | None, resumed: bool, precision: str,
              tbank=None) -> None:
    """A new run's bank: warm.bank when given, else one forward pass of the untrained network (--bank-init forward),
    the teacher bank projected to d (teacher: project_rows) or the random rows it has (random). A resumed run keeps
    its checkpoint's."""
    n = len(run.images)
    if resumed:
        where = f", step {state.steps_done}" if state.steps_done else ""
        run.say(f"Resuming {run.run_dir} after epoch {state.epoch}/{run.cfg.epochs}{where}.")
    elif warm is not None and warm.bank is not None:
        state.method.bank.fill(torch.arange(n, device=run.device), warm.bank.to(run.device))
    elif run.cfg.bank_init == "teacher":
        state.method.bank.fill(torch.arange(n, device=run.device), project_rows(tbank.features, run.cfg.feature_dim))
        run.say(f"Memory bank: {n} rows from the teacher's features ({tbank.dim} -> {run.cfg.feature_dim} dimensions).")
    elif run.cfg.bank_init == "forward":
        t0 = time.time()
        encoder = getattr(state.model, "encoder", state.model)  # the full width of a SlimmableEncoder
        with file_progress(None if run.quiet else run.console, "memory bank: a forward pass") as progress:
            forward_init_bank(encoder, state.method, run.images, run.device, precision, IMAGENET_MEAN, IMAGENET_STD,
                              256, run.d, run.cfg.seed, progress)
        which = "the --init network" if run.cfg.init else "the untrained network"
        run.say(f"Memory bank: {n} rows filled by a forward pass of {which} ({time.time() - t0:.1f} s).")


def encoder_meta(cfg: PretrainConfig, arch: dict[str, Any], feat_dim: int, widths: list[float],
                 warm: WarmStart | None) -> dict[str, Any]:
    """encoder.json: what rebuilds the backbone and how to feed it."""
    meta = {
        **arch,
        "input_size": [3, cfg.image_size, cfg.image_size],
        "image_size": cfg.image_size,
        "resize": "shorter side to image_size (bicubic), center crop; RGBA/P composited on white",
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "feature_dim": feat_dim,
        "method": cfg.method,
        **(warm.meta if warm is not None else {}),
    }
    if len(widths) > 1:
        meta["widths"] = widths
    return meta
