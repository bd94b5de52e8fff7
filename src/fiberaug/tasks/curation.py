"""sample.py's filters: drawn images that copy a training image, or that a classifier fitted on the real images does
not read as their class, are rejected (and recorded) instead of entering the data set."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from fiberaug.errors import UserError
from fiberaug.metrics import ClassReader, CopyTest, fit_reader
from fiberaug.models import read_checkpoint
from fiberaug.models.base import GenerativeModule
from fiberaug.tasks.inputs import ImageSet, align_labels, checkpoint_data, read_folder

log = logging.getLogger(__name__)

#: At most this many training images are compared with (the first of the split, as evaluate.py's reference).
MAX_REFERENCE = 5000


@dataclass
class Curation:
    """The filters in force, each None when off."""

    copy_test: CopyTest | None = None
    reader: ClassReader | None = None
    min_confidence: float | None = None

    def judge(self, images: torch.Tensor, labels: torch.Tensor | None) -> list[tuple[dict[str, float], str | None]]:
        """Per image (in [-1, 1]): its scores, and why it is rejected (None: kept)."""
        scores: list[dict[str, float]] = [{} for _ in images]
        reasons: list[str | None] = [None] * len(images)
        if self.copy_test is not None:
            result = self.copy_test(images)
            for i, (score, copy) in enumerate(zip(result.score.tolist(), result.copies.tolist())):
                scores[i]["copy_score"] = round(score, 4)
                reasons[i] = "copy" if copy else None
        if self.reader is not None and labels is not None:
            for i, confidence in enumerate(self.reader.confidence(images, labels).tolist()):
                scores[i]["class_confidence"] = round(confidence, 4)
                if confidence < self.min_confidence and reasons[i] is None:
                    reasons[i] = "off-class"
        return list(zip(scores, reasons))


def build_curation(options: DictConfig, model: GenerativeModule, ckpt_path: str) -> tuple[Curation, dict[str, Any]]:
    """The filters `options` (sample.py's `filter`) ask for, fitted on the training images (`filter.train_dir`, else
    those the checkpoint records), and their settings for the job's identity."""
    ratio, confidence = options.max_copy_ratio, options.min_class_confidence
    if ratio is not None and not 0 < ratio <= 1:
        raise UserError(f"filter.max_copy_ratio={ratio} must lie in (0, 1] (1/3 by default), or be null to keep copies")
    if confidence is not None and not 0 <= confidence <= 1:
        raise UserError(f"filter.min_class_confidence={confidence} must be a probability in [0, 1], or null")
    if confidence is not None and not model.num_classes:
        raise UserError(f"filter.min_class_confidence={confidence}: this model was trained without classes")
    settings = {"max_copy_ratio": ratio, "min_class_confidence": confidence, "train_dir": options.train_dir}
    if ratio is None and confidence is None:
        return Curation(), settings
    train = _training_images(options.train_dir, model, ckpt_path)
    if train is None:
        if confidence is not None:
            raise UserError(f"filter.min_class_confidence={confidence} needs the real images: ckpt_path={ckpt_path} "
                            "records none (an export, or an older checkpoint); pass filter.train_dir=DIR")
        log.warning("filter.max_copy_ratio=%s is off: ckpt_path=%s records no training images; pass "
                    "filter.train_dir=DIR to reject copies of them", ratio, ckpt_path)
        return Curation(), {**settings, "max_copy_ratio": None}
    curation = Curation(copy_test=CopyTest(train.images, threshold=ratio) if ratio is not None else None)
    if confidence is not None:
        labels = align_labels(train, model.class_names)
        if labels is None:
            raise UserError(f"filter.min_class_confidence needs the real images' classes to be the model's "
                            f"{list(model.class_names)}; filter.train_dir={options.train_dir} has {train.class_names}")
        curation.reader, curation.min_confidence = fit_reader(train.images, labels, probabilities=True), confidence
        log.info("class filter: a classifier on %d real images reads %.0f%% of its held-out ones right",
                 len(train.images), 100 * curation.reader.accuracy)
    return curation, settings


def _training_images(train_dir: str | None, model: GenerativeModule, ckpt_path: str) -> ImageSet | None:
    size = model.hparams.image_size
    if train_dir:
        return read_folder(train_dir, size, MAX_REFERENCE, name="filter.train_dir")
    path = Path(ckpt_path).expanduser()
    data = checkpoint_data(read_checkpoint(path)) if path.is_file() else None
    if data is None or not len(data.train_set):
        return None
    images, labels = data.reference_images("train", MAX_REFERENCE)
    return ImageSet(images, labels, list(data.class_names), available=len(data.train_set))
