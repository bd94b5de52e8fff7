"""Loading speed of `data=folder` on 12 MP phone JPEGs: a naive full decode against the decoded-image cache.

    python benchmarks/data_loading.py               # 48 synthetic 4032x3024 JPEGs
    python benchmarks/data_loading.py --photos 200 --epochs 10

Makes a temporary folder of synthetic phone photos (smooth colour fields, hard-edged panels, cables and sensor
noise: about 4 MB each, every one different), then measures, side by side in this one run, at the setting of
`experiment=fibres128_unet` (128x128 crops at crop_scale 0.5, so a working short side of 256; augment=geometric;
batch 16), all photos training, with the DataLoader workers of conf/data/folder.yaml (`data.num_workers`):

- naive full decode: what a plain PyTorch loader does for every sample of every epoch: `PIL.Image.open().convert()`
  at full size, a resize to the working scale, then the same augmentations and crop (its second epoch, timed);
- cache, first epoch: FiberAug's DataModule on an empty `data.cache_dir`: `setup()` (hashing and decoding every
  photo once, in parallel) plus the first epoch, worker start included;
- cache, later epochs: the following epochs of the same DataModule (its persistent workers);
- cache, next run: a new DataModule on the filled `data.cache_dir`: `setup()` plus its first epoch;
- model: images per second of training steps of the experiment's UNet (forward, backward, optimizer step, gradient
  checkpointing), on CUDA with float16 autocast and the experiment's batch when there is a GPU, else on the CPU in
  float32 with a small batch (CPU bfloat16 is slower still).

The photos were just written, so every variant reads them from the page cache. Prints the usable CPU cores (the
machine may be shared), images/s of each variant, and the ratios; the last number is the headline ratio.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from fiberaug.data import sized_pipeline

CONF = Path(__file__).resolve().parents[1] / "conf"
HEIGHT, WIDTH = 3024, 4032


def make_photos(root: Path, count: int) -> list[Path]:
    """Photo-like JPEGs: what a decoder meets in a phone photo of a panel, at a phone's size and quality."""
    rng = np.random.default_rng(0)
    noise = (rng.standard_normal((HEIGHT + 64, WIDTH + 64, 3), dtype=np.float32) * 6).astype(np.int16)
    paths = []
    for i in range(count):
        coarse = rng.integers(30, 225, (6, 8, 3), dtype=np.uint8)
        image = cv2.resize(coarse, (WIDTH, HEIGHT), interpolation=cv2.INTER_CUBIC)
        for _ in range(60):  # panels and ports
            x, y = int(rng.integers(0, WIDTH)), int(rng.integers(0, HEIGHT))
            corner = (x + int(rng.integers(40, 600)), y + int(rng.integers(40, 400)))
            thickness = -1 if rng.random() < 0.5 else int(rng.integers(2, 12))
            cv2.rectangle(image, (x, y), corner, rng.integers(0, 255, 3).tolist(), thickness)
        for _ in range(30):  # cables
            (x0, y0), (x1, y1) = rng.integers(0, [WIDTH, HEIGHT], (2, 2)).tolist()
            cv2.line(image, (x0, y0), (x1, y1), rng.integers(0, 255, 3).tolist(), int(rng.integers(3, 20)), cv2.LINE_AA)
        dy, dx = rng.integers(0, 64, 2)  # each photo its own noise
        image = np.clip(image + noise[dy : dy + HEIGHT, dx : dx + WIDTH], 0, 255).astype(np.uint8)
        paths.append(root / f"IMG_{i:04d}.jpg")
        Image.fromarray(image).save(paths[-1], quality=94)
    return paths


class NaiveImages(Dataset):
    """A plain PyTorch dataset: every sample decodes its photo in full and resizes it, as most loaders do."""

    def __init__(self, paths: list[Path], side: int, transform) -> None:
        self.paths, self.side, self.transform = paths, side, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.paths[index]) as im:
            image = im.convert("RGB")
        scale = self.side / min(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
        array = self.transform(image=np.asarray(image, dtype=np.float32) / 255)["image"]
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))) * 2 - 1, -1


def timed_epochs(loader: DataLoader, epochs: range) -> tuple[int, float]:
    """Images served and seconds taken by `epochs` of `loader` (its sampler told each epoch when it can be)."""
    images, start = 0, time.perf_counter()
    for epoch in epochs:
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        images += sum(len(batch[0]) for batch in loader)
    return images, time.perf_counter() - start


def datamodule_run(cfg, epochs: int) -> dict[str, float]:
    """Images/s of a DataModule's setup plus first epoch, then of its later epochs, as training runs them."""
    dm = instantiate(cfg.data, augment=cfg.augment, _recursive_=False, _convert_="all")  # imports Lightning: untimed
    start = time.perf_counter()
    dm.setup("fit")
    setup_s = time.perf_counter() - start
    loader = dm.train_dataloader()
    images, seconds = timed_epochs(loader, range(1))
    result = {"setup_s": setup_s, "first": images / (setup_s + seconds), "memory_mib": dm.images.memory_used / 2**20}
    if epochs:
        images, seconds = timed_epochs(loader, range(1, 1 + epochs))
        result["later"] = images / seconds
    return result


