"""Everything before the first training step: where the run goes, the data and its identity, the batch, the
bank initialisation, and the run directory's first files. Every check here passes before anything is written."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from edgessl.config import PretrainConfig, replace, save_config
from edgessl.data.augment import test_transform
from edgessl.data.auto import choose_epochs, choose_image_size, header_sizes
from edgessl.data.folder import ImageSet, load_image_folder, write_skipped
from edgessl.data.loader import Prefetcher, gather
from edgessl.data.lookalike import LOOKALIKE_SAMPLE, choose_temperature, lookalike_score
from edgessl.data.signature import describe_difference, files_hash, folder_signature, scan_images
from edgessl.demo import demo_images
from edgessl.errors import Interrupted, UserError, stop_words
from edgessl.fileio import atomic_write_text
from edgessl.method.bank import BANK_STEP, auto_bank_lr
from edgessl.report.progress import file_progress
from edgessl.rundir import (
    CHECKPOINT,
    RunDir,
    check_out,
    claim,
    default_run_dir,
    plural,
    resume_problem,
)
from edgessl.runtime import autocast
from edgessl.seeding import keyed_generator
from edgessl.train import distributed
from edgessl.train.checkpoint import load_checkpoint

BANK_BATCH_DIVISOR = 10  # a step's batch covers at most this fraction of the bank (see bank_batch_cap)
DATA_RECORD = "data.json"  # the training folder's signature (edgessl.data.signature), compared by --resume


def bank_batch_cap(n: int, multiple: int = 8) -> int:
    """Largest batch for a bank of n rows: n / BANK_BATCH_DIVISOR rounded down to a multiple of `multiple`, and never
    below `multiple`. Measured on the bundled demo (360 images): at batch 128 (36% of the bank per step) L_ce climbs
    above log N and kNN falls below the untrained network's; at batch 32 (9%) both improve every epoch."""
    return max(multiple, n // BANK_BATCH_DIVISOR // multiple * multiple)


def bank_init_order(seed: int, n: int) -> torch.Tensor:
    """(n,) the order the bank initialisation visits the images: a permutation seeded by `seed` only, so each
    BatchNorm batch mixes images from the whole folder (class folders sorted by path would give one-class batches)."""
    return torch.randperm(n, generator=keyed_generator(seed, 0xB1A5))


@torch.no_grad()
def forward_init_bank(
    model, method, images: ImageSet, device, precision, mean, std, batch_size: int, d: distributed.Dist | None = None,
    seed: int = 0, progress: Callable[[int, int], None] | None = None,
) -> None:
    """Fill every bank row with the untrained network's feature of its image.

    Order: bank_init_order(seed, N), in chunks of `batch_size` (gathered ahead in a background thread).
    Transform: the test transform (the cached resize, no augmentation). BatchNorm: train mode, i.e. batch
    statistics as in the training forward pass, with the running statistics restored afterwards, so the
    initialisation leaves the network exactly as it was.
    d: under torchrun, each chunk of `batch_size` rows is split over the processes and the features are gathered,
    so every process fills the same bank (with SyncBatchNorm the rows equal one process's).
    progress(rows done, rows): after each chunk (file_progress's bar: 50,000 images had taken a minute unseen)."""
    d = d or distributed.Dist()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    done = 0
    for idx, raw in forward_chunks(images, bank_init_order(seed, len(images)), batch_size, d, device):
        x = test_transform(raw, mean, std)  # NCHW: channels_last convolutions round differently by batch size,
        # and 2 processes must fill the bank of 1 (tests/test_distributed.py)
        with autocast(device, precision):
            z = model(x)
        z = distributed.all_gather_cat(F.normalize(z.float(), dim=1), d, distributed.split_sizes(len(idx), d.world))
        method.bank.fill(idx.to(device), z)
        done += len(idx)
        if progress is not None:
            progress(done, len(images))
    model.load_state_dict(saved)


def forward_chunks(images: ImageSet, order: torch.Tensor, batch_size: int, d: distributed.Dist,
                   device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(idx (b,) rows of a chunk of `order`, this process's uint8 images of it on `device`) for each chunk of
    `batch_size` rows in turn; each chunk is split over the processes (rank r gets idx.tensor_split(world)[r]) and
    gathered ahead in a background thread."""
    chunks = order.tensor_split(max(1, math.ceil(len(order) / batch_size)))
    mine = lambda i: chunks[i].tensor_split(d.world)[d.rank]  # noqa: E731
    with Prefetcher(lambda i: gather(images, mine(i), device.type == "cuda"), len(chunks)) as rows:
        for idx, raw in zip(chunks, rows, strict=True):
            yield idx, raw.to(device, non_blocking=True)


def resolve_auto(cfg: PretrainConfig) -> tuple[PretrainConfig, dict[str, str], list[Path] | None]:
    """--image-size auto and --epochs auto chosen from the training folder (edgessl.data.auto): the config with the
    numbers (config.yaml records what ran), {option: "N (why)"} for the banner and encoder.json, and the folder's
    files when it was scanned (load_data takes them rather than scanning again). A folder that does not exist is
    left to load_data's error."""
    wanted = [name for name in ("image_size", "epochs") if getattr(cfg, name) == "auto"]
    if not wanted:
        return cfg, {}, None
    root = cfg.data if cfg.data is not None else str(demo_images())
    paths = scan_images(root) if Path(root).is_dir() else None
    chosen, said = {}, {}
    if "image_size" in wanted:
        size = choose_image_size(header_sizes(paths or []))
        chosen["image_size"], said["image_size"] = size.value, f"{size.value} px ({size.reason})"
    if "epochs" in wanted:
        epochs = choose_epochs(len(paths or []))
        chosen["epochs"], said["epochs"] = epochs.value, f"{epochs.value} ({epochs.reason})"
    return replace(cfg, **chosen), said, paths


def recount_epochs(cfg: PretrainConfig, chosen: dict[str, str], scanned: list[Path] | None,
                   n_images: int) -> PretrainConfig:
    """--epochs auto counted the files found (resolve_auto); when decoding skipped some, the budget is set again for
    the images that train (1,800 unreadable files among 2,000 had given 22 epochs to 200 images, not 100)."""
    if "epochs" not in chosen or scanned is None or n_images == len(scanned):
        return cfg
    epochs = choose_epochs(n_images)
    chosen["epochs"] = (f"{epochs.value} ({epochs.reason}; the {len(scanned) - n_images:,} unreadable files are not "
                        "counted)")
    return replace(cfg, epochs=epochs.value)


def resolve_temperature(cfg: PretrainConfig, images: ImageSet) -> tuple[PretrainConfig, dict[str, str]]:
    """--temperature auto chosen from the decoded training images (edgessl.data.lookalike): the config with the
    number (config.yaml records what ran) and {"temperature": "tau (why)"} for the banner and encoder.json."""
    if cfg.temperature != "auto":
        return cfg, {}
    choice = choose_temperature(lookalike_score(images), min(len(images), LOOKALIKE_SAMPLE))
    return replace(cfg, temperature=choice.value), {"temperature": f"{choice.value:g} ({choice.reason})"}


def resolve_bank_lr(cfg: PretrainConfig) -> tuple[PretrainConfig, dict[str, str]]:
    """--bank-lr auto from the (resolved) temperature (edgessl.method.bank.auto_bank_lr): the config with the number
    and {"bank_lr": "eta (why)"} for the banner and encoder.json (nothing said under --bank-update momentum, which
    does not read it)."""
    if cfg.bank_lr != "auto":
        return cfg, {}
    eta = auto_bank_lr(cfg.temperature)
    why = (f"{eta:g} (auto: {BANK_STEP:g} / tau {cfg.temperature:g}, the bank's step of eta 1 at tau 0.1; NEU-DET "
           f"at tau 0.2: linear@10 +0.02 over eta 1 on 5 seeds, --bank-lr 1 for the old step)")
    return replace(cfg, bank_lr=eta), ({"bank_lr": why} if cfg.bank_update == "grad" else {})


def target_dir(cfg: PretrainConfig, resume: str | Path | None, overwrite: bool, d: distributed.Dist):
    """(run directory, checkpoint dict or None): checks only, nothing is written."""
    if resume:
        run_dir = Path(resume)
        problem = resume_problem(run_dir)
        if problem:
            raise UserError(problem)
        return run_dir, load_checkpoint(run_dir, map_location="cpu")
    run_dir = Path(cfg.out) if cfg.out else default_run_dir(cfg.backbone)
    run_dir = Path(distributed.broadcast_object(str(run_dir), d))  # rank 0's time stamp
    if d.main:  # only rank 0 writes (and it may claim the folder before another process gets here)
        check_out(run_dir, overwrite)
    return run_dir, None


def load_data(cfg: PretrainConfig, resumed: Path | None, console, d: distributed.Dist, warn: Callable[[str], None],
              scanned: list[Path] | None = None):
    """(training ImageSet, --val ImageSet or None, the training folder's signature). resumed: the run directory
    of a resume, whose recorded data must be the same files (refused before any decoding otherwise). console:
    a rich Console for messages and the progress bar, or None (quiet); warn: a damaged disk cache is reported here.
    scanned: the folder's files when resolve_auto has listed them already."""
    data_root, labels = cfg.data, cfg.labels_from_folders
    if data_root is None:
        data_root, labels = str(demo_images()), True
        if console is not None:
            console.print(f"No --data given: training on the bundled demo images ({data_root}).")
    elif resumed is not None and not Path(data_root).exists():
        raise UserError(
            f"Cannot resume '{resumed}': its data folder '{data_root}' does not exist any more. If it moved, pass "
            "--data with its new location (the files are checked against the run's record)."
        )
    paths = scanned if scanned is not None else scan_images(data_root)
    if resumed is not None:  # the files the run skipped as unreadable are not part of it: gone, fixed or still there
        skipped = recorded_skipped(resumed, data_root)
        paths = [p for p in paths if os.path.relpath(p, data_root) not in skipped]
    signature = folder_signature(data_root, paths)
    if resumed is not None:
        check_same_data(resumed, signature, skipped, warn if d.main else None)
    with file_progress(console, "reading images") as progress:
        images = load_image_folder(data_root, cfg.image_size, labels=labels, decode=cfg.decode, paths=paths,
                                   warn=warn, progress=progress, signature=signature)
    val = None
    if cfg.val and d.main:  # the kNN monitor runs on rank 0 only
        val = load_image_folder(cfg.val, cfg.image_size, labels=True, decode=cfg.decode, what="--val", warn=warn)
    return images, val, signature


def recorded_skipped(run_dir: Path, data_root: str | Path) -> set[str]:
    """The relative paths a run skipped as unreadable (data.json's "skipped"; older runs: skipped_files.txt)."""
    record = run_dir / DATA_RECORD
    if record.is_file() and "skipped" in (data := json.loads(record.read_text())):
        return set(data["skipped"])
    listed = run_dir / "skipped_files.txt"
    if not listed.is_file():
        return set()
    return {os.path.relpath(line.split("\t")[0], data_root) for line in listed.read_text().splitlines() if line}


def check_same_data(run_dir: Path, signature: dict[str, Any], skipped: set[str] = frozenset(),
                    warn: Callable[[str], None] | None = None) -> None:
    """Refuse to resume on other files than the run recorded in data.json, the files it skipped as unreadable left
    out on both sides (runs without a record: the image count is compared after decoding, and `warn` says so)."""
    record = run_dir / DATA_RECORD
    if not record.is_file():
        if warn is not None and (run_dir / CHECKPOINT).is_file():  # deleted: a swapped image would go unseen
            warn(f"{run_dir / DATA_RECORD} is missing, so only the number of images is checked against the run's "
                 "training folder: an image replaced by another would go unnoticed (the resume writes a new record).")
        return
    old = json.loads(record.read_text())["data"]
    if skipped:
        kept = [f for f in old["files"] if f[0] not in skipped]
        old = {**old, "files": kept, "sha256": files_hash(kept)}
    diff = describe_difference(old, signature)
    if diff:
        raise UserError(
            f"Cannot resume '{run_dir}': '{signature['root']}' does not hold the images it was trained on "
            f"(from '{old['root']}'): {diff}. Pass --data with the original files, or start a new run."
        )


def resolve_batch(cfg: PretrainConfig, n: int, d: distributed.Dist, warn: Callable[[str], None],
                  fixed: int | None = None) -> int:
    """The global batch: --batch-size, shrunk to the data set and to bank_batch_cap(n, 8 x processes), with a
    warning. fixed: the batch a resumed run started with (its checkpoint's), kept whatever the process count now,
    so steps and schedule do not change."""
    if fixed is not None:
        if fixed % d.world:
            raise UserError(f"Cannot resume with {d.world} processes: the run's global batch {fixed} is not divisible "
                            "by it. Use a number of processes that divides it.")
        return fixed
    batch, cap = cfg.batch_size, bank_batch_cap(n, 8 * d.world)
    share = "a tenth" if BANK_BATCH_DIVISOR == 10 else f"1/{BANK_BATCH_DIVISOR}"
    rule = (f"{share} of the data set in multiples of {8 * d.world}, at least {8 * d.world}: larger batches "
            "destabilise the memory bank on small data")
    if n < batch:
        batch = n - n % d.world
        if batch == 0:
            raise UserError(f"only {n} images for {d.world} processes: every process needs at least one per step.")
        if batch > cap:  # one warning, with the batch the run gets
            warn(f"only {n} images, fewer than --batch-size {cfg.batch_size}: the batch shrinks to {cap} ({rule}).")
            return cap
        warn(f"only {n} images, fewer than --batch-size {cfg.batch_size}: the batch shrinks to {batch}.")
    if batch > cap:
        warn(f"--batch-size {batch} would cover {batch / n:.0%} of the {n} images per step; the batch shrinks to {cap} "
             f"({rule}).")
        batch = cap
    return batch


def write_run_files(run_dir: Path, resumed: bool, overwrite: bool, cfg: PretrainConfig, images: ImageSet,
                     signature: dict[str, Any], warn: Callable[[str], None]) -> RunDir:
    """Every check has passed: claim the folder (a new run) and write config.yaml, data.json, skipped_files.txt."""
    run = RunDir(run_dir) if resumed else claim(run_dir, overwrite)
    if run.moved_to is not None:
        warn(f"--overwrite: the previous contents of {run_dir} are now in {run.moved_to}.")
    if images.skipped:
        first = ", ".join(str(p) for p, _ in images.skipped[:3])
        warn(f"skipped {len(images.skipped)} unreadable file(s) (first: {first}); "
             f"all are listed in {run_dir / 'skipped_files.txt'}.")
        run.written.append(write_skipped(images.skipped, run_dir / "skipped_files.txt"))
    run.written.append(save_config(cfg, run_dir / "config.yaml"))
    skipped = {os.path.relpath(p, images.root) for p, _ in images.skipped}
    if resumed:  # a resume left the files skipped before out of its scan: they stay recorded as skipped
        skipped |= recorded_skipped(run_dir, images.root)
    skipped = sorted(skipped)
    run.written.append(atomic_write_text(run_dir / DATA_RECORD, json.dumps(
        {"data": signature, "val": cfg.val, "skipped": skipped}) + "\n"))
    return run


def interrupted(run: RunDir | None, run_dir: Path, terminated: bool = False) -> Interrupted:
    """The Ctrl-C / SIGTERM message: what is kept, and how to continue (a run with no checkpoint is removed).
    Exit code 130 (Ctrl-C) or 143 (SIGTERM)."""
    code, what = stop_words(terminated)
    if run is not None and not run.has_checkpoint():
        restored = run.abandon()
        gone = (f" (the earlier run is back in {run_dir})" if restored else
                f" ({run_dir} was removed)" if not run_dir.exists() else "")
        return Interrupted(f"{what} before the first checkpoint: there is nothing to resume{gone}.", code)
    ckpt = load_checkpoint(run_dir)
    kept = plural(ckpt["epoch"], "completed epoch")
    if ckpt.get("step"):
        kept += f" and {plural(ckpt['step'], 'step')} of epoch {ckpt['epoch'] + 1}"
    head = f"{what}. {kept} checkpointed in {run_dir}"
    return Interrupted(f"{head}: continue with edgessl pretrain --resume {run_dir}", code, kept=head)


def write_history(run_dir: Path, history: list[dict[str, Any]]) -> Path:
    return atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))
