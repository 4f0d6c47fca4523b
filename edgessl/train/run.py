"""Pretraining from options to a trained run directory: every check (edgessl.train.prepare) before anything is
written, then the model, the state and the bank (edgessl.train.build), then the loop (edgessl.train.loop)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape

from edgessl.config import PretrainConfig, replace
from edgessl.data.greyscale import choose_greyscale, colour_under_on, training_augment
from edgessl.demo import demo_images
from edgessl.errors import Terminated, UserError, stopped
from edgessl.loggers import Loggers, check_installed, parse_loggers
from edgessl.method.losses import active_widths
from edgessl.models.backbone import want_small_input
from edgessl.rundir import absolute, absolute_source, plural, run_lock
from edgessl.runtime import StopRequest, pick_device, pick_precision, precision_caution, thread_governor, use_threads
from edgessl.train import distributed
from edgessl.train.build import add_predictor, build_model, encoder_meta, init_bank, new_state, set_determinism
from edgessl.train.loop import train_epochs
from edgessl.train.objective import Objective
from edgessl.train.output import banner
from edgessl.train.prepare import (
    interrupted,
    load_data,
    recount_epochs,
    resolve_auto,
    resolve_bank_lr,
    resolve_batch,
    resolve_temperature,
    target_dir,
    write_history,
    write_run_files,
)
from edgessl.train.teacher import open_teacher, teacher_bank
from edgessl.train.types import Evaluation, NoMonitor, PretrainResult, Run, StepInfo, WarmStart, warner

AUTO_LABELS = {"image_size": "Image size", "epochs": "Epochs", "temperature": "Temperature",  # the banner's lines
               "bank_lr": "Bank step"}


def pretrain(
    cfg: PretrainConfig,
    resume: str | Path | None = None,
    console: Console | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
    warm: WarmStart | None = None,
    overwrite: bool = False,
    evaluation: Evaluation | None = None,
) -> PretrainResult:
    """Pretrain an encoder with the single-branch method. See docs/method.md for every option.

    With cfg.widths the encoder is a SlimmableEncoder trained at every width (slow start, online distillation,
    loss re-weighting); the bank follows the full width. warm: start from given weights (see WarmStart).

    resume: a run directory to continue after its last completed epoch (cfg should be its config.yaml).
    overwrite: a non-empty cfg.out is moved aside (edgessl.rundir) instead of refused.
    on_step(StepInfo): called after every optimiser step (custom logging, tests), on every process.
    evaluation: the kNN monitor and the per-width report (see Evaluation; None: neither).

    Every check (options, data, the resumed checkpoint) passes before anything is written into the run directory.
    Under torchrun (WORLD_SIZE > 1) each process trains on its slice of every global batch with DDP and the same
    memory bank; only rank 0 prints and writes files (see docs/distributed.md). Without torchrun no
    process group is created.
    """
    if resume is None:  # a resume keeps its checkpoint's global batch (resolve_batch checks that one)
        distributed.check_global_batch(cfg.batch_size, distributed.env_world())
    d, device = distributed.setup(pick_device(cfg.device))
    finished = False
    try:
        with StopRequest() as stop, run_lock(resume if d.main else None), contextlib.ExitStack() as held:
            result = _pretrain(cfg, resume, console or Console(), on_step, d, device, warm, overwrite,
                               evaluation or Evaluation(), stop, held)
        finished = True
        return result
    except KeyboardInterrupt as e:
        raise stopped(e, " before training started: nothing was written.") from None
    finally:
        distributed.teardown(d, clean=finished)


def _pretrain(cfg: PretrainConfig, resume: str | Path | None, console: Console, on_step, d: distributed.Dist,
              device: torch.device, warm: WarmStart | None, overwrite: bool, evaluation: Evaluation,
              stop=None, held: contextlib.ExitStack | None = None) -> PretrainResult:
    check_installed(parse_loggers(cfg.logger))  # a missing logger package fails before anything is written
    threads = use_threads(cfg.threads)
    set_determinism(cfg.deterministic, device)
    precision = pick_precision(cfg.precision, device)
    cfg, chosen, scanned = resolve_auto(cfg)
    # a wrong backbone fails before any data is read
    model, arch, feat_dim, widths, teacher = build_model(cfg, warm, d, device, warner(console, d), resume)
    run_dir, ckpt = target_dir(cfg, resume, overwrite, d)  # checks only
    if ckpt is not None:
        check_kept_settings(cfg, ckpt, run_dir)
    if ckpt is not None and ckpt["epoch"] >= cfg.epochs:
        return _already_complete(cfg, run_dir, ckpt, console, d)
    quiet = cfg.quiet or not d.main
    warn = warner(console, d)
    if caution := precision_caution(precision, device):
        warn(caution)
    pending = open_teacher(cfg, run_dir if ckpt is not None else None, warn)  # a wrong --teacher fails here
    predictor = add_predictor(cfg, model, pending, d, device)
    images, val, signature = load_data(cfg, run_dir if resume else None, None if quiet else console, d, warn, scanned)
    cfg = recount_epochs(cfg, chosen, scanned, len(images))
    grey = choose_greyscale(cfg.greyscale, images)
    caution = colour_under_on(cfg.greyscale, images) if d.main else None
    if caution:
        warn(caution)
    cfg, said = resolve_temperature(cfg, images)
    chosen.update(said)
    cfg, said = resolve_bank_lr(cfg)
    chosen.update(said)
    batch = resolve_batch(cfg, len(images), d, warn, ckpt.get("batch") if ckpt else None)
    state = new_state(cfg, model, len(images), batch, device, precision)
    if ckpt is not None:  # every process reads it: any number of processes continues any run
        state.restore(ckpt, run_dir, len(images))
    monitor = NoMonitor() if evaluation.monitor is None else evaluation.monitor(
        images if cfg.eval_every > 0 and d.main else None, val, cfg.monitor_queries, cfg.seed,
        off="--eval-every 0" if cfg.eval_every <= 0 else "no labels")
    cfg = replace(cfg, data=absolute(cfg.data), val=absolute(cfg.val), out=absolute(run_dir),
                  init=absolute_source(cfg.init), teacher=absolute_source(cfg.teacher))
    meta = {**encoder_meta(cfg, arch, feat_dim, widths, warm), **({"greyscale": True} if grey.on else {}),
            **({"auto": chosen} if chosen else {})}
    run = Run(cfg, d, device, run_dir, images, distributed.local_rows(batch, d.rank, d.world), monitor, meta, threads,
              console, quiet, training_augment(cfg.blur, grey), stop=stop,
              governor=thread_governor(threads, cfg.deterministic))
    # ---- every check has passed: from here on the run directory is written
    files = write_run_files(run_dir, ckpt is not None, overwrite, cfg, images, signature, warn) if d.main else None
    _hold(held, run_dir if files is not None and resume is None else None)  # a new run: a resume waits for its end
    run.loggers = Loggers(parse_loggers(cfg.logger), run_dir, cfg.to_dict(), warn,
                          say=lambda text: run.say(escape(text))) if d.main else Loggers()
    try:
        tbank = None
        if pending is not None:
            tbank, run.first_row = teacher_bank(cfg, pending, run_dir, images, signature, device, precision, d,
                                                state.batch, run.say, warn)
            run.every_row = {"teacher_ms_per_step": run.first_row["teacher_ms_per_step"]}
            del pending  # the teacher network is freed unless the per-step ablation holds it
        objective = Objective(state.method, cfg.seed, cfg.epochs, device, precision, widths, cfg.slow_start,
                              cfg.width_distill, cfg.width_reweight, teacher, tbank, predictor, cfg.teacher_predictor)
        init_bank(run, state, warm, ckpt is not None, precision, tbank)
        if files is not None:
            files.written.append(write_history(run_dir, state.history))
        unused = objective.slim and active_widths(widths, state.epoch, cfg.epochs, cfg.slow_start) != widths
        net = distributed.wrap_model(model, d, device, find_unused=unused)  # `model` stays the unwrapped one
        if ckpt is not None:
            run.first_row["resumed"] = True  # curves.png marks where this invocation took over
        banner(run, state, precision, arch)
        for name, text in chosen.items():
            run.say(f"{AUTO_LABELS[name]}: {text}")
        if grey.on or grey.mixed or cfg.greyscale != "auto":
            run.say(f"Colour: {grey.describe()}")
        train_epochs(run, state, objective, net, on_step)
        if objective.slim and d.main and evaluation.widths_report is not None:
            evaluation.widths_report(run_dir, widths, images if images.labels is not None else None, val, device,
                                     None if quiet else console)
        run.say(f"Done. Encoder: {run_dir / 'encoder.safetensors'} (+ encoder.json). Curves: {run_dir / 'curves.png'}")
        return PretrainResult(run_dir, state.history, data=images.root, labelled=images.labels is not None)
    except KeyboardInterrupt as e:
        raise interrupted(files, run_dir, isinstance(e, Terminated)) from None
    except Exception:  # a failure before the first checkpoint leaves no half-made run behind, as Ctrl-C does not
        if files is not None:
            files.abandon()
        raise


def _hold(held: contextlib.ExitStack | None, run_dir: Path | None) -> None:
    """Lock a new run's folder (edgessl.rundir.run_lock) until pretraining returns (`held` closes it)."""
    if held is not None and run_dir is not None:
        held.enter_context(run_lock(run_dir))


