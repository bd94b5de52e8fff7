"""The work on one output: read and check the source, draw its augmentation from the output's seed, write the
image (and its mask and boxes) in the source's format and mode, and return its manifest record.

Mode rules: 8-bit images are augmented as they are; 16-bit ones as float32 in [0, 1] and rounded back, so they
stay 16-bit. An alpha channel is kept: it moves with the geometry like a mask (nearest neighbour, uncovered
areas transparent) and colour transforms never touch it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np

from fiberaug.augment.annotations import Annotations, format_yolo, read_yolo
from fiberaug.augment.generative import GenerativeStep
from fiberaug.augment.plan import Output
from fiberaug.data.images import check_complete, encode_image, read_image, write_image
from fiberaug.data.pipelines import build_transforms, reseed
from fiberaug.files import write_atomic
from fiberaug.jobs import json_safe


class Augmenter:
    """Makes outputs of one pipeline; each worker process builds one and calls it for every output it is given."""

    def __init__(
        self, spec: Any, input_dir: Path, output_dir: Path, annotations: Annotations, jpeg_quality: int,
        generative: GenerativeStep | None = None,
    ) -> None:
        self.compose = A.Compose(
            build_transforms(spec),
            bbox_params=annotations.bbox_params(),
            additional_targets={"alpha": "mask"},
            save_applied_params=True,
        )
        self.input_dir, self.output_dir = input_dir, output_dir
        self.annotations, self.jpeg_quality = annotations, jpeg_quality
        self.generative = generative  # a Stable Diffusion step before the classical ones, in this process

    def __call__(self, out: Output) -> dict[str, Any]:
        """The output's record: `status` ok with what was drawn, or error with the reason; bad input never raises."""
        record: dict[str, Any] = {"source": out.source, "source_sha256": None, "copy": out.copy, "seed": out.seed,
                                  "output": out.image}
        try:
            data = (self.input_dir / out.source).read_bytes()
            record["source_sha256"] = hashlib.sha256(data).hexdigest()
            check_complete(data)
            image = read_image(self.input_dir / out.source)
            if self.generative is not None:  # first, on the photo as it is; the geometry (and annotations) stay
                image, record["generative"] = self.generative(image, out.source, out.seed)
                iou, least = record["generative"]["edge_iou"], self.generative.spec.min_edge_iou
                if least is not None and iou < least:
                    return {**record, "status": "dropped", "transforms": [],
                            "error": f"edge_iou {iou} < min_edge_iou {least}: the variant drifted from the layout"}
            targets, labels = self._targets(out, image)
            result = self._draw(image, out.seed, targets)
            encoded = encode_image(result["image"], Path(out.image).suffix, self.jpeg_quality)
            extra = self._write_annotations(out, result, targets, labels)
            write_atomic(self.output_dir / out.image, encoded)
        except Exception as exc:  # one bad file must not stop the run: it is recorded instead
            return {**record, "status": "error", "error": f"{type(exc).__name__}: {exc}", "transforms": []}
        transforms = [{"name": name, "params": json_safe(params)} for name, params in result["applied_transforms"]]
        record.update(output_sha256=hashlib.sha256(encoded).hexdigest(), status="ok", transforms=transforms)
        return {**record, "annotations": extra} if extra else record

    def _targets(self, out: Output, image: np.ndarray) -> tuple[dict[str, Any], list[str] | None]:
        """The source's mask and boxes as albumentations targets, and the YOLO classes when boxes come from YOLO."""
        targets: dict[str, Any] = {}
        mask_path = self.annotations.find_mask(out.source)
        if mask_path is not None:
            mask = read_image(mask_path)
            if mask.shape[:2] != image.shape[:2]:
                raise ValueError(f"mask {mask_path.name} is {mask.shape[1]}×{mask.shape[0]}, "
                                 f"the image {image.shape[1]}×{image.shape[0]}")
            targets["mask"] = mask
        labels = None
        if self.annotations.yolo_dir:
            labels_path = self.annotations.find_labels(out.source)
            labels, boxes = read_yolo(labels_path) if labels_path else (None, np.zeros((0, 4)))
        else:
            boxes = np.array([box["bbox"] for box in out.boxes], dtype=np.float64).reshape(-1, 4)
        if self.compose.processors:
            targets.update(bboxes=boxes, box_ids=np.arange(len(boxes)))
        return targets, labels

    def _draw(self, image: np.ndarray, seed: int, targets: dict[str, Any]) -> dict[str, Any]:
        """One draw of the pipeline, from generators seeded by this output's seed alone."""
        deep = image.dtype == np.uint16
        alpha = np.ascontiguousarray(image[..., -1]) if image.shape[2] in (2, 4) else None
        colour = image[..., :-1] if alpha is not None else image
        data = {"image": colour.astype(np.float32) / 65535 if deep else np.ascontiguousarray(colour), **targets}
        if alpha is not None:
            data["alpha"] = alpha
        reseed(self.compose, seed)
        result = self.compose(**data)
        colour = result["image"] if result["image"].ndim == 3 else result["image"][..., None]
        if deep:
            colour = np.round(np.clip(colour, 0, 1) * 65535).astype(np.uint16)
        result["image"] = np.concatenate([colour, result["alpha"][..., None]], axis=2) if alpha is not None else colour
        return result

    def _write_annotations(
        self, out: Output, result: dict[str, Any], targets: dict[str, Any], labels: list[str] | None
    ) -> dict[str, Any]:
        """Write the moved mask and boxes; returns what the record says of them."""
        extra: dict[str, Any] = {}
        if "mask" in targets:
            mask = result["mask"] if result["mask"].ndim == 3 else result["mask"][..., None]
            extra["mask"] = self.annotations.mask_output(out.source, out.copy)
            write_image(self.output_dir / extra["mask"], mask)
        if "bboxes" not in targets:
            return extra
        kept = np.asarray(result["box_ids"], dtype=int)
        boxes = np.asarray(result["bboxes"], dtype=np.float64).reshape(-1, 4)
        if labels is not None:
            extra["labels"] = self.annotations.labels_output(out.source, out.copy)
            write_atomic(self.output_dir / extra["labels"], format_yolo([labels[i] for i in kept], boxes))
        elif self.annotations.coco:
            extra["boxes"] = [{**out.boxes[i], "bbox": [round(float(v), 2) for v in b]} for i, b in zip(kept, boxes)]
            extra["height"], extra["width"] = result["image"].shape[:2]
        if labels is not None or self.annotations.coco:
            extra["boxes_kept"], extra["boxes_dropped"] = len(kept), len(targets["bboxes"]) - len(kept)
        return extra
