"""DCGAN-style generator and discriminator (Radford et al. 2016), sized from the image and class-conditional.

Both halve or double the resolution with stride-2 4×4 convolutions between 4×4 and `image_size`, so
`image_size` must be a power of two from 16 up. The generator is conditioned by a class embedding
concatenated to its noise; the discriminator by projection (Miyato & Koyama 2018): the inner product of
a class embedding with its features is added to its score. The discriminator can be spectrally normalised
(Miyato et al. 2018, SNGAN).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm
from torch.utils.checkpoint import checkpoint

from fiberaug.errors import UserError

NORMS = ("batch", "layer", "none")


def _check_size(image_size: int, name: str) -> int:
    """The number of stride-2 stages between 4×4 and `image_size`."""
    if image_size < 16 or image_size & (image_size - 1):
        raise UserError(
            f"data.image_size={image_size} does not fit the DCGAN {name}: it takes powers of two from 16 up"
        )
    return int(math.log2(image_size)) - 2


def _norm(kind: str, channels: int, name: str) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels)  # normalises each sample over channels and pixels
    if kind == "none":
        return nn.Identity()
    raise UserError(f"model.{name}.norm={kind!r} is not known; choose one of: {', '.join(NORMS)}")


def _widths(base_channels: int, max_channels: int, stages: int) -> list[int]:
    """Channels from the finest stage to 4×4: doubling as the resolution halves, capped at `max_channels`."""
    return [min(max_channels, base_channels * 2**i) for i in range(stages)]


def init_weights(module: nn.Module) -> None:
    """DCGAN's initialisation: weights N(0, 0.02), norm scales N(1, 0.02), biases zero."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.normal_(m.weight, 1.0, 0.02)
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)


class _Checkpointed(nn.Module):
    """Runs its blocks in turn, recomputing their activations in the backward pass when enabled.

    Non-reentrant checkpointing (`use_reentrant=False`) supports the double backward of a gradient penalty.
    """

    def __init__(self) -> None:
        super().__init__()
        self.gradient_checkpointing = False

    def enable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = True

    def _run(self, blocks: nn.ModuleList, h: torch.Tensor) -> torch.Tensor:
        for block in blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h = checkpoint(block, h, use_reentrant=False)
            else:
                h = block(h)
        return h


class Generator(_Checkpointed):
    """Maps noise `(N, latent_dim)` and class indices to images `(N, channels, image_size, image_size)` in [-1, 1].

    A transposed convolution turns the noise into 4×4 features of the widest stage; each stage then doubles
    the resolution, and the last one outputs the image. `extra_layers` 3×3 convolutions follow each
    intermediate stage for depth.
    """

    def __init__(
        self,
        channels: int,
        image_size: int,
        num_classes: int = 0,
        latent_dim: int = 64,
        base_channels: int = 64,
        max_channels: int = 512,
        norm: str = "batch",
        extra_layers: int = 0,
    ) -> None:
        super().__init__()
        stages = _check_size(image_size, "generator")
        widths = _widths(base_channels, max_channels, stages)[::-1]  # 4×4 first
        self.embedding = nn.Embedding(num_classes, latent_dim) if num_classes else None
        in_dim = 2 * latent_dim if num_classes else latent_dim

        def layer(conv: nn.Module, out_ch: int) -> nn.Sequential:
            return nn.Sequential(conv, _norm(norm, out_ch, "generator"), nn.ReLU())

        blocks = [layer(nn.ConvTranspose2d(in_dim, widths[0], 4, 1, 0, bias=False), widths[0])]
        for in_ch, out_ch in zip(widths[:-1], widths[1:]):
            blocks.append(layer(nn.ConvTranspose2d(in_ch, out_ch, 4, 2, 1, bias=False), out_ch))
            blocks += [layer(nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False), out_ch) for _ in range(extra_layers)]
        blocks.append(nn.Sequential(nn.ConvTranspose2d(widths[-1], channels, 4, 2, 1), nn.Tanh()))
        self.blocks = nn.ModuleList(blocks)
        init_weights(self)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.embedding is not None:
            z = torch.cat([z, self.embedding(labels)], dim=1)
        return self._run(self.blocks, z[:, :, None, None])


class Discriminator(_Checkpointed):
    """Scores images `(N, channels, image_size, image_size)` as one logit (or critic value) per sample.

    Each stage halves the resolution down to 4×4; the first stage has no normalisation, as in DCGAN.
    `norm="batch"` couples the samples of a batch, so it must not be used with a gradient penalty.

    `spectral_norm=True` divides the weight of every convolution, of the score layer and of the projection
    embedding by its largest singular value (SNGAN; the projection discriminator's own code normalises
    the embedding too, and without it the class term escapes the Lipschitz bound). A convolution's weight
    counts as the matrix (out, in·k·k), as in SNGAN. The singular value is estimated by one power
    iteration per forward pass in training mode (a checkpointed block runs one more as it recomputes).
    SNGAN uses it without other normalisation: `norm="none"`.
    """

    def __init__(
        self,
        channels: int,
        image_size: int,
        num_classes: int = 0,
        base_channels: int = 64,
        max_channels: int = 512,
        norm: str = "layer",
        extra_layers: int = 0,
        spectral_norm: bool = False,
    ) -> None:
        super().__init__()
        stages = _check_size(image_size, "discriminator")
        widths = _widths(base_channels, max_channels, stages)

        def layer(conv: nn.Module, out_ch: int, normed: bool = True) -> nn.Sequential:
            return nn.Sequential(
                conv, _norm(norm, out_ch, "discriminator") if normed else nn.Identity(), nn.LeakyReLU(0.2)
            )

        blocks = [layer(nn.Conv2d(channels, widths[0], 4, 2, 1), widths[0], normed=False)]
        for in_ch, out_ch in zip(widths[:-1], widths[1:]):
            blocks += [layer(nn.Conv2d(in_ch, in_ch, 3, 1, 1), in_ch) for _ in range(extra_layers)]
            blocks.append(layer(nn.Conv2d(in_ch, out_ch, 4, 2, 1), out_ch))
        self.blocks = nn.ModuleList(blocks)
        features = widths[-1] * 4 * 4
        self.score = nn.Linear(features, 1)
        self.embedding = nn.Embedding(num_classes, features) if num_classes else None
        init_weights(self)
        if spectral_norm:  # after the initialisation, which writes the raw weights
            for m in [m for m in self.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding))]:
                _spectral_norm(m)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h = self._run(self.blocks, x).flatten(1)
        score = self.score(h).squeeze(1)
        if self.embedding is not None:
            score = score + (self.embedding(labels) * h).sum(dim=1)
        return score
