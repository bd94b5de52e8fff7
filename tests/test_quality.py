"""Slow checks (`make test-slow`): the default runs, as a user starts them, draw recognisable and varied digits."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_config
from sklearn.linear_model import LogisticRegression

from fiberaug.data import DigitsDataModule
from fiberaug.models import load_generator
from fiberaug.tasks.train import train


def _spread_within_classes(images: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean pixel standard deviation within each class: near 0 when a model draws one image per class."""
    return torch.stack([images[labels == c].std(dim=0).mean() for c in labels.unique()]).mean().item()


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [[], ["model=gan"]], ids=["ddpm", "gan"])
def test_default_run_draws_recognisable_and_varied_digits(tmp_path, overrides):
    """`python train.py [model=gan]` as it is; a classifier trained on the real digits then reads its samples."""
    dm = DigitsDataModule(image_size=16, channels=1, batch_size=2000, val_fraction=0.2, seed=0)
    dm.setup()
    (x_train, y_train), (x_val, y_val) = (next(iter(loader)) for loader in (dm.train_dataloader(), dm.val_dataloader()))
    classifier = LogisticRegression(max_iter=3000).fit(x_train.flatten(1).numpy(), y_train.numpy())
    assert classifier.score(x_val.flatten(1).numpy(), y_val.numpy()) > 0.9  # it reads real digits

    train(compose_config("train", overrides, tmp_path))
    model = load_generator(tmp_path / "checkpoints" / "last.ckpt")
    images, labels = model.sample(1000, seed=0), model.label_indices(None, 1000)  # 100 of each class
    accuracy = classifier.score(images.flatten(1).numpy(), labels.numpy())
    spread = _spread_within_classes(images, labels) / _spread_within_classes(x_train, y_train)
    print(f"{overrides or 'ddpm'}: {accuracy:.1%} read as their class, within-class spread {spread:.2f} of real")
    assert accuracy > 0.9, f"a digits classifier reads only {accuracy:.1%} of the samples as their class"
    assert spread > 0.5, f"the samples vary only {spread:.0%} as much within a class as the real digits"
