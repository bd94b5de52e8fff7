"""The decoded-image cache of `data=folder`: decoded once, bounded memory, never stale, and invisible to the model."""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONF, save

from fiberaug.data import FolderDataModule
from fiberaug.data import cache as cache_module
from fiberaug.data.cache import ImageCache
from fiberaug.data.images import encode_image, list_images, read_image, to_channels
from fiberaug.data.pipelines import scale_transform
from fiberaug.errors import UserError

ENTRY_BYTES = 8 * 16 * 3  # a 16x32 RGB image at short side 8: a multiple of the memory tier's 64-byte alignment


def _photos(root: Path, n: int = 6, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    return [save(root / f"{i}.png", rng.integers(0, 255, (16, 32, 3), dtype=np.uint8)) for i in range(n)]


def _folder(root: Path, cache_dir: Path | None, cache_mb: float = 1, **kwargs) -> FolderDataModule:
    options = {"image_size": 8, "batch_size": 2, "val_fraction": 0, **kwargs}
    dm = FolderDataModule(root=str(root), cache_mb=cache_mb, cache_dir=cache_dir and str(cache_dir), **options)
    dm.setup()
    return dm


def _epoch(dm: FolderDataModule, epoch: int) -> torch.Tensor:
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)
    return torch.cat([images for images, _ in loader])


def _item(dm: FolderDataModule, path: Path) -> torch.Tensor:
    return dm.train_set[(0, dm.train_set.items.index(path))][0]


@pytest.fixture
def count(monkeypatch, tmp_path) -> Callable[[object, str], Callable[[], int]]:
    """Count the calls of `owner.name` in this process and in forked DataLoader workers (a line per call in a file)."""

    def patch(owner: object, name: str) -> Callable[[], int]:
        calls = tmp_path / f"calls-{name}"
        calls.touch()
        real = getattr(owner, name)

        def counted(*args, **kwargs):
            with open(calls, "a") as f:
                f.write("call\n")
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)
        return lambda: len(calls.read_text().splitlines())

    return patch


def test_each_image_is_decoded_once_across_epochs_and_runs(tmp_path, count, caplog):
    _photos(tmp_path / "photos")
    decodes = count(cache_module, "read_image")
    with caplog.at_level(logging.INFO):
        first = _folder(tmp_path / "photos", tmp_path / "cache")
    assert decodes() == 6
    assert "decoded-image cache: 6 images at short side 8 in" in caplog.text
    assert "(6 decoded, 0 from the disk cache, 0 unreadable); 6 in memory" in caplog.text
    _epoch(first, 0), _epoch(first, 1)
    assert decodes() == 6, "a later epoch decoded again"
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 6
    second = _folder(tmp_path / "photos", tmp_path / "cache", cache_mb=0)  # another run: disk tier only
    _epoch(second, 0), _epoch(second, 1)
    assert decodes() == 6, "another run sharing cache_dir decoded again"


def test_memory_tier_holds_cache_mb_and_the_rest_comes_from_disk(tmp_path, count):
    _photos(tmp_path / "photos")
    dm = _folder(tmp_path / "photos", tmp_path / "cache", cache_mb=3 * ENTRY_BYTES / 2**20)
    decodes, disk_reads = count(cache_module, "read_image"), count(ImageCache, "_load")
    assert len(_epoch(dm, 0)) == 6
    assert (decodes(), disk_reads()) == (0, 3), "three images fit the memory budget, three must come from disk"
    os.utime(dm.train_set.items[0])  # in memory: a new mtime, the same content
    _epoch(dm, 1)
    assert (decodes(), disk_reads()) == (0, 6), "a touched file left the memory tier"
    memory_only = _folder(tmp_path / "photos", None, cache_mb=3 * ENTRY_BYTES / 2**20)
    assert decodes() == 6
    _epoch(memory_only, 0)
    assert decodes() == 6 + 3, "without a disk tier, the images beyond the budget are decoded when drawn"


def test_cache_on_and_off_give_bit_identical_batches(image_folder, tmp_path):
    root = image_folder(broken=False)  # RGB, gray JPEG, RGBA, 16-bit gray, TIFF
    options = {"augment": CONF / "augment" / "geometric.yaml", "resize_policy": "random_crop", "crop_scale": 0.5,
               "image_size": 8, "batch_size": 3, "seed": 3}
    off = _folder(root, None, cache_mb=0, **options)
    expected = [_epoch(off, epoch) for epoch in (0, 1)]
    for cache_mb in (1, 0, 1):  # cold; then from disk only; then from disk into memory
        on = _folder(root, tmp_path / "cache", cache_mb=cache_mb, **options)
        for epoch in (0, 1):
            assert torch.equal(_epoch(on, epoch), expected[epoch]), f"cache_mb={cache_mb} changed epoch {epoch}"
    assert not torch.equal(expected[0], expected[1]), "the epochs drew the same augmentations"


