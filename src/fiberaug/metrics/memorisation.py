"""Memorisation: which generated images are copies of a training image.

For each generated image x, its nearest and second-nearest training images by ℓ2 distance in pixel space
(at the evaluation size, see `match_sets`). x counts as a copy when d(x, nearest) < ⅓ · d(x, second
nearest): it sits far closer to one training image than to any other. This is the criterion of Yoon et al.
2023 ("Diffusion probabilistic models generalize when they fail to memorize") that Gu et al. 2023 ("On
memorization in diffusion models", `mem_ratio.py` of sail-sg/DiffMemorize) report as the memorisation
ratio: the share of generated images with d₁/d₂ < 1/3. A ratio near 1 means x is about as far from its
nearest training image as from the next: new, or an average of several.

It looks only at pixels, so a copy that is shifted by several pixels, flipped or recoloured is not found,
and a training set with near-duplicates hides copies of them (d₁ ≈ d₂). `memorisation` (the share of copies)
is lower-better; `memorisation/median_ratio` is higher-better (further from copying).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from fiberaug.errors import UserError
from fiberaug.imaging import make_grid, to_uint8
from fiberaug.metrics.images import match_sets

COPY_RATIO = 1 / 3


@dataclass(frozen=True)
class Memorisation:
    """Per generated image: its two nearest training images, their distances and the ratio d₁/d₂."""

    nearest: torch.Tensor  # N×2 indices into the training set: nearest, second nearest
    distances: torch.Tensor  # N×2 root-mean-square pixel differences (images in [-1, 1])
    ratio: torch.Tensor  # N: distances[:, 0] / distances[:, 1] (0 for an exact copy)
    threshold: float = COPY_RATIO

    @property
    def copies(self) -> torch.Tensor:
        """N booleans: which generated images count as copies."""
        return self.ratio < self.threshold

    def values(self) -> dict[str, float]:
        return {
            "memorisation": self.copies.double().mean().item(),
            "memorisation/median_ratio": self.ratio.median().item(),
        }


def memorisation(
    fake: torch.Tensor, train: torch.Tensor, *, threshold: float = COPY_RATIO, chunk: int = 256
) -> Memorisation:
    """The two nearest training images of every generated one, and which are copies.

    Distances are computed `chunk` generated images at a time, so the work needs some tens of MB beyond the
    two sets whatever their size (50 MB for 1,000 generated against 5,000 training images of 64×64×3).
    """
    train, fake, _ = match_sets(train, fake, names=("train", "fake"))
    if len(train) < 2:
        raise UserError(f"memorisation needs at least 2 training images, got {len(train)}")
    train_flat = train.flatten(1)
    train_sq = train_flat.square().sum(dim=1)
    pairs = [_two_nearest(part, train_flat, train_sq) for part in fake.flatten(1).split(chunk)]
    nearest, distances = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
    ratio = torch.where(distances[:, 1] > 0, distances[:, 0] / distances[:, 1].clamp_min(1e-12), 0.0)
    return Memorisation(nearest=nearest, distances=distances, ratio=ratio, threshold=threshold)


def _two_nearest(
    fake: torch.Tensor, train: torch.Tensor, train_sq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two nearest training images of each row of `fake` (found by ‖f‖² + ‖t‖² − 2 f·t) and their exact
    RMS distances: the fast form rounds an exact copy's 0 to a small positive number."""
    squared = fake.square().sum(dim=1, keepdim=True) + train_sq - 2 * fake @ train.T
    nearest = torch.topk(squared, 2, dim=1, largest=False).indices
    return nearest, (fake[:, None] - train[nearest]).square().mean(dim=2).sqrt()


def nearest_sheet(
    fake: torch.Tensor, train: torch.Tensor, result: Memorisation, *, rows: int = 16, cell: int = 64
) -> np.ndarray:
    """The `rows` generated images with the lowest ratio, each beside its nearest and second-nearest training
    image and labelled with the ratio and whether it counts as a copy: an H×W×3 uint8 picture (nearest.png).

    `fake` and `train` are the sets `result` was computed from; small images are enlarged to about `cell` px.
    """
    train, fake, _ = match_sets(train, fake, names=("train", "fake"))
    order = torch.argsort(result.ratio, stable=True)[:rows]  # ties (exact copies) in generated order
    triples = torch.stack([fake[order], train[result.nearest[order, 0]], train[result.nearest[order, 1]]], dim=1)
    pictures = to_uint8(triples.flatten(0, 1))
    scale = max(1, cell // pictures.shape[1])
    pictures = pictures.repeat(scale, axis=1).repeat(scale, axis=2)
    if pictures.shape[3] == 1:
        pictures = pictures.repeat(3, axis=3)
    grid = make_grid(pictures, columns=3)
    verdicts = [(result.ratio[i].item(), result.copies[i].item()) for i in order]
    return _label(grid, pictures.shape[1], verdicts, result.threshold)


def _label(grid: np.ndarray, cell: int, verdicts: list[tuple[float, bool]], threshold: float) -> np.ndarray:
    """A header over the three columns and, right of each row, its ratio and verdict (copies in red)."""
    font = ImageFont.load_default()
    header, margin, padding = 14, 150, 2  # padding: make_grid's, between the cells
    canvas = Image.new("RGB", (grid.shape[1] + margin, grid.shape[0] + header))
    canvas.paste(Image.fromarray(grid), (0, header))
    draw = ImageDraw.Draw(canvas)
    for column, title in enumerate(("generated", "nearest", "2nd nearest")):
        draw.text((padding + column * (cell + padding), 1), title, fill=(200, 200, 200), font=font)
    draw.text((grid.shape[1] + 4, 1), f"d1/d2 (copy if < {threshold:.2f})", fill=(200, 200, 200), font=font)
    for row, (ratio, copy) in enumerate(verdicts):
        y = header + padding + row * (cell + padding) + cell // 2 - 6
        text, colour = (f"{ratio:.3f}  COPY", (255, 80, 80)) if copy else (f"{ratio:.3f}  not a copy", (255, 255, 255))
        draw.text((grid.shape[1] + 4, y), text, fill=colour, font=font)
    return np.asarray(canvas)
