"""What a pretraining run carries and returns: the fixed context of a run (Run), the result, a warm start, what a
step callback sees, and the evaluation hooks the caller hands in (so that train/ imports no later package)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape

from edgessl.config import PretrainConfig
from edgessl.data.augment import AugmentConfig
from edgessl.data.folder import ImageSet
from edgessl.loggers import Loggers
from edgessl.method.instance import InstanceDiscrimination
from edgessl.runtime import ThreadChoice, ThreadGovernor
from edgessl.train import distributed


@dataclass
class StepInfo:
    """What an `on_step` callback sees after each optimiser step."""
    epoch: int
    step: int
    loss: float
    model: torch.nn.Module  # the unwrapped model (never the DDP wrapper)
    method: InstanceDiscrimination
    rank: int = 0  # this process's rank under torchrun, 0 otherwise


@dataclass
class WarmStart:
    """Start from given weights instead of a fresh network (`edgessl prune`'s recovery pretraining).

    encoder: an Encoder (backbone + head), e.g. physically pruned; meta: extra encoder.json keys (how to rebuild
    it); teacher: a frozen Encoder whose distribution over the bank columns the student also matches (soft
    cross-entropy, weight `distill`, own loss weight 1 - distill); bank: (N, d) initial bank rows (None: forward
    pass of `encoder`)."""
    encoder: torch.nn.Module
    meta: dict[str, Any] = field(default_factory=dict)
    teacher: torch.nn.Module | None = None
    bank: torch.Tensor | None = None
    distill: float = 0.5


@dataclass
class PretrainResult:
    run_dir: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    report: list[dict[str, Any]] | None = None  # widths.json entries (`edgessl prune`)
    data: Path | None = None  # the training folder
    labelled: bool = False  # its subfolders were used as labels (the demo, --labels-from-folders)
    already_complete: bool = False  # a --resume that found every epoch done (nothing was trained or written)

    @property
    def encoder(self) -> Path:
        return self.run_dir / "encoder.json"


class NoMonitor:
    """No kNN monitor (no labels, or none given): the stand-in the loop asks."""
    active = False

    def describe(self) -> str:
        return "off"


@dataclass
class Evaluation:
    """What the loop measures besides training, handed in by the caller (edgessl.api) so that train/ imports no
    later layer. monitor(train ImageSet or None, --val ImageSet or None, max queries, seed) -> a monitor (`active`,
    `describe()`, `__call__(backbone, device, mean, std) -> metrics`), e.g. edgessl.evaluate.monitor.Monitor;
    widths_report(run_dir, widths, labelled ImageSet or None, val, device, console) after a --widths run."""
    monitor: Callable[..., Any] | None = None
    widths_report: Callable[..., Any] | None = None


@dataclass
class Run:
    """What stays fixed while a run trains: its options, processes, device, folder, data, monitor and display."""
    cfg: PretrainConfig
    d: distributed.Dist
    device: torch.device
    run_dir: Path
    images: ImageSet
    rows: slice  # this process's rows of every global batch (all of them with one process)
    monitor: Any  # see Evaluation
    meta: dict[str, Any]  # encoder.json
    threads: ThreadChoice
    console: Console
    quiet: bool
    aug: AugmentConfig = field(default_factory=AugmentConfig)
    progress: Any = None
    task: Any = None
    last_read: float = 0.0  # when the loop last read values back from the device (see _show_step)
    loggers: Loggers = field(default_factory=Loggers)  # --logger (rank 0; Loggers() logs nothing)
    first_row: dict[str, Any] = field(default_factory=dict)  # merged into this invocation's first metrics row
    every_row: dict[str, Any] = field(default_factory=dict)  # merged into every metrics row
    stop: Any = None  # edgessl.runtime.StopRequest: SIGTERM asks the loop to checkpoint and stop
    last_checkpoint: float = field(default_factory=time.time)  # when the last checkpoint was written
    last_plot: float = 0.0  # when curves.png was last drawn (edgessl.train.output.save_run)
    plotted: int = -1  # the epochs curves.png shows (-1: not drawn by this invocation)
    governor: ThreadGovernor | None = None  # --threads auto: the count follows the load between steps

    def say(self, msg: str) -> None:
        if not self.quiet:
            self.console.print(msg, highlight=False)

    def warn(self, msg: str) -> None:
        warner(self.console, self.d)(msg)


def warner(console: Console, d: distributed.Dist) -> Callable[[str], None]:
    """A warning line on rank 0 (the others stay silent)."""
    def warn(msg: str) -> None:
        if d.main:
            console.print(f"[yellow]warning:[/yellow] {escape(msg)}", highlight=False)  # its brackets are text

    return warn
