"""LightningDataModules: where images come from, how they are split, and the on-the-fly pipeline."""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader

from fiberaug.data.cache import ImageCache, default_cache_dir
from fiberaug.data.captions import read_captions
from fiberaug.data.datasets import AugmentedImages, EpochSampler, MixedImages
from fiberaug.data.images import list_folder
from fiberaug.data.pipelines import scaled_side, sized_pipeline
from fiberaug.errors import UserError
from fiberaug.seeding import derive_seed

log = logging.getLogger(__name__)

#: Augmentations that leave an image one of a few fixed forms, whose latents can be cached (`latent_cache_refusal`).
CACHEABLE_AUGMENTATIONS = (A.HorizontalFlip, A.VerticalFlip)


class ImageDataModule(pl.LightningDataModule):
    """Splits a source of images by `split_seed` and serves augmented batches drawn by `seed`.

    The split has its own seed, so runs with different training seeds (a sweep) validate on the same
    images. The training order is a function of (seed, epoch) and each image's augmentation of (seed,
    epoch, index); under DDP each rank trains on its own shard. Subclasses implement `load_items`: the
    items, their labels and the class names. `labels: none` drops the labels, for an unconditional model.
    """

    def __init__(
        self,
        image_size: int = 32,
        channels: int = 3,
        batch_size: int = 64,
        num_workers: int = 0,
        persistent_workers: bool = False,
        pin_memory: bool = False,
        val_fraction: float = 0.05,
        resize_policy: str = "resize",
        crop_scale: float = 1.0,
        augment: Any = None,
        labels: str = "auto",
        seed: int = 0,
        split_seed: int = 0,
        synthetic_root: str | None = None,
        synthetic_fraction: float = 0.5,
        train_per_class: int | None = None,
        subset_seed: int = 0,
    ) -> None:
        super().__init__()
        # Checkpoints keep them (evaluate.py rebuilds the same split); train.py logs its own hyperparameters.
        self.save_hyperparameters(logger=False)
        if labels not in ("auto", "none"):
            raise UserError(f"data.labels={labels!r} must be 'auto' (use the classes the data has) or 'none'")
        if not isinstance(image_size, int) or image_size < 4:
            raise UserError(f"data.image_size={image_size!r} must be an integer of at least 4")
        if channels not in (1, 3):
            raise UserError(f"data.channels={channels!r} must be 1 (grayscale) or 3 (RGB)")
        if not 0 <= val_fraction < 1:
            raise UserError(f"data.val_fraction={val_fraction} must lie in [0, 1)")
        if synthetic_root and not 0 < synthetic_fraction < 1:
            raise UserError(f"data.synthetic_fraction={synthetic_fraction} must lie in (0, 1): the share of each "
                            "training epoch drawn from data.synthetic_root")
        if train_per_class is not None and (isinstance(train_per_class, bool) or not isinstance(train_per_class, int)
                                            or train_per_class < 1):
            raise UserError(f"data.train_per_class={train_per_class!r} must be a positive integer (images per class "
                            "kept for training) or null (all)")
        self.train_per_class, self.subset_seed = train_per_class, subset_seed
        self.image_size = image_size
        self.channels = channels
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.persistent_workers = persistent_workers and num_workers > 0
        self.pin_memory = pin_memory
        self.val_fraction = val_fraction
        self.labels = labels
        self.seed = seed
        self.split_seed = split_seed
        self._resume: tuple[int, int] | None = None  # (epoch, batches of it done) for a resumed run
        self.scaled_side = scaled_side(image_size, resize_policy, crop_scale)
        # Built now so that a bad pipeline or policy fails before anything is read.
        self.train_transform = sized_pipeline(image_size, resize_policy, crop_scale, augment, train=True, seed=seed)
        self.val_transform = sized_pipeline(image_size, resize_policy, crop_scale, train=False, seed=seed)
        self.class_names: list[str] = []
        self.train_set: AugmentedImages | None = None
        self.val_set: AugmentedImages | None = None
        self.synthetic_root, self.synthetic_fraction = synthetic_root, synthetic_fraction
        self.synthetic_set: AugmentedImages | None = None  # training only, never validation
        self._gone: set[str] = set()  # files already reported missing

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def load_items(self) -> tuple[list[Any], list[int] | None, list[str]]:
        """The items (whatever `reader` decodes), their class indices or None, and the class names."""
        raise NotImplementedError

    @property
    def reader(self) -> Callable[[Any], np.ndarray]:
        """Turns an item into an H×W×C array; the identity for in-memory arrays."""
        return np.asarray

    def item_captions(self, items: Sequence[Any]) -> list[str | None] | None:
        """Each item's caption (None where it has none), or None for a source without captions."""
        return None

    def item_id(self, item: Any) -> str:
        """The SHA-256 of an item's content (its array's bytes; a file's bytes for folders)."""
        return hashlib.sha256(np.ascontiguousarray(item).tobytes()).hexdigest()

    def reference_images(self, split: str = "val", limit: int | None = None) -> tuple[torch.Tensor, list[int] | None]:
        """A split's images as validation sees them (scaled and centre-cropped, never augmented) and their
        labels, to measure generated images against: the first `limit` of the split, a random subset."""
        subset = {"train": self.train_set, "val": self.val_set}[split]
        n = len(subset) if limit is None else min(limit, len(subset))
        labels = subset.labels[:n] if subset.labels is not None else None
        dataset = AugmentedImages(subset.items[:n], labels, self.reader, self.val_transform, self.channels)
        images = torch.stack([dataset[i][0] for i in range(n)]) if n else torch.empty(0)
        return images, labels

    def latent_cache_refusal(self) -> str | None:
        """Why the training images are not worth caching as latents, or None when they are: a pipeline that only
        scales, centre-crops and flips gives each image a few fixed forms; any other draws new pixels every time."""
        _, *augmentations, crop = self.train_transform.transforms
        if not isinstance(crop, A.CenterCrop):
            return f"data.resize_policy={self.hparams.resize_policy} cuts a new random crop at every draw"
        drawn = [type(t).__name__ for t in augmentations if not isinstance(t, CACHEABLE_AUGMENTATIONS)]
        if drawn:
            return f"the augment pipeline draws new pixels at every draw ({', '.join(drawn)})"
        return None

    def serve_captions(self) -> None:
        """Send each image's caption with it ("" where it has none), for a text-conditioned model."""
        for dataset in (self.train_set, self.val_set, self.synthetic_set):
            if dataset is not None:
                dataset.serve_captions = True

    def serve_digests(self, train: bool = True) -> None:
        """Send each image's pixel digest with it, for the latent cache: always for validation (never augmented),
        for training when asked."""
        self.val_set.digests = True
        self.train_set.digests = train
        if self.synthetic_set is not None:
            self.synthetic_set.digests = train

    @property
    def latent_cache_dir(self) -> Path | None:
        """Where the latent cache keeps its disk tier; None: memory only."""
        return None

    def item_versions(self, item: Any) -> tuple[list[str], bool]:
        """Every content hash the item had while this run read it, and whether it can still be read.

        In-memory arrays never change; files do (see `FolderDataModule`).
        """
        return [self.item_id(item)], True

    def record(self) -> dict[str, Any]:
        """What a checkpoint keeps of its data: the DataModule and the content hashes of each split's images.

        The hashes name the images whatever folder they lie in later, so a task can refuse to test on images
        the generator was trained on. A file changed during the run is recorded with every content it had (each
        may have been trained on); one removed keeps the hash it had when it was last read, and is named in
        `gone` and in a warning. Taken again at every checkpoint: a file is hashed again only when it changed.
        """
        record: dict[str, Any] = {
            "datamodule": f"{type(self).__module__}.{type(self).__qualname__}",
            "class_names": self.class_names,
            "gone": [],
            "synthetic": None if self.synthetic_set is None else {
                "root": str(Path(self.synthetic_root).expanduser().resolve()), "images": len(self.synthetic_set),
                "fraction": self.synthetic_fraction,
            },
        }
        for split, subset in (("train", self.train_set), ("val", self.val_set)):
            record[split] = []
            for item in subset.items:
                versions, present = self.item_versions(item)
                record[split].extend(versions)
                if not present:
                    record["gone"].append(str(item))
        newly_gone = sorted(set(record["gone"]) - self._gone)
        if newly_gone:
            shown = ", ".join(newly_gone[:5]) + (f" and {len(newly_gone) - 5} more" if len(newly_gone) > 5 else "")
            log.warning("%d image(s) went missing during the run; the checkpoint records the content each had when "
                        "last read: %s", len(newly_gone), shown)
            self._gone |= set(newly_gone)
        return record

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        items, labels, self.class_names = self.load_items()
        captions = self.item_captions(items)
        if self.labels == "none":
            labels, self.class_names = None, []
        val_idx, train_idx = self.split(items)
        if self.train_per_class:
            train_idx = self._per_class(train_idx, labels)

        def subset(idx: np.ndarray, transform: Any) -> AugmentedImages:
            return AugmentedImages(
                [items[i] for i in idx],
                [labels[i] for i in idx] if labels is not None else None,
                self.reader,
                transform,
                self.channels,
                self.seed,
                [captions[i] for i in idx] if captions is not None else None,
            )

        self.train_set = subset(train_idx, self.train_transform)
        self.val_set = subset(val_idx, self.val_transform)
        log.info(
            "data: %d train / %d val images, %d classes, %d×%d×%d",
            len(self.train_set), len(self.val_set), self.num_classes, self.image_size, self.image_size, self.channels,
        )
        if self.synthetic_root:
            self.synthetic_set = self._synthetic_set()

    def split(self, items: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
        """The validation and training indices: `val_fraction` of the items at random, drawn by `split_seed`."""
        order = np.random.default_rng(self.split_seed).permutation(len(items))
        n_val = max(1, round(len(items) * self.val_fraction)) if self.val_fraction > 0 and len(items) > 1 else 0
        return order[:n_val], order[n_val:]

    def _per_class(self, train_idx: np.ndarray, labels: list[int] | None) -> np.ndarray:
        """`train_per_class` training indices of each class, drawn by `subset_seed` (a few-shot training set; the
        validation split is the full data's, so runs with different draws are tested on the same images)."""
        if labels is None:
            raise UserError(f"data.train_per_class={self.train_per_class} needs labelled images (class sub-folders, "
                            "or data=digits) and data.labels=auto")
        rng = np.random.default_rng(self.subset_seed)
        picked = []
        for c, name in enumerate(self.class_names):
            members = np.array([i for i in train_idx if labels[i] == c], dtype=np.int64)
            if len(members) < self.train_per_class:
                raise UserError(f"data.train_per_class={self.train_per_class}: class {name!r} has only "
                                f"{len(members)} training images")
            picked.append(rng.choice(members, self.train_per_class, replace=False))
        return np.concatenate(picked)

    def _synthetic_set(self) -> AugmentedImages:
        """The images of `synthetic_root` (a data set sample.py wrote), labelled by class folders matched by name to
        the real classes, through the training pipeline."""
        paths, labels, names = folder_items(self.synthetic_root, "data.synthetic_root", self.labels)
        if self.class_names:
            if labels is None:
                raise UserError(f"data.synthetic_root={self.synthetic_root} has no class folders, and the real images "
                                f"have classes {self.class_names}: pass a data set with the same class folders")
            unknown = sorted(set(names) - set(self.class_names))
            if unknown:
                raise UserError(f"data.synthetic_root={self.synthetic_root} has classes {unknown} that the real images "
                                f"do not; its class folders must be among {self.class_names}")
            labels = [self.class_names.index(names[label]) for label in labels]
        else:
            labels = None
        per_epoch = self.synthetic_per_epoch
        log.info("data: %d synthetic images in %s; each epoch adds %d of them to the %d real (fraction %.2f)",
                 len(paths), self.synthetic_root, per_epoch, len(self.train_set), self.synthetic_fraction)
        return AugmentedImages(paths, labels, ImageCache(self.scaled_side), self.train_transform, self.channels,
                               self.seed)

    @property
    def synthetic_per_epoch(self) -> int:
        """Synthetic images per epoch, beside every real training image: fraction · (real + synthetic)."""
        f = self.synthetic_fraction
        return round(len(self.train_set) * f / (1 - f)) if self.synthetic_root else 0

    @property
    def fit_set(self) -> AugmentedImages | MixedImages:
        """What the training epochs draw from: the real training images, and after them the synthetic ones."""
        return MixedImages(self.train_set, self.synthetic_set) if self.synthetic_set is not None else self.train_set

    def _loader(self, dataset: AugmentedImages, sampler: EpochSampler | None = None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=sampler is not None and len(sampler) > self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.persistent_workers,
            pin_memory=self.pin_memory,
            # Its own generator: starting an iterator then never draws from the global stream (see GenerativeModule).
            generator=torch.Generator().manual_seed(derive_seed(self.seed)),
        )

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        # Lightning starts the first iterator before its first `set_epoch`, so a resumed run names its epoch here.
        epoch, batches = self._resume or (0, 0)
        dataset = self.fit_set
        sampler = EpochSampler(
            dataset,
            num_replicas=trainer.world_size if trainer else 1,
            rank=trainer.global_rank if trainer else 0,
            seed=self.seed,
            epoch=epoch,
            epoch_of=(lambda: trainer.current_epoch) if trainer else None,
            mix=(len(self.train_set), self.synthetic_per_epoch) if self.synthetic_set is not None else None,
        )
        sampler.resume(epoch, batches * self.batch_size)
        return self._loader(dataset, sampler)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_set) if len(self.val_set) else []

    def state_dict(self) -> dict[str, int]:
        """The epoch to continue in and how many of its batches this rank has trained on, for a resumed run."""
        if self.trainer is None:
            return {}
        epoch, batches = self.trainer.current_epoch, self.trainer.fit_loop.epoch_loop.batch_progress.current.ready
        if batches >= self.trainer.num_training_batches:  # the epoch is done: the run continues with the next one
            epoch, batches = epoch + 1, 0
        return {"epoch": epoch, "batches": batches}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        if state_dict:
            self._resume = (state_dict["epoch"], state_dict["batches"])