def test_cached_images_match_scaling_in_float_within_rounding(image_folder):
    """The cache composites alpha and scales in the decoded dtype: what the pipeline did in float, up to rounding.

    Two roundings (compositing, scaling) and OpenCV's fixed-point interpolation stay within 1.5/255; scaling
    colour and alpha apart, or compositing after scaling, misses by up to 50/255 on the RGBA image.
    """
    cache = ImageCache(side=40)  # upscales and downscales the folder's images
    for path in list_images(image_folder(broken=False)):  # RGB, gray JPEG, RGBA, 16-bit gray, TIFF
        for channels in (1, 3):
            in_float = scale_transform(40)(image=to_channels(read_image(path, min_side=40), channels))["image"]
            cached = to_channels(cache.decode(path), channels)
            assert cached.shape == in_float.shape and np.abs(cached - in_float).max() < 1.5 / 255, path.name


def test_a_changed_file_is_decoded_again_within_a_run_and_across_runs(tmp_path):
    paths = _photos(tmp_path / "photos")
    dm = _folder(tmp_path / "photos", tmp_path / "cache")
    old = _item(dm, paths[0])
    save(paths[0], np.random.default_rng(9).integers(0, 255, (16, 40, 3), dtype=np.uint8))  # same name, new content
    fresh = _item(_folder(tmp_path / "photos", None, cache_mb=0), paths[0])
    assert not torch.equal(fresh, old)
    assert torch.equal(_item(dm, paths[0]), fresh), "the running DataModule served the old decode"
    assert dm.item_id(paths[0]) == hashlib.sha256(paths[0].read_bytes()).hexdigest()
    assert torch.equal(_item(_folder(tmp_path / "photos", tmp_path / "cache"), paths[0]), fresh), "the next run"
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 7  # the old entry stays, unused


def test_a_file_rewritten_in_place_with_its_old_size_and_mtime_is_noticed(tmp_path):
    """Copying tools can keep a file's size and set its mtime back; its change time, which no tool sets, still moves."""
    rng = np.random.default_rng(5)
    path, _ = [save(tmp_path / "photos" / f"{i}.bmp", rng.integers(0, 255, (16, 32, 3), np.uint8)) for i in range(2)]
    dm = _folder(tmp_path / "photos", tmp_path / "cache")
    old, before = _item(dm, path), path.stat()
    new = encode_image(rng.integers(0, 255, (16, 32, 3), np.uint8), ".bmp")  # a BMP's size depends on its shape only
    time.sleep(0.05)  # past the file system clock's tick
    with open(path, "r+b") as f:
        f.write(new)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    fresh = _item(_folder(tmp_path / "photos", None, cache_mb=0), path)
    assert not torch.equal(fresh, old)
    assert torch.equal(_item(dm, path), fresh), "the running DataModule served the old decode"


def test_a_removed_file_is_gone_within_a_run_and_from_the_next(tmp_path, caplog):
    paths = _photos(tmp_path / "photos")
    dm = _folder(tmp_path / "photos", tmp_path / "cache")
    paths[2].unlink()
    with caplog.at_level(logging.WARNING):
        images = _epoch(dm, 0)
    assert f"skipping unreadable image {paths[2]}" in caplog.text
    assert len(images) == 6  # another image took its place
    assert [dm.train_set.items[i] for i in dm.train_set.failed] == [paths[2]]
    assert paths[2] not in _folder(tmp_path / "photos", tmp_path / "cache").train_set.items


def _damage(entry: Path) -> None:
    data = bytearray(entry.read_bytes())
    data[-20] ^= 0xFF  # a pixel byte: the .npy header and the length stay intact
    entry.write_bytes(bytes(data))


