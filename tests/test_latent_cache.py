"""The latent cache: each image (and flip) encoded once, found again by its pixels and the autoencoder's hash, in
memory and on disk, never stale; latents drawn from it train exactly as encoded ones."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, compose_config, tiny_autoencoder
from PIL import Image

from fiberaug.data import FolderDataModule
from fiberaug.data.datasets import pixel_digest
from fiberaug.data.latents import LatentCache
from fiberaug.models.diffusion import DiffusionModule
from fiberaug.tasks.train import train

CONTEXT_UNET = {"_target_": "fiberaug.nets.ContextUNet", "base_channels": 8, "channel_mults": [1, 2]}


def _photos(folder: Path, count: int = 6, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


class Encodings:
    """Counts what `DiffusionModule.posterior_moments` encodes, by pixel digest."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.digests: list[bytes] = []
        encode = DiffusionModule.posterior_moments

        def counted(module: DiffusionModule, images: torch.Tensor) -> torch.Tensor:
            self.digests += [bytes(pixel_digest(image.cpu()).numpy()) for image in images]
            return encode(module, images)

        monkeypatch.setattr(DiffusionModule, "posterior_moments", counted)

    def take(self) -> list[bytes]:
        taken, self.digests = self.digests, []
        return taken


def _train(run_dir: Path, photos: Path, cache: Path, autoencoder: Path, *overrides: str) -> None:
    options = [
        "data=folder", f"data.root={photos}", f"data.cache_dir={cache}", "data.channels=1", "data.batch_size=2",
        "data.val_fraction=0.2", "augment=flip", f"model.autoencoder={autoencoder}", "trainer.max_steps=16",
        "trainer.limit_train_batches=null", "callbacks.metrics=null", *overrides,
    ]
    train(compose_config("train", [*TINY, *options], run_dir))


def test_each_image_and_flip_is_encoded_once_then_read_from_memory_and_disk(tmp_path, monkeypatch):
    encodings = Encodings(monkeypatch)
    photos, cache = _photos(tmp_path / "photos"), tmp_path / "cache"
    autoencoder = tiny_autoencoder(tmp_path / "autoencoder")
    _train(tmp_path / "run", photos, cache, autoencoder)
    encoded = encodings.take()
    # 5 training images (each plain or flipped) and 1 validation image: at most 11 forms, over 8 epochs of draws.
    assert len(encoded) == len(set(encoded)) <= 11
    assert len(encoded) > 6  # the flips drawn are forms of their own
    assert len(list((cache / "latents").rglob("*.npy"))) == len(encoded)

    _train(tmp_path / "again", photos, cache, autoencoder)  # a new process's cache: its disk tier serves all
    assert encodings.take() == []

    # A changed photo has other pixels: only its forms are encoded.
    Image.fromarray(np.full((8, 8), 17, np.uint8)).save(photos / "3.png")
    _train(tmp_path / "changed", photos, cache, autoencoder)
    changed = encodings.take()
    constant = torch.full((1, 8, 8), 17 / 255 * 2 - 1)
    assert set(changed) <= {bytes(pixel_digest(constant).numpy()), bytes(pixel_digest(constant.flip(-1)).numpy())}
    assert changed

    other = tiny_autoencoder(tmp_path / "other", scaling_factor=0.5)  # another autoencoder: nothing of the first's
    _train(tmp_path / "other_run", photos, cache, other)
    assert len(set(encodings.take())) >= 6


def test_random_crops_and_augmentations_are_encoded_as_drawn(tmp_path, monkeypatch):
    encodings = Encodings(monkeypatch)
    photos, autoencoder = _photos(tmp_path / "photos"), tiny_autoencoder(tmp_path / "autoencoder")
    _train(tmp_path / "run", photos, tmp_path / "cache", autoencoder, "data.resize_policy=random_crop",
           "data.crop_scale=0.5", "trainer.max_steps=4")
    # Training batches (4 steps of 2) are encoded as drawn; only the validation image's latents are cached.
    assert len(encodings.take()) >= 8
    assert len(list((tmp_path / "cache" / "latents").rglob("*.npy"))) == 1


