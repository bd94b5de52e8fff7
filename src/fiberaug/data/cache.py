"""The decoded-image cache of `data=folder`: each photo decoded once at the working scale, then reused.

What is cached is the image as the pipeline's deterministic first step leaves it: decoded at reduced scale
(JPEG draft mode), alpha composited onto black (as `to_channels` does, but before scaling, which must not
bleed the colour of transparent pixels), and scaled so its short side is the side the pipeline works at, in
the dtype it was decoded with (uint8 or uint16) and its gray or RGB channels. Conversion to `data.channels`,
augmentations and the crop still run on every draw, so each epoch draws them afresh.

Two tiers. Memory: a few large buffers filled in the main process at setup, up to a budget. DataLoader
workers started by fork share their pages: nothing writes to them, so copy-on-write copies nothing, and one
copy serves every worker. Workers started by spawn or forkserver get the cache by pickling, which leaves the
buffers behind (a copy per worker would multiply the memory); they read the disk tier instead, whose pages
the operating system's page cache shares between processes. Disk: one `.npy` file per image in `folder`,
named by a key that hashes the SHA-256 of the file's bytes together with everything that shapes the decoded
result (working side, decode mode, format version, the decoding and resizing libraries' versions), written
atomically, so runs and workers that write the same entry at once each leave a complete file.

Never stale: a changed file has another content hash, hence another entry, and a removed one is no longer
listed. Within a run, every read compares the file's inode, size, mtime and ctime with those it had when it
was hashed, and hashes it again when they differ (a removed file raises, and is skipped like any unreadable
one). Every content hash a file had in this process is kept (`versions`), so a checkpoint can record what was
trained on even after the file changed or went away. The hash and the decode are made from the same bytes.
Each entry ends with a CRC-32 of its content: an entry that does not check out, or holds an image of the wrong
shape, is decoded again and rewritten.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import time
import zlib
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import numpy as np
import PIL
import platformdirs
from tqdm import tqdm

from fiberaug.data.images import composite_alpha, read_image
from fiberaug.data.pipelines import scale_transform
from fiberaug.errors import UserError
from fiberaug.files import write_atomic

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # of the entries and of what they hold; part of every key
_TRAILER = b"FAC1"  # then the CRC-32 of the .npy bytes before it, little-endian
_BUFFER_BYTES = 64 << 20  # memory-tier buffers: large allocations of their own, apart from Python's objects
_ALIGN = 64
_UNREADABLE = (OSError, ValueError, SyntaxError)  # what a damaged image raises, as AugmentedImages catches

State = tuple[int, int, int, int]  # st_ino, st_size, st_mtime_ns, st_ctime_ns
Slot = tuple[int, int, tuple[int, ...], str]  # buffer, offset, shape, dtype


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/fiberaug/decoded`, else `~/.cache/fiberaug/decoded` (the platform's own on macOS, Windows)."""
    return platformdirs.user_cache_path("fiberaug") / "decoded"


def file_state(path: Path) -> State:
    """What changes whenever a file's content does (a file renamed over it included); one `stat`, microseconds."""
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


@dataclass(frozen=True)
class _File:
    state: State  # taken before the bytes were read, so any later change shows
    sha256: str
    key: str
    slot: Slot | None = None


