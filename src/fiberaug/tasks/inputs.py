"""The image sets that evaluation compares: folders, a model's samples, and the data a checkpoint was trained on."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from fiberaug.data import list_folder, read_image, sized_pipeline, to_channels
from fiberaug.errors import UserError
from fiberaug.models import GenerativeModule

log = logging.getLogger(__name__)

@dataclass
class ImageSet:
    """Images N×C×H×W in [-1, 1], with class indices into `class_names` where the set has classes."""

    images: torch.Tensor
    labels: list[int] | None = None
    class_names: list[str] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)  # content hashes, where known
    available: int | None = None  # how many the source held, when only a subset was taken


def read_folder(root: str | Path, size: int, limit: int | None = None, name: str = "folder", seed: int = 0) -> ImageSet:
    """The images below `root`, scaled so their short side is `size` and centre-cropped: all of them, or a random
    `limit` drawn by `seed`, stratified by class (each class keeps its share, and at least one image).

    Classes: the top-level sub-folders when every image lies in one (as for training, and in the data sets
    sample.py writes). Grayscale stays one channel unless the
    folder mixes in colour. Unreadable files are skipped with a warning naming them.
    """
    folder, paths = list_folder(root, name)
    available = len(paths)
    if limit is not None and available > limit:
        labels, _ = _folder_labels(folder, paths)
        paths = [paths[i] for i in stratified_subset(labels or [0] * available, limit, seed)]
        log.info("%s: a random %d of its %d images (seed %d%s)", name, len(paths), available, seed,
                 ", stratified by class" if labels else "")
    resize = sized_pipeline(size, "resize", train=False)
    arrays, kept, skipped = [], [], []
    for path in tqdm(paths, desc=f"reading {name}", unit="img", leave=False):
        try:
            array = read_image(path, min_side=size)
        except (OSError, ValueError, SyntaxError) as exc:
            skipped.append(f"{path.relative_to(folder)} ({exc})")
            continue
        arrays.append(resize(image=to_channels(array, 3 if array.shape[2] >= 3 else 1))["image"])
        kept.append(path)
    if skipped:
        log.warning("%s: skipped %d unreadable file(s): %s", name, len(skipped), "; ".join(skipped[:5]))
    if not arrays:
        raise UserError(f"{name}={folder}: none of its {len(paths)} image files could be read")
    channels = max(a.shape[2] for a in arrays)
    images = torch.stack([torch.from_numpy(np.repeat(a, channels // a.shape[2], axis=2)) for a in arrays])
    labels, class_names = _folder_labels(folder, kept)
    return ImageSet(images.permute(0, 3, 1, 2).contiguous() * 2 - 1, labels, class_names, available=available)


def stratified_subset(labels: Sequence[int], limit: int, seed: int) -> list[int]:
    """`limit` indices drawn by `seed`, each class's count proportional to its share (largest remainders round,
    and every class keeps one where `limit` allows), in their original order."""
    rng = np.random.default_rng(seed)
    members: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        members.setdefault(label, []).append(index)
    classes = sorted(members)
    exact = np.array([len(members[c]) * limit / len(labels) for c in classes])
    counts = np.floor(exact).astype(int)
    if limit >= len(classes):
        counts = np.maximum(counts, 1)
    for i in np.argsort(-(exact - np.floor(exact)), kind="stable"):
        if counts.sum() >= limit:
            break
        counts[i] += 1
    while counts.sum() > limit:  # the minimum of one per class took more than the remainders gave back
        counts[np.argmax(np.where(counts > 1, counts - exact, -np.inf))] -= 1
    picked = [rng.permutation(members[c])[:n] for c, n in zip(classes, counts)]
    return sorted(int(i) for part in picked for i in part)


def _folder_labels(root: Path, paths: Sequence[Path]) -> tuple[list[int] | None, list[str]]:
    parts = [p.relative_to(root).parts for p in paths]
    if not all(len(part) > 1 for part in parts):
        return None, []
    names = [part[0] for part in parts]
    class_names = sorted(set(names))
    return [class_names.index(n) for n in names], class_names


def align_labels(fake: ImageSet, class_names: Sequence[str]) -> list[int] | None:
    """`fake`'s labels as indices into the real set's `class_names` (matched by name), or None if any is unknown."""
    if fake.labels is None or not class_names:
        return None
    names = [fake.class_names[i] for i in fake.labels]
    if not set(names) <= set(class_names):
        log.warning("the generated images' classes %s are not all among the real ones %s: no class consistency",
                    sorted(set(names)), list(class_names))
        return None
    return [list(class_names).index(n) for n in names]


def draw_samples(model: GenerativeModule, num_samples: int, seed: int, batch_size: int, labels: Any = None,
                 **options: Any) -> ImageSet:
    """`num_samples` images from `model` (with a progress bar), labelled with the classes they were drawn for."""
    images = model.sample(num_samples, labels=labels, seed=seed, batch_size=batch_size, progress=True, **options)
    indices = model.label_indices(labels, num_samples)
    return ImageSet(images, indices.tolist() if indices is not None else None, list(model.class_names))


def checkpoint_data(checkpoint: dict[str, Any]) -> Any:
    """The DataModule a checkpoint was trained with, set up with the same split, or None for older checkpoints.

    Warns when images the checkpoint recorded are missing or changed since (they are matched by content).
    """
    record, hparams = checkpoint["fiberaug"].get("data"), checkpoint.get("datamodule_hyper_parameters")
    if not record or hparams is None:
        return None
    module_name, _, class_name = record["datamodule"].rpartition(".")
    datamodule = getattr(importlib.import_module(module_name), class_name)(**hparams)
    datamodule.setup("fit")
    for split in ("train", "val"):
        now = {datamodule.item_id(item) for item in getattr(datamodule, f"{split}_set").items}
        missing = len(set(record[split]) - now)
        if missing:
            log.warning("%d of the checkpoint's %d %s images are missing or changed since training",
                        missing, len(record[split]), split)
    return datamodule
