"""ContextUNet: our class-conditional UNet that predicts the noise in a noisy image.

Residual blocks are modulated (scale and shift) by the sum of a sinusoidal time embedding and a learned
class embedding; the class embedding has one extra row, the "no label" token that classifier-free
guidance needs. Skip connections join each encoder block to its decoder block.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fiberaug.errors import UserError


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(channels, groups), channels)


def _zero(module: nn.Module) -> nn.Module:
    """Zero-initialised output layers make every residual branch start as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class SinusoidalEmbedding(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=t.device) / half)
        angles = t.float()[:, None] * freqs[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the embedding as a FiLM scale and shift between the convolutions."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, groups: int) -> None:
        super().__init__()
        self.norm1 = _norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = _norm(out_ch, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        # Built here, once, so it is trained (the prototype made a fresh 1×1 conv on every call).
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    def __init__(self, channels: int, groups: int, head_dim: int = 32) -> None:
        super().__init__()
        self.heads = max(1, channels // head_dim)
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        attended = F.scaled_dot_product_attention(q, k, v)
        return x + self.out(attended.transpose(-1, -2).reshape(b, c, h, w))


class ContextUNet(nn.Module):
    """Noise predictor `net(x, t, labels) -> eps` for `channels`×`image_size`² images.

    Every entry of `channel_mults` is one resolution level; each level but the last halves the image,
    so `image_size` must be a multiple of 2**(levels-1) and leave at least 2×2 pixels at the bottom.
    `num_classes=0` makes it unconditional; otherwise `labels == num_classes` means "no label".
    """

    def __init__(
        self,
        channels: int,
        image_size: int,
        num_classes: int = 0,
        base_channels: int = 64,
        channel_mults: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 2,
        attention: bool = True,
        dropout: float = 0.0,
        norm_groups: int = 8,
    ) -> None:
        super().__init__()
        factor = 2 ** (len(channel_mults) - 1)
        if image_size % factor or image_size < 2 * factor:
            raise UserError(
                f"data.image_size={image_size} does not fit ContextUNet with channel_mults={list(channel_mults)}: "
                f"it takes multiples of {factor} from {2 * factor} up (or change model.denoiser.channel_mults)"
            )
        self.num_classes = num_classes
        self.gradient_checkpointing = False
        emb_dim = 4 * base_channels
        self.time_embedding = nn.Sequential(
            SinusoidalEmbedding(base_channels),
            nn.Linear(base_channels, emb_dim),
            nn.SiLU(),
            nn.Linear(emb_dim, emb_dim),
        )
        self.class_embedding = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None
        self.conv_in = nn.Conv2d(channels, base_channels, 3, padding=1)

        block = lambda i, o: ResBlock(i, o, emb_dim, dropout, norm_groups)  # noqa: E731
        widths = [base_channels * m for m in channel_mults]
        self.down = nn.ModuleList()
        skips, ch = [base_channels], base_channels
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks):
                self.down.append(block(ch, width))
                ch = width
                skips.append(ch)
            if level < len(widths) - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skips.append(ch)
        self.mid = nn.ModuleList(
            [block(ch, ch), SelfAttention(ch, norm_groups) if attention else nn.Identity(), block(ch, ch)]
        )
        self.up = nn.ModuleList()
        for level, width in reversed(list(enumerate(widths))):
            for _ in range(num_res_blocks + 1):
                self.up.append(block(ch + skips.pop(), width))
                ch = width
            if level > 0:
                upsample = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1))
                self.up.append(upsample)
        self.out = nn.Sequential(_norm(ch, norm_groups), nn.SiLU(), _zero(nn.Conv2d(ch, channels, 3, padding=1)))

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each block's activations in the backward pass instead of storing them."""
        self.gradient_checkpointing = True

    def _run(self, layer: nn.Module, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if not isinstance(layer, (ResBlock, SelfAttention)):
            return layer(h)
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(layer, h, emb, use_reentrant=False)
        return layer(h, emb)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.time_embedding(t.expand(x.shape[0]))
        if self.class_embedding is not None:
            if labels is None:
                labels = torch.full((x.shape[0],), self.num_classes, device=x.device, dtype=torch.long)
            emb = emb + self.class_embedding(labels)
        h = self.conv_in(x)
        skips = [h]
        for layer in self.down:
            h = self._run(layer, h, emb)
            skips.append(h)
        for layer in self.mid:
            h = self._run(layer, h, emb)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = torch.cat([h, skips.pop()], dim=1)
            h = self._run(layer, h, emb)
        return self.out(h)
