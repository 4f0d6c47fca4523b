"""The one training loop: for each epoch, for each global batch, train_step (crops -> objective -> optimiser step ->
bank update), then end_epoch (checks, metrics row, checkpoint). Everything around it (building the run, writing
files, the display) sits in the modules beside it; edgessl.train.run.pretrain sets a run up and calls train_epochs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from edgessl.data.augment import IMAGENET_MEAN, IMAGENET_STD
from edgessl.data.loader import Prefetcher, gather
from edgessl.errors import Terminated, TrainingDiverged
from edgessl.report.progress import training_progress
from edgessl.seeding import keyed_generator
from edgessl.train import distributed
from edgessl.train.crops import make_crops
from edgessl.train.meter import EpochMeter
from edgessl.train.objective import Objective
from edgessl.train.output import draw_curves, log_epoch, save_run
from edgessl.train.state import MAX_NONFINITE, TrainState
from edgessl.train.types import Run, StepInfo

COLLAPSE_FRACTION = 0.25  # warn when the bank's per-dimension std falls below this fraction of 1/sqrt(d)


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The order images are visited in an epoch, a function of (seed, epoch) only."""
    return torch.randperm(n, generator=keyed_generator(seed, epoch, 0x5EED))


def train_epochs(run: Run, state: TrainState, objective: Objective, net: torch.nn.Module,
                 on_step: Callable[[StepInfo], None] | None = None) -> None:
    """Every remaining epoch: a seeded order, one train_step per global batch, end_epoch."""
    n, batch = len(run.images), state.batch
    run.progress = None if run.quiet else training_progress(run.console)
    if run.progress is not None:
        run.progress.start()
        run.task = run.progress.add_task("training", total=run.cfg.epochs * (n // batch),
                                         completed=state.epoch * (n // batch), info="")
    try:
        for epoch in range(state.epoch, run.cfg.epochs):
            state.model.train()
            start = state.steps_done if epoch == state.epoch else 0  # > 0: resumed from a mid-epoch checkpoint
            meter = EpochMeter.resumed(state.meter if start else None)
            order = epoch_order(run.cfg.seed, epoch, n)
            batches = order[: n // batch * batch].view(-1, batch)  # (steps, B): the global batch of each step
            with Prefetcher(_rows_of(run, batches[start:]), len(batches) - start) as rows:
                for k, raw in enumerate(rows):  # raw: this process's uint8 rows, assembled in the background
                    step = start + k
                    values = train_step(run, state, objective, net, batches[step], epoch, step, raw)
                    meter.add(values.named(), batch, values.moved)
                    _show_step(run, state, meter, epoch, step, values, on_step is not None)
                    if on_step is not None and bool(values.moved):  # a callback reads the loss: one sync per step
                        on_step(StepInfo(epoch, step, values.loss(), state.model, state.method, run.d.rank))
                    _between_steps(run, state, step + 1, len(batches), meter)
                    _follow_load(run, epoch, step)
            state.steps_done, state.meter = 0, None
            end_epoch(run, state, epoch, meter)
            if epoch + 1 < run.cfg.epochs and _stop_requested(run):  # an epoch of one step has no step between
                raise Terminated()
    finally:
        if run.d.main and state.history and run.plotted not in (-1, state.epoch):
            draw_curves(run, state)  # stopped early (a signal, divergence): curves.png shows every finished epoch
        run.loggers.close(ok=state.epoch == run.cfg.epochs)
        if run.progress is not None:
            run.progress.stop()


STOP_EVERY = 16  # under torchrun, processes agree on a SIGTERM or a due checkpoint every this many steps


def _stop_requested(run: Run) -> bool:
    """SIGTERM came (on any process): the epoch just ended is checkpointed, so the run stops there."""
    return distributed.any_rank(run.stop is not None and run.stop.requested, run.d)


def _between_steps(run: Run, state: TrainState, done: int, steps: int, meter: EpochMeter) -> None:
    """After a step: a mid-epoch checkpoint when --checkpoint-every is due or SIGTERM came (then stop: Terminated).
    With several processes they decide together, every STOP_EVERY steps."""
    if done == steps or (run.d.active and done % STOP_EVERY):
        return
    minutes = run.cfg.checkpoint_every
    due = bool(minutes) and time.time() - run.last_checkpoint >= 60 * minutes
    due, stop = distributed.any_rank(due, run.d), _stop_requested(run)
    if not (due or stop):
        return
    state.steps_done, state.meter = done, meter.state()
    if run.d.main:
        state.save(run.run_dir, len(run.images), run.cfg.to_dict(), run.d.world)
    distributed.barrier(run.d)
    run.last_checkpoint = time.time()
    if stop:
        raise Terminated()


def _thread_changes(run: Run, epoch: int) -> dict[str, Any]:
    """{"thread_changes": [...]} when the governor changed the count during this epoch, else {}."""
    changes = [c for c in (run.governor.changes if run.governor else []) if c["epoch"] == epoch + 1]
    return {"thread_changes": changes} if changes else {}


def _follow_load(run: Run, epoch: int, step: int) -> None:
    """--threads auto: let the governor look at the load (every RECHECK_SECONDS) and say when the count changed."""
    new = run.governor.tick(epoch, step) if run.governor is not None else None
    if new is not None:
        run.threads = new
        run.say(f"CPU: {new.describe()} from epoch {epoch + 1}, step {step + 1}")


def _rows_of(run: Run, batches: torch.Tensor) -> Callable[[int], torch.Tensor]:
    """step -> this process's uint8 rows of global batch batches[step] (pinned for the GPU copy on CUDA)."""
    return lambda step: gather(run.images, batches[step][run.rows], run.device.type == "cuda")


@dataclass
class StepValues:
    """A step's losses averaged over processes, left on the training device (reading them is a host sync).
    names: "loss", "ce", "sd", "ce_w<w>" per sub-width; values: (K,) in that order; moved: () bool, whether the
    weights and the bank moved (False: a non-finite loss, or an fp16 step the gradient scaler skipped)."""
    names: list[str]
    values: torch.Tensor
    moved: torch.Tensor

    def named(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.values, strict=True))

    def loss(self) -> float:
        return float(self.values[0])

    def as_floats(self) -> dict[str, float]:
        return dict(zip(self.names, self.values.tolist(), strict=True))


def train_step(run: Run, state: TrainState, objective: Objective, net: torch.nn.Module, idx: torch.Tensor,
               epoch: int, step: int, raw: torch.Tensor | None = None) -> StepValues:
    """One optimiser step on the global batch `idx` (B,) (raw: this process's uint8 rows of it when already
    gathered): crops, loss, backward, optimiser, then the bank update with the features and bank columns of the
    forward pass (before the step). A non-finite loss skips the step (the schedule advances; MAX_NONFINITE in a row
    stop the run, see TrainState.check_nonfinite); so does an fp16 step whose gradients overflowed (the gradient
    scaler skips it), and the bank does not move either.

    With SGD/AdamW and no gradient scaler the decision stays on the device (TrainState.step_on_device, a masked
    bank update): nothing is read back to the host, so a GPU never waits for the CPU between steps. Otherwise
    (fp16's scaler, LARS) the loss is read back and decided on the host (TrainState.step)."""
    x, mix = make_crops(run, idx, epoch, step, raw)
    res = objective(net, x, idx, epoch, step, mix, run.rows if run.d.active else None)  # idx on the host
    names = ["loss", "ce", "sd", *[f"ce_w{w:g}" for w in res.widths[1:]], *res.logged]
    # the global batch's mean (mean of equal-sized slices' means), identical on every process
    stacked = torch.stack([res.loss.detach().float(), res.out.ce.float(), res.out.sd.float(), *res.sub_ce,
                           *[v.float() for v in res.logged.values()]])
    values = distributed.mean_over_ranks(stacked.float(), run.d)
    gathered = (lambda: distributed.all_gather_cat(res.out.z, run.d)) if run.d.active else (lambda: None)
    if state.on_device:
        moved = state.step_on_device(res.loss, values[0])
        state.method.update_bank(res.out, gathered(), keep=moved)
        return StepValues(names, values, moved)
    moved = state.step(res.loss, float(values[0]), _diverged(run, epoch, step))
    if moved:
        state.method.update_bank(res.out, gathered())
    return StepValues(names, values, torch.tensor(moved))


def _diverged(run: Run, epoch: int, step: int) -> Callable[[], TrainingDiverged]:
    return lambda: TrainingDiverged(
        f"Training diverged: {MAX_NONFINITE} non-finite losses in a row (epoch {epoch + 1}, by step {step + 1}). "
        f"The last good checkpoint is kept in {run.run_dir}. Lower --lr or --bank-lr, or use --precision fp32.")


def end_epoch(run: Run, state: TrainState, epoch: int, meter: EpochMeter) -> dict[str, Any]:
    """Check the weights, make the bank exact on every process, log a metrics row (kNN monitor when due), and on
    rank 0 write the checkpoint, encoder, metrics.jsonl and curves.png. Returns the row."""
    seconds = time.time() - meter.t0
    state.check_nonfinite(_diverged(run, epoch, len(run.images) // state.batch - 1))
    if not all(torch.isfinite(p).all() for p in state.model.parameters()):
        raise TrainingDiverged(f"Training diverged: non-finite weights after epoch {epoch + 1}. The last good "
                               f"checkpoint is kept in {run.run_dir}. Lower --lr or --bank-lr.")
    # every process computed the same bank; rank 0's copy (the one checkpointed) is made exact everywhere so no
    # rounding difference between machines can accumulate
    distributed.broadcast_(state.method.bank.weight, run.d)
    row: dict[str, Any] = {
        "epoch": epoch + 1,
        **meter.means(),
        "lr": state.optimizer.param_groups[0]["lr"],
        "images_per_s": meter.seen / max(seconds, 1e-9),
        "seconds": seconds,
        "bank_feature_std": float(state.method.bank.weight.std(dim=0).mean()),
        "threads": run.threads.threads,
        **_thread_changes(run, epoch),
        **run.every_row,
        **run.first_row,
    }
    run.first_row = {}
    every, last = run.cfg.eval_every, epoch + 1 == run.cfg.epochs
    if run.monitor.active and every and ((epoch + 1) % every == 0 or last):
        row.update(run.monitor(state.model.backbone, run.device, IMAGENET_MEAN, IMAGENET_STD))
    healthy = 1 / math.sqrt(run.cfg.feature_dim)
    if row["bank_feature_std"] < COLLAPSE_FRACTION * healthy:
        run.warn(f"the memory bank is collapsing: feature std {row['bank_feature_std']:.4f}, well below "
                 f"{healthy:.4f} (1/sqrt(d)) for well-spread features. Lower --bank-lr or --lr.")
    state.history.append(row)
    state.epoch = epoch + 1
    if run.d.main:
        save_run(run, state, last)
        run.loggers.log(row, {"curves": run.run_dir / "curves.png"} if last else None)
        log_epoch(run.console, row, run.cfg.epochs, run.progress)
    distributed.barrier(run.d)  # the others wait for rank 0's checkpoint and monitor
    return row


DISPLAY_SECONDS = 0.5  # the progress line's loss (and the non-finite count) is read back at most this often


def _show_step(run: Run, state: TrainState, meter: EpochMeter, epoch: int, step: int, values: StepValues,
               synced: bool) -> None:
    """Advance the progress bar; at most every DISPLAY_SECONDS (or every step when `synced`: a callback reads the
    loss anyway) read the loss back and check the non-finite count: the loop's only host syncs besides end_epoch."""
    now = time.time()
    if not synced and now - run.last_read < DISPLAY_SECONDS:
        if run.progress is not None:
            run.progress.update(run.task, advance=1)
        return
    run.last_read = now
    state.check_nonfinite(_diverged(run, epoch, step))
    if run.progress is None:
        return
    rate = meter.seen / max(now - meter.t0, 1e-9)
    loss = f"{values.loss():.3f}" if bool(values.moved) else "skipped"
    info = f"epoch {epoch + 1}/{run.cfg.epochs} step loss {loss} {rate:.0f} img/s"  # the epoch line: the mean
    run.progress.update(run.task, advance=1, info=info)
