"""Batched single-crop augmentation on uint8 tensors, on the training device.

Every random number comes from a counter-based generator keyed by (seed, epoch, image index), so an image's
crop does not depend on the batch it lands in, the batch size or the number of processes.

Per image, in this order: random resized crop (scale, ratio) + horizontal flip (one bilinear `grid_sample`),
colour jitter with probability p (brightness, contrast, saturation, hue as a YIQ rotation), grayscale with
probability p, optional Gaussian blur, then normalisation with mean/std.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the normalisation of every timm backbone here (encoder.json records it)
IMAGENET_STD = (0.229, 0.224, 0.225)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_LUMA = (0.299, 0.587, 0.114)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def keyed_uniform(seed: int, epoch: int, index, n: int) -> np.ndarray:
    """(B, n) float64 uniforms in [0, 1), a pure function of (seed, epoch, index[b], column)."""
    with np.errstate(over="ignore"):
        idx = np.asarray(index, dtype=np.int64).astype(np.uint64).reshape(-1, 1)
        key = _mix(np.array([seed], dtype=np.int64).astype(np.uint64) * _GOLDEN
                   + _mix(np.array([epoch + 1], dtype=np.uint64)))
        cols = np.arange(n, dtype=np.uint64).reshape(1, -1)
        x = _mix(key ^ _mix(idx * np.uint64(1024) + cols + _GOLDEN))
        return (x >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)


@dataclass(frozen=True)
class AugmentConfig:
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)


def crop_theta(u: Tensor, cfg: AugmentConfig) -> Tensor:
    """Affine matrices of random resized crops with flips. u: (B, 5) uniforms -> theta (B, 2, 3) for affine_grid."""
    lo, hi = cfg.scale
    area = lo + (hi - lo) * u[:, 0]
    log_r = math.log(cfg.ratio[0]) + (math.log(cfg.ratio[1]) - math.log(cfg.ratio[0])) * u[:, 1]
    r = torch.exp(log_r)
    w = torch.sqrt(area * r).clamp(max=1.0)  # fraction of the image width
    h = torch.sqrt(area / r).clamp(max=1.0)
    cx = (1 - w) * (2 * u[:, 2] - 1)  # crop centre in [-1, 1] coordinates, crop stays inside
    cy = (1 - h) * (2 * u[:, 3] - 1)
    sign = torch.where(u[:, 4] < cfg.flip, -1.0, 1.0).to(u.dtype)
    theta = torch.zeros(u.shape[0], 2, 3, dtype=u.dtype, device=u.device)
    theta[:, 0, 0] = w * sign
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    return theta


def _gray(x: Tensor) -> Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return _LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b


def color_jitter(x: Tensor, brightness: Tensor, contrast: Tensor, saturation: Tensor | None,
                 hue: Tensor | None) -> Tensor:
    """Per-sample colour jitter of x (B, 3, H, W) in [0, 1]; each factor (B,); hue in turns (B,). saturation or hue
    None: that step is skipped (a greyscale folder's setting, where both would change nothing)."""
    v = lambda t: t.view(-1, 1, 1, 1).to(x.dtype)  # noqa: E731
    x = (x * v(brightness)).clamp(0, 1)
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * v(contrast) + mean).clamp(0, 1)
    if saturation is not None:
        g = _gray(x)
        x = ((x - g) * v(saturation) + g).clamp(0, 1)
    if hue is None:
        return x
    # hue: rotate the chroma plane of YIQ by 2*pi*hue (the inverse computed once, on the CPU: torch.linalg.inv on a
    # GPU checks its result on the host, a wait in every step)
    to_yiq, from_yiq = (m.to(device=x.device, dtype=x.dtype) for m in _YIQ)
    ang = 2 * math.pi * hue.to(x.dtype)
    c, s = torch.cos(ang), torch.sin(ang)
    rot = torch.zeros(x.shape[0], 3, 3, dtype=x.dtype, device=x.device)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = c, -s, s, c
    m = from_yiq @ rot @ to_yiq  # (B, 3, 3)
    x = torch.einsum("bij,bjhw->bihw", m, x)
    return x.clamp(0, 1)


