"""Export suite: what `edgessl export RUN --int8` ships for encoders it has not seen calibrate before.

`python -m benchmarks.run export [--tiny]`. mobilenetv3_small at 64 px and resnet18 at 32 px (default stems:
timm's at 64 px, the small-input one at 32 px), each pretrained for 1 and for 15 epochs on the shared emoji training
images, then exported with the default int8 search
(a passing candidate is written whatever its speed here), calibrated on the same folder. Per run: every candidate
tried and its parity, the one that passed, and fp32 against int8 batch-1 latency with the export's verdict, all files
timed in the same alternating rounds (ONNX Runtime, this machine's threads).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import edgessl

CONFIGS = (("mobilenetv3_small", 64), ("resnet18", 32))


def one_run(backbone: str, size: int, epochs: int, data: Path, root: Path, tiny: bool) -> dict[str, Any]:
    run = root / f"{backbone}-{epochs}"
    edgessl.pretrain(backbone=backbone, data=str(data), image_size=size, epochs=epochs,
                     eval_every=0, quiet=True, out=str(run), batch_size=8 if tiny else 128)
    load = os.getloadavg()[0]
    result = edgessl.export(run, int8=True, calib=str(data))
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
            "bytes": {p: e.get("bytes") for p, e in entries.items()}}


def suite_export(args) -> list[dict[str, Any]]:
    from benchmarks.datasets import emoji, stratified_subset

    train, _ = emoji()
    epochs = (1,) if args.tiny else (1, 15)
    if args.tiny:
        train = stratified_subset(train, 4, 0, "emoji-train-tiny")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for backbone, size in CONFIGS[:1] if args.tiny else CONFIGS:
            for e in epochs:
                rows.append(one_run(backbone, size, e, train, Path(tmp), args.tiny))
                print(f"export {backbone} {e} epochs: {rows[-1]['outcome']}", flush=True)
    return rows


def export_search_section(rec: dict[str, Any]) -> str:
    m = rec["machine"]
    out = ["## Export: the int8 search on encoders it has not seen\n",
           f"{m.get('cpu')}, {m.get('threads')} threads, torch {m.get('torch')}, edgessl {m.get('edgessl')}, "
           f"{m.get('date')}; `{rec['command']}`. Pretrained on the emoji training images (1,529), exported with "
           "`--int8 --calib` on the same folder; bounds mean cosine >= 0.93, min >= 0.75.\n",
           "| backbone | px | epochs | candidates tried (mean / min cosine) | passed | int8 vs fp32 batch-1 p50 | "
           "verdict here |", "|---|---|---|---|---|---|---|"]
    for r in rec["rows"]:
        tried = "; ".join(
            f"{c['candidate']} ({c['parity']['mean_cosine']:.3f} / {c['parity']['min_cosine']:.3f})"
            if c.get("parity") else f"{c['candidate']} (failed)" for c in r["candidates"])
        speed = (f"{r['int8_ms']:.2f} vs {r['fp32_ms']:.2f} ms" if r.get("int8_ms") and r.get("fp32_ms") else "-")
        default = r.get("verdict") or "-"
        out.append(f"| {r['backbone']} | {r['image_size']} | {r['epochs']} | {tried} | {r.get('shipped') or 'none'} "
                   f"| {speed} | {default} |")
    return "\n".join(out) + "\n"
