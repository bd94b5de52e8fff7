"""Peak memory and time of a diffusion training step: gradient checkpointing and mixed precision vs fp32, or
pixel against latent diffusion.

    python benchmarks/memory.py                        # ContextUNet (model=ddpm) at 64x64, batch 16
    python benchmarks/memory.py --model diffusers --image-size 128 --batch-size 16 experiment=fibres128_unet
    python benchmarks/memory.py --model diffusers_lora model.lora_on_random_base=true ...
    python benchmarks/memory.py --latent --image-size 512 --batch-size 4

`--latent` compares the pixel UNet (experiment=fibres128_unet's denoiser at --image-size) with the latent model
(experiment=fibres256_ldm / fibres512_ldm: its denoiser on the 4-channel latents of an autoencoder with Stable
Diffusion's VAE configuration, f=8, random weights: memory and time do not depend on them), both with gradient
checkpointing (as the presets) and mixed precision on CUDA: the latent step encoding its batch (no gradients), and
the step as the latent cache serves it (the posteriors looked up, not encoded).

A step is forward, backward and the optimizer's update, so memory counts activations, gradients and
optimizer state (not the weights themselves, nor an EMA copy).

Each variant runs in a fresh process. Memory is what the first step adds: `torch.cuda.max_memory_allocated`
on CUDA, the growth of the process's peak resident size on the CPU. Time is the mean of the next steps.
Prints each variant's
figures and their ratio to the fp32 baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

CONF = Path(__file__).resolve().parents[1] / "conf"
#: Stable Diffusion's VAE (v1 to 2.1): f=8, 4 latent channels.
SD_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "sample_size": 512, "scaling_factor": 0.18215,
}
LATENT_VARIANTS = {
    "pixel": {"latent": False, "cached": False},
    "latent, encoding": {"latent": True, "cached": False},
    "latent, cached": {"latent": True, "cached": True},
}
VARIANTS = {
    "fp32": {"checkpointing": False, "precision": None},
    "gradient checkpointing": {"checkpointing": True, "precision": None},
    "mixed precision": {"checkpointing": False, "precision": "mixed"},
    "both": {"checkpointing": True, "precision": "mixed"},
}


def sd_vae_folder() -> Path:
    """A Stable Diffusion VAE folder with random weights, made once in the temporary folder."""
    from diffusers import AutoencoderKL

    folder = Path(tempfile.gettempdir()) / "fiberaug-benchmark-sd-vae"
    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        AutoencoderKL(**SD_VAE).save_pretrained(str(folder))
    return folder


def measure(args: argparse.Namespace, checkpointing: bool, precision: str | None, latent: bool | None = None,
            cached: bool = False) -> dict[str, float]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if latent is None:
        overrides = [f"model={args.model}", *args.overrides]
    elif latent:
        preset = "fibres256_ldm" if args.image_size <= 256 else "fibres512_ldm"
        overrides = [f"experiment={preset}", f"model.autoencoder={sd_vae_folder()}", "data.labels=none"]
    else:
        overrides = ["experiment=fibres128_unet"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", [*overrides, f"model.gradient_checkpointing={checkpointing}"])
    model = instantiate(cfg.model, image_size=args.image_size, channels=3, class_names=[]).to(device).train()
    batch = (torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device),
             torch.full((args.batch_size,), -1, device=device))
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    optimizer = model.configure_optimizers()["optimizer"]
    if cached:  # the latent cache's lookup: posteriors of the batch's shape (their values do not change the cost)
        side = args.image_size // 8
        moments = torch.randn(args.batch_size, 2 * model.autoencoder.config.latent_channels, side, side, device=device)
        model.posterior_moments = lambda images: moments

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=precision is not None):
            loss = model._loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # Memory: the first step against the state before it (the CPU's peak resident size only grows).
    if device.type == "cuda":
        base = torch.cuda.memory_allocated()
        step()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        step()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"peak_mib": peak / 2**20, "step_s": (time.perf_counter() - start) / args.steps, "device": str(device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ddpm")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--latent", action="store_true", help="pixel against latent diffusion (f=8)")
    parser.add_argument("--variant", choices=[*VARIANTS, *LATENT_VARIANTS], help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model.denoiser.base_channels=64")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if args.variant in LATENT_VARIANTS:
        print(json.dumps(measure(args, True, "mixed" if cuda else None, **LATENT_VARIANTS[args.variant])))
        return
    if args.variant:
        print(json.dumps(measure(args, **VARIANTS[args.variant])))
        return

    results = {}
    for name in LATENT_VARIANTS if args.latent else VARIANTS:
        cmd = [sys.executable, __file__, "--variant", name, "--model", args.model, "--image-size", str(args.image_size),
               "--batch-size", str(args.batch_size), "--steps", str(args.steps), *args.overrides]
        output = subprocess.run(cmd, capture_output=True, text=True)
        if output.returncode:
            raise SystemExit(f"{name} failed:\n{output.stderr[-3000:]}")
        results[name] = json.loads(output.stdout.splitlines()[-1])
    base = results["pixel" if args.latent else "fp32"]
    name = torch.cuda.get_device_name() if cuda else f"CPU, {len(os.sched_getaffinity(0))} usable cores"
    what = "pixel vs latent (f=8, SD VAE config, random weights)" if args.latent else f"model={args.model}"
    print(f"{what} image_size={args.image_size} batch_size={args.batch_size} on {name}, torch {torch.__version__}")
    print(f"{'variant':<24}{'peak MiB':>10}{'ratio':>8}{'step s':>10}{'ratio':>8}")
    for name, r in results.items():
        print(f"{name:<24}{r['peak_mib']:>10.0f}{r['peak_mib'] / base['peak_mib']:>8.2f}"
              f"{r['step_s']:>10.3f}{r['step_s'] / base['step_s']:>8.2f}")


if __name__ == "__main__":
    main()
