"""A map-style dataset that decodes, augments and normalises images on the fly."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from typing import Any

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from fiberaug.data.images import to_channels
from fiberaug.data.pipelines import reseed

log = logging.getLogger(__name__)


class AugmentedImages(Dataset):
    """`(image, label)` pairs: image C×H×W in [-1, 1], label the class index or -1 when unlabelled.

    An item that fails to decode is skipped with a warning naming it and the next one is served, so
    one damaged file never stops an epoch.
    """

    def __init__(
        self,
        items: Sequence[Any],
        labels: Sequence[int] | None,
        read: Callable[[Any], np.ndarray],
        transform: A.Compose,
        channels: int,
    ) -> None:
        self.items = list(items)
        self.labels = list(labels) if labels is not None else None
        self.read = read
        self.transform = transform
        self.channels = channels
        self.failed: set[int] = set()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        for offset in range(len(self.items)):
            i = (index + offset) % len(self.items)
            if i in self.failed:
                continue
            try:
                array = self.read(self.items[i])
            except (OSError, ValueError, SyntaxError) as exc:
                self.failed.add(i)
                log.warning("skipping unreadable image %s: %s", self.items[i], exc)
                continue
            image = self.transform(image=to_channels(array, self.channels))["image"]
            tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))) * 2 - 1
            return tensor, self.labels[i] if self.labels is not None else -1
        raise RuntimeError(f"none of the {len(self.items)} images could be read")


def seed_worker(worker_id: int) -> None:
    """Give each DataLoader worker, in each epoch, its own augmentation stream.

    The pipeline keeps its own generators, which every forked worker would otherwise copy, so all
    workers (and, without persistent workers, all epochs) would draw the same augmentations.
    `torch.initial_seed()` differs per worker and per epoch and follows the run's seed.
    """
    seed = torch.initial_seed() % 2**32
    reseed(get_worker_info().dataset.transform, seed)
    np.random.seed(seed)
    random.seed(seed)
