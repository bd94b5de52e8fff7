"""Reading image files of any common mode into numpy arrays, and converting them to a channel count."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")

# PIL modes kept as they are; everything else is converted to the nearest of these.
_NATIVE_MODES = {"L", "LA", "RGB", "RGBA", "I;16", "I;16B", "I;16L"}
_EXIF_ORIENTATION = 0x0112


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def list_images(root: Path) -> list[Path]:
    """Image files below `root`, sorted; hidden files and folders (`.thumbnails`, `.hydra`) are skipped."""
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and is_image_file(p) and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def read_image(path: Path, min_side: int | None = None) -> np.ndarray:
    """Decode `path` to an H×W×C array (C: 1 gray, 2 gray+alpha, 3 RGB, 4 RGBA) with EXIF orientation applied.

    8-bit sources give uint8 and 16-bit sources give uint16, colour included (Pillow decodes 16-bit colour
    as 8-bit, so OpenCV reads those). `min_side` lets JPEG decoding skip resolution that would be thrown
    away: a 4032×3024 photo needed at 512 pixels decodes at 1/4 scale. Raises OSError or ValueError for
    files that are not images or are damaged (Pillow refuses truncated data instead of padding it grey).
    """
    with Image.open(path) as im:
        rawmode = im.tile[0].args if im.tile else ""  # read first: getexif() may decode a PNG and clear tile
        rawmode = rawmode[0] if isinstance(rawmode, tuple) else rawmode
        orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
        if im.mode in ("RGB", "RGBA") and ";16" in str(rawmode):
            array = _read_16bit_colour(path)
        else:
            if min_side:
                im.draft(im.mode, (min_side, min_side))
            array = _pil_to_array(im)
    return _apply_orientation(array, orientation)


def _pil_to_array(im: Image.Image) -> np.ndarray:
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif im.mode == "PA":
        im = im.convert("RGBA")
    elif im.mode == "1":
        im = im.convert("L")
    elif im.mode == "I":
        # Pillow opens some 16-bit grayscale files as 32-bit "I"; their values fit 16 bits.
        return np.clip(np.asarray(im), 0, 65535).astype(np.uint16)[..., None]
    elif im.mode not in _NATIVE_MODES:
        if im.mode == "F":
            raise ValueError("floating-point images (mode F) are not supported; save as 8- or 16-bit")
        im = im.convert("RGB")
    array = np.asarray(im)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("="))
    return array[..., None] if array.ndim == 2 else array


def _read_16bit_colour(path: Path) -> np.ndarray:
    array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if array is None:
        raise ValueError("OpenCV could not decode this 16-bit colour image")
    code = cv2.COLOR_BGRA2RGBA if array.shape[2] == 4 else cv2.COLOR_BGR2RGB
    return cv2.cvtColor(array, code)


def _apply_orientation(array: np.ndarray, orientation: int) -> np.ndarray:
    """Rotate/flip as the EXIF orientation tag says, so the array is upright as a viewer shows it."""
    ops = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.swapaxes(0, 1),
        6: lambda a: np.rot90(a, k=-1),
        7: lambda a: a.swapaxes(0, 1)[::-1, ::-1],
        8: lambda a: np.rot90(a, k=1),
    }
    op = ops.get(orientation)
    return np.ascontiguousarray(op(array)) if op else array


def to_channels(array: np.ndarray, channels: int) -> np.ndarray:
    """Float32 H×W×`channels` in [0, 1]: alpha is composited onto black, gray is repeated, RGB becomes luma."""
    scale = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(array.dtype, 1.0)
    image = array.astype(np.float32) / scale
    if image.shape[2] in (2, 4):
        image = image[..., :-1] * image[..., -1:]
    if channels == 1 and image.shape[2] == 3:
        image = image @ np.array([[0.299], [0.587], [0.114]], dtype=np.float32)
    elif channels == 3 and image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image)
