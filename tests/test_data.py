"""Image decoding, the DataModules, their pipelines, and the errors bad data gets."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from conftest import save
from PIL import Image

from fiberaug.data import DigitsDataModule, FolderDataModule, list_images, read_image, sized_pipeline, to_channels
from fiberaug.data.datasets import EpochSampler
from fiberaug.errors import UserError


def test_read_image_keeps_modes_and_depth(tmp_path):
    rng = np.random.default_rng(1)
    gray16 = rng.integers(0, 65535, (5, 7), dtype=np.uint16)
    rgb16 = rng.integers(0, 65535, (5, 7, 3), dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "rgb16.png"), rgb16[..., ::-1])  # OpenCV writes BGR
    save(tmp_path / "gray16.png", gray16)
    save(tmp_path / "rgba.png", rng.integers(0, 255, (5, 7, 4), dtype=np.uint8))
    Image.fromarray(rng.integers(0, 255, (5, 7), dtype=np.uint8)).convert("P").save(tmp_path / "palette.png")

    assert np.array_equal(read_image(tmp_path / "gray16.png"), gray16[..., None])
    assert np.array_equal(read_image(tmp_path / "rgb16.png"), rgb16)
    assert read_image(tmp_path / "rgba.png").shape == (5, 7, 4)
    assert read_image(tmp_path / "palette.png").shape == (5, 7, 3)


def test_read_image_applies_exif_orientation(tmp_path):
    array = np.zeros((4, 6, 3), dtype=np.uint8)
    array[0, 0] = 255  # a marker in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: a viewer turns it 90° clockwise
    Image.fromarray(array).save(tmp_path / "rotated.png", exif=exif)
    upright = read_image(tmp_path / "rotated.png")
    assert upright.shape == (6, 4, 3)
    assert upright[0, -1].tolist() == [255, 255, 255]


def test_to_channels_converts_explicitly():
    rgba = np.array([[[255, 0, 0, 255], [0, 255, 0, 0]]], dtype=np.uint8)
    rgb = to_channels(rgba, 3)
    assert rgb.dtype == np.float32 and rgb.shape == (1, 2, 3)
    assert rgb[0, 0].tolist() == [1.0, 0.0, 0.0] and rgb[0, 1].tolist() == [0.0, 0.0, 0.0]  # alpha over black
    gray = to_channels(np.full((2, 2, 3), 65535, dtype=np.uint16), 1)
    assert gray.shape == (2, 2, 1) and np.allclose(gray, 1.0)
    assert to_channels(np.zeros((2, 2, 1), dtype=np.uint8), 3).shape == (2, 2, 3)


def test_folder_with_classes_mixed_modes_and_a_broken_file(image_folder, caplog):
    root = image_folder(broken=True)
    dm = FolderDataModule(root=str(root), image_size=16, channels=3, batch_size=4, val_fraction=0.2)
    with caplog.at_level(logging.WARNING):
        dm.setup("fit")
    assert "broken.png" in caplog.text
    assert dm.class_names == ["cats", "dogs"]
    assert len(dm.train_set) + len(dm.val_set) == 9  # 10 image files, one broken; notes.txt ignored
    assert sorted(set(dm.train_set.labels + dm.val_set.labels)) == [0, 1]
    for images, labels in dm.train_dataloader():
        assert images.shape[1:] == (3, 16, 16)
        assert images.min() >= -1 and images.max() <= 1
        assert labels.dtype == torch.int64


def test_flat_folder_is_unlabelled_and_channels_follow_config(tmp_path):
    for i in range(4):
        save(tmp_path / f"{i}.png", np.full((10, 10, 3), 60 * i, dtype=np.uint8))
    dm = FolderDataModule(root=str(tmp_path), image_size=8, channels=1, batch_size=2, val_fraction=0.25)
    dm.setup()
    assert dm.class_names == []
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (2, 1, 8, 8) and labels.tolist() == [-1, -1]


def test_image_that_breaks_after_setup_is_skipped_mid_epoch(image_folder, caplog):
    root = image_folder(broken=False)
    dm = FolderDataModule(root=str(root), image_size=8, batch_size=32, val_fraction=0)
    dm.setup()
    victim = dm.train_set.items[0]
    victim.write_bytes(victim.read_bytes()[:40])  # truncated after the header check passed
    with caplog.at_level(logging.WARNING):
        images, _ = next(iter(dm.train_dataloader()))
    assert len(images) == len(dm.train_set)  # another image took its place
    assert victim.name in caplog.text
    assert [dm.train_set.items[i] for i in dm.train_set.failed] == [victim]


def test_large_photo_is_cut_by_random_crop_policy(tmp_path):
    save(tmp_path / "photo.jpg", np.random.default_rng(2).integers(0, 255, (756, 1008, 3), dtype=np.uint8))
    save(tmp_path / "photo2.jpg", np.random.default_rng(3).integers(0, 255, (756, 1008, 3), dtype=np.uint8))
    dm = FolderDataModule(
        root=str(tmp_path), image_size=32, batch_size=1, val_fraction=0.5, resize_policy="random_crop", crop_scale=0.25
    )
    dm.setup()
    assert dm.scaled_side == 128
    assert read_image(tmp_path / "photo.jpg", min_side=128).shape[0] < 756  # JPEG decoded at reduced scale
    assert next(iter(dm.train_dataloader()))[0].shape == (1, 3, 32, 32)
    assert next(iter(dm.val_dataloader()))[0].shape == (1, 3, 32, 32)


def test_split_is_fixed_by_its_own_seed_and_never_overlaps():
    def split(**kwargs) -> tuple[list[bytes], list[bytes]]:
        dm = DigitsDataModule(image_size=8, channels=1, **kwargs)
        dm.setup()
        return [x.tobytes() for x in dm.train_set.items], [x.tobytes() for x in dm.val_set.items]

    train, val = split(seed=1)
    assert split(seed=2) == (train, val), "the training seed moved the split"
    assert split(seed=1, split_seed=5)[1] != val
    assert len(train) + len(val) == 1797 and len(val) == round(0.05 * 1797)
    dm = DigitsDataModule(image_size=8)
    dm.setup()
    assert not {id(x) for x in dm.train_set.items} & {id(x) for x in dm.val_set.items}, "an image is in both"


def _augmenting_folder(root, n: int = 8, num_workers: int = 0, seed: int = 0) -> FolderDataModule:
    """n copies of one image under a strong random colour change: every difference between items is the draw."""
    image = np.random.default_rng(4).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    for i in range(n):
        if not (root / f"same{i}.png").exists():
            save(root / f"same{i}.png", image)
    spec = {"transforms": [{"_target_": "albumentations.RandomBrightnessContrast", "p": 1.0}]}
    dm = FolderDataModule(
        root=str(root), image_size=16, batch_size=2, num_workers=num_workers, val_fraction=0, augment=spec, seed=seed
    )
    dm.setup()
    return dm


def _epoch(dm: FolderDataModule, epoch: int) -> torch.Tensor:
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)
    return torch.cat([images for images, _ in loader])


def test_augmentations_are_reproducible_and_do_not_depend_on_workers(tmp_path):
    single = _epoch(_augmenting_folder(tmp_path), 0)
    assert torch.equal(_epoch(_augmenting_folder(tmp_path, num_workers=2), 0), single)
    assert torch.equal(_epoch(_augmenting_folder(tmp_path, num_workers=2), 0), single), "another run drew otherwise"
    assert not torch.equal(_epoch(_augmenting_folder(tmp_path, seed=1), 0), single)


def test_items_workers_and_epochs_draw_different_augmentations(tmp_path):
    dm = _augmenting_folder(tmp_path, num_workers=2)
    first, second = _epoch(dm, 0), _epoch(dm, 1)
    # Batch 0 comes from worker 0, batch 1 from worker 1: all eight copies of the image must differ.
    assert len({image.sum().item() for image in first}) == 8, "items were augmented alike"
    assert not torch.equal(first.sort(0).values, second.sort(0).values), "the second epoch repeated the first"


def test_each_rank_trains_on_its_own_shard_in_an_order_fixed_by_seed_and_epoch():
    dataset = list(range(11))
    shards = [list(EpochSampler(dataset, num_replicas=2, rank=rank, seed=3, epoch=4)) for rank in (0, 1)]
    assert all(len(shard) == 5 for shard in shards)  # 11 = 2 * 5 + 1: the uneven tail is left out
    assert not {i for _, i in shards[0]} & {i for _, i in shards[1]}, "two ranks got the same image"
    assert {e for shard in shards for e, _ in shard} == {4}
    assert shards[0] == list(EpochSampler(dataset, num_replicas=2, rank=0, seed=3, epoch=4))
    assert shards[0] != list(EpochSampler(dataset, num_replicas=2, rank=0, seed=3, epoch=5))
    assert shards[0] != list(EpochSampler(dataset, num_replicas=2, rank=0, seed=2, epoch=4))
    resumed = EpochSampler(dataset, num_replicas=2, rank=0, seed=3, epoch=4)
    resumed.resume(4, consumed=2)
    assert list(resumed) == shards[0][2:] and len(resumed) == 5
    resumed.set_epoch(5)
    assert len(list(resumed)) == 5, "the skip applies to the interrupted epoch only"


def test_each_rank_augments_its_images_differently(tmp_path):
    dm = _augmenting_folder(tmp_path, n=4)
    batches = []
    for rank in (0, 1):
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        batches.append(torch.cat([images for images, _ in dm.train_dataloader()]))
    assert batches[0].shape == batches[1].shape == (2, 3, 16, 16)
    assert not torch.allclose(batches[0], batches[1])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"root": None}, "data.root is not set"),
        ({"root": "/no/such/folder"}, "data.root=/no/such/folder is not a folder"),
        ({"root": "EMPTY"}, "holds no images"),
        ({"root": "JUNK"}, "none of its 1 image files could be read"),
        ({"root": "EMPTY", "image_size": 2}, "data.image_size=2 must be an integer of at least 4"),
        ({"root": "EMPTY", "channels": 4}, "data.channels=4 must be 1"),
        ({"root": "EMPTY", "resize_policy": "squash"}, "data.resize_policy='squash' is not known"),
        ({"root": "EMPTY", "augment": {"transforms": [{"_target_": "albumentations.Nope"}]}}, "albumentations.Nope"),
    ],
)
def test_bad_data_gets_a_clear_message(tmp_path, kwargs, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "fake.jpg").write_text("plain text")
    roots = {"EMPTY": str(tmp_path / "empty"), "JUNK": str(tmp_path / "junk")}
    kwargs = {**kwargs, "root": roots.get(kwargs["root"], kwargs["root"])}
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(".", r"\.")):
        FolderDataModule(**kwargs).setup()


def test_list_images_skips_hidden_and_non_images(tmp_path):
    save(tmp_path / "a.PNG", np.zeros((4, 4), dtype=np.uint8))
    save(tmp_path / ".hydra" / "b.png", np.zeros((4, 4), dtype=np.uint8))
    (tmp_path / "c.txt").write_text("x")
    assert [p.name for p in list_images(tmp_path)] == ["a.PNG"]


def test_seeded_pipeline_draws_each_transform_independently():
    spec = {"transforms": [{"_target_": "albumentations.HorizontalFlip", "p": 0.5},
                           {"_target_": "albumentations.VerticalFlip", "p": 0.5}]}
    image = np.arange(16, dtype=np.float32).reshape(4, 4, 1)  # the top-left pixel tells which flips ran

    def corners() -> list[float]:
        pipeline = sized_pipeline(4, augment=spec, seed=3)
        return [float(pipeline(image=image)["image"][0, 0, 0]) for _ in range(40)]

    first = corners()
    assert first == corners(), "the same seed gave different augmentations"
    assert set(first) == {0.0, 3.0, 12.0, 15.0}, "the two flips do not fire independently"


def test_val_pattern_holds_back_matching_paths_and_refuses_a_pattern_matching_none(tmp_path):
    for epoch in range(3):
        for position in range(4):
            save(tmp_path / f"e{epoch}_s{position:02d}.png", np.full((8, 8, 3), 10 * position + epoch, np.uint8))
    dm = FolderDataModule(root=str(tmp_path), image_size=8, batch_size=2, val_pattern="*_s0[23].png", cache_dir=None)
    dm.setup()
    assert sorted(p.name for p in dm.val_set.items) == sorted(f"e{e}_s{s:02d}.png" for e in range(3) for s in (2, 3))
    assert sorted(p.name for p in dm.train_set.items) == sorted(f"e{e}_s{s:02d}.png" for e in range(3) for s in (0, 1))
    with pytest.raises(UserError, match=r"data.val_pattern='\*_s09.png' matches 0 of the 12 images"):
        FolderDataModule(root=str(tmp_path), image_size=8, val_pattern="*_s09.png", cache_dir=None).setup()


def test_train_per_class_draws_a_stratified_reproducible_subset_of_the_training_split():
    def module(**kwargs):
        dm = DigitsDataModule(image_size=8, channels=1, val_fraction=0.2, **kwargs)
        dm.setup()
        return dm

    full = module()
    ids = lambda images: {full.item_id(item) for item in images.items}  # noqa: E731
    few, again, other = (module(train_per_class=5, subset_seed=s) for s in (3, 3, 4))
    assert np.bincount(few.train_set.labels, minlength=10).tolist() == [5] * 10
    assert ids(few.train_set) < ids(full.train_set)
    assert [few.item_id(i) for i in few.train_set.items] == [again.item_id(i) for i in again.train_set.items]
    assert ids(few.train_set) != ids(other.train_set)
    assert ids(few.val_set) == ids(full.val_set)  # every draw is tested on the same held-out images
    with pytest.raises(UserError, match="train_per_class=500: class '0' has only"):
        module(train_per_class=500)
