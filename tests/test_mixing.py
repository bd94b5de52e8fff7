"""Mixing downstream: data.synthetic_root adds a data set sample.py wrote to every training epoch, at
data.synthetic_fraction, labelled by its class folders, and never to validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import save

from fiberaug.data import DigitsDataModule
from fiberaug.errors import UserError


def synthetic_set(root, classes=("3", "7"), per_class=40):
    """White images (no digit is all white), with a class's index written in the top-left pixel's value."""
    for name in classes:
        for i in range(per_class):
            image = np.full((8, 8), 255, np.uint8)
            image[0, 0] = 200 + int(name) if name.isdigit() else 200
            save(root / name / f"{i:06d}.png", image)
    return root


def epoch(data, number=0):
    loader = data.train_dataloader()
    loader.sampler.set_epoch(number)
    images, labels = zip(*[(x, y) for x, y in loader])
    return torch.cat(images), torch.cat(labels)


@pytest.mark.parametrize("fraction", [0.5, 0.25])
def test_the_synthetic_share_of_each_epoch_and_their_labels(tmp_path, fraction):
    data = DigitsDataModule(image_size=8, batch_size=50, val_fraction=0.1,
                            synthetic_root=str(synthetic_set(tmp_path / "d")), synthetic_fraction=fraction)
    data.setup("fit")
    images, labels = epoch(data)
    white = (images > 0.5).flatten(1).float().mean(dim=1) > 0.9
    # Every real image once, plus fraction/(1 - fraction) as many synthetic ones; the last partial batch dropped.
    assert white.float().mean().item() == pytest.approx(fraction, abs=0.02)
    assert len(images) == pytest.approx(len(data.train_set) / (1 - fraction), abs=50)
    marks = ((images[white, 0, 0, 0] + 1) * 127.5).round().long() - 200  # the class written in the pixel
    assert torch.equal(labels[white], marks) and set(marks.tolist()) == {3, 7}
    # Fresh synthetic images each epoch (80 available, fewer drawn at 0.25), and none in validation.
    val = torch.cat([x for x, _ in data.val_dataloader()])
    assert not ((val > 0.5).flatten(1).float().mean(dim=1) > 0.9).any()
    assert data.record()["synthetic"]["images"] == 80 and len(data.val_set) == 180


def test_another_epoch_draws_other_synthetic_images(tmp_path):
    root = synthetic_set(tmp_path / "d", per_class=400)
    data = DigitsDataModule(image_size=8, batch_size=50, synthetic_root=str(root), synthetic_fraction=0.2)
    data.setup("fit")
    sampler = data.train_dataloader().sampler
    drawn = []
    for number in (0, 1):
        sampler.set_epoch(number)
        drawn.append({i for _, i in sampler if i >= len(data.train_set)})
    assert len(drawn[0]) == data.synthetic_per_epoch and drawn[0] != drawn[1]


def test_synthetic_classes_the_real_images_lack_are_refused(tmp_path):
    root = synthetic_set(tmp_path / "d", classes=("3", "giraffe"), per_class=2)
    data = DigitsDataModule(image_size=8, synthetic_root=str(root))
    with pytest.raises(UserError, match=r"data.synthetic_root=.* has classes \['giraffe'\] that the real images do "
                                        r"not; its class folders must be among \['0', '1'"):
        data.setup("fit")
    with pytest.raises(UserError, match=r"data.synthetic_fraction=1.0 must lie in \(0, 1\)"):
        DigitsDataModule(synthetic_root=str(root), synthetic_fraction=1.0)
