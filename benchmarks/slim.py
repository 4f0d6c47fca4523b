"""Slim suite: one slimmable run vs separately trained widths vs prune-then-recover (issue #5's benchmark).

On the emoji data (64 px, mobilenetv3_small, the accuracy suite's settings), routes to a width-1.0 and a width-0.5
encoder:
  slimmable   `pretrain --widths 1.0,0.5` for E epochs, then `edgessl slim` at 1.0 and 0.5
  separate    width 1.0 trained for E epochs, and the width-0.5 architecture trained from scratch for E epochs
  prune       the separate width-1.0 run, `edgessl prune --ratio 0.5` (magnitude) + R recovery epochs
Each encoder: kNN (k=200) and linear probe at 10 and all labels, parameters, MACs, batch-1 latency; each route:
its total training seconds (the budget it used).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch


def encoder_cost(folder: Path, size: int) -> dict[str, Any]:
    """Parameters, MACs and batch-1 latency (ONNX Runtime fp32 when installed, else PyTorch eager; median over at
    least 30 runs and 0.5 s, one thread) of a saved encoder: the numbers of a --widths run's widths.json."""
    import edgessl
    from edgessl.deploy.widths import batch1_latency
    from edgessl.models.prune import count_params_macs

    model = edgessl.load_encoder(folder)
    params, macs = count_params_macs(model, torch.zeros(1, 3, size, size))
    latency, runtime = batch1_latency(model, size, threads=1)
    return {"params": params, "macs": macs, "latency_ms": latency, "latency_runtime": runtime}


def recost(results: Path) -> None:
    """Re-measure params/MACs/latency of the encoders slim.json names (their folders must still exist), e.g. on an
    idle machine after a run that shared the CPU: `python -m benchmarks.run slim-cost`."""
    import json

    path = results / "slim.json"
    rec = json.loads(path.read_text())
    size = 8 if rec.get("tiny") else 64
    for r in rec["rows"]:
        r.pop("latency_ms_pytorch", None)
        r.update(encoder_cost(Path(r["folder"]), r.get("image_size", size)))
    rec["cost_command"] = "python -m benchmarks.run slim-cost"
    path.write_text(json.dumps(rec, indent=1) + "\n")


def suite_slim(args) -> list[dict]:
    import edgessl
    from benchmarks.common import datasets, final_eval
    from edgessl.config import resolve
    from edgessl.data.folder import load_image_folder
    from edgessl.models.backbone import create_backbone, output_dim, want_small_input
    from edgessl.models.channels import channel_groups, group_counts
    from edgessl.models.head import Encoder, ProjectionHead
    from edgessl.models.prune import prune_to_counts
    from edgessl.models.slimmable import last_layer
    from edgessl.models.widths import slim_encoder
    from edgessl.train.run import pretrain
    from edgessl.train.types import WarmStart
    from edgessl.workflows.pretrain import standard_evaluation
    from edgessl.workflows.prune import prune_encoder

    train, test, backbone, size = datasets(args.tiny)["emoji"]
    epochs = args.epochs
    recover = 1 if args.tiny else max(1, round(epochs / 4))
    batch = 8 if args.tiny else 128
    work = Path("/tmp/edgessl-bench") / f"slim-{time.time_ns()}"
    common = dict(data=str(train), val=str(test), labels_from_folders=True, backbone=backbone, image_size=size,
                  epochs=epochs, batch_size=batch, seed=0, quiet=True, eval_every=max(1, epochs // 5))
    train_set = load_image_folder(train, size, labels=True)
    test_set = load_image_folder(test, size, labels=True)
    rows = []

    def record(route: str, width: float, folder: Path, seconds: float, epochs_run: int) -> None:
        enc = edgessl.load_encoder(folder)
        rows.append({"route": route, "width": width, "folder": str(folder), "train_seconds": seconds,
                     "epochs": epochs_run, "image_size": size, **encoder_cost(folder, size),
                     "final": final_eval(enc, train_set, test_set, f"{route}-{width}", args.seeds)})
        print(f"slim {route} {width}: kNN@all {rows[-1]['final']['knn@all']['mean']:.3f}", flush=True)

    # route 1: one slimmable run
    t0 = time.time()
    slim_run = edgessl.pretrain(out=str(work / "slimmable"), widths="1.0,0.5", **common)
    t_slim = time.time() - t0
    for w in (1.0, 0.5):
        record("slimmable", w, slim_encoder(slim_run.run_dir, w), t_slim, epochs)

    # route 2: separately trained widths
    t0 = time.time()
    full = edgessl.pretrain(out=str(work / "separate-1.0"), **common)
    t_full = time.time() - t0
    record("separate", 1.0, full.run_dir, t_full, epochs)
    cfg = resolve(common)
    torch.manual_seed(0)
    bb, _ = create_backbone(backbone, small_input=want_small_input(cfg.small_input, size))
    head = ProjectionHead(output_dim(bb, size), cfg.feature_dim, cfg.head_hidden, cfg.head)
    half = Encoder(bb, head)
    example = torch.zeros(2, 3, size, size)
    counts = group_counts(channel_groups(half, example, keep_outputs=[last_layer(head)]), 0.5)
    prune_to_counts(half, example, counts, keep_outputs=[last_layer(head)])
    meta = {"pruned": {k[len("backbone."):]: v for k, v in counts.items() if k.startswith("backbone.")}, "width": 0.5}
    t0 = time.time()
    half_run = pretrain(resolve({**common, "out": str(work / "separate-0.5")}), warm=WarmStart(half, meta=meta),
                        evaluation=standard_evaluation())
    record("separate", 0.5, half_run.run_dir, time.time() - t0, epochs)

    # route 3: prune the separate width-1.0 encoder by half, recover
    t0 = time.time()
    pruned = prune_encoder(full.run_dir, 0.5, "magnitude", epochs=recover, out=work / "pruned-0.5", quiet=True)
    record("prune+recover", 0.5, pruned.run_dir, t_full + time.time() - t0, recover)
    return rows
