"""Stable Diffusion LoRA (model=sd_lora) with the real SD 1.5 configurations and random weights: peak memory and time
of a training step, and of sampling. Memory and speed do not depend on the weights' values; quality does, and is not
measured here (nobody here has SD's weights).

    python benchmarks/sd_lora.py                                   # CUDA: 512 px, batch 1 and 4; CPU: 256 px, batch 1
    python benchmarks/sd_lora.py --image-size 512 --batch-sizes 1 4 --pipeline /path/to/stable-diffusion-v1-5

Training: `benchmarks/memory.py --model sd_lora` for each batch size (fp32, gradient checkpointing, mixed precision,
both; on CUDA also both with 8-bit AdamW where bitsandbytes installs). Sampling: one `sample.py`-like draw of
`--sample-count` images at the same size, DPM-Solver++ with guidance, in a fresh process: images/s and peak memory.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
#: Stable Diffusion 1.5's UNet (unet/config.json); the rest are UNet2DConditionModel's defaults.
SD15_UNET = {"sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8}
#: Its text encoder, CLIP ViT-L/14's (text_encoder/config.json).
SD15_TEXT = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
             "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
             "projection_dim": 768}


def sd15_folder() -> Path:
    """A Stable Diffusion 1.5-shaped pipeline folder with random weights (4 GB), made once in the temporary folder;
    its tokenizer maps characters, not CLIP's 49,408 BPE tokens (the ids' values cost nothing)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from memory import sd_vae_folder
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(tempfile.gettempdir()) / "fiberaug-benchmark-sd15"
    if (folder / "model_index.json").is_file():
        return folder
    chars = sorted(set(string.ascii_lowercase + string.digits + string.punctuation))
    vocab = [*chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"]
    files = Path(tempfile.mkdtemp())
    (files / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (files / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(files / "vocab.json"), str(files / "merges.txt"), model_max_length=77)
    torch.manual_seed(0)
    pipeline = StableDiffusionPipeline(
        unet=UNet2DConditionModel(**SD15_UNET), vae=AutoencoderKL.from_pretrained(sd_vae_folder()),
        text_encoder=CLIPTextModel(CLIPTextConfig(**SD15_TEXT)), tokenizer=tokenizer,
        scheduler=PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipeline.save_pretrained(str(folder))
    return folder


def measure_sampling(pipeline: Path, image_size: int, count: int, steps: int) -> dict[str, float]:
    from fiberaug.models.diffusion import DiffusionModule

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = DiffusionModule._from_pipeline(pipeline, {}).to(device)
    base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
        model.sample(count, seed=0, batch_size=count, prompt="a photo of a fibre panel", sampler="dpmpp",
                     steps=steps, guidance_scale=7.5, height=image_size, width=image_size)
    elapsed = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() - base if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"images_s": count / elapsed, "peak_mib": peak / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--pipeline", type=Path, help="a real SD 1.5 folder (default: random weights)")
    parser.add_argument("--image-size", type=int, default=512 if cuda else 256)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4] if cuda else [1])
    parser.add_argument("--steps", type=int, default=3 if cuda else 1, help="timed training steps per variant")
    parser.add_argument("--sample-count", type=int, default=4 if cuda else 1)
    parser.add_argument("--sample-steps", type=int, default=25 if cuda else 4)
    parser.add_argument("--sample-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    pipeline = args.pipeline or sd15_folder()
    if args.sample_only:
        print(json.dumps(measure_sampling(pipeline, args.image_size, args.sample_count, args.sample_steps)))
        return
    device = torch.cuda.get_device_name() if cuda else f"CPU, {len(os.sched_getaffinity(0))} usable cores"
    print(f"model=sd_lora, SD 1.5 configurations ({'given weights' if args.pipeline else 'random weights'}), "
          f"{args.image_size} px, on {device}, torch {torch.__version__}", flush=True)
    extra = ["model.optimizer=adamw8bit"] if cuda and importlib.util.find_spec("bitsandbytes") else []
    for batch_size in args.batch_sizes:
        for optimizer in [[], extra] if extra else [[]]:
            cmd = [sys.executable, str(HERE / "memory.py"), "--model", "sd_lora", "--image-size", str(args.image_size),
                   "--batch-size", str(batch_size), "--steps", str(args.steps), f"model.pretrained={pipeline}",
                   *optimizer]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode:
                raise SystemExit(f"training batch {batch_size} failed:\n{result.stderr[-3000:]}")
            print(f"training step, batch {batch_size}{' with 8-bit AdamW' if optimizer else ''}:", flush=True)
            print("\n".join(result.stdout.splitlines()[1:]), flush=True)
    cmd = [sys.executable, __file__, "--sample-only", "--pipeline", str(pipeline), "--image-size",
           str(args.image_size), "--sample-count", str(args.sample_count), "--sample-steps", str(args.sample_steps)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"sampling failed:\n{result.stderr[-3000:]}")
    r = json.loads(result.stdout.splitlines()[-1])
    print(f"sampling {args.sample_count} images, DPM-Solver++ {args.sample_steps} steps, guidance 7.5"
          f"{', float16 autocast' if cuda else ''}: {r['images_s']:.3f} images/s, peak {r['peak_mib']:.0f} MiB "
          f"({'allocated on the GPU' if cuda else 'resident, the whole process'})")


if __name__ == "__main__":
    main()
