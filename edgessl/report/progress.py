"""Progress display: a rich bar whose ETA comes from a smoothed step rate, and periodic lines for logs."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text


def smoothed_rate(previous: float | None, steps: float, seconds: float, alpha: float = 0.1) -> float | None:
    """Exponential moving average of steps per second: alpha * (steps / seconds) + (1 - alpha) * previous.
    The first measurement is taken as it is; a zero-second interval changes nothing."""
    if seconds <= 0 or steps <= 0:
        return previous
    rate = steps / seconds
    return rate if previous is None else alpha * rate + (1 - alpha) * previous


class SmoothedETA(ProgressColumn):
    """'ETA 1:23': remaining steps over an exponential moving average of the step rate (alpha 0.1, i.e. about the
    last ten updates), so one slow or fast stretch moves the estimate a little, not threefold."""

    def __init__(self, alpha: float = 0.1):
        super().__init__()
        self.alpha = alpha
        self._state: dict[int, tuple[float, float, float | None]] = {}  # task id -> (completed, time, rate)

    def render(self, task: Task) -> Text:
        now = time.monotonic()
        done, seen, rate = self._state.get(task.id, (task.completed, now, None))
        if task.completed > done:
            rate = smoothed_rate(rate, task.completed - done, now - seen, self.alpha)
            done, seen = task.completed, now
        self._state[task.id] = (done, seen, rate)
        if rate is None or task.total is None:
            return Text("ETA -:--:--", style="progress.remaining")
        left = max(0.0, (task.total - task.completed) / rate)
        h, rest = divmod(int(left + 0.5), 3600)
        return Text(f"ETA {h}:{rest // 60:02d}:{rest % 60:02d}", style="progress.remaining")


def training_progress(console) -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        SmoothedETA(),
        console=console,
    )


@contextlib.contextmanager
def file_progress(console, description: str) -> Iterator[Callable[[int, int], None] | None]:
    """A transient bar for a pass over files: yields progress(done, total) (None without a console). The bar appears
    on the first call, so a pass that has nothing to do shows nothing."""
    if console is None:
        yield None
        return
    bar = Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), SmoothedETA(),
                   console=console, transient=True)
    task = None

    def progress(done: int, total: int) -> None:
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task(description, total=total)
        bar.update(task, completed=done)

    try:
        yield progress
    finally:
        if task is not None:
            bar.stop()
