"""The patch discriminator of pix2pix (Isola et al. 2017), as taming-transformers and latent diffusion use it to
sharpen an autoencoder's reconstructions: one logit per overlapping patch instead of one per image.

A patch-level critic judges texture and edges, which an L1 loss leaves blurred, without asking the decoder to
invent whole-image structure. Each output logit sees a receptive field of 70×70 pixels with `n_layers=3`.
"""

from __future__ import annotations

from torch import Tensor, nn

from fiberaug.errors import UserError
from fiberaug.nets.dcgan import init_weights

NORMS = ("batch", "none")


def max_layers(image_size: int) -> int:
    """The most stride-2 layers that leave at least one patch logit: each 4×4 stride-2 convolution (padding 1) halves
    the side, rounding down, and each of the two 4×4 stride-1 ones after them removes a pixel."""
    layers = 0
    while (image_size >> (layers + 1)) - 2 >= 1:
        layers += 1
    return layers


class PatchDiscriminator(nn.Module):
    """`n_layers` 4×4 stride-2 convolutions (widths doubling from `base_channels` up to 8×), one 4×4 stride-1
    convolution, then a 4×4 stride-1 convolution to one channel: `(N, 1, h, w)` patch logits, LeakyReLU(0.2) between.

    `norm="batch"` as in pix2pix and taming (not after the first convolution), or `"none"`. Images too small for
    `n_layers` (pix2pix's 3 needs 24 px) get as many as fit: a patch then spans the whole image.
    """

    def __init__(
        self, channels: int, image_size: int, base_channels: int = 64, n_layers: int = 3, norm: str = "batch"
    ) -> None:
        super().__init__()
        if norm not in NORMS:
            raise UserError(f"model.discriminator.norm={norm!r} is not known; choose one of: {', '.join(NORMS)}")
        if not isinstance(n_layers, int) or n_layers < 1:
            raise UserError(f"model.discriminator.n_layers={n_layers!r} must be an integer of at least 1")
        n_layers = min(n_layers, max_layers(image_size))
        if n_layers < 1:
            raise UserError(f"data.image_size={image_size} is too small for a patch discriminator: it takes images of "
                            "at least 6 px")

        def norm_layer(width: int) -> nn.Module:
            return nn.BatchNorm2d(width) if norm == "batch" else nn.Identity()

        widths = [base_channels * min(2**i, 8) for i in range(n_layers + 1)]
        layers: list[nn.Module] = [nn.Conv2d(channels, widths[0], 4, 2, 1), nn.LeakyReLU(0.2)]
        for in_ch, out_ch in zip(widths[:-2], widths[1:-1]):
            layers += [nn.Conv2d(in_ch, out_ch, 4, 2, 1, bias=norm == "none"), norm_layer(out_ch), nn.LeakyReLU(0.2)]
        layers += [nn.Conv2d(widths[-2], widths[-1], 4, 1, 1, bias=norm == "none"), norm_layer(widths[-1]),
                   nn.LeakyReLU(0.2), nn.Conv2d(widths[-1], 1, 4, 1, 1)]
        self.layers = nn.Sequential(*layers)
        init_weights(self)  # pix2pix's initialisation, the same as DCGAN's

    def forward(self, images: Tensor) -> Tensor:
        return self.layers(images)
