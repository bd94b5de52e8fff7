"""Masks and boxes that travel with their images: found by the source's stem, moved by the same draw.

A mask of `input_dir/a/b.jpg` is `mask_dir/a/b.<any image extension>`; its YOLO boxes are `yolo_dir/a/b.txt`;
COCO boxes come from one JSON file whose `file_name`s are relative to input_dir. An annotation folder inside
input_dir keeps its place below output_dir; one outside it goes to `output_dir/masks` or `output_dir/labels`.
"""

from __future__ import annotations

import glob
import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import albumentations as A
import numpy as np

from fiberaug.augment.plan import output_name
from fiberaug.data.images import is_image_file
from fiberaug.errors import UserError


@dataclass(frozen=True)
class Annotations:
    """Where annotations are read (absolute folders) and written (folders relative to output_dir)."""

    mask_dir: Path | None = None
    mask_root: str = "masks"
    yolo_dir: Path | None = None
    labels_root: str = "labels"
    coco: bool = False

    @classmethod
    def configure(cls, input_dir: Path, mask_dir: Any = None, yolo_dir: Any = None, coco: Any = None) -> Annotations:
        if yolo_dir and coco:
            raise UserError(f"yolo_dir={yolo_dir} and coco={coco}: boxes come from one of them; pass only one")
        masks, labels = _folder("mask_dir", mask_dir), _folder("yolo_dir", yolo_dir)
        if masks == input_dir:
            raise UserError(f"mask_dir={mask_dir} is input_dir; masks need their own folder, or they count as images")
        return cls(masks, _root(masks, input_dir, "masks"), labels, _root(labels, input_dir, "labels"), bool(coco))

    def bbox_params(self) -> A.BboxParams | None:
        """Boxes are clipped to the image; those that leave it (or are degenerate) are dropped and counted."""
        if not (self.yolo_dir or self.coco):
            return None
        return A.BboxParams(format="yolo" if self.yolo_dir else "coco", label_fields=["box_ids"], clip=True,
                            filter_invalid_bboxes=True)

    def excluded(self, input_dir: Path) -> tuple[Path, ...]:
        """Folders below input_dir that hold annotations, not images to augment."""
        return (self.mask_dir,) if self.mask_dir and self.mask_dir.is_relative_to(input_dir) else ()

    def find_mask(self, source: str) -> Path | None:
        if self.mask_dir is None:
            return None
        path = self.mask_dir / source
        found = [p for p in path.parent.glob(f"{glob.escape(path.stem)}.*") if p.stem == path.stem and is_image_file(p)]
        if len(found) > 1:
            raise ValueError(f"{len(found)} masks for one image: {', '.join(sorted(p.name for p in found))}")
        return found[0] if found else None

    def find_labels(self, source: str) -> Path | None:
        path = (self.yolo_dir / source).with_suffix(".txt") if self.yolo_dir else None
        return path if path and path.is_file() else None

    def mask_output(self, source: str, copy: int) -> str:
        """Masks are written as PNG whatever their source format: label values must survive exactly."""
        return str(PurePosixPath(self.mask_root, output_name(source, copy, ".png")))

    def labels_output(self, source: str, copy: int) -> str:
        return str(PurePosixPath(self.labels_root, output_name(source, copy, ".txt")))


def _folder(key: str, value: Any) -> Path | None:
    if not value:
        return None
    path = Path(value).resolve()
    if not path.is_dir():
        raise UserError(f"{key}={value} is not a folder")
    return path


def _root(folder: Path | None, input_dir: Path, default: str) -> str:
    return folder.relative_to(input_dir).as_posix() if folder and folder.is_relative_to(input_dir) else default


def read_yolo(path: Path) -> tuple[list[str], np.ndarray]:
    """Class names and N×4 normalised `x_center y_center width height` boxes of a YOLO label file."""
    classes, boxes = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        values = line.split()
        if not values:
            continue
        try:
            if len(values) != 5:
                raise ValueError(f"{len(values)} values")
            boxes.append([float(v) for v in values[1:]])
        except ValueError as exc:
            expected = "expected `class x_center y_center width height`"
            raise ValueError(f"{path.name} line {number}: {exc}; {expected}") from None
        classes.append(values[0])
    return classes, np.array(boxes, dtype=np.float64).reshape(-1, 4)


def format_yolo(classes: list[str], boxes: np.ndarray) -> bytes:
    return "".join(f"{c} {x:.6f} {y:.6f} {w:.6f} {h:.6f}\n" for c, (x, y, w, h) in zip(classes, boxes)).encode()


def read_coco(path: Any) -> tuple[list[dict], dict[str, tuple[dict, ...]]]:
    """The categories of a COCO file and the boxes of each image, keyed by `file_name` (relative to input_dir)."""
    try:
        data = json.loads(Path(path).read_text())
        names = {image["id"]: PurePosixPath(image["file_name"]).as_posix() for image in data["images"]}
        boxes: dict[str, list[dict]] = defaultdict(list)
        for ann in data.get("annotations", []):
            box = {"bbox": ann["bbox"], "category_id": ann["category_id"], "iscrowd": ann.get("iscrowd", 0)}
            boxes[names[ann["image_id"]]].append(box)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"coco={path} is not a readable COCO file with images and annotations: {exc!r}") from exc
    return data.get("categories", []), {name: tuple(b) for name, b in boxes.items()}


def coco_document(categories: list[dict], records: Iterable[dict]) -> dict[str, Any]:
    """A COCO file for the outputs of `records` (the latest record of each output, in manifest order)."""
    images: list[dict] = []
    annotations: list[dict] = []
    for record in records:
        if record["status"] != "ok":
            continue
        info = record["annotations"]
        images.append({"id": len(images) + 1, "file_name": record["output"], "width": info["width"],
                       "height": info["height"]})
        for box in info["boxes"]:
            area = box["bbox"][2] * box["bbox"][3]
            annotations.append({"id": len(annotations) + 1, "image_id": len(images), **box, "area": area})
    return {"images": images, "annotations": annotations, "categories": categories}