def test_a_damaged_cache_entry_is_decoded_again_and_rewritten(tmp_path, count, caplog):
    _photos(tmp_path / "photos")
    expected = _epoch(_folder(tmp_path / "photos", None, cache_mb=0), 0)
    _folder(tmp_path / "photos", tmp_path / "cache")
    truncated, flipped, foreign = sorted((tmp_path / "cache").rglob("*.npy"))[:3]
    truncated.write_bytes(truncated.read_bytes()[:100])
    _damage(flipped)
    np.save(foreign, np.zeros((8, 16, 3), np.uint8))  # a valid .npy of the right shape, but no checksum
    decodes = count(cache_module, "read_image")
    with caplog.at_level(logging.WARNING):
        dm = _folder(tmp_path / "photos", tmp_path / "cache", cache_mb=0)  # at setup
        assert torch.equal(_epoch(dm, 0), expected)
        assert (decodes(), caplog.text.count("is damaged")) == (3, 3)
        _damage(flipped)  # after setup: found when drawn from disk
        assert torch.equal(_epoch(dm, 0), expected)
        assert (decodes(), caplog.text.count("is damaged")) == (4, 4)
    _folder(tmp_path / "photos", tmp_path / "cache")
    assert decodes() == 4, "a damaged entry was not rewritten"


def test_data_workers_read_the_memory_tier_without_decoding(tmp_path, count):
    _photos(tmp_path / "photos", n=8)
    expected = _epoch(_folder(tmp_path / "photos", None, cache_mb=0), 0)
    dm = _folder(tmp_path / "photos", tmp_path / "cache", num_workers=2)
    decodes, disk_reads = count(cache_module, "read_image"), count(ImageCache, "_load")
    assert torch.equal(_epoch(dm, 0), expected)
    assert (decodes(), disk_reads()) == (0, 0), "a worker decoded or read from disk what memory holds"


def test_a_pickled_cache_leaves_its_memory_behind_and_reads_the_disk(tmp_path, count):
    """What DataLoader workers started by spawn or forkserver get: the disk tier, not a copy of the memory tier."""
    paths = _photos(tmp_path / "photos", n=20)
    dm = _folder(tmp_path / "photos", tmp_path / "cache", image_size=32)  # 32x64x3 bytes an image
    data = pickle.dumps(dm.images)
    assert len(data) < 20 * 32 * 64 * 3 / 4, "the memory tier travelled with the pickle"
    clone, decodes = pickle.loads(data), count(cache_module, "read_image")
    assert all(np.array_equal(clone(p), dm.images(p)) for p in paths)
    assert decodes() == 0


def test_an_image_that_cannot_be_decoded_at_setup_is_skipped_when_drawn(tmp_path, caplog):
    _photos(tmp_path / "photos", n=3)
    jpeg = save(tmp_path / "photos" / "cut.jpg", np.random.default_rng(1).integers(0, 255, (40, 60, 3), np.uint8))
    jpeg.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])  # its header is fine: decoding finds the damage
    with caplog.at_level(logging.INFO):
        dm = _folder(tmp_path / "photos", tmp_path / "cache", batch_size=4)
        images = _epoch(dm, 0)
    assert "1 unreadable" in caplog.text and "skipping unreadable image" in caplog.text and "cut.jpg" in caplog.text
    assert len(images) == 4


def test_record_reuses_the_hashes_of_the_cache(tmp_path, monkeypatch):
    paths = _photos(tmp_path / "photos")
    dm = _folder(tmp_path / "photos", tmp_path / "cache", val_fraction=0.5)
    expected = {hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}
    monkeypatch.setattr(hashlib, "sha256", lambda *a: pytest.fail("record() hashed a file the cache had hashed"))
    record = dm.record()
    assert set(record["train"]) | set(record["val"]) == expected and len(record["train"]) == 3


def test_auto_cache_dir_honours_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert FolderDataModule(root="unused").images.folder == tmp_path / "xdg" / "fiberaug" / "decoded"
    assert FolderDataModule(root="unused", cache_dir="~/here").images.folder == Path.home() / "here"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cache_mb": -1}, "data.cache_mb=-1 must be a number of MiB, 0 or more"),
        ({"cache_mb": "lots"}, "data.cache_mb='lots' must be a number of MiB"),
        ({"cache_mb": True}, "data.cache_mb=True must be a number of MiB"),
        ({"cache_dir": ""}, "data.cache_dir='' must be a folder, auto (the user's cache folder) or null"),
        ({"cache_dir": "FILE"}, "cannot be used (File exists): name a writable folder, or data.cache_dir=null"),
    ],
)
def test_bad_cache_options_get_a_clear_message(tmp_path, kwargs, message):
    _photos(tmp_path / "photos", n=2)
    (tmp_path / "file").write_text("not a folder")
    if kwargs.get("cache_dir") == "FILE":
        kwargs = {"cache_dir": str(tmp_path / "file")}
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        FolderDataModule(root=str(tmp_path / "photos"), **kwargs).setup()