def model_rate(cfg, steps: int) -> tuple[float, str]:
    """Images per second of the experiment's UNet training steps on this machine's device, and what ran."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    batch_size = cfg.data.batch_size if cuda else 4
    size = cfg.data.image_size
    model = instantiate(cfg.model, image_size=size, channels=3, class_names=[]).to(device).train()
    optimizer = model.configure_optimizers()["optimizer"]
    batch = (torch.randn(batch_size, 3, size, size, device=device), torch.full((batch_size,), -1, device=device))

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
            loss = model._loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: allocator, cuDNN autotuning
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    what = f"{torch.cuda.get_device_name() if cuda else 'CPU'}, batch {batch_size}, {'float16' if cuda else 'float32'}"
    return steps * batch_size / (time.perf_counter() - start), what


def single_core_decode_ms(paths: list[Path], side: int) -> tuple[float, float]:
    """Milliseconds to decode one photo in this process: in full, and at JPEG draft scale for `side`."""
    def timed(draft: bool) -> float:
        start = time.perf_counter()
        for path in paths:
            with Image.open(path) as im:
                if draft:
                    im.draft("RGB", (side, side))
                im.load()
        return (time.perf_counter() - start) / len(paths) * 1000

    return timed(False), timed(True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=48, help="synthetic 4032x3024 JPEGs to make")
    parser.add_argument("--epochs", type=int, default=8, help="later epochs to time")
    parser.add_argument("--model-steps", type=int, help="timed UNet steps (default: 3 on CUDA, 1 on the CPU)")
    args = parser.parse_args()

    workers = OmegaConf.load(CONF / "data" / "folder.yaml").num_workers
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        photos = Path(tmp) / "photos"
        photos.mkdir()
        paths = make_photos(photos, args.photos)
        made_s, mean_mb = time.perf_counter() - start, np.mean([p.stat().st_size for p in paths]) / 1e6
        overrides = ["experiment=fibres128_unet", f"data.root={photos}", f"data.num_workers={workers}",
                     "data.val_fraction=0", f"data.cache_dir={Path(tmp) / 'cache'}"]
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("train", overrides)
        side = round(cfg.data.image_size / cfg.data.crop_scale)
        full_ms, draft_ms = single_core_decode_ms(paths[:4], side)

        transform = sized_pipeline(cfg.data.image_size, "random_crop", cfg.data.crop_scale, cfg.augment, seed=0)
        naive_loader = DataLoader(NaiveImages(paths, side, transform), batch_size=cfg.data.batch_size, shuffle=True,
                                  drop_last=True, num_workers=workers, persistent_workers=workers > 0)
        timed_epochs(naive_loader, range(1))  # starts the workers
        images, seconds = timed_epochs(naive_loader, range(1))
        naive = images / seconds
        del naive_loader  # and its workers

        cold = datamodule_run(cfg, args.epochs)
        warm = datamodule_run(cfg, 0)
        disk_mib = sum(p.stat().st_size for p in (Path(tmp) / "cache").rglob("*.npy")) / 2**20
    model, model_what = model_rate(cfg, args.model_steps or (3 if torch.cuda.is_available() else 1))

    print(f"usable CPU cores: {cores} (os.sched_getaffinity; the machine may be shared); "
          f"data.num_workers={workers} (conf/data/folder.yaml); CUDA: {torch.cuda.is_available()}")
    print(f"{args.photos} synthetic {WIDTH}x{HEIGHT} JPEGs, {mean_mb:.1f} MB each on average (made in {made_s:.0f} s); "
          f"experiment=fibres128_unet: {cfg.data.image_size}x{cfg.data.image_size} crops at crop_scale "
          f"{cfg.data.crop_scale} (working short side {side}), augment=geometric, batch {cfg.data.batch_size}")
    print(f"one photo on one core: full decode {full_ms:.0f} ms, reduced-scale (draft) decode {draft_ms:.0f} ms")
    print(f"cache: {cold['memory_mib']:.0f} MiB in memory, {disk_mib:.0f} MiB on disk; setup {cold['setup_s']:.1f} s "
          f"cold, {warm['setup_s']:.1f} s from the disk cache")
    rows = {
        "naive full decode (PIL open+convert, resize)": naive,
        "cache, first epoch (setup + epoch 0)": cold["first"],
        f"cache, later epochs (mean of {args.epochs})": cold["later"],
        "cache, next run (setup + epoch 0)": warm["first"],
        f"model: UNet training step ({model_what})": model,
    }
    for name, rate in rows.items():
        print(f"{name:<58}{rate:>10.1f} images/s")
    print(f"first epoch / naive full decode: {cold['first'] / naive:.1f}")
    print(f"loader (later epochs) / model: {cold['later'] / model:.1f}")
    print(f"later epochs / naive full decode: {cold['later'] / naive:.1f}")


if __name__ == "__main__":
    main()
