"""Is data loading the bottleneck? End-to-end training images/s against model-only images/s.

    python -m benchmarks.throughput [--backbone mobilenetv3_small --image-size 64 --batch-size 128 --steps 20]

model-only: forward + backward + optimiser step of backbone + head on a batch already on the device, with a
  supervised-like cross-entropy on the same (B, d) output (the floor any method pays).
end-to-end: what `edgessl pretrain` does per step: cache lookup, batched augmentation, forward, L_ce + L_sd over
  the bank, backward, optimiser step, gradient bank update.
Writes benchmarks/results/throughput.json (appends one record per configuration and machine).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from edgessl.data.augment import IMAGENET_MEAN, IMAGENET_STD, AugmentConfig, augment_batch
from edgessl.data.folder import load_image_folder
from edgessl.demo import demo_images
from edgessl.method.instance import InstanceDiscrimination
from edgessl.models.backbone import create_backbone, output_dim, want_small_input
from edgessl.models.head import Encoder, ProjectionHead

RESULTS = Path(__file__).parent / "results" / "throughput.json"


def timed(fn, steps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure(backbone: str, image_size: int, batch: int, steps: int, data: str | None) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    images = load_image_folder(data or demo_images(), image_size)
    n = len(images)
    torch.manual_seed(0)
    net, arch = create_backbone(backbone, small_input=want_small_input("auto", image_size))
    model = Encoder(net, ProjectionHead(output_dim(net, image_size), 128, 2048)).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    method = InstanceDiscrimination(n, 128).to(device)
    aug = AugmentConfig()
    fixed_idx = torch.arange(batch) % n
    fixed_x = augment_batch(images.get(fixed_idx).to(device), fixed_idx, 0, 0, aug, IMAGENET_MEAN, IMAGENET_STD)
    fixed_x = fixed_x.contiguous(memory_format=torch.channels_last)  # the layout of edgessl's step (train/crops.py)
    target = torch.randint(0, 128, (batch,), device=device)
    step = {"i": 0}

    def model_only():
        out = model(fixed_x)
        loss = F.cross_entropy(out, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def end_to_end():
        idx = torch.randint(0, n, (batch,), generator=torch.Generator().manual_seed(step["i"]))
        step["i"] += 1
        x = augment_batch(images.get(idx).to(device), idx, 0, 0, aug, IMAGENET_MEAN, IMAGENET_STD)
        x = x.contiguous(memory_format=torch.channels_last)
        out = method(F.normalize(model(x).float(), dim=1), idx.to(device))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        method.update_bank(out)

    def augment_only():
        idx = torch.randint(0, n, (batch,))
        augment_batch(images.get(idx).to(device), idx, 0, 0, aug, IMAGENET_MEAN, IMAGENET_STD)

    t_model = timed(model_only, steps)
    t_e2e = timed(end_to_end, steps)
    t_aug = timed(augment_only, steps)
    return {
        "backbone": arch["timm_name"], "image_size": image_size, "batch_size": batch, "steps": steps,
        "bank_rows": n, "device": str(device), "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "model_only_images_per_s": batch * steps / t_model,
        "end_to_end_images_per_s": batch * steps / t_e2e,
        "augment_only_images_per_s": batch * steps / t_aug,
        "end_to_end_over_model_only": t_model / t_e2e,
        "date": time.strftime("%Y-%m-%d"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="mobilenetv3_small")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--data", default=None, help="image folder (default: the bundled demo images)")
    args = ap.parse_args()
    rec = measure(args.backbone, args.image_size, args.batch_size, args.steps, args.data)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    RESULTS.write_text(json.dumps(old + [rec], indent=1) + "\n")
    print(json.dumps(rec, indent=1))


if __name__ == "__main__":
    main()
