"""int8 that searches before it gives up: the candidate order, the search loop and the decision, kept free of file
and runtime details (export.py passes them in as functions, the tests pass fakes).

Order: the --calib-method (default minmax), then the other calibration methods of SEARCH_METHODS; when none meets
the int8 bound, the method that came closest with growing tails of the network kept in float (sensitivity.py). The
search stops at the first candidate that passes: the methods give the same graph, every later candidate keeps more
in float, so the first that passes is the one with the most int8. It is written whenever it passes (mode "search",
the default; "keep-slow" is its old name): this machine's speed is reported, never a reason to withhold the file
(the device is another machine, and phones, boards and NPUs run int8 fastest). Mode "faster-here" writes it only
when it is clearly faster than fp32 on this machine (for a model deployed where it is exported). Mode "strict" is
the single configuration of --calib-method, written when it passes and an error (exit 3) when it does not.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgessl.deploy import onnx as ox
from edgessl.errors import UserError

MODES = ("search", "keep-slow", "faster-here", "strict")  # keep-slow: search, kept as a name from 0.2
# Entropy is not searched: quantize_static cannot set its histogram size, and with the default 128 bins (= the
# quantised bins) its ranges equal MinMax's (identical scales on MobileNetV3-Small); 2048 bins took 60 s per model.
SEARCH_METHODS = ("minmax", "percentile", "moving-average")


def int8_mode(value: bool | str | None) -> str | None:
    """export's `int8` argument -> None (no int8) or one of MODES (True is "search"); UserError otherwise."""
    if value is None or value is False:
        return None
    if value is True:
        return "search"
    if value in MODES:
        return str(value)
    raise UserError(f"--int8-mode must be one of {', '.join(MODES)}, not '{value}'.")


@dataclass(frozen=True)
class Candidate:
    """One int8 configuration: a calibration method and the nodes kept in float (a tail of the network)."""

    method: str
    nodes_in_float: tuple[str, ...] = ()
    share: float | None = None  # the share of the measured error whose tail of blocks is kept in float

    @property
    def label(self) -> str:
        if not self.nodes_in_float:
            return self.method
        return f"{self.method} + {len(self.nodes_in_float)} nodes in float"


def shortfall(parity: dict[str, Any], bounds: dict[str, float] | None = None) -> float:
    """How far parity figures are from the int8 bounds: the largest miss (<= 0 when every bound holds)."""
    bounds = bounds if bounds is not None else ox.BOUNDS["int8"]
    return max((parity[k] - b) if k == "rel_max_abs_diff" else (b - parity[k]) for k, b in bounds.items())


@dataclass
class Attempt:
    """A tried candidate: its parity against PyTorch (None when it could not be built or loaded), the bounds it
    misses (or the error), its temporary file and its conversion settings."""

    candidate: Candidate
    parity: dict[str, Any] | None = None
    missed: list[str] = field(default_factory=list)
    path: Path | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.parity is not None and not self.missed

    def record(self) -> dict[str, Any]:
        """The manifest's line for this candidate."""
        parity = None if self.parity is None else {k: self.parity[k] for k in (
            "min_cosine", "mean_cosine", "max_abs_diff", "rel_max_abs_diff", "top1_agreement") if k in self.parity}
        return {"candidate": self.candidate.label, "calibration": self.candidate.method,
                "nodes_in_float": list(self.candidate.nodes_in_float), "tail_share": self.candidate.share,
                "parity": parity, "passed": self.passed, "missed": list(self.missed)}


def method_candidates(first: str) -> list[Candidate]:
    """The calibration methods in search order: `first` (the --calib-method), then the rest of SEARCH_METHODS."""
    return [Candidate(m) for m in dict.fromkeys([first, *SEARCH_METHODS])]


def tail_candidates(method: str, tails: list[dict[str, Any]]) -> list[Candidate]:
    """One candidate per float tail (sensitivity.float_tails, smallest first), all with the same method."""
    return [Candidate(method, tuple(t["nodes"]), t["share"]) for t in tails]