class DigitsDataModule(ImageDataModule):
    """scikit-learn's bundled 8×8 handwritten digits (1,797 images, classes 0-9): offline and small."""

    def load_items(self) -> tuple[list[Any], list[int], list[str]]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = np.round(digits.images / 16 * 255).astype(np.uint8)[..., None]
        return list(images), digits.target.tolist(), [str(i) for i in range(10)]


class FolderDataModule(ImageDataModule):
    """Every image below `root`; top-level sub-folders are the classes when every image lies in one.

    The sorted sub-folder names give the class indices. Each image is decoded once at the working scale and
    kept in the decoded-image cache (`fiberaug.data.cache`): up to `cache_mb` MiB in memory, shared by forked
    workers, and in `cache_dir` on disk for later epochs, workers and runs ("auto": the user's cache folder;
    None: no disk tier). `cache_mb=0, cache_dir=None` decodes every image on every draw.
    """

    def __init__(
        self,
        root: str | None = None,
        cache_mb: float = 1024,
        cache_dir: str | None = "auto",
        val_pattern: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if isinstance(cache_mb, bool) or not isinstance(cache_mb, (int, float)) or not 0 <= cache_mb < math.inf:
            raise UserError(f"data.cache_mb={cache_mb!r} must be a number of MiB, 0 or more (0: no memory cache)")
        if cache_dir is not None and (not isinstance(cache_dir, (str, os.PathLike)) or not str(cache_dir)):
            raise UserError(
                f"data.cache_dir={cache_dir!r} must be a folder, auto (the user's cache folder) or null (no disk cache)"
            )
        self.root = root
        self.val_pattern = val_pattern
        folder = default_cache_dir() if cache_dir == "auto" else Path(cache_dir).expanduser() if cache_dir else None
        self.images = ImageCache(self.scaled_side, int(cache_mb * 2**20), folder)

    @property
    def reader(self) -> ImageCache:
        # Decodes no more than the short side the pipeline scales to (JPEG draft mode), scaled to it, once.
        return self.images

    def item_id(self, item: Path) -> str:
        return self.images.content_hash(item)  # hashed once, when the cache is built, unless the file changed

    def item_versions(self, item: Path) -> tuple[list[str], bool]:
        return self.images.versions(item)

    @property
    def latent_cache_dir(self) -> Path | None:
        return None if self.images.folder is None else self.images.folder / "latents"

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            super().setup(stage)
            self.images.build([*self.train_set.items, *self.val_set.items])  # training images first into memory

    def split(self, items: Sequence[Path]) -> tuple[np.ndarray, np.ndarray]:
        """With `val_pattern`, the images whose path below `root` matches it (shell-style, e.g. `*_s1[01].png`)
        are the validation split: images that must not be separated (the same scene twice) stay on one side."""
        if not self.val_pattern:
            return super().split(items)
        root = Path(self.root).expanduser()
        held = np.array([fnmatch.fnmatchcase(p.relative_to(root).as_posix(), self.val_pattern) for p in items])
        if held.all() or not held.any():
            raise UserError(f"data.val_pattern={self.val_pattern!r} matches {int(held.sum())} of the {len(items)} "
                            f"images in {root}: it must hold back some and leave some to train on (a shell pattern "
                            "on the path below data.root, e.g. '*_s1[01].png' or 'held-out/*')")
        return np.flatnonzero(held), np.flatnonzero(~held)

    def item_captions(self, items: Sequence[Path]) -> list[str | None]:
        return read_captions(Path(self.root).expanduser(), items)

    def load_items(self) -> tuple[list[Path], list[int] | None, list[str]]:
        if not self.root:
            raise UserError("data.root is not set: pass data.root=DIR, a folder of images")
        return folder_items(self.root, "data.root", self.labels)


def folder_items(folder: str, key: str, labels: str = "auto") -> tuple[list[Path], list[int] | None, list[str]]:
    """Every readable image below `folder` (unreadable ones skipped with a warning), with class indices and names
    when every image lies in a top-level sub-folder. `key` names the setting in errors."""
    root, paths = list_folder(folder, key)
    paths, bad = _readable(paths)
    if bad:
        shown = "; ".join(f"{p.relative_to(root)} ({reason})" for p, reason in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        log.warning("skipping %d unreadable image file(s) in %s: %s%s", len(bad), root, shown, more)
    if not paths:
        raise UserError(f"{key}={root}: none of its {len(bad)} image files could be read ({bad[0][1]})")
    parts = [p.relative_to(root).parts for p in paths]
    if any(len(part) == 1 for part in parts):
        if labels == "auto" and any(len(part) > 1 for part in parts):
            log.warning("images lie both in %s and in its sub-folders: training without class labels", root)
        return paths, None, []
    class_names = sorted({part[0] for part in parts})
    index = {name: i for i, name in enumerate(class_names)}
    return paths, [index[part[0]] for part in parts], class_names


def _readable(paths: Sequence[Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Split paths into those whose headers open as images and those that fail, with the reason."""
    good, bad = [], []
    for path in paths:
        try:
            with Image.open(path) as im:
                im.verify()
            good.append(path)
        except Exception as exc:  # Pillow raises many types for damaged files
            bad.append((path, str(exc) or type(exc).__name__))
    return good, bad
