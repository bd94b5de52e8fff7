"""FastGAN's networks (Liu et al., ICLR 2021) for the one GAN module: a generator with skip-layer excitation and a
self-supervised discriminator that must reconstruct its input from its own features.

Generator: noise → 4×4 → doubling stages (upsample, 3×3 conv, BatchNorm, GLU) up to `image_size`. Skip-layer
excitation (SLE): the features at resolution r, pooled to 4×4 and squeezed to one sigmoid gate per channel, scale
the channels of the features at 16·r (every such pair the image has: 4→64, 8→128, 16→256, 32→512, 64→1024), so that
coarse structure steers fine features across the whole image at the cost of a channel-wise product.

Discriminator: stride-2 stages (4×4 conv, norm, LeakyReLU) from `image_size` down to 8×8, a score (and the class
projection); two small decoders reconstruct, from the 8×8 features, the whole image and, from a random quarter of
the 16×16 features, that quarter of the image, both at `min(image_size, 128)` px. The reference compares them with
LPIPS, a network nobody here may download; this uses the mean absolute error of the pixels, which asks the same of
the features (to hold the image's content) with no outside knowledge, at the price of blurrier targets. The
reconstruction loss is the critic's alone (`GANModule` adds it to the critic's step on real images).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from fiberaug.errors import UserError
from fiberaug.nets.dcgan import _Checkpointed, _norm, init_weights

#: Channels per resolution, as multiples of the width (the reference's nfc table).
WIDTH = {4: 16, 8: 8, 16: 4, 32: 2, 64: 2, 128: 1, 256: 0.5, 512: 0.25, 1024: 0.125}


def _stages(image_size: int, name: str) -> list[int]:
    if image_size not in WIDTH or image_size < 64:
        raise UserError(f"data.image_size={image_size} does not fit the FastGAN {name}: it takes powers of two from "
                        "64 to 1024")
    return [2**k for k in range(2, int(math.log2(image_size)) + 1)]


def _channels(width: int, resolution: int) -> int:
    return max(8, int(WIDTH[resolution] * width))


class SkipExcitation(nn.Module):
    """The gate of skip-layer excitation: low-resolution features → one sigmoid weight per high-resolution channel."""

    def __init__(self, low_channels: int, high_channels: int) -> None:
        super().__init__()
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(4), nn.Conv2d(low_channels, high_channels, 4), nn.SiLU(),
            nn.Conv2d(high_channels, high_channels, 1), nn.Sigmoid(),
        )

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        return high * self.gate(low)


def _up(in_channels: int, out_channels: int) -> nn.Sequential:
    """Double the resolution: nearest upsampling, 3×3 conv to twice the channels, BatchNorm, GLU."""
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                         nn.Conv2d(in_channels, 2 * out_channels, 3, 1, 1, bias=False),
                         nn.BatchNorm2d(2 * out_channels), nn.GLU(dim=1))


class FastGANGenerator(_Checkpointed):
    """Maps noise `(N, latent_dim)` and class indices to images `(N, channels, image_size, image_size)` in [-1, 1];
    class-conditional as the DCGAN's (a class embedding concatenated to the noise)."""

    def __init__(self, channels: int, image_size: int, num_classes: int = 0, latent_dim: int = 64,
                 width: int = 64) -> None:
        super().__init__()
        self.resolutions = _stages(image_size, "generator")
        widths = [_channels(width, r) for r in self.resolutions]
        self.embedding = nn.Embedding(num_classes, latent_dim) if num_classes else None
        in_dim = 2 * latent_dim if num_classes else latent_dim
        self.start = nn.Sequential(nn.ConvTranspose2d(in_dim, 2 * widths[0], 4, 1, 0, bias=False),
                                   nn.BatchNorm2d(2 * widths[0]), nn.GLU(dim=1))
        self.blocks = nn.ModuleList(_up(a, b) for a, b in zip(widths[:-1], widths[1:]))
        index = {r: i for i, r in enumerate(self.resolutions)}
        self.skips = nn.ModuleDict({str(r): SkipExcitation(widths[index[r]], widths[index[16 * r]])
                                    for r in self.resolutions if 16 * r in index})
        self.to_image = nn.Sequential(nn.Conv2d(widths[-1], channels, 3, 1, 1), nn.Tanh())
        init_weights(self)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.embedding is not None:
            z = torch.cat([z, self.embedding(labels)], dim=1)
        h = self.start(z[:, :, None, None])
        features = {4: h}
        for resolution, block in zip(self.resolutions[1:], self.blocks):
            h = self._run([block], h)
            low = features.get(resolution // 16)
            if low is not None:
                h = self.skips[str(resolution // 16)](low, h)
            features[resolution] = h
        return self.to_image(h)


def _down(in_channels: int, out_channels: int, norm: str, first: bool = False) -> nn.Sequential:
    return nn.Sequential(spectral_norm(nn.Conv2d(in_channels, out_channels, 4, 2, 1, bias=first)),
                         nn.Identity() if first else _norm(norm, out_channels, "discriminator"), nn.LeakyReLU(0.2))


class _Decoder(nn.Sequential):
    """8×8 features → an image of `size` px (nearest upsampling and 3×3 convs, GLU), in [-1, 1]."""

    def __init__(self, in_channels: int, channels: int, size: int, width: int) -> None:
        layers, current = [], in_channels
        for _ in range(int(math.log2(size // 8))):
            out = max(16, width // 2)
            layers.append(_up(current, out))
            current = out
        super().__init__(*layers, nn.Conv2d(current, channels, 3, 1, 1), nn.Tanh())


class FastGANDiscriminator(_Checkpointed):
    """Scores images as one logit (or critic value) per sample, with projection for classes (as the DCGAN's), and
    reconstructs them from its own features (`forward(..., reconstruct=True)` also returns that loss)."""

    self_supervised = True

    def __init__(self, channels: int, image_size: int, num_classes: int = 0, width: int = 64,
                 norm: str = "batch") -> None:
        super().__init__()
        resolutions = _stages(image_size, "discriminator")[::-1]  # image_size first, down to 8×8
        resolutions = resolutions[: resolutions.index(8) + 1]
        widths = [_channels(width, r) for r in resolutions[1:]]
        ins = [channels, *widths[:-1]]
        self.blocks = nn.ModuleList(_down(a, b, norm, first=i == 0) for i, (a, b) in enumerate(zip(ins, widths)))
        self.at16 = resolutions.index(8) - 2  # the block whose output is 16×16
        features = widths[-1] * 8 * 8
        self.score = spectral_norm(nn.Linear(features, 1))
        self.embedding = spectral_norm(nn.Embedding(num_classes, features)) if num_classes else None
        self.size = min(image_size, 128)
        self.decode_whole = _Decoder(widths[-1], channels, self.size, width)
        self.decode_part = _Decoder(widths[-2], channels, self.size, width)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, reconstruct: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        h, at16 = x, None
        for i, block in enumerate(self.blocks):
            h = self._run([block], h)
            if i == self.at16:
                at16 = h
        flat = h.flatten(1)
        score = self.score(flat).squeeze(1)
        if self.embedding is not None:
            score = score + (self.embedding(labels) * flat).sum(dim=1)
        if not reconstruct:
            return score
        return score, self.reconstruction_loss(x, h, at16)

    def reconstruction_loss(self, x: torch.Tensor, at8: torch.Tensor, at16: torch.Tensor) -> torch.Tensor:
        """Mean absolute error of the whole image from the 8×8 features and of a random quarter of it from that
        quarter of the 16×16 features (one quarter per batch, drawn by the CPU: no wait for the GPU)."""
        whole = F.interpolate(x, size=self.size, mode="area")
        quarter = int(torch.randint(4, (1,)))
        row, col = divmod(quarter, 2)
        half = x.shape[-1] // 2
        part = x[..., row * half : (row + 1) * half, col * half : (col + 1) * half]
        part = F.interpolate(part, size=self.size, mode="area" if half >= self.size else "bilinear")
        crop = at16[..., row * 8 : (row + 1) * 8, col * 8 : (col + 1) * 8]
        return (self.decode_whole(at8) - whole).abs().mean() + (self.decode_part(crop) - part).abs().mean()