def search(first_method: str, attempt: Callable[[Candidate], Attempt],
           tails_for: Callable[[Attempt], list[dict[str, Any]]]) -> list[Attempt]:
    """Try the candidates in order until one passes; returns every attempt (the passing one last).

    attempt(candidate) builds and checks one candidate; tails_for(closest attempt) measures where that model
    loses accuracy and returns the float tails to try with its method (empty when it cannot tell)."""
    tried: list[Attempt] = []
    for candidate in method_candidates(first_method):
        tried.append(attempt(candidate))
        if tried[-1].passed:
            return tried
    built = [a for a in tried if a.parity is not None]
    if not built:
        return tried
    closest = min(built, key=lambda a: shortfall(a.parity))
    for candidate in tail_candidates(closest.candidate.method, tails_for(closest)):
        tried.append(attempt(candidate))
        if tried[-1].passed:
            break
    return tried


def _figures(a: Attempt) -> str:
    return f"mean cosine {a.parity['mean_cosine']:.4f}, min {a.parity['min_cosine']:.4f}"


def decide(tried: list[Attempt], mode: str, speed: tuple[dict, dict, str] | None = None,
           fallback: str = "fp32") -> tuple[bool, str]:
    """(write the passing attempt?, one line saying what happened and why, with the numbers).

    speed: mode "faster-here" only: (fp32, int8) batch-1 figures of the passing attempt (edgessl.deploy.speed entries)
    and the int8-vs-fp32 verdict; fallback: what the user gets instead ("fp32" or "fp32 and fp16")."""
    bounds = ", ".join(f"{k} {'<=' if k == 'rel_max_abs_diff' else '>='} {v:g}" for k, v in ox.BOUNDS["int8"].items())
    passing = tried[-1] if tried and tried[-1].passed else None
    if passing is None:
        built = [a for a in tried if a.parity is not None]
        if not built:
            first = tried[0].missed[0] if tried and tried[0].missed else "no candidate"
            return False, f"int8 not written: quantisation failed for every candidate ({first}); kept {fallback}."
        closest = min(built, key=lambda a: shortfall(a.parity))
        return False, (f"int8 not written: none of {len(tried)} candidates meets the int8 bound ({bounds}); closest: "
                       f"{closest.candidate.label} at {_figures(closest)}. Kept {fallback}; the candidates are "
                       "listed in manifest.json.")
    tries = f"{len(tried)} candidate{'s' if len(tried) > 1 else ''}"
    if mode == "faster-here" and speed is not None and speed[2] != "faster":
        fp32, int8, how = speed
        return False, (f"int8 not written: {passing.candidate.label} passes ({_figures(passing)}) but is not clearly "
                       f"faster than fp32 on this machine (batch 1: int8 {int8['batch1_ms']['p50']:.3g} ms vs fp32 "
                       f"{fp32['batch1_ms']['p50']:.3g} ms, {how}; ranges {_range(int8)} and {_range(fp32)}, timed "
                       f"for this decision); kept {fallback} (--int8-mode faster-here).")
    return True, f"int8: {passing.candidate.label} passes ({_figures(passing)}) after {tries}."


def _range(speed: dict) -> str:
    b1 = speed["batch1_ms"]
    return f"{b1.get('low', b1['p50']):.3g}-{b1.get('high', b1['p50']):.3g} ms"


def search_record(mode: str, tried: list[Attempt], shipped: bool, line: str,
                  sensitivity: dict[str, Any] | None, speed: tuple[dict, dict, str] | None = None) -> dict[str, Any]:
    """What manifest.json keeps of a search (under the fp32 entry's "int8_search"); speed: faster-here's decision
    timing (fp32, int8, verdict), kept as "decision_speed" (the table's figures are timed again with every file)."""
    return {
        "mode": mode, "bounds": dict(ox.BOUNDS["int8"]),
        "order": "calibration methods (--calib-method first), then float tails of the closest one, smallest first",
        "candidates": [a.record() for a in tried],
        "shipped": tried[-1].candidate.label if shipped else None,
        "sensitivity": sensitivity, "outcome": line,
        **({"decision_speed": {"fp32": speed[0]["batch1_ms"], "int8": speed[1]["batch1_ms"], "verdict": speed[2]}}
           if speed else {}),
    }
