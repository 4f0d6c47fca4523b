"""Data-parallel pretraining under torchrun: process group, rank helpers, sharding, all-gathers, SyncBatchNorm.

The training loop calls these and nothing else touches torch.distributed. With no torchrun environment
(WORLD_SIZE unset or 1) every helper is the identity and no process group is created.

Layout of a step: every rank knows the global batch idx = order[step*B:(step+1)*B] (the epoch order is a function of
(seed, epoch) only); rank r takes the contiguous rows `local_rows(B, r, W)` of it. Gathering per-rank tensors in
rank order therefore rebuilds them in global-batch order.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from timm.layers import convert_sync_batchnorm as timm_convert
from timm.layers.norm_act import BatchNormAct2d
from torch import Tensor, nn

from edgessl.errors import UserError

TIMEOUT = timedelta(minutes=30)  # rank 0's end-of-epoch work (checkpoint, kNN monitor) happens while others wait


@dataclass(frozen=True)
class Dist:
    """Where this process stands. rank/world: global; local_rank: on its node; owned: this module created the
    process group and destroys it in `teardown` (False when a caller initialised it, or for one process)."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owned: bool = False

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes files and prints."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


# ---------------------------------------------------------------- environment and process group
def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def env_world() -> int:
    """WORLD_SIZE as torchrun sets it (1 without torchrun), or the size of a group a caller already initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return env_int("WORLD_SIZE", 1)


def setup(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group that torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).

    Backend: NCCL when `device` is CUDA (each process takes GPU LOCAL_RANK), gloo on CPU. Returns (Dist, the
    device this process trains on). World size 1: (Dist(), device) and nothing is created. A group that is already
    initialised (a caller's) is used as it is and left to the caller."""
    if dist.is_available() and dist.is_initialized():
        rank, world, owned = dist.get_rank(), dist.get_world_size(), False
    else:
        world = env_int("WORLD_SIZE", 1)
        if world <= 1:
            return Dist(), device
        rank, owned = env_int("RANK", 0), True
    local_rank = env_int("LOCAL_RANK", rank)
    if device.type == "mps":  # gloo, the only backend here, takes CPU tensors: the collectives would fail
        raise UserError(f"torchrun with {world} processes on MPS: PyTorch has no process-group backend for Apple "
                        "GPUs. Train in one process (plain edgessl pretrain), or pass --device cpu to torchrun.")
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) are visible: start at most "
                "that many processes per node (torchrun --nproc-per-node)."
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if owned:
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=TIMEOUT, **kwargs)
    return Dist(rank, world, local_rank, owned), device


def teardown(d: Dist, clean: bool = True) -> None:
    """Destroy the process group if `setup` created it; clean: wait for every rank first (normal end)."""
    if not d.owned or not dist.is_initialized():
        return
    if clean:
        barrier(d)
    dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.active:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


# ---------------------------------------------------------------- sharding
def check_global_batch(batch: int, world: int) -> None:
    """--batch-size is the global batch; every rank takes batch / world rows of it."""
    if batch % world:
        raise UserError(
            f"--batch-size {batch} is not divisible by the number of processes ({world}): it is the global batch, "
            f"split evenly over the processes. Use a multiple of {world}, e.g. {max(world, batch - batch % world)}."
        )


def local_rows(batch: int, rank: int, world: int) -> slice:
    """Rows of a global batch of `batch` that rank `rank` of `world` takes: contiguous, equal-sized, in rank order,
    so the slices of ranks 0..world-1 partition [0, batch). Needs batch % world == 0."""
    per = batch // world
    return slice(rank * per, (rank + 1) * per)


def shard(idx: Tensor, rank: int, world: int) -> Tensor:
    """This rank's part of a global batch. idx: (B,) -> (B / world,); concatenating every rank's part gives idx."""
    return idx[local_rows(idx.shape[0], rank, world)]


def split_sizes(n: int, world: int) -> list[int]:
    """Sizes of `tensor_split(n rows, world)`: n rows over world ranks, unequal by at most one."""
    return [len(part) for part in torch.arange(n).tensor_split(world)]


# ---------------------------------------------------------------- collectives
def all_gather_cat(t: Tensor, d: Dist, sizes: list[int] | None = None) -> Tensor:
    """Concatenate every rank's `t` in rank order (no gradient).

    t: (n_r, ...) on this rank -> (sum_r n_r, ...) on every rank. sizes: n_r of every rank when they differ
    (padded to the largest for the collective, then trimmed); None: all equal to t.shape[0]."""
    if not d.active:
        return t
    t = t.detach().contiguous()
    size = t.shape[0] if sizes is None else max(sizes)
    if t.shape[0] < size:
        t = torch.cat([t, t.new_zeros((size - t.shape[0], *t.shape[1:]))])
    parts = [torch.empty_like(t) for _ in range(d.world)]
    dist.all_gather(parts, t)
    if sizes is not None:
        parts = [p[:s] for p, s in zip(parts, sizes, strict=True)]
    return torch.cat(parts)


def all_reduce_sum(t: Tensor, d: Dist) -> Tensor:
    """Sum of `t` over ranks (a new tensor, no gradient); t itself when there is one process."""
    if not d.active:
        return t
    t = t.detach().clone()
    dist.all_reduce(t)
    return t


def mean_over_ranks(t: Tensor, d: Dist) -> Tensor:
    """Mean over ranks, e.g. of per-rank means over equal-sized slices = the mean over the global batch.
    t: (k,) -> (k,), the same on every rank; t itself when there is one process."""
    if not d.active:
        return t
    return all_reduce_sum(t, d) / d.world


