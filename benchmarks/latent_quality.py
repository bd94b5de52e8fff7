"""Latent against pixel diffusion on the fibre tiles at 128×128, at one wall-clock budget.

    python benchmarks/latent_quality.py --data ../shared/data/fibres128 --minutes 15 --ae-minutes 6

The tiles are split by position (their starting noise): positions 0-8 train, 9-11 are held back. It trains
- the f=4 and f=8 autoencoders (`experiment=fibres128_autoencoder`, `model=autoencoder`) for `--ae-minutes` each, and
  measures their reconstruction PSNR and SWD on the held-back tiles;
- the pixel DDPM (`experiment=fibres128_unet`) for `--minutes`, and the latent DDPM (`experiment=fibres128_ldm` on the
  f=4 autoencoder) for `--minutes` less the autoencoder's training: the same budget, the autoencoder counted;
and prints `evaluate.py`'s SWD, precision/recall and memorisation of 64 samples of each against the held-back tiles,
side by side. Pictures (real | reconstruction, and the sample grids) go to `--out`: they show the shared tiles,
which the repository must not hold. Budgets are wall-clock (`trainer.max_time`): run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
HELD_OUT = range(9, 12)


def split(data: Path, out: Path) -> tuple[Path, Path]:
    """train/ and held/ folders of links to the tiles, by position."""
    for tile in sorted(data.glob("*.png")):
        part = "held" if int(tile.stem.split("_s")[1]) in HELD_OUT else "train"
        link = out / part / "tiles" / tile.name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(tile.resolve())
    return out / "train", out / "held"


def train(run: Path, minutes: float, *overrides: str) -> None:
    if (run / "done").exists():
        return
    args = [sys.executable, str(ROOT / "train.py"), *overrides, f"hydra.run.dir={run}", "trainer.precision=32",
            "trainer.max_steps=-1", f"+trainer.max_time=00:00:{int(minutes):02d}:{int(minutes % 1 * 60):02d}",
            "data.num_workers=0", "data.cache_dir=null"]
    result = subprocess.run(args, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{' '.join(overrides)} failed:\n{result.stderr[-3000:]}")
    (run / "done").touch()


def reconstruction(export: Path, held: Path, out: Path, name: str) -> dict[str, float]:
    """PSNR and SWD of the autoencoder's reconstructions of the held-back tiles; real | reconstruction to `out`."""
    from diffusers import AutoencoderKL

    from fiberaug.imaging import make_grid, save_png, to_uint8
    from fiberaug.metrics import sliced_wasserstein
    from fiberaug.tasks.inputs import read_folder

    vae = AutoencoderKL.from_pretrained(str(export)).eval()
    images = read_folder(held, 128).images
    with torch.no_grad():
        recon = torch.cat([vae(part, sample_posterior=False).sample.clamp(-1, 1) for part in images.split(16)])
    mse = ((recon - images) / 2).square().flatten(1).mean(dim=1)
    psnr = (10 * torch.log10(1 / mse)).mean().item()
    pairs = np.stack([to_uint8(images[:8]), to_uint8(recon[:8])], axis=1).reshape(16, *images.shape[2:], 3)
    save_png(make_grid(pairs, columns=4), out / f"{name}_real_reconstruction.png")
    return {"psnr": psnr, "swd": sliced_wasserstein(images, recon, seed=0)["swd"]}


def evaluate(run: Path, held: Path, train_dir: Path, out: Path) -> dict[str, float]:
    folder = out / f"eval_{run.name}"
    args = [sys.executable, str(ROOT / "evaluate.py"), f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
            f"real_dir={held}", f"train_dir={train_dir}", "num_samples=64", "batch_size=16",
            "metrics=[swd,prdc,memorisation]", f"output_dir={folder}", "overwrite=true", "device=cpu"]
    result = subprocess.run(args, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"evaluate {run.name} failed:\n{result.stderr[-3000:]}")
    return json.loads((folder / "metrics.json").read_text())["metrics"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="the fibres128 folder")
    parser.add_argument("--minutes", type=float, default=15, help="the budget of each diffusion model")
    parser.add_argument("--ae-minutes", type=float, default=6, help="each autoencoder's training")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "latent_quality")
    args = parser.parse_args()
    train_dir, held = split(args.data, args.out)
    small = ["data.batch_size=8", "callbacks.sample_grid.every_n_epochs=1000"]
    ae = {"f4": args.out / "ae_f4", "f8": args.out / "ae_f8"}
    train(ae["f4"], args.ae_minutes, "experiment=fibres128_autoencoder", f"data.root={train_dir}", *small)
    train(ae["f8"], args.ae_minutes, "experiment=fibres128_autoencoder", "model=autoencoder",
          f"data.root={train_dir}", *small)
    pixel, latent = args.out / "pixel_ddpm", args.out / "latent_ddpm"
    common = [f"data.root={train_dir}", "data.labels=none", "data.val_fraction=0.05", *small,
              "trainer.check_val_every_n_epoch=1000", "model.warmup_steps=50"]
    train(pixel, args.minutes, "experiment=fibres128_unet", *common)
    train(latent, args.minutes - args.ae_minutes, "experiment=fibres128_ldm",
          f"model.autoencoder={ae['f4'] / 'export'}", *common)
    print(f"fibre tiles 128x128, positions 0-8 train, 9-11 held back; CPU, budgets {args.minutes} min "
          f"(autoencoders {args.ae_minutes} min each), torch {torch.__version__}")
    for name, run in ae.items():
        r = reconstruction(run / "export", held, args.out, name)
        print(f"autoencoder {name}: held-back PSNR {r['psnr']:.2f} dB, SWD {r['swd']:.1f}")
    results = {name: evaluate(run, held, train_dir, args.out) for name, run in (("pixel", pixel), ("latent", latent))}
    keys = ("swd", "precision", "recall", "memorisation")
    print(f"{'model':<10}" + "".join(f"{k:>14}" for k in keys))
    for name, values in results.items():
        print(f"{name:<10}" + "".join(f"{values[k]:>14.4f}" for k in keys))
    print(f"latent / pixel SWD: {results['latent']['swd'] / results['pixel']['swd']:.2f}")


if __name__ == "__main__":
    main()
