"""Two-view peers from lightly (SimCLR, MoCo v2, BYOL) trained under edgessl's conditions.

Same backbone (edgessl's timm creation, small-input stem rule), same decoded uint8 cache, same batched augmentation
(called twice with different keys for the two views), the same channels_last inputs (edgessl's step on CPU and CUDA:
train/crops.py; since 2026-12-06, 1.5x a CPU step), same optimiser (SGD momentum 0.9, wd 5e-4, lr per 256
images), warm-up + cosine schedule, batch size and epochs. Heads and losses are lightly's own, with the settings of
lightly's examples. A supervised cross-entropy step of the same backbone gives the cost floor.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from edgessl.data.augment import IMAGENET_MEAN, IMAGENET_STD, AugmentConfig, augment_batch
from edgessl.data.folder import ImageSet
from edgessl.evaluate.features import extract_features
from edgessl.models.backbone import create_backbone, output_dim, want_small_input
from edgessl.train.loop import epoch_order
from edgessl.train.optim import build_optimizer, warmup_cosine

PEERS = ("edgessl", "npid", "simclr", "mocov2", "byol", "supervised")
VIEW2 = 1_000_003  # key offset of the second view's random numbers


class Peer(nn.Module):
    """loss(x1, x2, labels, index, progress) -> scalar; after_step() runs after the optimiser step."""

    def after_step(self) -> None:
        pass


class EdgeSSL(Peer):
    """edgessl's step (or the NPID preset) in this harness, for the cost suite: one view, bank, L_ce + lambda L_sd."""

    def __init__(self, backbone: nn.Module, dim: int, num_rows: int, npid: bool = False):
        from edgessl.config import resolve
        from edgessl.data.lookalike import TEMPERATURES
        from edgessl.method.bank import auto_bank_lr
        from edgessl.method.instance import InstanceDiscrimination
        from edgessl.models.head import ProjectionHead

        super().__init__()
        c = resolve({"method": "npid" if npid else "edgessl"})
        self.backbone, self.head = backbone, ProjectionHead(dim, c.feature_dim, c.head_hidden, c.head)
        tau = TEMPERATURES[0] if c.temperature == "auto" else c.temperature  # a step costs the same at any tau
        eta = auto_bank_lr(tau) if c.bank_lr == "auto" else c.bank_lr
        self.method = InstanceDiscrimination(num_rows, c.feature_dim, tau, c.negatives, c.bank_update,
                                             eta, c.bank_momentum, c.sd_weight, c.sd_temperature, c.sd_alpha)
        self._out = None

    def loss(self, x1, x2, labels, index, progress):
        self._out = self.method(F.normalize(self.head(self.backbone(x1)).float(), dim=1), index)
        return self._out.loss

    def after_step(self) -> None:
        self.method.update_bank(self._out)


class SimCLR(Peer):
    def __init__(self, backbone: nn.Module, dim: int):
        from lightly.loss import NTXentLoss
        from lightly.models.modules import SimCLRProjectionHead

        super().__init__()
        self.backbone, self.head, self.criterion = backbone, SimCLRProjectionHead(dim, 2048, 128), NTXentLoss()

    def loss(self, x1, x2, labels, index, progress):
        return self.criterion(self.head(self.backbone(x1)), self.head(self.backbone(x2)))


class MoCoV2(Peer):
    def __init__(self, backbone: nn.Module, dim: int):
        from lightly.loss import NTXentLoss
        from lightly.models.modules import MoCoProjectionHead
        from lightly.models.utils import deactivate_requires_grad

        super().__init__()
        self.backbone, self.head = backbone, MoCoProjectionHead(dim, 2048, 128)
        self.backbone_m, self.head_m = copy.deepcopy(backbone), copy.deepcopy(self.head)
        deactivate_requires_grad(self.backbone_m)
        deactivate_requires_grad(self.head_m)
        self.criterion = NTXentLoss(memory_bank_size=(4096, 128))

    def loss(self, x1, x2, labels, index, progress):
        from lightly.models.utils import update_momentum
        from lightly.utils.scheduler import cosine_schedule

        m = cosine_schedule(int(progress * 1000), 1000, 0.996, 1.0)
        update_momentum(self.backbone, self.backbone_m, m)
        update_momentum(self.head, self.head_m, m)
        q = self.head(self.backbone(x1))
        with torch.no_grad():
            k = self.head_m(self.backbone_m(x2))
        return self.criterion(q, k)