_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ = (_TO_YIQ, torch.linalg.inv(_TO_YIQ))  # RGB -> YIQ and back, float32 on the CPU


def gaussian_blur(x: Tensor, sigma: Tensor, max_sigma: float | None = None) -> Tensor:
    """Per-sample separable Gaussian blur; sigma (B,) in pixels; reflect padding. max_sigma: sigma.max() when the
    caller knows it on the host (reading it from a GPU tensor waits for the GPU)."""
    b, c, h, w = x.shape
    radius = max(1, int(math.ceil(3 * (float(sigma.max()) if max_sigma is None else max_sigma))))
    radius = min(radius, (min(h, w) - 1) // 2) or 1
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t.view(1, -1) / sigma.view(-1, 1).to(x.dtype)) ** 2)
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (B*C, K)
    y = x.reshape(1, b * c, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), k.view(b * c, 1, 1, -1), groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), k.view(b * c, 1, -1, 1), groups=b * c)
    return y.view(b, c, h, w)


def normalize(x: Tensor, mean, std) -> Tensor:
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def to_float(images: Tensor) -> Tensor:
    """uint8 (B, 3, H, W) -> float32 in [0, 1]."""
    return images.float().div_(255.0)


def test_transform(images: Tensor, mean, std) -> Tensor:
    """Evaluation transform: the cached images are already resized; only scale and normalise."""
    return normalize(to_float(images), mean, std)


def augment_batch(images: Tensor, index, epoch: int, seed: int, cfg: AugmentConfig, mean, std) -> Tensor:
    """One augmented crop per image. images: uint8 (B, 3, S, S) on any device; index: (B,) dataset rows
    -> float32 (B, 3, S, S) normalised. Deterministic in (seed, epoch, index)."""
    host = torch.from_numpy(keyed_uniform(seed, epoch, index.cpu() if torch.is_tensor(index) else index, 13)).float()
    u = host.to(images.device)
    x = to_float(images)
    b, _, h, w = x.shape
    grid = F.affine_grid(crop_theta(u[:, :5], cfg), (b, 3, h, w), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    bj, cj, sj, hj = cfg.jitter
    on = u[:, 5] < cfg.jitter_p
    one = torch.ones_like(u[:, 0])
    br = torch.where(on, 1 - bj + 2 * bj * u[:, 6], one)
    co = torch.where(on, 1 - cj + 2 * cj * u[:, 7], one)
    sa = torch.where(on, 1 - sj + 2 * sj * u[:, 8], one)
    hu = torch.where(on, -hj + 2 * hj * u[:, 9], torch.zeros_like(one))
    x = color_jitter(x, br, co, sa if sj else None, hu if hj else None)
    if cfg.grayscale_p > 0:
        gray = (u[:, 10] < cfg.grayscale_p).view(-1, 1, 1, 1)
        x = torch.where(gray, _gray(x).expand_as(x), x)
    if cfg.blur_p > 0:
        lo, hi = cfg.blur_sigma
        sigma = lo + (hi - lo) * u[:, 12]
        blurred = gaussian_blur(x, sigma, float((lo + (hi - lo) * host[:, 12]).max()))  # the same max, on the host
        x = torch.where((u[:, 11] < cfg.blur_p).view(-1, 1, 1, 1), blurred, x)
    return normalize(x, mean, std)


def cutmix(x: Tensor, lam: float, box_u: tuple[float, float], perm: Tensor) -> tuple[Tensor, float]:
    """Paste a box of each partner image perm[b] into image b (one box for the batch, CutMix).

    x: (B, 3, H, W); lam: drawn area kept; box_u: two uniforms for the box centre.
    Returns (mixed x, lam corrected to the box's exact area)."""
    _, _, h, w = x.shape
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = int(box_u[0] * h), int(box_u[1] * w)
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    out = x.clone()
    out[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
    return out, 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
