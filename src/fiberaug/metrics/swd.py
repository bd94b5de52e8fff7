"""Sliced Wasserstein distance between Laplacian-pyramid patches (Karras et al. 2018, Progressive GAN).

Each pyramid level is a band of spatial frequencies: the finest holds edges and noise, the coarsest (about
16×16) the layout and colour of the whole picture. From each level 7×7 neighbourhoods are cut at random
positions; each set's descriptors are normalised per channel by that set's own mean and standard deviation
(as ProGAN does, so the score follows the shape of the patch distribution rather than a global brightness
or contrast offset); the distance between the two clouds of descriptors is the mean, over random unit
directions, of the 1-D Wasserstein-1 distance of their projections. Reported ×1e3, per level and averaged.
Lower is better; 0 up to sampling noise for two sets of the same distribution.

Defaults follow ProGAN's `metrics/sliced_wasserstein.py`: 128 neighbourhoods per image, 4 repeats of 128
directions, levels from the image size down while at least 16 pixels.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fiberaug.errors import UserError
from fiberaug.metrics.images import match_sets

# The 5×5 binomial filter of cv2.pyrDown / pyrUp (a separable [1, 4, 6, 4, 1] / 16).
_BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16
COARSEST = 16  # the pyramid stops before a level whose short side would fall below this


def sliced_wasserstein(
    real: torch.Tensor,
    fake: torch.Tensor,
    *,
    seed: int = 0,
    patch_size: int = 7,
    patches_per_image: int = 128,
    repeats: int = 4,
    directions: int = 128,
    max_patches: int = 2**18,
) -> dict[str, float]:
    """`{"swd": mean, "swd/<res>": …}` (×1e3, lower is better), one entry per pyramid level, finest first.

    Levels are named by their side (`swd/64`, `swd/32`, `swd/16`), or height×width for non-square images.
    Both sets give the same number of neighbourhoods: `patches_per_image` times the smaller set's size, at
    most `max_patches` (which bounds time and memory for large sets; beyond 2048 images each image gives
    fewer). Deterministic for a given `seed`.
    """
    real, fake, _ = match_sets(real, fake)
    if min(real.shape[2:]) < patch_size:
        raise UserError(f"SWD needs images of at least {patch_size}×{patch_size} pixels, got {tuple(real.shape[2:])}")
    generator = torch.Generator().manual_seed(seed)
    count = min(patches_per_image * min(len(real), len(fake)), max_patches)
    levels = pyramid_levels(min(real.shape[2:]))
    scores = {}
    for band_real, band_fake in zip(laplacian_pyramid(real, levels), laplacian_pyramid(fake, levels)):
        h, w = band_real.shape[2:]
        descriptors = [_descriptors(band, count, patch_size, generator) for band in (band_real, band_fake)]
        distance = _sliced_distance(*descriptors, repeats, directions, generator)
        scores[f"swd/{h}" if h == w else f"swd/{h}x{w}"] = distance * 1e3
    return {"swd": float(np.mean(list(scores.values()))), **scores}


def pyramid_levels(side: int) -> int:
    """How many levels: halve the short side while it stays at least `COARSEST` (one level at 16 px or less)."""
    levels = 1
    while side // 2 >= COARSEST:
        side //= 2
        levels += 1
    return levels


def laplacian_pyramid(images: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """Band-pass levels, finest first, and the low-pass remainder last; their sum upsampled is the image."""
    gaussians = [images]
    for _ in range(levels - 1):
        gaussians.append(_blur(gaussians[-1])[:, :, ::2, ::2])
    bands = [fine - _upsample(coarse, fine.shape[2:]) for fine, coarse in zip(gaussians, gaussians[1:])]
    return [*bands, gaussians[-1]]


def _blur(images: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    """The binomial filter with mirrored borders (cv2's BORDER_REFLECT_101), as two 1-D passes of shifted
    sums: on a CPU several times faster than a 5×5 grouped convolution."""
    h, w = images.shape[2:]
    padded = F.pad(images, (2, 2, 2, 2), mode="reflect")
    rows = sum(tap * padded[:, :, :, i : i + w] for i, tap in enumerate(_BINOMIAL.tolist()))
    return sum(tap * gain * rows[:, :, i : i + h] for i, tap in enumerate(_BINOMIAL.tolist()))


def _upsample(images: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """cv2.pyrUp to `size`: zeros between the pixels, then the filter ×4 to keep the brightness."""
    n, c = images.shape[:2]
    spread = images.new_zeros(n, c, *size)
    spread[:, :, ::2, ::2] = images
    return _blur(spread, gain=4.0)


def _descriptors(band: torch.Tensor, count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """`count` random size×size neighbourhoods, spread evenly over the images and normalised per channel: a
    count × (size²·C) matrix."""
    n, c, h, w = band.shape
    half = size // 2
    images = torch.randperm(n, generator=generator)[torch.arange(count) % n]
    ys = torch.randint(half, h - half, (count,), generator=generator)
    xs = torch.randint(half, w - half, (count,), generator=generator)
    offsets = torch.arange(-half, half + 1)
    pixels = (images * h + ys)[:, None, None] + offsets[:, None]
    pixels = (pixels * w + xs[:, None, None] + offsets).flatten()  # count·size·size positions in N×H×W
    values = band.permute(0, 2, 3, 1).reshape(-1, c).index_select(0, pixels)  # (count·size·size) × C
    std, mean = torch.std_mean(values, dim=0)
    values.sub_(mean).div_(std.clamp_min(1e-8))  # clamped: a constant set stays finite and far from a real one
    return values.view(count, size * size * c)


def _sliced_distance(
    a: torch.Tensor, b: torch.Tensor, repeats: int, directions: int, generator: torch.Generator
) -> float:
    """Mean over random unit directions of the Wasserstein-1 distance between the projected descriptors.

    The directions come in `repeats` blocks only to bound memory. numpy sorts: its SIMD sort of float32 rows
    is several times faster than torch's on a CPU.
    """
    distances = []
    for _ in range(repeats):
        dirs = torch.randn(directions, a.shape[1], generator=generator)
        dirs /= dirs.norm(dim=1, keepdim=True)
        sorted_a, sorted_b = ((dirs @ x.T).numpy() for x in (a, b))  # directions × count, rows contiguous
        sorted_a.sort(axis=1)
        sorted_b.sort(axis=1)
        distances.append(np.abs(np.subtract(sorted_a, sorted_b, out=sorted_a), out=sorted_a).mean())
    return float(np.mean(distances))
