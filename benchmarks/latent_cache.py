"""The latent cache: an `augment=flip` training epoch of a latent diffusion preset with the cache against the same
epoch encoding every batch on the fly (`model.latent_cache=false`).

    python benchmarks/latent_cache.py                                   # fibres128_ldm: own f=4 autoencoder
    python benchmarks/latent_cache.py --preset fibres256_ldm --sd-vae   # SD's VAE (f=8) at 256×256
    python benchmarks/latent_cache.py --images ../shared/data/fibres128 --epochs 6 trainer.precision=32
    python benchmarks/latent_cache.py --latents-only --count 32 --epochs 6

Each variant is `train.py`'s training in a fresh process on the same images (`--images`, else random ones), with
`augment=flip` and `data.resize_policy=resize`, no validation, sample grids or metrics, and the preset's denoiser,
precision (bf16 on a CPU) and gradient checkpointing; `--latents-only` times only what the cache replaces: the
latents of every training batch, encoded or looked up. The autoencoder has random weights, saved to a temporary
folder (no download; `autoencoder_f4`'s architecture, or Stable Diffusion's VAE with `--sd-vae`): the time of its
forward pass does not depend on them. Each image is cached in the forms the epochs drew (plain or flipped, p=0.5), so
the cache fills over the first epochs (after k epochs a form is missing with probability 0.5^k); the ratio is on the
fly over cached for the mean of the last two epochs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image

from fiberaug.data.latents import LatentCache

ROOT = Path(__file__).resolve().parents[1]

F4 = {"block_out_channels": (64, 128, 256), "latent_channels": 3}
SD_VAE = {"block_out_channels": (128, 256, 512, 512), "latent_channels": 4, "scaling_factor": 0.18215}


class EpochTimes(pl.Callback):
    """Writes the wall-clock time of every training epoch to `path` (JSON)."""

    def __init__(self, path: str) -> None:
        self.path, self.times, self.start = Path(path), [], 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.times.append(time.perf_counter() - self.start)
        self.path.write_text(json.dumps(self.times))


def autoencoder(folder: Path, sd_vae: bool, image_size: int) -> Path:
    from diffusers import AutoencoderKL

    spec = dict(SD_VAE if sd_vae else F4)
    levels = len(spec["block_out_channels"])
    torch.manual_seed(0)
    AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, layers_per_block=2, sample_size=image_size, **spec,
    ).save_pretrained(folder)
    return folder


def photos(folder: Path, source: str | None, count: int, size: int) -> Path:
    folder.mkdir(parents=True)
    if source:
        paths = sorted(p for p in Path(source).expanduser().iterdir() if p.suffix.lower() in (".png", ".jpg"))
        if not paths:
            raise SystemExit(f"--images {source} holds no .png or .jpg images")
        for path in paths[:count]:
            (folder / path.name).symlink_to(path.resolve())
    else:
        rng = np.random.default_rng(0)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return folder


def latents_only(vae: Path, root: Path, tmp: Path, size: int, batch_size: int, epochs: int) -> dict[bool, list[float]]:
    """The part the cache replaces, alone: the latents of every training batch of an epoch, encoded or looked up."""
    from fiberaug.data import FolderDataModule
    from fiberaug.data.pipelines import resolve_pipeline
    from fiberaug.models.diffusion import DiffusionModule

    datamodule = FolderDataModule(root=str(root), image_size=size, batch_size=batch_size, val_fraction=0,
                                  augment=resolve_pipeline("flip"), labels="none", cache_dir=str(tmp / "decoded"))
    datamodule.setup("fit")
    datamodule.serve_digests()
    tiny = {"_target_": "fiberaug.nets.ContextUNet", "base_channels": 8, "channel_mults": [1]}
    model = DiffusionModule(tiny, image_size=size, channels=3, autoencoder=str(vae)).eval()
    model.latent_scale.fill_(1.0)
    times: dict[bool, list[float]] = {}
    for cached in (False, True):
        model.latent_cache = LatentCache("benchmark", 1 << 30) if cached else None
        times[cached] = []
        for epoch in range(epochs):
            loader = datamodule.train_dataloader()
            loader.sampler.set_epoch(epoch)
            start = time.perf_counter()
            for images, _, digests in loader:
                model.encode(images, digests=digests)
            times[cached].append(time.perf_counter() - start)
    return times


def run(preset: str, vae: Path, root: Path, tmp: Path, cached: bool, batch_size: int, epochs: int,
        extra: list[str]) -> list[float]:
    """`train.py` in a fresh process; the times of its epochs."""
    out = tmp / f"epochs_{cached}.json"
    overrides = [
        f"experiment={preset}", f"model.autoencoder={vae}", f"data.root={root}", f"data.cache_dir={tmp / 'cache'}",
        "augment=flip", "data.resize_policy=resize", "data.labels=none", f"data.batch_size={batch_size}",
        "data.num_workers=0", f"trainer.max_epochs={epochs}", "trainer.max_steps=-1", "+trainer.limit_val_batches=0",
        "callbacks.sample_grid=null", "~callbacks.metrics", f"model.latent_cache={cached}",
        "+callbacks.epochs._target_=latent_cache.EpochTimes", f"+callbacks.epochs.path={out}",
        f"hydra.run.dir={tmp / f'run_{cached}'}", *extra,
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *overrides], capture_output=True, text=True,
                            env=env)
    if result.returncode:
        raise SystemExit(f"model.latent_cache={cached} failed:\n{result.stderr[-3000:]}")
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="fibres128_ldm")
    parser.add_argument("--sd-vae", action="store_true", help="Stable Diffusion's VAE (f=8) instead of an f=4 one")
    parser.add_argument("--images", help="a folder of images (default: random ones)")
    parser.add_argument("--count", type=int, default=32, help="how many images")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--latents-only", action="store_true", help="time the latents of each epoch, not training")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for train.py, e.g. trainer.precision=32")
    args = parser.parse_args()
    size = int(args.preset.removeprefix("fibres").split("_")[0])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        vae = autoencoder(tmp / "autoencoder", args.sd_vae, size)
        root = photos(tmp / "photos", args.images, args.count, size)
        if args.latents_only:
            results = latents_only(vae, root, tmp, size, args.batch_size, args.epochs)
        else:
            results = {cached: run(args.preset, vae, root, tmp, cached, args.batch_size, args.epochs, args.overrides)
                       for cached in (False, True)}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    what = "the latents of each epoch alone" if args.latents_only else f"train.py's epochs of {args.preset}"
    vae = "SD VAE f=8" if args.sd_vae else "autoencoder f=4"
    print(f"{what} {' '.join(args.overrides)}, {vae}, {args.count} images ({args.images or 'random'}), "
          f"batch {args.batch_size}, augment=flip, on {device}")
    print(f"{'variant':<22}" + "".join(f"{f'epoch {i}':>10}" for i in range(args.epochs)) + "   seconds")
    for cached, name in ((False, "encoded on the fly"), (True, "latent cache")):
        print(f"{name:<22}" + "".join(f"{t:>10.2f}" for t in results[cached]))
    last = {cached: statistics.mean(times[-2:]) for cached, times in results.items()}
    print(f"last two epochs: on the fly / cached = {last[False] / last[True]:.2f}x")


if __name__ == "__main__":
    main()
