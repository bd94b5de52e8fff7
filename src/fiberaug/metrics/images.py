"""Checking image batches and bringing two of them to one size and channel count before they are compared."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fiberaug.errors import UserError

# Models clamp their samples to [-1, 1]; a little slack admits a tanh or float rounding, not a [0, 255] batch.
_RANGE_SLACK = 1e-3


def check_images(images: torch.Tensor, name: str) -> torch.Tensor:
    """`images` as a contiguous float32 CPU tensor N×C×H×W in [-1, 1], C = 1 or 3, or a UserError naming `name`.

    A batch that is one already comes back as it is, not copied: callers never write into it.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise UserError(f"{name}: expected a tensor N×C×H×W with C = 1 or 3, got {shape}")
    if not images.is_floating_point():
        raise UserError(f"{name}: expected floats in [-1, 1], got {images.dtype}")
    if images.shape[0] == 0:
        raise UserError(f"{name}: the batch is empty")
    images = images.detach().to("cpu", torch.float32).contiguous()
    low, high = images.min().item(), images.max().item()
    if not (-1 - _RANGE_SLACK <= low and high <= 1 + _RANGE_SLACK):
        raise UserError(f"{name}: values span [{low:.3g}, {high:.3g}]; expected images scaled to [-1, 1]")
    return images.clamp(-1, 1) if low < -1 or high > 1 else images


def match_sets(a: torch.Tensor, b: torch.Tensor, names: tuple[str, str] = ("real", "fake")) -> tuple[
    torch.Tensor, torch.Tensor, str
]:
    """Both sets at one size and channel count, and a line saying which.

    Size: the smaller height and the smaller width of the two; the larger set is scaled down with an
    antialiased bilinear filter (scaling the smaller one up would invent detail that neither set has). A set
    of another aspect ratio is stretched. Channels: a grayscale set beside an RGB one is repeated to three
    channels, so a generator that draws colour where the real images have none is charged for it (turning
    both to gray would hide that).
    """
    a, b = check_images(a, names[0]), check_images(b, names[1])
    rgb, height, width = 3 in (a.shape[1], b.shape[1]), min(a.shape[2], b.shape[2]), min(a.shape[3], b.shape[3])
    description = f"compared at {height}×{width}, {'RGB' if rgb else 'grayscale'}"
    return conform(a, height, width, rgb), conform(b, height, width, rgb), description


def conform(images: torch.Tensor, height: int, width: int, rgb: bool = False) -> torch.Tensor:
    """Checked `images` at height×width (antialiased bilinear), grayscale repeated to RGB when `rgb`."""
    images = check_images(images, "images")
    if rgb and images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1).contiguous()
    if images.shape[2:] != (height, width):
        scaled = F.interpolate(images, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
        images = scaled.clamp(-1, 1)  # the antialiasing filter overshoots at sharp edges
    return images
