"""Batches assembled ahead of the step that needs them: a background thread gathers the next rows (RAM or memory
map), pins them for an asynchronous copy to the GPU, and hands them over in order through a short queue."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

import torch

from edgessl.data.folder import ImageSet

T = TypeVar("T")
DEPTH = 3  # batches assembled ahead of the step that runs


def gather(images: ImageSet, index: torch.Tensor, pin: bool = False) -> torch.Tensor:
    """uint8 (B, 3, S, S) rows `index` (B,) of `images`; pinned (page-locked) when `pin`, for a non_blocking copy."""
    rows = images.get(index)
    return rows.pin_memory() if pin else rows


class Prefetcher(Generic[T]):
    """Iterate make(i) for i in range(count), computed `depth` items ahead in one background thread.

    An exception in make() is raised by the iteration at the item it failed on; leaving the loop early (break,
    an exception, Ctrl-C) stops the thread (close()). Use as a context manager or call close()."""

    def __init__(self, make: Callable[[int], T], count: int, depth: int = DEPTH):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._count = count
        self._thread = threading.Thread(target=self._work, args=(make,), daemon=True, name="edgessl-prefetch")
        self._thread.start()

    def _work(self, make: Callable[[int], T]) -> None:
        for i in range(self._count):
            try:
                item = (make(i), None)
            except BaseException as e:  # handed to the consumer, raised there
                item = (None, e)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if self._stop.is_set() or item[1] is not None:
                return

    def __iter__(self) -> Iterator[T]:
        for _ in range(self._count):
            value, error = self._queue.get()
            if error is not None:
                raise error
            yield value

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> Prefetcher[T]:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
