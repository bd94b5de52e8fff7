"""Pictures a person can read: labelled sample grids, report.png, and which sources the contact sheet shows."""

from __future__ import annotations

import numpy as np
import torch

from fiberaug.augment.sheet import shown_sources
from fiberaug.imaging import labelled_grid
from fiberaug.tasks.evaluate import report_sheet


def _samples(n: int, size: int = 8, channels: int = 1) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, size, size, channels), dtype=np.uint8)


def test_small_samples_are_enlarged_by_nearest_neighbour_into_class_columns_under_their_names():
    samples = _samples(4)
    grid = labelled_grid(samples, ["cats", "dogs"])
    plain = labelled_grid(samples)
    tile, pad = 64, 2  # 8-px samples ×8
    assert grid.shape[2] == 1 and plain.shape == (2 * (tile + pad) + pad,) * 2 + (1,)  # 2×2, no band without names
    header = grid.shape[0] - plain.shape[0]
    assert grid.shape[1] == plain.shape[1] and header >= 14 and np.array_equal(grid[header:], plain)
    for i, sample in enumerate(samples):  # sample i is of class i % 2: its column
        y, x = header + pad + (i // 2) * (tile + pad), pad + (i % 2) * (tile + pad)
        assert np.array_equal(grid[y : y + tile, x : x + tile, 0], np.kron(sample[..., 0], np.ones((8, 8), np.uint8)))
    over = [grid[:header, pad + c * (tile + pad) : (c + 1) * (tile + pad)] for c in (0, 1)]
    assert all(band.max() > 128 for band in over) and not np.array_equal(*over)  # a name written over each column


def test_grids_are_roughly_square_with_one_column_per_class():
    two = labelled_grid(_samples(16, channels=3), ["a", "b"])  # 8 samples of each class: 4×4, not a 2×8 strip
    assert two.shape[1] == 4 * 66 + 2 and 0.8 < two.shape[0] / two.shape[1] < 1.3 and two.shape[2] == 3
    ten = labelled_grid(_samples(20), [str(c) for c in range(10)])  # 10 classes: still one column each, two rows
    assert ten.shape[1] == 10 * 66 + 2 and 2 * 66 + 2 < ten.shape[0] < 3 * 66
    large = labelled_grid(_samples(4, size=96))  # no enlargement
    assert large.shape[:2] == (2 * 98 + 2, 2 * 98 + 2)


def test_the_contact_sheet_takes_its_sources_from_each_class_in_turn():
    sources = [f"cats/{i}.png" for i in range(5)] + ["dogs/0.png", "dogs/1.png", "top.png"]
    assert shown_sources(sources, 4) == ["top.png", "cats/0.png", "dogs/0.png", "cats/1.png"]
    assert shown_sources(sources[::-1], 3) == ["top.png", "cats/4.png", "dogs/1.png"]  # classes in name order
    assert shown_sources(sources, 20) == ["top.png", "cats/0.png", "dogs/0.png", "cats/1.png", "dogs/1.png",
                                          "cats/2.png", "cats/3.png", "cats/4.png"]


def test_report_shows_real_beside_generated_enlarged_with_readable_metrics():
    black = -torch.ones(20, 1, 8, 8)  # black images: every bright pixel is text
    report = report_sheet(black, black.repeat(1, 3, 1, 1), {"swd": 12.3, "precision": 0.5, "swd/16": 1.0})
    grid = 4 * 66 + 2  # 16 of each, 8 px enlarged to 64, 4×4
    assert report.shape[1] == 2 * grid and report.shape[2] == 3 and grid < report.shape[0] < 2 * grid
    ink = (report.max(axis=2) > 128).any(axis=1).astype(int)
    starts, ends = np.flatnonzero(np.diff(np.r_[0, ink]) == 1), np.flatnonzero(np.diff(np.r_[ink, 0]) == -1)
    assert len(starts) == 3  # the captions, then swd and precision (swd/16 left out)
    assert starts[1] > grid and min(ends - starts + 1) >= 11  # letters at least 11 px tall, not an 8-px bitmap font
