"""Samplers on the digits DDPM: quality (SWD) against steps, and `sample.py`'s speed and memory.

    python benchmarks/samplers.py                      # trains the default digits DDPM first (python train.py),
                                                       # into outputs/benchmarks/digits_ddpm (benchmarks/curation.py
                                                       # uses it too)
    python benchmarks/samplers.py --ckpt outputs/train/runs/<run>/checkpoints/last.ckpt

1. SWD (×1e3, against the checkpoint's training digits) of `--count` samples of DDIM, DPM-Solver++ 2M and UniPC at
   10, 20 and 50 steps, side by side, with the fewest steps at which each reaches DDIM-50's SWD (within 5%).
2. `sample.py` writing 10,000 and 1,000 digits, each run a fresh process: images per second and the process's
   peak resident memory, for DDIM-50 and for the fastest sampler at its steps found in 1.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SAMPLERS = ("ddim", "dpmpp", "unipc")
STEPS = (10, 20, 50)


def trained_checkpoint(run: Path = ROOT / "outputs" / "benchmarks" / "digits_ddpm") -> Path:
    """The default digits DDPM (`python train.py`), trained once."""
    ckpt = run / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        subprocess.run([sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={run}"], check=True,
                       capture_output=True)
    return ckpt


def swd_table(ckpt: Path, count: int) -> dict[tuple[str, int], float]:
    from fiberaug.metrics import sliced_wasserstein
    from fiberaug.models import load_generator, read_checkpoint
    from fiberaug.tasks.inputs import checkpoint_data

    model = load_generator(ckpt)
    real, _ = checkpoint_data(read_checkpoint(ckpt)).reference_images("train")
    table = {}
    for name in SAMPLERS:
        for steps in STEPS:
            fake = model.sample(count, seed=0, batch_size=500, sampler=name, steps=steps)
            table[name, steps] = sliced_wasserstein(real, fake, seed=0)["swd"]
            print(f"  {name} {steps}: {table[name, steps]:.2f}", flush=True)
    return table


def sample_run(ckpt: Path, folder: Path, count: int, sampler: str, steps: int) -> tuple[float, float]:
    """Images per second and peak resident MiB of one `sample.py` process (its own rusage, from wait4)."""
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, str(ROOT / "sample.py"), f"ckpt_path={ckpt}", f"output_dir={folder}",
                                f"num_samples={count}", f"sampler={sampler}", f"steps={steps}", "batch_size=500",
                                "filter.max_copy_ratio=null"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    if status:
        raise SystemExit(f"sample.py {sampler} {steps} failed ({status})")
    return count / (time.perf_counter() - start), usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path)
    parser.add_argument("--count", type=int, default=1000, help="samples per SWD")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.ckpt or trained_checkpoint()
        print(f"digits DDPM {ckpt}; CPU, torch {torch.__version__}; SWD x1e3 of {args.count} samples:")
        table = swd_table(ckpt, args.count)
        print(f"{'sampler':<10}" + "".join(f"{f'{s} steps':>12}" for s in STEPS) + f"{'reaches DDIM-50 at':>22}")
        target = table["ddim", 50] * 1.05
        fewest = {}
        for name in SAMPLERS:
            reached = [s for s in STEPS if table[name, s] <= target]
            fewest[name] = reached[0] if reached else None
            print(f"{name:<10}" + "".join(f"{table[name, s]:>12.2f}" for s in STEPS)
                  + f"{(f'{fewest[name]} steps' if fewest[name] else 'not by 50'):>22}")
        best = min((n for n in SAMPLERS if fewest[n]), key=lambda n: (fewest[n], table[n, fewest[n]]))
        print(f"fastest to DDIM-50's SWD (within 5%): {best} at {fewest[best]} steps")
        fast = f"{best} {fewest[best]}"
        runs = {fast: (best, fewest[best]), "ddim 50": ("ddim", 50)}  # the quick runs first
        rates = {}
        print(f"{'sample.py':<16}{'count':>8}{'images/s':>12}{'peak MiB':>12}")
        for label, (name, steps) in runs.items():
            for count in (1_000, 10_000):
                rate, peak = sample_run(ckpt, Path(tmp) / f"{name}{steps}_{count}", count, name, steps)
                rates[label, count] = rate
                print(f"{label:<16}{count:>8}{rate:>12.1f}{peak:>12.0f}", flush=True)
        print(f"speed-up at 10,000 images: {rates[fast, 10_000] / rates['ddim 50', 10_000]:.2f}x")


if __name__ == "__main__":
    main()
