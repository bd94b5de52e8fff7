"""DiffAugment (Zhao et al. 2020): differentiable augmentation of every image a GAN's discriminator sees.

On a small data set the discriminator soon memorises the real images and its gradients stop teaching
the generator. Augmenting only the real images would teach the generator to draw augmented images;
augmenting real and generated images alike, with transforms that gradients pass through, enlarges
what the discriminator must tell apart while the generator still learns the un-augmented images.

The ranges follow the authors' reference (mit-han-lab/data-efficient-gans) for images in [-1, 1].
Every image draws its own values, from torch's global generator (seeded by `seed`):

- `color`: brightness + U(-0.5, 0.5); saturation (distance from the pixel's channel mean) × U(0, 2);
  contrast (distance from the image's mean) × U(0.5, 1.5). On one-channel images saturation is the
  identity (a pixel is its own channel mean), so grayscale gets brightness and contrast only.
- `translation`: a shift of up to 1/8 of the height and of the width in each direction, in whole
  pixels, filled with zeros.
- `cutout`: a square of half the height and width set to zero, centred on a random pixel (the part
  that falls outside the image is lost).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from fiberaug.errors import UserError


def brightness(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Add `delta[i]` to every pixel of image i."""
    return x + delta.view(-1, 1, 1, 1)


def saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Scale each pixel's distance from its mean over the channels by `factor[i]` (0: gray)."""
    mean = x.mean(dim=1, keepdim=True)
    return mean + (x - mean) * factor.view(-1, 1, 1, 1)


def contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Scale each image's distance from its mean over channels and pixels by `factor[i]`."""
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return mean + (x - mean) * factor.view(-1, 1, 1, 1)


def translate(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Move image i down by `dy[i]` and right by `dx[i]` whole pixels; what comes in is zero.

    A gather from clamped indices times a mask of the valid ones: no padding copy and no device sync.
    """
    n, _, h, w = x.shape
    rows = torch.arange(h, device=x.device) - dy.view(-1, 1)  # output row r reads input row r - dy
    cols = torch.arange(w, device=x.device) - dx.view(-1, 1)
    valid = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    batch = torch.arange(n, device=x.device).view(-1, 1, 1)
    moved = x[batch, :, rows.clamp(0, h - 1)[:, :, None], cols.clamp(0, w - 1)[:, None, :]]  # (N, H, W, C)
    return moved.permute(0, 3, 1, 2) * valid[:, None].to(x.dtype)


def cutout(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Zero a `height` × `width` rectangle whose top-left corner in image i is (`top[i]`, `left[i]`)."""
    _, _, h, w = x.shape
    rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    in_rows = (rows >= top.view(-1, 1)) & (rows < top.view(-1, 1) + height)
    in_cols = (cols >= left.view(-1, 1)) & (cols < left.view(-1, 1) + width)
    keep = ~(in_rows[:, :, None] & in_cols[:, None, :])
    return x * keep[:, None].to(x.dtype)


def _uniform(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """One value per image from U(low, high), in the images' dtype (drawn in float32 for any dtype)."""
    return (low + (high - low) * torch.rand(x.shape[0], device=x.device)).to(x.dtype)


def _fraction(size: int, fraction: float) -> int:
    """`size · fraction` rounded half up, as the reference does (Python's round() rounds half to even)."""
    return int(size * fraction + 0.5)


def _shifts(x: torch.Tensor, size: int) -> torch.Tensor:
    bound = _fraction(size, 1 / 8)
    return torch.randint(-bound, bound + 1, (x.shape[0],), device=x.device)


def random_color(x: torch.Tensor) -> torch.Tensor:
    x = brightness(x, _uniform(x, -0.5, 0.5))
    x = saturation(x, _uniform(x, 0.0, 2.0))
    return contrast(x, _uniform(x, 0.5, 1.5))


def random_translation(x: torch.Tensor) -> torch.Tensor:
    return translate(x, _shifts(x, x.shape[2]), _shifts(x, x.shape[3]))


def random_cutout(x: torch.Tensor) -> torch.Tensor:
    (h, w), n = x.shape[2:], x.shape[0]
    height, width = _fraction(h, 1 / 2), _fraction(w, 1 / 2)
    top = torch.randint(0, h, (n,), device=x.device) - height // 2
    left = torch.randint(0, w, (n,), device=x.device) - width // 2
    return cutout(x, top, left, height, width)


OPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "color": random_color, "translation": random_translation, "cutout": random_cutout
}


def parse_policy(policy: str | Sequence[str] | None) -> tuple[str, ...]:
    """The ops of a policy: a comma-separated string or a list of names; None or empty means none."""
    names = policy.split(",") if isinstance(policy, str) else list(policy or ())
    names = [name.strip() for name in names if name.strip()]
    unknown = [name for name in names if name not in OPS]
    if unknown:
        raise UserError(
            f"model.diffaugment={policy!r}: {unknown[0]!r} is not known; give a comma-separated subset of "
            f"{', '.join(OPS)} (null: no DiffAugment)"
        )
    return tuple(names)


class DiffAugment(nn.Module):
    """Applies the ops of `policy` in its order; with an empty policy it returns its input itself."""

    def __init__(self, policy: str | Sequence[str] | None = None) -> None:
        super().__init__()
        self.policy = parse_policy(policy)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.policy:
            x = OPS[name](x)
        return x

    def extra_repr(self) -> str:
        return f"policy={','.join(self.policy) or 'none'}"
