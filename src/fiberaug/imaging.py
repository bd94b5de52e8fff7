"""Model outputs to pictures a person can read: uint8 conversion, labelled grids, text bands and PNG files, with
numpy and Pillow only."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

#: The short side, in pixels, that `enlarge` brings small images up to: 16-px samples are unreadable as they are.
MIN_TILE = 64
#: The height of text in pictures, in pixels.
TEXT_SIZE = 16

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """N×C×H×W in [-1, 1] to N×H×W×C uint8."""
    array = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return array.permute(0, 2, 3, 1).numpy()


def enlarge(images: np.ndarray, min_size: int = MIN_TILE) -> np.ndarray:
    """N×H×W×C images scaled up by the smallest whole factor that makes their short side at least `min_size`.

    Nearest neighbour (each pixel becomes a square block), so nothing is invented between pixels; images already
    that large are returned as they are.
    """
    factor = max(1, math.ceil(min_size / min(images.shape[1:3])))
    return images.repeat(factor, axis=1).repeat(factor, axis=2) if factor > 1 else images


def font(size: int = TEXT_SIZE) -> Font:
    """Pillow's bundled TrueType font at `size` px; its small bitmap font where Pillow cannot scale one."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError):  # Pillow 10.0 takes no size; a Pillow built without FreeType has no TrueType
        return ImageFont.load_default()


def labelled_grid(
    images: np.ndarray, columns: Sequence[str] = (), rows: Sequence[str] = (), *, blocks: int | None = None,
    padding: int = 2,
) -> np.ndarray:
    """Tile N×H×W×C uint8 images (C = 1 or 3), enlarged to at least `MIN_TILE` px, into one H'×W'×C picture.

    With k `columns` names, image i belongs to column i % k (a model samples its classes in turn) and the names
    are written over their columns. The k columns repeat in `blocks` blocks side by side, by default as many as make
    the picture roughly square: 2 classes × 8 samples are 4 columns × 4 rows, not a 2×8 strip, and 10 classes × 2
    samples stay one column per class. With `rows` names (one block), each row's name is written above it. Images
    are separated by `padding` black pixels; without names the grid is roughly square.
    """
    images = enlarge(images)
    n, h, w, c = images.shape
    k = min(len(columns), n) or 1
    per_column = math.ceil(n / k)
    blocks = 1 if rows else blocks or math.ceil(math.sqrt(per_column / k))
    height = math.ceil(per_column / blocks)
    text = font()
    band = text.getbbox("Ag")[3] + 6  # the height of one line of text with its margins
    header, row_band = band if columns else 0, band if rows else 0
    grid = np.zeros((header + height * (row_band + h + padding) + padding, blocks * k * (w + padding) + padding, c),
                    dtype=np.uint8)
    for i, image in enumerate(images):
        row, block = divmod(i // k, blocks)  # row by row, across the blocks
        y = header + padding + row * (row_band + h + padding) + row_band
        x = padding + (block * k + i % k) * (w + padding)
        grid[y : y + h, x : x + w] = image
    picture = Image.fromarray(grid[..., 0] if c == 1 else grid)
    draw = ImageDraw.Draw(picture)
    for column in range(blocks * k if columns else 0):
        name = fit(draw, columns[column % k], text, w)
        x = padding + column * (w + padding) + (w - draw.textlength(name, font=text)) / 2
        draw.text((x, 3), name, fill=_white(c), font=text)
    for row, name in enumerate(rows):
        y = header + padding + row * (row_band + h + padding)
        draw.text((padding, y + 1), fit(draw, name, text, grid.shape[1] - 2 * padding), fill=_white(c), font=text)
    return np.asarray(picture).reshape(grid.shape)


def make_grid(images: np.ndarray, columns: int, padding: int = 2) -> np.ndarray:
    """Tile N×H×W×C images as they are, `columns` wide, separated by `padding` black pixels (no labels)."""
    n, h, w, c = images.shape
    rows = math.ceil(n / columns)
    grid = np.zeros((rows * (h + padding) + padding, columns * (w + padding) + padding, c), dtype=images.dtype)
    for i, image in enumerate(images):
        y, x = padding + (i // columns) * (h + padding), padding + (i % columns) * (w + padding)
        grid[y : y + h, x : x + w] = image
    return grid


def text_band(lines: Sequence[str], width: int, channels: int = 3) -> np.ndarray:
    """Lines of white text on black, `width` px wide (longer lines are cut short with "…"): an H×W×C uint8 array."""
    text = font()
    line = text.getbbox("Ag")[3] + 4
    band = Image.new("L" if channels == 1 else "RGB", (width, line * len(lines) + 6))
    draw = ImageDraw.Draw(band)
    for i, content in enumerate(lines):
        draw.text((4, 3 + line * i), fit(draw, content, text, width - 8), fill=_white(channels), font=text)
    return np.asarray(band).reshape(band.height, width, channels)


def fit(draw: ImageDraw.ImageDraw, text: str, typeface: Font, width: float) -> str:
    """`text`, cut short with "…" where it would be wider than `width` px."""
    if draw.textlength(text, font=typeface) <= width:
        return text
    while text and draw.textlength(text + "…", font=typeface) > width:
        text = text[:-1]
    return text + "…"


def _white(channels: int) -> int | tuple[int, int, int]:
    return 255 if channels == 1 else (255, 255, 255)


def save_png(image: np.ndarray, path: Path) -> None:
    """Write an H×W×C uint8 array (C = 1 or 3) as a PNG, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image[..., 0] if image.shape[2] == 1 else image).save(path)