def check_kept_settings(cfg: PretrainConfig, ckpt: dict[str, Any], run_dir: Path) -> None:
    """UserError when a resume changes the encoder's input: the image size or the stem (--small-input, as resolved).
    The weights fit any size, so a changed --image-size had trained the last epochs at another size and recorded
    that size for the whole run. Likewise the teacher: its bank is stored with the run, so another --teacher had been
    recorded in config.yaml without being used."""
    was = ckpt.get("config", {})
    if absolute_source(was.get("teacher")) != absolute_source(cfg.teacher):
        how = f"distilled from --teacher {was['teacher']}" if was.get("teacher") else "trained without a teacher"
        raise UserError(f"Cannot resume '{run_dir}': it was {how}, not --teacher {cfg.teacher}: a run keeps its "
                        f"teacher. Resume without --teacher, or start a new run from its weights: --init {run_dir} "
                        f"--teacher {cfg.teacher}.")
    size = was.get("image_size", "auto")
    if size == "auto":  # not recorded: nothing to compare
        return
    changed = None
    if int(size) != cfg.image_size:
        changed = f"--image-size {size} px, not {cfg.image_size} px"
    elif want_small_input(was.get("small_input", "auto"), int(size)) != want_small_input(cfg.small_input, int(size)):
        changed = f"--small-input {was.get('small_input', 'auto')}, not {cfg.small_input}"
    if changed:
        raise UserError(f"Cannot resume '{run_dir}': it trains with {changed}: a run keeps its input. Resume without "
                        f"that option, or start a new run from its weights: --init {run_dir}.")


def _already_complete(cfg: PretrainConfig, run_dir: Path, ckpt: dict[str, Any], console: Console,
                      d: distributed.Dist) -> PretrainResult:
    done = ckpt["epoch"]
    what = (f"all {plural(done, 'epoch')}" if done == cfg.epochs else
            f"{plural(done, 'epoch')}, more than --epochs {cfg.epochs} (a larger --epochs continues it)")
    missing = [n for n in ("encoder.safetensors", "encoder.json") if not (run_dir / n).is_file()]
    where = (f"encoder: {run_dir / 'encoder.safetensors'}" if not missing else
             f"but its {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing: --epochs {done + 1} "
             "trains one more epoch and writes the encoder again")
    if d.main:  # even with --quiet: it is the command's whole answer
        console.print(f"Nothing to resume: {run_dir} has completed {what} ({where}).", highlight=False)
    data = Path(cfg.data) if cfg.data else demo_images()
    return PretrainResult(run_dir, ckpt["history"], data=data, labelled=cfg.labels_from_folders or not cfg.data,
                          already_complete=True)
