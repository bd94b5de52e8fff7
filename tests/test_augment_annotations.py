"""Masks, YOLO and COCO boxes move with their images, by the same draw; boxes that leave are dropped and counted."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import augment_config, save
from PIL import Image

from fiberaug.tasks import run_task
from fiberaug.tasks.augment import augment

# Keep the left half, then mirror it: box A (left) moves, box B (right) leaves the image.
CROP_FLIP = ("augment={transforms: [{_target_: albumentations.Crop, x_min: 0, y_min: 0, x_max: 20, y_max: 20},"
             " {_target_: albumentations.HorizontalFlip, p: 1.0}]}")


def scene(root: Path) -> np.ndarray:
    """A 40×20 black image with box A (x 4–12, y 5–15) and box B (x 28–36, y 4–10); returns its label mask."""
    image, mask = np.zeros((20, 40, 3), dtype=np.uint8), np.zeros((20, 40), dtype=np.uint8)
    image[5:15, 4:12], mask[5:15, 4:12] = 255, 1
    image[4:10, 28:36], mask[4:10, 28:36] = 255, 2
    save(root / "sub" / "a.jpg", image, quality=100)
    return mask


@pytest.mark.parametrize("inside", [False, True], ids=["annotations-beside", "annotations-inside-input"])
def test_masks_and_yolo_boxes_move_with_their_images(tmp_path, inside):
    root = tmp_path / "in"
    masks, labels = (root / "masks", root) if inside else (tmp_path / "masks", tmp_path / "labels")
    save(masks / "sub" / "a.png", scene(root))
    (labels / "sub").mkdir(parents=True, exist_ok=True)
    (labels / "sub" / "a.txt").write_text("0 0.2 0.5 0.2 0.5\n1 0.8 0.35 0.2 0.3\n")
    out = tmp_path / "out"
    augment(augment_config(root, out, CROP_FLIP, f"mask_dir={masks}", f"yolo_dir={labels}", "copies=2"))

    mask_out, labels_out = "masks/sub/a_aug1.png", "sub/a_aug1.txt" if inside else "labels/sub/a_aug1.txt"
    (record,) = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines() if '"copy": 1' in line]
    assert record["source"] == "sub/a.jpg"  # the masks inside input_dir are not taken for images
    assert record["annotations"] == {"mask": mask_out, "labels": labels_out, "boxes_kept": 1, "boxes_dropped": 1}
    mask = np.asarray(Image.open(out / mask_out))
    expected = np.zeros((20, 20), dtype=np.uint8)
    expected[5:15, 8:16] = 1  # box A, mirrored within the kept half
    assert np.array_equal(mask, expected)
    image = np.asarray(Image.open(out / "sub" / "a_aug1.jpg"))
    assert np.array_equal(image > 127, np.repeat(expected[..., None], 3, axis=2) > 0)  # the image moved the same way
    cls, *box = (out / labels_out).read_text().split()
    assert cls == "0" and np.allclose([float(v) for v in box], [0.6, 0.5, 0.4, 0.5])


def test_coco_boxes_move_and_a_coco_file_is_written_for_the_outputs(tmp_path):
    root = tmp_path / "in"
    scene(root)
    coco = {"images": [{"id": 7, "file_name": "sub/a.jpg", "width": 40, "height": 20}],
            "annotations": [{"id": 1, "image_id": 7, "category_id": 3, "bbox": [4, 5, 8, 10], "iscrowd": 0},
                            {"id": 2, "image_id": 7, "category_id": 4, "bbox": [28, 4, 8, 6], "iscrowd": 0}],
            "categories": [{"id": 3, "name": "A"}, {"id": 4, "name": "B"}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    out = tmp_path / "out"
    augment(augment_config(root, out, CROP_FLIP, f"coco={tmp_path / 'coco.json'}"))
    written = json.loads((out / "annotations.json").read_text())
    assert written["images"] == [{"id": 1, "file_name": "sub/a_aug0.jpg", "width": 20, "height": 20}]
    assert written["annotations"] == [{"id": 1, "image_id": 1, "bbox": [8.0, 5.0, 8.0, 10.0], "category_id": 3,
                                       "iscrowd": 0, "area": 80.0}]
    assert written["categories"] == coco["categories"]
    record = json.loads((out / "manifest.jsonl").read_text())
    assert record["annotations"]["boxes_dropped"] == 1


def test_mask_of_another_size_is_an_error_for_that_image(tmp_path):
    root = tmp_path / "in"
    scene(root)
    save(tmp_path / "masks" / "sub" / "a.png", np.zeros((5, 5), dtype=np.uint8))
    summary = augment(augment_config(root, tmp_path / "out", f"mask_dir={tmp_path / 'masks'}"))
    assert summary.failures == {"sub/a.jpg": "ValueError: mask a.png is 5×5, the image 40×20"}


def test_yolo_and_coco_together_are_refused(tmp_path):
    scene(tmp_path / "in")
    with pytest.raises(SystemExit, match="boxes come from one of them"):
        run_task(augment, augment_config(tmp_path / "in", tmp_path / "out", f"yolo_dir={tmp_path}", "coco=x.json"))
