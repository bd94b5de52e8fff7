"""Model outputs to pictures: uint8 conversion, grids and PNG files, with numpy and Pillow only."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """N×C×H×W in [-1, 1] to N×H×W×C uint8."""
    array = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return array.permute(0, 2, 3, 1).numpy()


def make_grid(images: np.ndarray, columns: int | None = None, padding: int = 2) -> np.ndarray:
    """Tile N×H×W×C images into one H'×W'×C picture, `columns` wide, separated by `padding` black pixels."""
    n, h, w, c = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = np.zeros((rows * (h + padding) + padding, columns * (w + padding) + padding, c), dtype=images.dtype)
    for i, image in enumerate(images):
        y, x = padding + (i // columns) * (h + padding), padding + (i % columns) * (w + padding)
        grid[y : y + h, x : x + w] = image
    return grid


def save_png(image: np.ndarray, path: Path) -> None:
    """Write an H×W×C uint8 array (C = 1 or 3) as a PNG, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image[..., 0] if image.shape[2] == 1 else image).save(path)
