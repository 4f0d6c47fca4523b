"""Export suite: what `edgessl export RUN --int8 --calib DIR` ships for encoders it has not seen calibrate before.

`python -m benchmarks.run export [--tiny]`. Folders: the emoji training images (1,529; mobilenetv3_small at 64 px and
resnet18 at 32 px), NEU-DET's steel scans (1,440; mobilenetv3_small at 64 px) and 1,000 CIFAR-10 training images
(100 per class; mobilenetv3_small at 32 px, the small-input stem). Each encoder is pretrained for 1 and for 15 epochs,
then exported with the default int8 search (a passing candidate is written whatever its speed here), calibrated on
the same folder. Per run: every candidate tried and its parity, the one that passed or the one-line reason printed
when none did, and fp32 against int8 batch-1 latency with the export's verdict, all files timed in the same
alternating rounds (ONNX Runtime, this machine's threads; the load average is recorded beside it).
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any

import edgessl

CONFIGS = (("emoji", "mobilenetv3_small", 64), ("emoji", "resnet18", 32), ("neu-det", "mobilenetv3_small", 64),
           ("cifar10-1k", "mobilenetv3_small", 32))


def folders(tiny: bool) -> dict[str, Path]:
    from benchmarks.datasets import cifar10, emoji, neu_det, stratified_subset

    if tiny:
        return {"emoji": stratified_subset(emoji()[0], 4, 0, "emoji-train-tiny")}
    return {"emoji": emoji()[0], "neu-det": neu_det()[0],
            "cifar10-1k": stratified_subset(cifar10()[0], 100, 0, "cifar10-train-100pc-s0")}


def one_run(backbone: str, size: int, epochs: int, data: Path, root: Path, tiny: bool) -> dict[str, Any]:
    run = root / f"{data.name}-{backbone}-{epochs}"
    edgessl.pretrain(backbone=backbone, data=str(data), image_size=size, epochs=epochs,
                     eval_every=0, quiet=True, out=str(run), batch_size=8 if tiny else 128)
    load = os.getloadavg()[0]
    from rich.console import Console

    printed = io.StringIO()
    result = edgessl.export(run, int8=True, calib=str(data), console=Console(file=printed, width=400))
    lines = printed.getvalue().splitlines()
    entries = {e["precision"]: e for e in result.models}
    search = entries["fp32"].get("int8_search", {})
    int8 = entries.get("int8")
    comp = (int8 or {}).get("comparison", {})
    lat = comp.get("latency_ms_batch1") or {}
    return {"backbone": backbone, "image_size": size, "epochs": epochs, "load_average_1min": load,
            "candidates": search.get("candidates", []), "shipped": search.get("shipped"),
            "outcome": search.get("outcome"), "fp32_ms": lat.get("fp32"), "int8_ms": lat.get("int8"),
            "verdict": comp.get("latency_verdict"),
            "int8_parity": None if int8 is None else int8.get("parity"),
            "bytes": {p: e.get("bytes") for p, e in entries.items()},
            "int8_written": int8 is not None, "reason": next((ln for ln in lines if ln.startswith("int8 not written")),
                                                             None)}


def suite_export(args) -> list[dict[str, Any]]:
    data = folders(args.tiny)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, backbone, size in CONFIGS[:1] if args.tiny else CONFIGS:
            if args.datasets and name not in args.datasets:  # a partial rerun (the runner keeps the other rows)
                continue
            for e in (1,) if args.tiny else (1, 15):
                rows.append({"data": name, **one_run(backbone, size, e, data[name], Path(tmp), args.tiny)})
                r = rows[-1]
                print(f"export {name} {backbone} {e} epochs: {r['outcome']} "
                      f"({'int8 written' if r['int8_written'] else r['reason']})", flush=True)
    return rows


def export_search_section(rec: dict[str, Any]) -> str:
    m = rec["machine"]
    out = ["## Export: the int8 search on encoders it has not seen\n",
           f"{m.get('cpu')}, {m.get('threads')} threads, torch {m.get('torch')}, edgessl {m.get('edgessl')}, "
           f"{m.get('date')}; `{rec['command']}`. Pretrained on each folder, exported with `--int8 --calib` on the "
           "same folder; bounds mean cosine >= 0.93, min >= 0.75. Every run leaves an int8 file that meets them or "
           "the one line printed instead.\n",
           "| folder | backbone | px | epochs | candidates tried (mean / min cosine) | int8 file | int8 vs fp32 "
           "batch-1 p50 | verdict here | load |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rec["rows"]:
        tried = "; ".join(
            f"{c['candidate']} ({c['parity']['mean_cosine']:.3f} / {c['parity']['min_cosine']:.3f})"
            if c.get("parity") else f"{c['candidate']} (failed)" for c in r["candidates"])
        speed = (f"{r['int8_ms']:.2f} vs {r['fp32_ms']:.2f} ms" if r.get("int8_ms") and r.get("fp32_ms") else "-")
        default = r.get("verdict") or "-"
        shipped = (f"written ({r.get('shipped')})" if r.get("int8_written", r.get("shipped")) else
                   f"not written: {(r.get('reason') or 'none passed').removeprefix('int8 not written: ')}")
        out.append(f"| {r.get('data', 'emoji')} | {r['backbone']} | {r['image_size']} | {r['epochs']} | {tried} | "
                   f"{shipped} | {speed} | {default} | {r.get('load_average_1min', 0):.1f} |")
    return "\n".join(out) + "\n"
