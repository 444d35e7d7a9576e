"""CIFAR-10's training augmentation on the images' own device: :func:`normalize`, and :func:`augment` (random crop
of the 4-padded image and horizontal flip, one draw and one gather for the whole batch), for uint8 (B, 3, H, W)
batches as :mod:`sdlib.data` holds them."""

from __future__ import annotations

from typing import Any

import torch

from sdlib.checks import check, integer
from sdlib.data import CIFAR10_MEAN, CIFAR10_STD


def _check_images(name: str, x: Any) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"{name} must be a uint8 torch.Tensor of shape (B, 3, H, W), got "
                         f"{f'{x.dtype} {tuple(x.shape)}' if isinstance(x, torch.Tensor) else type(x).__name__}")
    return x


_NORM_CACHE: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def normalize(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> a new contiguous float32 tensor ``(x/255 - CIFAR10_MEAN) / CIFAR10_STD`` per channel."""
    x = _check_images("x_uint8", x_uint8)
    key = str(x.device)
    if key not in _NORM_CACHE:  # one multiply-add, its constants kept per device (no copy to the device per batch)
        std, mean = torch.tensor(CIFAR10_STD, dtype=torch.float64), torch.tensor(CIFAR10_MEAN, dtype=torch.float64)
        _NORM_CACHE[key] = ((1.0 / (255.0 * std)).float().view(1, 3, 1, 1).to(x.device),
                            (mean / std).float().view(1, 3, 1, 1).to(x.device))
    scale, shift = _NORM_CACHE[key]
    return x.to(torch.float32, memory_format=torch.contiguous_format).mul_(scale).sub_(shift)


def sample_crop_flip(batch: int, generator: torch.Generator | None = None, device: str | torch.device = "cpu",
                     padding: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The random parameters of :func:`augment` for ``batch`` images, drawn in this order from ``generator`` (on
    ``device``): ``top``, ``left`` int64 uniform on ``0..2*padding`` (``RandomCrop(32, padding=4)``'s corner) and
    ``flip`` bool, True with probability 1/2."""
    batch, padding = check("batch", batch, integer(0)), check("padding", padding, integer(0))
    device = torch.device(device)
    if generator is not None and (not isinstance(generator, torch.Generator) or generator.device.type != device.type):
        raise ValueError(f"generator must be None or a torch.Generator on the images' device {device}, got "
                         f"{generator!r}")
    top = torch.randint(0, 2 * padding + 1, (batch,), generator=generator, device=device)
    left = torch.randint(0, 2 * padding + 1, (batch,), generator=generator, device=device)
    flip = torch.randint(0, 2, (batch,), generator=generator, device=device).bool()
    return top, left, flip


def crop_flip(x_uint8: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor,
              padding: int = 4) -> torch.Tensor:
    """The deterministic core of :func:`augment`, one gather over the batch: zero-pad by ``padding``, crop H x W at
    ``(top[b], left[b])``, mirror where ``flip[b]``; equal, image by image, to torchvision's pad, crop and
    horizontal_flip. uint8 (B, 3, H, W) in and out."""
    x, padding = _check_images("x_uint8", x_uint8), check("padding", padding, integer(0))
    b, c, h, w = x.shape
    for name, t in (("top", top), ("left", left), ("flip", flip)):
        if not isinstance(t, torch.Tensor) or t.shape != (b,):
            raise ValueError(f"{name} must be a tensor of shape ({b},), got {getattr(t, 'shape', type(t))}")
    top, left, flip = top.to(x.device, torch.int64), left.to(x.device, torch.int64), flip.to(x.device, torch.bool)
    hp, wp = h + 2 * padding, w + 2 * padding
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))  # zeros, still uint8
    col = torch.arange(w, device=x.device)
    rows = top[:, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = left[:, None] + torch.where(flip[:, None], (w - 1) - col, col)  # (B, W): mirrored read when flipped
    index = (rows[:, :, None] * wp + cols[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)
    return padded.reshape(b, c, hp * wp).gather(2, index).reshape(b, c, h, w)


def augment(x_uint8: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """CIFAR-10's standard augmentation of a whole batch, then :func:`normalize`: a random 32x32 crop of the image
    zero-padded by 4 (padded pixels are 0 before normalization) and a horizontal flip with probability 1/2, on
    ``x_uint8``'s device: one draw (:func:`sample_crop_flip`) and one gather (:func:`crop_flip`); the order of
    images (and so their labels) unchanged."""
    x = _check_images("x_uint8", x_uint8)
    top, left, flip = sample_crop_flip(x.shape[0], generator=generator, device=x.device)
    return normalize(crop_flip(x, top, left, flip))