@pytest.mark.parametrize(
    ("options", "refusal"),
    [
        ({}, None),
        ({"augment": "flip"}, None),
        ({"augment": "flip", "resize_policy": "random_crop", "crop_scale": 0.5}, "random crop"),
        ({"augment": "geometric"}, "draws new pixels"),
    ],
)
def test_only_pipelines_that_scale_centre_crop_and_flip_are_cached(tmp_path, options, refusal):
    from fiberaug.data.pipelines import resolve_pipeline

    if "augment" in options:
        options["augment"] = resolve_pipeline(options["augment"])
    datamodule = FolderDataModule(root=str(tmp_path), image_size=8, **options)
    found = datamodule.latent_cache_refusal()
    assert (found is None) if refusal is None else (refusal in found)


def _moments(images: torch.Tensor) -> torch.Tensor:
    return torch.cat([images.mean(1, keepdim=True), images.std(1, keepdim=True)], dim=1)


def test_the_cache_is_keyed_by_pixels_and_autoencoder_and_rebuilds_damaged_entries(tmp_path):
    images = torch.rand(3, 2, 4, 4)
    digests = torch.stack([pixel_digest(image) for image in images])
    calls = []

    def encode(batch: torch.Tensor) -> torch.Tensor:
        calls.append(len(batch))
        return _moments(batch)

    cache = LatentCache("a" * 64, memory_bytes=1 << 20, folder=tmp_path)
    assert torch.equal(cache.moments(digests[:2], images[:2], encode), _moments(images[:2]))
    assert torch.equal(cache.moments(digests, images, encode), _moments(images))  # only the third is new
    assert calls == [2, 1] and cache.take_counts() == (3, 2)

    disk_only = LatentCache("a" * 64, memory_bytes=0, folder=tmp_path)
    assert torch.equal(disk_only.moments(digests, images, encode), _moments(images)) and calls == [2, 1]
    assert disk_only.memory_used == 0

    entry = cache.entry_path(cache.key(bytes(digests[0].numpy())))
    entry.write_bytes(entry.read_bytes()[:-3])  # truncated
    again = LatentCache("a" * 64, memory_bytes=1 << 20, folder=tmp_path)
    assert torch.equal(again.moments(digests, images, encode), _moments(images)) and calls == [2, 1, 1]
    assert again.moments(digests[:1], images[:1], encode) is not None and calls == [2, 1, 1]  # rewritten

    other = LatentCache("b" * 64, memory_bytes=1 << 20, folder=tmp_path)
    other.moments(digests, images, encode)
    assert calls == [2, 1, 1, 3]


def test_latents_drawn_from_cached_posteriors_train_as_encoded_ones(tmp_path):
    autoencoder = tiny_autoencoder(tmp_path / "autoencoder")
    model = DiffusionModule(CONTEXT_UNET, image_size=8, channels=1, autoencoder=str(autoencoder)).eval()
    model.latent_scale.fill_(0.7)
    model.latent_cache = LatentCache("x" * 64, memory_bytes=1 << 20)
    images = torch.rand(4, 1, 8, 8) * 2 - 1
    batch = (images, torch.full((4,), -1))
    digests = torch.stack([pixel_digest(image) for image in images])

    def latents(*extra: torch.Tensor) -> torch.Tensor:
        return model.encode(images, torch.Generator().manual_seed(3), *extra)

    def loss(*extra: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model._loss((*batch, *extra), torch.Generator().manual_seed(3))

    encoded = latents()
    assert torch.equal(latents(digests), encoded)  # encoded and stored
    assert torch.equal(latents(digests), encoded)  # from the cache: the same draw from the same posterior
    assert model.latent_cache.take_counts() == (4, 4)
    assert torch.allclose(loss(digests), loss(), rtol=1e-6, atol=0)  # (the denoiser's kernels may round apart)
    assert not torch.allclose(latents(digests.flip(0)), encoded)  # the posteriors belong to their own images


def test_pixel_digests_name_the_pixels():
    image = torch.rand(3, 4, 4)
    assert torch.equal(pixel_digest(image), pixel_digest(image.clone()))
    assert not torch.equal(pixel_digest(image), pixel_digest(image.flip(-1)))
    assert not torch.equal(pixel_digest(image), pixel_digest(image.reshape(3, 2, 8)))
    assert bytes(pixel_digest(image).numpy()) == hashlib.sha256(
        f"{(3, 4, 4)} {image.dtype};".encode() + image.numpy().tobytes()).digest()