def broadcast_(t: Tensor, d: Dist, src: int = 0) -> None:
    """Overwrite `t` in place with rank `src`'s values."""
    if d.active:
        dist.broadcast(t, src)


def any_rank(flag: bool, d: Dist) -> bool:
    """True on every rank when `flag` is True on any (one small all-reduce; the flag itself with one process)."""
    if not d.active:
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    return bool(all_reduce_sum(torch.tensor([float(flag)], device=device), d)[0] > 0)


def broadcast_object(obj: Any, d: Dist, src: int = 0) -> Any:
    """Rank `src`'s picklable object on every rank (small things: a path, a flag)."""
    if not d.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


# ---------------------------------------------------------------- model wrapping
STRIDE_WARNING = "Grad strides do not match bucket view strides"  # a 1x1 conv's weight under channels_last crops:
# grad strides (576, 1, 576, 576) against the bucket's (576, 1, 1, 1) for a (1024, 576, 1, 1) kernel, the same bytes
# in the same order (the size-1 dimensions' strides differ only), so DDP's "may impair performance" costs nothing


def wrap_model(model: nn.Module, d: Dist, device: torch.device, find_unused: bool = False) -> nn.Module:
    """DistributedDataParallel around `model` (which keeps the un-prefixed state_dict), or `model` itself.
    find_unused: some parameters sit out some steps (the sub-widths' BatchNorm before the slow start; the caller
    asks for it only then: after it DDP warned on every rank that none was unused). Only rank 0 shows Python
    warnings (each rank printed the same ones), and none shows the STRIDE_WARNING."""
    if not d.active:
        return model
    warnings.filterwarnings("ignore", message=STRIDE_WARNING)
    if not d.main:
        warnings.simplefilter("ignore")
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm (timm's BatchNormAct2d in the backbone included, and the head's BatchNorm1d) normalises with
    statistics over the global batch. Parameters, running statistics and state_dict keys do not change.

    CUDA: timm's converter, i.e. torch.nn.SyncBatchNorm, plus timm's SyncBatchNormAct, which keeps the fused
    activation that torch.nn.SyncBatchNorm.convert_sync_batchnorm would drop from BatchNormAct2d. CPU (gloo):
    torch's SyncBatchNorm runs on accelerators only (and DDP refuses it on CPU modules), so each layer becomes its
    `GLOO_SYNC` subclass instead: the same maths with two differentiable all-reduces (`sync_batch_norm`)."""
    if device.type == "cuda":
        return timm_convert(model)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, _GlooSync):
            if type(m) not in GLOO_SYNC:
                raise UserError(f"--sync-bn on CPU: no synchronised version of {type(m).__name__} layers.")
            m.__class__ = GLOO_SYNC[type(m)]  # a subclass without new state: only forward changes
    return model


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the backward sums the incoming gradients over ranks (each rank's loss depends on the sum)."""
    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def sync_batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: Tensor) -> Tensor:
    """Training-mode batch norm of x (N_r, C, *) with mean and (biased) variance over every rank's rows.

    Two passes (sum -> mean, then sum of squared deviations -> variance), each one all-reduce that autograd sees,
    so the gradient equals that of one process normalising the concatenated batch. Updates the running statistics
    like torch (unbiased variance, momentum or cumulative average). -> (N_r, C, *) in x's dtype."""
    c = x.shape[1]
    dims = [0, *range(2, x.dim())]
    shape = (1, c) + (1,) * (x.dim() - 2)
    xf = x.float()
    count = torch.full((1,), x.numel() // c, dtype=torch.float32, device=x.device)
    sums = _AllReduceSum.apply(torch.cat([xf.sum(dims), count]))
    n = sums[c].detach()
    mean = sums[:c] / n
    centred = xf - mean.view(shape)
    var = _AllReduceSum.apply((centred * centred).sum(dims)) / n
    y = centred * torch.rsqrt(var + bn.eps).view(shape)
    if bn.affine:
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
    if bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            f = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
            bn.running_mean.mul_(1 - f).add_(mean.detach().to(bn.running_mean.dtype), alpha=f)
            unbiased = var.detach() * (n / (n - 1).clamp(min=1))
            bn.running_var.mul_(1 - f).add_(unbiased.to(bn.running_var.dtype), alpha=f)
    return y.to(x.dtype)


class _GlooSync:
    """Mixin: training-mode forward with global-batch statistics when a process group of more than one rank is up;
    otherwise (eval mode, one process) the layer's own forward."""
    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input)
        self._check_input_dim(input)
        return sync_batch_norm(self, input)


class GlooSyncBatchNorm1d(_GlooSync, nn.BatchNorm1d):
    pass


class GlooSyncBatchNorm2d(_GlooSync, nn.BatchNorm2d):
    pass


class GlooSyncBatchNorm3d(_GlooSync, nn.BatchNorm3d):
    pass


def _timm_norm_act():
    class GlooSyncBatchNormAct2d(_GlooSync, BatchNormAct2d):
        """timm's BatchNorm + dropout + activation layer, with synchronised statistics."""

        def forward(self, input: Tensor) -> Tensor:
            if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
                return BatchNormAct2d.forward(self, input)
            return self.act(self.drop(sync_batch_norm(self, input)))

    return {BatchNormAct2d: GlooSyncBatchNormAct2d}


GLOO_SYNC: dict[type, type] = {
    nn.BatchNorm1d: GlooSyncBatchNorm1d,
    nn.BatchNorm2d: GlooSyncBatchNorm2d,
    nn.BatchNorm3d: GlooSyncBatchNorm3d,
    **_timm_norm_act(),
}