class _Arena:
    """Arrays packed into a few large buffers, up to `budget` bytes in all."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.used = 0
        self.buffers: list[np.ndarray] = []
        self._free = 0

    def add(self, array: np.ndarray) -> Slot | None:
        """Copy `array` in and say where it lies; None when it does not fit the budget."""
        size = -(-array.nbytes // _ALIGN) * _ALIGN
        if self.used + size > self.budget:
            return None
        if size > self._free:
            self.buffers.append(np.empty(max(size, min(_BUFFER_BYTES, self.budget - self.used)), np.uint8))
            self._free = len(self.buffers[-1])
        buffer = self.buffers[-1]
        offset = len(buffer) - self._free
        buffer[offset : offset + array.nbytes] = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        self._free -= size
        self.used += size
        return len(self.buffers) - 1, offset, array.shape, array.dtype.str

    def get(self, slot: Slot) -> np.ndarray:
        """A read-only view: nothing may write to pages that forked workers share."""
        index, offset, shape, dtype = slot
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        view = self.buffers[index][offset : offset + nbytes].view(dtype).reshape(shape)
        view.flags.writeable = False
        return view


class ImageCache:
    """Turns an image path into its H×W×C array at the working scale (`AugmentedImages`' reader).

    `side` is the short side the pipeline scales to; `memory_bytes` bounds the memory tier and `folder` holds the
    disk tier (None: none). `build` fills the cache at setup. With neither tier every call decodes, as without
    a cache; either way the arrays are the same, so the cache never changes what a model sees.
    """

    def __init__(self, side: int, memory_bytes: int = 0, folder: Path | None = None) -> None:
        self.side = side
        self.folder = folder
        self._arena = _Arena(memory_bytes)
        self._files: dict[Path, _File] = {}
        self._versions: dict[Path, list[str]] = {}  # every content hash seen per file, oldest first
        self._recipe = (
            f"fiberaug-decoded v{FORMAT_VERSION}; alpha onto black; short side {side}; JPEG draft mode;"
            " SmallestMaxSize, area down;"
            f" Pillow {PIL.__version__}; OpenCV {cv2.__version__}; albumentations {A.__version__}"
        )
        self._warned_write = False
        self._warned_pickle = False

    @property
    def enabled(self) -> bool:
        return self._arena.budget > 0 or self.folder is not None

    @property
    def memory_used(self) -> int:
        """Bytes of decoded images in the memory tier."""
        return self._arena.used

    def decode(self, source: Path | bytes) -> np.ndarray:
        """Decode no more than needed (JPEG draft mode), composite alpha onto black, scale the short side to `side`."""
        array = composite_alpha(read_image(source, min_side=self.side))
        # A transform per call: albumentations transforms keep per-call state, and `build` decodes in threads.
        return scale_transform(self.side)(image=array)["image"]

    def key(self, sha256: str) -> str:
        """The disk entry's name: the content hash and everything that shapes the decoded result."""
        return hashlib.sha256(f"{sha256}; {self._recipe}".encode()).hexdigest()

    def entry_path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.npy"

    def content_hash(self, path: Path) -> str:
        """The SHA-256 of the file's bytes: hashed once per run (at `build`), again only if the file changed."""
        file = self._files.get(path)
        if file is None or file.state != file_state(path):
            file, _ = self._refresh(path, file)
        return file.sha256

    def versions(self, path: Path) -> tuple[list[str], bool]:
        """The SHA-256 of every content this process saw the file hold, oldest first, and whether it is still there.

        A file changed since is hashed again (its new content is what later draws decode); a removed or unreadable
        one keeps the hashes it had, so a checkpoint still records what the model was trained on.
        """
        try:
            self.content_hash(path)
        except OSError:
            return list(self._versions.get(path, ())), False
        return list(self._versions[path]), True

    def build(self, paths: Sequence[Path]) -> None:
        """Hash every file and bring its decoded image into the cache: from disk if there, else decoded now.

        Runs in threads, one per usable CPU core (decoding, hashing and file I/O release the GIL). Memory goes to
        the images in the order given, until the budget is spent; the rest is read from disk when drawn.
        """
        if not self.enabled:
            return
        if self.folder is not None:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UserError(
                    f"data.cache_dir={self.folder} cannot be used ({exc.strerror}): name a writable folder, "
                    "or data.cache_dir=null for no disk cache"
                ) from None
        start, counts, slots = time.perf_counter(), Counter(), {}
        unique = list(dict.fromkeys(paths))
        with ThreadPoolExecutor(_usable_cores()) as pool, tqdm(
            total=len(unique), desc="decoded-image cache", unit="img", disable=None, leave=False
        ) as bar:
            for path, (file, array, how) in zip(unique, pool.map(self._prepare, unique)):
                bar.update()
                counts[how] += 1
                if file is None:
                    continue
                if array is not None and file.key not in slots:
                    slots[file.key] = self._arena.add(array)
                self._remember(path, replace(file, slot=slots.get(file.key)))
                if how != "failed":
                    counts["memory" if self._files[path].slot else "not in memory"] += 1
        log.info(
            "decoded-image cache: %d images at short side %d in %.1f s (%d decoded, %d from the disk cache, %d"
            " unreadable); %d in memory (%.0f MiB, data.cache_mb=%g), %d %s",
            len(unique), self.side, time.perf_counter() - start, counts["decoded"], counts["disk"], counts["failed"],
            counts["memory"], self._arena.used / 2**20, self._arena.budget / 2**20, counts["not in memory"],
            f"read from {self.folder} when drawn" if self.folder else "decoded when drawn (no data.cache_dir)",
        )

    def __call__(self, path: Path) -> np.ndarray:
        if not self.enabled:
            return self.decode(path)
        file, data = self._files.get(path), None
        if file is None or file.state != file_state(path):  # changed since it was hashed: the old decode is stale
            file, data = self._refresh(path, file)
        if file.slot is not None and self._arena.buffers:
            return self._arena.get(file.slot)
        if self.folder is None:  # beyond the memory budget, no disk tier
            return self.decode(path if data is None else data)
        array = self._load(file.key)
        if array is None:
            if data is None:
                file, data = self._refresh(path, file)  # decode the very bytes that give the key it is stored under
            array = self.decode(data)
            self._store(file.key, array)
        return array

    def __getstate__(self) -> dict[str, Any]:
        """Pickled for workers started by spawn or forkserver: without the memory tier, which stays here."""
        if self._arena.buffers and not self._warned_pickle:
            self._warned_pickle = True
            log.info(
                "decoded-image cache: data workers started by spawn/forkserver do not share its memory tier; "
                "they read %s", self.folder or "nothing cached (no data.cache_dir) and decode every image"
            )
        return {**self.__dict__, "_arena": _Arena(0)}

    def _refresh(self, path: Path, old: _File | None) -> tuple[_File, bytes]:
        """Hash the file again and record it; it keeps its memory slot if its content is the same (a `touch`)."""
        file, data = self._examine(path)
        if old is not None and old.key == file.key:
            file = replace(file, slot=old.slot)
        self._remember(path, file)
        return file, data

    def _remember(self, path: Path, file: _File) -> None:
        self._files[path] = file
        seen = self._versions.setdefault(path, [])
        if file.sha256 not in seen:
            seen.append(file.sha256)

    def _examine(self, path: Path) -> tuple[_File, bytes]:
        state = file_state(path)
        data = path.read_bytes()
        sha256 = hashlib.sha256(data).hexdigest()
        return _File(state, sha256, self.key(sha256)), data

    def _prepare(self, path: Path) -> tuple[_File | None, np.ndarray | None, str]:
        """One file at `build`: its record, its decoded image (None if it cannot be decoded), where that came from."""
        try:
            file, data = self._examine(path)
        except OSError:
            return None, None, "failed"  # gone since it was listed: reading it later raises, and it is skipped
        array = self._load(file.key) if self.folder is not None else None
        if array is not None:
            return file, array, "disk"
        try:
            array = self.decode(data)
        except _UNREADABLE:
            return file, None, "failed"  # decoded again when drawn, which raises, and AugmentedImages skips it
        self._store(file.key, array)
        return file, array, "decoded"

    def _load(self, key: str) -> np.ndarray | None:
        """The entry's image, or None when it is missing or damaged (then it is decoded again and rewritten)."""
        path = self.entry_path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("decoded-image cache: cannot read %s (%s); decoding its image", path, exc)
            return None
        try:
            return self._parse(data)
        except ValueError as exc:
            log.warning("decoded-image cache: %s is damaged (%s); decoding its image again", path, exc)
            return None

    def _parse(self, data: bytes) -> np.ndarray:
        array = parse_entry(data)
        if array.ndim != 3 or array.shape[2] not in (1, 3) or array.dtype not in (np.uint8, np.uint16) \
                or min(array.shape[:2]) != self.side:
            raise ValueError(f"holds {array.dtype} of shape {array.shape}, not an image of short side {self.side}")
        return array

    def _store(self, key: str, array: np.ndarray) -> None:
        if self.folder is None:
            return
        try:
            write_entry(self.entry_path(key), array)
        except OSError as exc:
            if not self._warned_write:
                self._warned_write = True
                log.warning("decoded-image cache: cannot write to %s (%s); images not on disk are decoded when drawn",
                            self.folder, exc)


def write_entry(path: Path, array: np.ndarray) -> None:
    """An array as a `.npy` file ending in a CRC-32 of its bytes, written atomically. No fsync: an entry a power loss
    damages fails its checksum (`parse_entry`) and is rebuilt."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    body = buffer.getvalue()
    write_atomic(path, body + _TRAILER + zlib.crc32(body).to_bytes(4, "little"), durable=False)


def parse_entry(data: bytes) -> np.ndarray:
    """The array of an entry `write_entry` wrote; ValueError when it is truncated or overwritten."""
    body, trailer = data[:-8], data[-8:]
    if len(data) < 8 or trailer[:4] != _TRAILER or int.from_bytes(trailer[4:], "little") != zlib.crc32(body):
        raise ValueError("checksum does not match: truncated or overwritten")
    return np.load(io.BytesIO(body), allow_pickle=False)


def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
