"""Memorisation: which generated images are copies of a training image.

For each generated image x, its nearest and second-nearest training images, d₁ and d₂. x counts as a copy when
d₁ < ⅓ · d₂: it sits far closer to one training image than to any other. This is the criterion of Yoon et al.
2023 ("Diffusion probabilistic models generalize when they fail to memorize") that Gu et al. 2023 ("On
memorization in diffusion models", `mem_ratio.py` of sail-sg/DiffMemorize) report as the memorisation ratio.
It misses copies of images that have near-duplicates in the training set (a panel shot twice, the fibre tiles'
same scene at successive epochs): there d₂ is as small as d₁. So x also counts as a copy when d₁ < ⅓ · m, m the
median distance of a training image to its nearest other training image: x is closer to a training image than
training images usually are to each other.

Distances are root-mean-square pixel differences after a 3×3 box blur (which damps JPEG's and noise's
high frequencies, not the content), the smallest over shifts of x by up to one pixel (a copy shifted by a pixel
stays a copy), compared on the interior the shifts leave. On the fibre tiles (training: 9 of their 12 positions,
40 planted copies each way) this flags all exact copies, JPEG re-encodings at quality 90 and 75 and one-pixel
shifts, and none of the 120 tiles of the held-out positions; the plain pixel ratio flagged 68% and 60% of the
JPEG ones and no shifted one. A copy flipped, recoloured or shifted by more pixels is not found.

The same distance and scale tell a collapsed generator's repeats: a generated image *repeats* when another generated
image lies closer than ⅓ · m, nearer than the training images' own near-duplicates.

`memorisation` (the share of copies) and `memorisation/repeats` (the share of generated images with a near-identical
twin among them, of the first 1000) are lower-better; `memorisation/median_ratio` is higher-better.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from fiberaug.errors import UserError
from fiberaug.imaging import make_grid, to_uint8
from fiberaug.metrics.images import match_sets

COPY_RATIO = 1 / 3
#: Training images whose nearest-neighbour distances estimate the median m (a seeded subset of larger sets).
SCALE_IMAGES = 1000


@dataclass(frozen=True)
class Memorisation:
    """Per generated image: its two nearest training images, their distances, the ratio d₁/d₂, and the training
    set's median nearest-neighbour distance m."""

    nearest: torch.Tensor  # N×2 indices into the training set: nearest, second nearest
    distances: torch.Tensor  # N×2 distances (images in [-1, 1], see the module's docstring)
    ratio: torch.Tensor  # N: distances[:, 0] / distances[:, 1] (0 for an exact copy)
    scale: float  # m
    threshold: float = COPY_RATIO
    repeats: torch.Tensor | None = None  # per generated image (the first 1000): a near-identical other one exists

    @property
    def score(self) -> torch.Tensor:
        """N: d₁ / max(d₂, m), below the threshold exactly when d₁/d₂ or d₁/m is: a copy."""
        return self.distances[:, 0] / self.distances[:, 1].clamp_min(self.scale).clamp_min(1e-12)

    @property
    def copies(self) -> torch.Tensor:
        """N booleans: which generated images count as copies."""
        return self.score < self.threshold

    def values(self) -> dict[str, float]:
        values = {
            "memorisation": self.copies.double().mean().item(),
            "memorisation/median_ratio": self.ratio.median().item(),
        }
        if self.repeats is not None:
            values["memorisation/repeats"] = self.repeats.double().mean().item()
        return values


