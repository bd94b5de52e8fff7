"""contact_sheet.png: the first sources of a run, each beside its augmentations, for a quick look."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from fiberaug.augment.plan import output_name
from fiberaug.data.images import read_image, to_channels
from fiberaug.imaging import make_grid


def contact_sheet(input_dir: Path, output_dir: Path, sources: list[str], copies: int, cell: int = 128) -> np.ndarray:
    """One row per source: the original, then up to 8 copies; a file that cannot be read shows as black."""
    shown = min(copies, 8)
    cells = [
        _thumbnail(path, cell)
        for source in sources
        for path in (input_dir / source, *(output_dir / output_name(source, k) for k in range(shown)))
    ]
    return make_grid(np.stack(cells), columns=1 + shown)


def _thumbnail(path: Path, cell: int) -> np.ndarray:
    """The image as 8-bit RGB, fitted into a black `cell`² square (alpha over black, like training sees it)."""
    canvas = np.zeros((cell, cell, 3), dtype=np.uint8)
    try:
        image = to_channels(read_image(path), 3)
    except (OSError, ValueError, SyntaxError):
        return canvas
    scale = cell / max(image.shape[:2])
    h, w = max(1, round(image.shape[0] * scale)), max(1, round(image.shape[1] * scale))
    small = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
    y, x = (cell - h) // 2, (cell - w) // 2
    canvas[y : y + h, x : x + w] = np.round(np.clip(small, 0, 1) * 255).astype(np.uint8)
    return canvas
