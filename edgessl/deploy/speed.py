"""Brief speed figures of an exported model on this machine (ONNX Runtime, CPU): batch-1 latency p50/p90 and
throughput at batch 32, measured with export/device_check.py's own functions; and a paired batch-1 comparison of two
models that alternates between them, so that a machine whose load changes during the export slows both alike."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from edgessl.scripts import device_check_module

LATENCY_RUNS = 30  # timed batch-1 runs per model at export (`edgessl check` / device_check.py do >= 100)
WARMUP = 5
THROUGHPUT_BATCH = 32
THROUGHPUT_SECONDS = 0.3  # at least this long and 3 batches
PAIRED_ROUNDS, PAIRED_RUNS = 5, 10  # int8-vs-fp32 decision: 5 alternating rounds of 10 batch-1 runs each


def batch_of(x: np.ndarray, n: int) -> np.ndarray:
    """n images from x (N, 3, S, S), repeating them when N < n."""
    return np.ascontiguousarray(np.resize(x, (n, *x.shape[1:])))


def speed(sess, x: np.ndarray) -> dict[str, Any]:
    """{"batch1_ms": {"p50", "p90", "runs"}, "throughput": {"batch", "images_per_s"}} of one session on images x."""
    dc = device_check_module()
    lat = dc.latency(sess, x[:1], LATENCY_RUNS, WARMUP)
    per_s = dc.throughput(sess, batch_of(x, THROUGHPUT_BATCH), min_seconds=THROUGHPUT_SECONDS)
    return {"batch1_ms": {"p50": lat["p50"], "p90": lat["p90"], "runs": LATENCY_RUNS},
            "throughput": {"batch": THROUGHPUT_BATCH, "images_per_s": float(per_s)}}


def batch1_p50(sess, x1: np.ndarray, runs: int = LATENCY_RUNS) -> float:
    """Median batch-1 latency in ms (after WARMUP runs)."""
    return device_check_module().latency(sess, x1, runs, WARMUP)["p50"]


def paired_p50(sess_a, sess_b, x1: np.ndarray, rounds: int = PAIRED_ROUNDS,
               runs: int = PAIRED_RUNS) -> tuple[float, float]:
    """Median batch-1 ms of two sessions timed in alternating rounds (a, b, a, b, ...)."""
    name_a, name_b = sess_a.get_inputs()[0].name, sess_b.get_inputs()[0].name
    for _ in range(WARMUP):
        sess_a.run(None, {name_a: x1})
        sess_b.run(None, {name_b: x1})
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(rounds):
        for sess, name, out in ((sess_a, name_a, times[0]), (sess_b, name_b, times[1])):
            for _ in range(runs):
                t = time.perf_counter()
                sess.run(None, {name: x1})
                out.append((time.perf_counter() - t) * 1000.0)
    return float(np.median(times[0])), float(np.median(times[1]))


def timed_ms(fn, runs: int, min_seconds: float = 0.5, max_runs: int = 2000) -> float:
    """Median ms of fn() over at least `runs` runs and `min_seconds` (sub-millisecond models get more runs), after
    warm-up."""
    for _ in range(WARMUP):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_runs and (len(times) < runs or time.perf_counter() - start < min_seconds):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    times.sort()
    return float(times[len(times) // 2])
