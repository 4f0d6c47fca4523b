"""Speed of exported models on this machine, by the one latency routine (export/device_check.py's timed_rounds, which
the device check itself uses): warm-up, then rounds that take turns between the models compared, each figure a
median with its spread (the lowest and highest round median), and "no clear difference" when two spreads overlap.
Every precision of an export is timed in the same rounds, once: one figure per model and batch size."""

from __future__ import annotations

from typing import Any

import numpy as np

from edgessl.scripts import device_check_module

ROUNDS, RUNS, WARMUP = 5, 10, 3  # batch 1: 5 alternating rounds of 10 runs per model
THROUGHPUT_BATCH, THROUGHPUT_ROUNDS, THROUGHPUT_RUNS = 32, 3, 2


def batch_of(x: np.ndarray, n: int) -> np.ndarray:
    """n images from x (N, 3, S, S), repeating them when N < n."""
    return np.ascontiguousarray(np.resize(x, (n, *x.shape[1:])))


def _runner(sess, x: np.ndarray):
    name = sess.get_inputs()[0].name
    return lambda: sess.run(None, {name: x})


def measure(sessions: dict[str, Any], x: np.ndarray) -> dict[str, dict[str, Any]]:
    """{name: {"batch1_ms": {"p50", "p90", "low", "high", "runs"}, "throughput": {"batch", "images_per_s", "low",
    "high"}}} of ONNX Runtime sessions on images x (N, 3, S, S), all timed in the same alternating rounds."""
    dc = device_check_module()
    lat = dc.timed_rounds({k: _runner(s, x[:1]) for k, s in sessions.items()}, ROUNDS, RUNS, WARMUP)
    xb = batch_of(x, THROUGHPUT_BATCH)
    thr = dc.timed_rounds({k: _runner(s, xb) for k, s in sessions.items()}, THROUGHPUT_ROUNDS, THROUGHPUT_RUNS, 1)
    per_s = 1000.0 * THROUGHPUT_BATCH
    return {k: {"batch1_ms": {"p50": lat[k]["median_ms"], "p90": lat[k]["p90_ms"], "low": lat[k]["low_ms"],
                              "high": lat[k]["high_ms"], "runs": lat[k]["runs"]},
                "throughput": {"batch": THROUGHPUT_BATCH, "images_per_s": per_s / thr[k]["median_ms"],
                               "low": per_s / thr[k]["high_ms"], "high": per_s / thr[k]["low_ms"]}}
            for k in sessions}


def verdict(a: dict[str, Any], b: dict[str, Any]) -> str:
    """"faster" | "slower" | "no clear difference": batch-1 latency of speed entry a against b (measure())."""
    return device_check_module().verdict(
        {"low_ms": a["batch1_ms"]["low"], "high_ms": a["batch1_ms"]["high"]},
        {"low_ms": b["batch1_ms"]["low"], "high_ms": b["batch1_ms"]["high"]})


def timed_ms(fn, runs: int = RUNS) -> float:
    """Median ms of fn() (any callable, e.g. a PyTorch forward), by the same routine."""
    return device_check_module().timed_rounds({"fn": fn}, ROUNDS, max(1, runs // ROUNDS), WARMUP)["fn"]["median_ms"]
