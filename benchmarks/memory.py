"""Peak memory and time of a diffusion training step: gradient checkpointing and mixed precision vs fp32.

    python benchmarks/memory.py                        # ContextUNet (model=ddpm) at 64x64, batch 16
    python benchmarks/memory.py --model diffusers --image-size 128 --batch-size 16 experiment=fibres128_unet
    python benchmarks/memory.py --model diffusers_lora model.lora_on_random_base=true ...

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
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

CONF = Path(__file__).resolve().parents[1] / "conf"
VARIANTS = {
    "fp32": {"checkpointing": False, "precision": None},
    "gradient checkpointing": {"checkpointing": True, "precision": None},
    "mixed precision": {"checkpointing": False, "precision": "mixed"},
    "both": {"checkpointing": True, "precision": "mixed"},
}


def measure(args: argparse.Namespace, checkpointing: bool, precision: str | None) -> dict[str, float]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        overrides = [f"model={args.model}", f"model.gradient_checkpointing={checkpointing}", *args.overrides]
        cfg = compose("train", overrides)
    model = instantiate(cfg.model, image_size=args.image_size, channels=3, class_names=[]).to(device).train()
    batch = (torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device),
             torch.full((args.batch_size,), -1, device=device))
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    optimizer = model.configure_optimizers()["optimizer"]

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
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model.denoiser.base_channels=64")
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args, **VARIANTS[args.variant])))
        return

    results = {}
    for name in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", name, "--model", args.model, "--image-size", str(args.image_size),
               "--batch-size", str(args.batch_size), "--steps", str(args.steps), *args.overrides]
        output = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results[name] = json.loads(output.splitlines()[-1])
    base = results["fp32"]
    print(f"model={args.model} image_size={args.image_size} batch_size={args.batch_size} on {base['device']}")
    print(f"{'variant':<24}{'peak MiB':>10}{'ratio':>8}{'step s':>10}{'ratio':>8}")
    for name, r in results.items():
        print(f"{name:<24}{r['peak_mib']:>10.0f}{r['peak_mib'] / base['peak_mib']:>8.2f}"
              f"{r['step_s']:>10.3f}{r['step_s'] / base['step_s']:>8.2f}")


if __name__ == "__main__":
    main()
