"""What a newcomer's first runs cost: `debug=fast` against the start-up alone, and a short run on a small folder
with its extras (sample grids, sample metrics, final validation) against the same run without them.

    python benchmarks/short_runs.py                 # 3 runs of each, medians and ratios
    python benchmarks/short_runs.py --runs 5 --steps 30

Every figure is the wall-clock time of `train.py` as a whole process (Python start-up and imports included), the
median over `--runs` runs taken in turn (A B A B …), so that a machine whose speed drifts moves both alike.
"Start-up" is `train.py --cfg job`: the same interpreter, imports and config composition, no training. The small
folder is 24 random 32×32 images in 2 classes, as a user's first `data=folder` try.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def make_folder(root: Path) -> None:
    rng = np.random.default_rng(0)
    for i in range(24):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")


def timed(args: list[str], out: Path) -> float:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *args, f"hydra.run.dir={out}"],
                            capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{result.stderr[-2000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30, help="length of the small-folder run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_folder(tmp / "photos")
        small = ["data=folder", f"data.root={tmp / 'photos'}", "data.image_size=32", f"trainer.max_steps={args.steps}",
                 f"data.cache_dir={tmp / 'cache'}"]
        variants = {
            "start-up (train.py --cfg job)": ["--cfg", "job"],
            "debug=fast": ["debug=fast"],
            f"{args.steps}-step folder run, extras as configured": small,
            f"{args.steps}-step folder run, no extras": [*small, "callbacks.sample_grid=null", "~callbacks.metrics",
                                                         "~callbacks.final_validation"],
        }
        times: dict[str, list[float]] = {name: [] for name in variants}
        for run in range(args.runs):
            for i, (name, overrides) in enumerate(variants.items()):
                times[name].append(timed(overrides, tmp / f"run{run}-{i}"))
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"median wall-clock over {args.runs} runs (CPU, {len(__import__('os').sched_getaffinity(0))} cores):")
    for name, value in median.items():
        print(f"  {name:<45} {value:6.1f} s   (min {min(times[name]):.1f}, max {max(times[name]):.1f})")
    names = list(median)
    print(f"debug=fast / start-up: {median[names[1]] / median[names[0]]:.2f}×")
    print(f"extras as configured / no extras: {median[names[2]] / median[names[3]]:.2f}×")


if __name__ == "__main__":
    main()
