"""augment.py's generative step with the real SD 1.5 configurations and random weights (speed and memory do not
depend on the weights' values): images per second (after a first image, which loads the model) and peak memory of
img2img and of ControlNet (canny), side by side in one run, each in a fresh process.

    python benchmarks/generative_augment.py                   # CUDA: 1024-px long side, 30 steps, offload or not
    python benchmarks/generative_augment.py --max-side 256 --steps 4 --photos 2   # what a CPU manages

The photos are synthetic 4032×3024-shaped panels scaled down to --photo-side (the generative step works at
--max-side whatever their size). Peak memory: CUDA's max_memory_allocated, or the process's peak resident size.
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

import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def controlnet_folder(pipeline: Path) -> Path:
    """SD 1.5's ControlNet shape (`ControlNetModel.from_unet` of its UNet), random weights, made once."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    folder = Path(tempfile.gettempdir()) / "fiberaug-benchmark-sd15-controlnet"
    if not (folder / "config.json").is_file():
        ControlNetModel.from_unet(UNet2DConditionModel.from_pretrained(pipeline, subfolder="unet")).save_pretrained(
            str(folder))
    return folder


def photos(folder: Path, count: int, side: int) -> Path:
    rng = np.random.default_rng(0)
    for i in range(count):
        image = rng.integers(0, 60, (side * 3 // 4, side, 3), dtype=np.uint8)
        for k in range(8):  # a rack of bright modules
            x = side // 10 + k * side // 10
            image[side // 8 : side * 5 // 8, x : x + side // 20] = 200
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i}.jpg", quality=92)
    return folder


def run(kind: str, args: argparse.Namespace, pipeline: Path, offload: bool) -> dict[str, float]:
    """The generative step of augment.py in this process (the child of main): images/s after a first image (which
    loads the model), and peak memory."""
    from fiberaug.augment.generative import GenerativeSpec, GenerativeStep

    tmp = Path(tempfile.mkdtemp())
    generative = {"kind": kind, "pipeline": str(pipeline), "steps": args.steps, "max_side": args.max_side,
                  "strength": 0.75, "offload": offload}
    if kind == "controlnet":
        generative["controlnet"] = str(controlnet_folder(pipeline))
    source = photos(tmp / "in", args.photos + 1, args.photo_side)
    step = GenerativeStep(GenerativeSpec.parse(generative), source, {})
    images = [np.asarray(Image.open(path)) for path in sorted(source.glob("*.jpg"))]
    step(images[0], "0.jpg", 0)  # loads the pipeline
    start = time.perf_counter()
    for i, image in enumerate(images[1:], 1):
        step(image, f"{i}.jpg", i)
    elapsed = time.perf_counter() - start
    cuda = torch.cuda.is_available()
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"images_s": args.photos / elapsed, "peak_mib": peak / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--pipeline", type=Path, help="a real SD 1.5 folder (default: random weights)")
    parser.add_argument("--max-side", type=int, default=1024 if cuda else 256)
    parser.add_argument("--steps", type=int, default=30 if cuda else 4)
    parser.add_argument("--photos", type=int, default=8 if cuda else 2)
    parser.add_argument("--photo-side", type=int, default=1344)
    parser.add_argument("--child", nargs=2, metavar=("KIND", "OFFLOAD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    from sd_lora import sd15_folder

    pipeline = args.pipeline or sd15_folder()
    if args.child:
        print(json.dumps(run(args.child[0], args, pipeline, args.child[1] == "1")))
        return
    device = torch.cuda.get_device_name() if cuda else f"CPU, {len(os.sched_getaffinity(0))} usable cores"
    print(f"augment.py generative step, SD 1.5 configurations ({'given' if args.pipeline else 'random'} weights), "
          f"long side {args.max_side}, {args.steps} steps, {args.photos} photos, on {device}", flush=True)
    print(f"{'step':<24}{'images/s':>10}{'peak MiB':>10}")
    for kind in ("img2img", "controlnet"):
        for offload in ([False, True] if cuda else [False]):
            cmd = [sys.executable, __file__, "--child", kind, str(int(offload)), "--max-side", str(args.max_side),
                   "--steps", str(args.steps), "--photos", str(args.photos), "--photo-side", str(args.photo_side),
                   *(["--pipeline", str(args.pipeline)] if args.pipeline else [])]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode:
                raise SystemExit(f"{kind} failed:\n{result.stderr[-3000:]}")
            r = json.loads(result.stdout.splitlines()[-1])
            label = kind + (", cpu offload" if offload else "")
            print(f"{label:<24}{r['images_s']:>10.3f}{r['peak_mib']:>10.0f}", flush=True)


if __name__ == "__main__":
    main()
