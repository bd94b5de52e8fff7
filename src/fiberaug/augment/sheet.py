"""contact_sheet.png: a few sources of a run, drawn across its classes, each beside its augmentations, for a quick
look."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain, zip_longest
from pathlib import Path

import cv2
import numpy as np

from fiberaug.augment.plan import output_name
from fiberaug.data.images import read_image, to_channels
from fiberaug.imaging import labelled_grid


def contact_sheet(
    input_dir: Path, output_dir: Path, sources: Sequence[str], copies: int, count: int, cell: int = 128
) -> np.ndarray:
    """One row per shown source (see `shown_sources`), headed by its file name: the original, then up to 8 copies,
    under a header row naming them; a file that cannot be read shows as black."""
    shown, columns = shown_sources(sources, count), min(copies, 8)
    cells = [
        _thumbnail(path, cell)
        for source in shown
        for path in (input_dir / source, *(output_dir / output_name(source, k) for k in range(columns)))
    ]
    names = ["original", *(f"copy {k + 1}" for k in range(columns))]
    return labelled_grid(np.stack(cells), names, shown)


def shown_sources(sources: Sequence[str], count: int) -> list[str]:
    """`count` of `sources`, taken from each class (top-level folder; files at the top form one group) in turn,
    classes in name order: the first files of a folder-per-class set would all be of one class."""
    groups: dict[str, list[str]] = {}
    for source in dict.fromkeys(sources):
        groups.setdefault(source.split("/")[0] if "/" in source else "", []).append(source)
    turns = zip_longest(*(groups[name] for name in sorted(groups)))
    return [source for source in chain.from_iterable(turns) if source is not None][:count]


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