class BYOL(Peer):
    def __init__(self, backbone: nn.Module, dim: int):
        from lightly.loss import NegativeCosineSimilarity
        from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
        from lightly.models.utils import deactivate_requires_grad

        super().__init__()
        self.backbone, self.head = backbone, BYOLProjectionHead(dim, 4096, 256)
        self.predictor = BYOLPredictionHead(256, 4096, 256)
        self.backbone_m, self.head_m = copy.deepcopy(backbone), copy.deepcopy(self.head)
        deactivate_requires_grad(self.backbone_m)
        deactivate_requires_grad(self.head_m)
        self.criterion = NegativeCosineSimilarity()

    def loss(self, x1, x2, labels, index, progress):
        from lightly.models.utils import update_momentum
        from lightly.utils.scheduler import cosine_schedule

        m = cosine_schedule(int(progress * 1000), 1000, 0.99, 1.0)
        update_momentum(self.backbone, self.backbone_m, m)
        update_momentum(self.head, self.head_m, m)
        p1, p2 = (self.predictor(self.head(self.backbone(x))) for x in (x1, x2))
        with torch.no_grad():
            t1, t2 = (self.head_m(self.backbone_m(x)) for x in (x1, x2))
        return 0.5 * (self.criterion(p1, t2) + self.criterion(p2, t1))


class Supervised(Peer):
    """The floor: one view, a linear classifier, cross-entropy with the true labels."""

    def __init__(self, backbone: nn.Module, dim: int, num_classes: int):
        super().__init__()
        self.backbone, self.fc = backbone, nn.Linear(dim, num_classes)

    def loss(self, x1, x2, labels, index, progress):
        return F.cross_entropy(self.fc(self.backbone(x1)), labels)


def build(name: str, backbone: str, image_size: int, num_classes: int = 10, num_rows: int = 1):
    torch.manual_seed(0)
    net, arch = create_backbone(backbone, small_input=want_small_input("auto", image_size))
    dim = output_dim(net, image_size)
    if name in ("edgessl", "npid"):
        return EdgeSSL(net, dim, num_rows, npid=name == "npid"), arch
    if name == "simclr":
        return SimCLR(net, dim), arch
    if name == "mocov2":
        return MoCoV2(net, dim), arch
    if name == "byol":
        return BYOL(net, dim), arch
    if name == "supervised":
        return Supervised(net, dim, num_classes), arch
    raise ValueError(f"unknown peer {name!r}; known: {', '.join(PEERS)}")


@dataclass
class PeerRun:
    model: nn.Module
    history: list[dict]


def train_peer(
    name: str,
    images: ImageSet,
    backbone: str = "mobilenetv3_small",
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 0.2,
    seed: int = 0,
    max_steps: int | None = None,
    eval_fn=None,
    eval_every: int = 1,
) -> PeerRun:
    """Train a peer on `images` (labels needed only for 'supervised'). eval_fn(backbone) -> dict, called each epoch."""
    model, _ = build(name, backbone, images.size, len(images.classes or [0]), len(images))
    model.train()
    n = len(images)
    batch = min(batch_size, n)
    steps = n // batch
    opt = build_optimizer("sgd", [p for p in model.parameters() if p.requires_grad], lr * batch / 256, 0.9, 5e-4)
    sched = warmup_cosine(opt, steps, epochs * steps)
    aug = AugmentConfig()
    history = []
    done_steps = 0
    for epoch in range(epochs):
        order = epoch_order(seed, epoch, n)
        t0 = time.time()
        total, count = 0.0, 0
        for step in range(steps):
            idx = order[step * batch : (step + 1) * batch]
            raw = images.get(idx)
            x1 = augment_batch(raw, idx, epoch, seed, aug, IMAGENET_MEAN, IMAGENET_STD)
            x2 = (None if name in ("supervised", "edgessl", "npid")
                  else augment_batch(raw, idx, epoch, seed + VIEW2, aug, IMAGENET_MEAN, IMAGENET_STD))
            x1, x2 = (None if x is None else x.contiguous(memory_format=torch.channels_last) for x in (x1, x2))
            labels = images.labels[idx] if images.labels is not None else None
            progress = (epoch * steps + step) / max(1, epochs * steps)
            loss = model.loss(x1, x2, labels, idx, progress)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            model.after_step()
            total, count = total + float(loss.detach()) * len(idx), count + len(idx)
            done_steps += 1
            if max_steps is not None and done_steps >= max_steps:
                break
        row = {"epoch": epoch + 1, "loss": total / max(count, 1), "seconds": time.time() - t0,
               "images_per_s": count / max(time.time() - t0, 1e-9)}
        if eval_fn is not None and ((epoch + 1) % eval_every == 0 or epoch + 1 == epochs):
            row.update(eval_fn(model.backbone))
        history.append(row)
        if max_steps is not None and done_steps >= max_steps:
            break
    return PeerRun(model, history)


def backbone_features(backbone: nn.Module, images: ImageSet) -> torch.Tensor:
    return extract_features(backbone, images, IMAGENET_MEAN, IMAGENET_STD)
