"""Reading and writing image files of any common mode as numpy arrays, and converting them to a channel count."""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from fiberaug.errors import UserError
from fiberaug.files import write_atomic

IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")

# PIL modes kept as they are; everything else is converted to the nearest of these.
_NATIVE_MODES = {"L", "LA", "RGB", "RGBA", "I;16", "I;16B", "I;16L"}
_EXIF_ORIENTATION = 0x0112
_FORMATS = {
    ".bmp": "BMP", ".jpeg": "JPEG", ".jpg": "JPEG", ".png": "PNG", ".tif": "TIFF", ".tiff": "TIFF", ".webp": "WEBP"
}


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def list_images(root: Path) -> list[Path]:
    """Image files below `root`, sorted; hidden files and folders (`.thumbnails`, `.hydra`) are skipped."""
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and is_image_file(p) and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def list_folder(root: str | Path, name: str = "folder") -> tuple[Path, list[Path]]:
    """The folder and its images (hidden ones, such as sample.py's `.preview.png`, left out); a missing folder or one
    without images is refused, naming the setting `name`."""
    folder = Path(root).expanduser()
    if not folder.is_dir():
        raise UserError(f"{name}={folder} is not a folder")
    paths = list_images(folder)
    if not paths:
        raise UserError(f"{name}={folder} holds no images (looked recursively for {', '.join(IMAGE_EXTENSIONS)})")
    return folder, paths


def read_image(source: Path | bytes, min_side: int | None = None) -> np.ndarray:
    """Decode a file (its path, or its bytes) to an H×W×C array (C: 1 gray, 2 gray+alpha, 3 RGB, 4 RGBA).

    8-bit sources give uint8 and 16-bit sources give uint16, colour included (Pillow decodes 16-bit colour
    as 8-bit, so OpenCV reads those). `min_side` lets JPEG decoding skip resolution that would be thrown
    away: a 4032×3024 photo needed at 512 pixels decodes at 1/4 scale. Upright: EXIF orientation is applied.
    Passing bytes lets a caller decode exactly the bytes it hashed. Raises OSError or ValueError for files that
    are not images or are damaged (Pillow refuses truncated data instead of padding it grey).
    """
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
        rawmode = im.tile[0].args if im.tile else ""  # read first: getexif() may decode a PNG and clear tile
        rawmode = rawmode[0] if isinstance(rawmode, tuple) else rawmode
        orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
        if im.mode in ("RGB", "RGBA") and ";16" in str(rawmode):
            array = _read_16bit_colour(source)
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


def _read_16bit_colour(source: Path | bytes) -> np.ndarray:
    if isinstance(source, bytes):
        array = cv2.imdecode(np.frombuffer(source, np.uint8), cv2.IMREAD_UNCHANGED)
    else:
        array = cv2.imread(str(source), cv2.IMREAD_UNCHANGED)
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


def check_complete(data: bytes) -> None:
    """Raise ValueError for an empty file, or a JPEG or PNG that stops before its end marker.

    Some decoders (OpenCV's; Pillow with `ImageFile.LOAD_TRUNCATED_IMAGES`) fill the missing rows with grey
    and report nothing, so the file's structure is checked. Other formats are left to their decoders.
    """
    if not data:
        raise ValueError("empty file")
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        pos = 8  # chunks: length, type, data, CRC
        while pos + 8 <= len(data):
            if data[pos + 4 : pos + 8] == b"IEND":
                return
            pos += 12 + int.from_bytes(data[pos : pos + 4], "big")
        raise ValueError(f"truncated or damaged PNG: its {len(data)} bytes end before the IEND chunk")
    if data[:2] == b"\xff\xd8":
        pos = 2  # header segments up to the first scan, whose entropy-coded data cannot contain FF D9
        while pos + 4 <= len(data) and data[pos] == 0xFF and data[pos + 1] != 0xDA:
            pos += 1 if data[pos + 1] == 0xFF else 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if data.find(b"\xff\xd9", pos) < 0:
            raise ValueError(f"truncated or damaged JPEG: its {len(data)} bytes end before the end-of-image marker")


def encode_image(array: np.ndarray, suffix: str, jpeg_quality: int = 95) -> bytes:
    """The file bytes of an H×W×C array (as `read_image` gives) in the format `suffix` names.

    Channels and bit depth are kept: 1 gray, 2 gray+alpha, 3 RGB, 4 RGBA; uint8 or uint16. Every format but
    JPEG is written losslessly; 16-bit colour goes through OpenCV (Pillow has no such mode). A combination the
    format cannot hold (alpha in JPEG, 16 bits in WebP) raises ValueError.
    """
    fmt = _FORMATS.get(suffix.lower())
    if fmt is None:
        raise ValueError(f"cannot write {suffix!r} files; known: {', '.join(IMAGE_EXTENSIONS)}")
    if array.dtype == np.uint16 and array.shape[2] in (3, 4) and fmt in ("PNG", "TIFF"):
        code = cv2.COLOR_RGB2BGR if array.shape[2] == 3 else cv2.COLOR_RGBA2BGRA
        ok, encoded = cv2.imencode(suffix.lower(), cv2.cvtColor(array, code))
        if not ok:
            raise ValueError(f"OpenCV could not encode a 16-bit {array.shape[2]}-channel {fmt}")
        return encoded.tobytes()
    if array.dtype not in (np.uint8, np.uint16) or (array.dtype == np.uint16 and array.shape[2] != 1):
        raise ValueError(f"cannot write a {array.dtype} array of {array.shape[2]} channels as {fmt}")
    image = Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)
    options = {"JPEG": {"quality": jpeg_quality}, "WEBP": {"lossless": True}}.get(fmt, {})
    buffer = io.BytesIO()
    try:
        image.save(buffer, fmt, **options)
    except OSError as exc:  # Pillow's way of saying the format cannot hold this mode
        raise ValueError(f"cannot write a {image.mode} image as {fmt}: {exc}") from exc
    return buffer.getvalue()


def write_image(path: Path, array: np.ndarray, jpeg_quality: int = 95) -> bytes:
    """Write `array` to `path` in the format of its suffix (see `encode_image`), atomically; returns the bytes."""
    data = encode_image(array, path.suffix, jpeg_quality)
    write_atomic(path, data)
    return data


def composite_alpha(array: np.ndarray) -> np.ndarray:
    """Gray+alpha or RGBA composited onto black in the array's own dtype (rounded), alpha dropped; others as they are.

    What `to_channels` does in float, done before an image is scaled: scaling colour and alpha apart would bleed
    the colour of transparent pixels into their neighbours.
    """
    if array.shape[2] not in (2, 4):
        return array
    maximum = np.iinfo(array.dtype).max
    colour, alpha = array[..., :-1].astype(np.uint64), array[..., -1:].astype(np.uint64)
    return ((colour * alpha + maximum // 2) // maximum).astype(array.dtype)


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
