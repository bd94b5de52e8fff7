"""A map-style dataset that decodes, augments and normalises images on the fly, and the sampler that feeds it.

Randomness is a function of (seed, epoch, index): the sampler's order of (seed, epoch), each item's
augmentation of (seed, epoch, index). So a run draws the same whatever its number of DataLoader workers
or processes, and a resumed run continues exactly where its checkpoint left off.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

from fiberaug.data.images import to_channels
from fiberaug.data.pipelines import reseed
from fiberaug.seeding import derive_seed

log = logging.getLogger(__name__)


class AugmentedImages(Dataset):
    """`(image, label)` pairs: image C×H×W in [-1, 1], label the class index or -1 when unlabelled.

    Items are asked for by index, or by `(epoch, index)` as `EpochSampler` yields them; the pipeline is
    reseeded from (seed, epoch, index) for each item. An item that fails to decode is skipped with a
    warning naming it and the next one is served, so one damaged file never stops an epoch.

    `digests=True` adds a third element: the SHA-256 of the image's pixels as the model receives them (32 bytes as
    a uint8 tensor), by which the latent cache (`fiberaug.data.latents`) finds what the autoencoder made of them.
    `serve_captions=True` adds each image's caption last ("" where it has none), for text-conditioned models.
    """

    def __init__(
        self,
        items: Sequence[Any],
        labels: Sequence[int] | None,
        read: Callable[[Any], np.ndarray],
        transform: A.Compose,
        channels: int,
        seed: int = 0,
        captions: Sequence[str | None] | None = None,
    ) -> None:
        self.items = list(items)
        self.captions = list(captions) if captions is not None else [None] * len(self.items)
        self.serve_captions = False
        self.labels = list(labels) if labels is not None else None
        self.read = read
        self.transform = transform
        self.channels = channels
        self.seed = seed
        self.digests = False
        self.failed: set[int] = set()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Any, ...]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        reseed(self.transform, derive_seed(self.seed, epoch, index))
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
            label = self.labels[i] if self.labels is not None else -1
            item = (tensor, label, pixel_digest(tensor)) if self.digests else (tensor, label)
            return (*item, self.captions[i] or "") if self.serve_captions else item
        raise RuntimeError(f"none of the {len(self.items)} images could be read")


def pixel_digest(image: torch.Tensor) -> torch.Tensor:
    """The SHA-256 of an image's shape, dtype and values, as 32 uint8s (a tensor, so batches collate them)."""
    digest = hashlib.sha256(f"{tuple(image.shape)} {image.dtype};".encode())
    digest.update(image.contiguous().numpy().tobytes())
    return torch.frombuffer(bytearray(digest.digest()), dtype=torch.uint8)


class MixedImages(Dataset):
    """Real training images, then synthetic ones, as one dataset of `(epoch, index)` keys: the real at indices
    below `len(real)`. `EpochSampler(mix=...)` decides how many of each an epoch draws."""

    def __init__(self, real: AugmentedImages, synthetic: AugmentedImages) -> None:
        self.real, self.synthetic = real, synthetic

    def __len__(self) -> int:
        return len(self.real) + len(self.synthetic)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Any, ...]:
        epoch, index = key
        if index < len(self.real):
            return self.real[epoch, index]
        return self.synthetic[epoch, index - len(self.real)]


class EpochSampler(DistributedSampler):
    """Shuffles by (seed, epoch) and shards by rank, yielding `(epoch, index)` keys for `AugmentedImages`.

    A `DistributedSampler`, so Lightning keeps it as it is under DDP: every rank takes its own slice of
    one permutation, with the tail that does not divide evenly left out, so no image is seen twice in an
    epoch. `resume(epoch, consumed)` skips what this rank already trained on when a run resumes inside
    an epoch. Lightning calls `set_epoch` before each epoch with its count of processed epochs, which
    runs one ahead of the epoch it trains after a resume from an epoch's end; `epoch_of` (the trainer's
    current epoch) overrides that count. `mix=(real, per_epoch)`: the dataset's first `real` items are real and the
    rest synthetic (`MixedImages`); an epoch is every real item and `per_epoch` synthetic ones drawn afresh.
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        epoch: int = 0,
        epoch_of: Callable[[], int] | None = None,
        mix: tuple[int, int] | None = None,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.epoch = epoch
        self.epoch_of = epoch_of
        self.mix = mix
        if mix is not None:  # an epoch is every real item and `mix[1]` of the others
            self.num_samples = sum(mix) // num_replicas
            self.total_size = self.num_samples * num_replicas
        self._skip: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(self.epoch_of() if self.epoch_of else epoch)

    def resume(self, epoch: int, consumed: int) -> None:
        """Leave out the first `consumed` keys of `epoch`, which the interrupted run already trained on."""
        self._skip = (epoch, consumed)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
        if self.mix is None:
            order = torch.randperm(len(self.dataset), generator=generator)[: self.total_size]
        else:  # every real item, and a fresh draw of the synthetic ones (with replacement where they are too few)
            real, drawn = self.mix
            others = len(self.dataset) - real
            synthetic = (torch.randperm(others, generator=generator)[:drawn] if drawn <= others
                         else torch.randint(others, (drawn,), generator=generator))
            keys = torch.cat([torch.arange(real), real + synthetic])
            order = keys[torch.randperm(len(keys), generator=generator)][: self.total_size]
        indices = order[self.rank :: self.num_replicas].tolist()
        if self._skip is not None and self._skip[0] == self.epoch:
            indices = indices[self._skip[1] :]
        return iter([(self.epoch, i) for i in indices])