class CopyTest:
    """A training set prepared once (blurred, its median nearest-neighbour distance measured), against which
    batches of generated images are judged: `memorisation` for one set, `sample.py`'s copy filter per batch."""

    def __init__(self, train: torch.Tensor, *, threshold: float = COPY_RATIO, chunk: int = 256, seed: int = 0):
        if len(train) < 2:
            raise UserError(f"memorisation needs at least 2 training images, got {len(train)}")
        self.images, self.threshold, self.chunk = train, threshold, chunk
        self.shift = 1 if min(train.shape[2:]) > 2 else 0
        self.train = _blur(_inner(train.float(), self.shift)).flatten(1)
        self.train_sq = self.train.square().sum(dim=1)
        self.seed = seed

    @cached_property
    def scale(self) -> float:
        """m: the median distance of a training image to its nearest other one (measured on first use)."""
        queries = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(self.seed))[:SCALE_IMAGES]
        own = torch.cat([self._distances(self.train[part], part) for part in queries.split(self.chunk)])
        return own.min(dim=1).values.median().item()

    def __call__(self, fake: torch.Tensor) -> Memorisation:
        """The two nearest training images of every generated one (of the training images' size), and which are
        copies; `chunk` generated images at a time, so the work needs some tens of MB beyond the two sets."""
        train, fake, _ = match_sets(self.images, fake, names=("train", "fake"))
        if train.shape != self.images.shape:
            raise UserError(f"generated images of shape {tuple(fake.shape[1:])} cannot be judged against training "
                            f"images of shape {tuple(self.images.shape[1:])}")
        pairs = [self._two_nearest(part) for part in fake.float().split(self.chunk)]
        nearest, distances = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
        ratio = torch.where(distances[:, 1] > 0, distances[:, 0] / distances[:, 1].clamp_min(1e-12), 0.0)
        return Memorisation(nearest, distances, ratio, self.scale, self.threshold)

    def repeats(self, fake: torch.Tensor) -> torch.Tensor:
        """Which of the first `SCALE_IMAGES` generated images have another of them closer than the threshold times m
        (the training images' median nearest-neighbour distance): the repeats of a collapsed generator. Capped, as
        the pairs grow with the square of the images (1000 at 64×64×3 take seconds on two CPU cores)."""
        fake = fake[:SCALE_IMAGES].float()
        if len(fake) < 2:
            return torch.zeros(len(fake), dtype=torch.bool)
        among = CopyTest(fake, threshold=self.threshold, chunk=self.chunk)
        # Each image's nearest image among them is itself (distance 0); the second nearest is its closest twin.
        nearest_other = torch.cat([among._two_nearest(part)[1][:, 1] for part in fake.split(self.chunk)])
        return nearest_other < self.threshold * self.scale

    def _distances(self, flat: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
        """Distance matrix of blurred windows (flattened) against the training set's."""
        squared = flat.square().sum(dim=1, keepdim=True) + self.train_sq - 2 * flat @ self.train.T
        if exclude is not None:
            squared[torch.arange(len(flat)), exclude] = torch.inf
        return squared.clamp_min(0).div(self.train.shape[1]).sqrt()

    def _two_nearest(self, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two nearest training images of each generated one, by the smallest distance over the shifts, and
        those distances computed exactly (the fast ‖f‖² + ‖t‖² − 2 f·t form rounds an exact copy's 0 up). Each
        shifted window is blurred on its own, as the training images' interior: a shifted copy matches exactly."""
        s, (height, width) = self.shift, fake.shape[2:]
        shifted = [_blur(fake[:, :, s + dy : height - s + dy, s + dx : width - s + dx]).flatten(1)
                   for dy in range(-s, s + 1) for dx in range(-s, s + 1)]
        distances = torch.stack([self._distances(flat) for flat in shifted])  # shifts × N × train
        nearest = torch.topk(distances.min(dim=0).values, 2, dim=1, largest=False).indices
        exact = torch.stack([(flat[:, None] - self.train[nearest]).square().mean(dim=2).sqrt() for flat in shifted])
        return nearest, exact.min(dim=0).values


def memorisation(
    fake: torch.Tensor, train: torch.Tensor, *, threshold: float = COPY_RATIO, chunk: int = 256
) -> Memorisation:
    """The two nearest training images of every generated one, which are copies and which repeat another generated
    image (see the module)."""
    train, fake, _ = match_sets(train, fake, names=("train", "fake"))
    test = CopyTest(train, threshold=threshold, chunk=chunk)
    return replace(test(fake), repeats=test.repeats(fake))


def _blur(images: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False)


def _inner(images: torch.Tensor, shift: int) -> torch.Tensor:
    return images[:, :, shift : images.shape[2] - shift, shift : images.shape[3] - shift] if shift else images


def nearest_sheet(
    fake: torch.Tensor, train: torch.Tensor, result: Memorisation, *, rows: int = 16, cell: int = 64
) -> np.ndarray:
    """The `rows` generated images with the lowest copy score, each beside its nearest and second-nearest training
    image and labelled with the score and whether it counts as a copy: an H×W×3 uint8 picture (nearest.png).

    `fake` and `train` are the sets `result` was computed from; small images are enlarged to about `cell` px.
    """
    train, fake, _ = match_sets(train, fake, names=("train", "fake"))
    order = torch.argsort(result.score, stable=True)[:rows]  # ties (exact copies) in generated order
    triples = torch.stack([fake[order], train[result.nearest[order, 0]], train[result.nearest[order, 1]]], dim=1)
    pictures = to_uint8(triples.flatten(0, 1))
    scale = max(1, cell // pictures.shape[1])
    pictures = pictures.repeat(scale, axis=1).repeat(scale, axis=2)
    if pictures.shape[3] == 1:
        pictures = pictures.repeat(3, axis=3)
    grid = make_grid(pictures, columns=3)
    verdicts = [(result.score[i].item(), result.copies[i].item()) for i in order]
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
    draw.text((grid.shape[1] + 4, 1), f"d1/max(d2,m): copy < {threshold:.2f}", fill=(200, 200, 200), font=font)
    for row, (ratio, copy) in enumerate(verdicts):
        y = header + padding + row * (cell + padding) + cell // 2 - 6
        text, colour = (f"{ratio:.3f}  COPY", (255, 80, 80)) if copy else (f"{ratio:.3f}  not a copy", (255, 255, 255))
        draw.text((grid.shape[1] + 4, y), text, fill=colour, font=font)
    return np.asarray(canvas)
