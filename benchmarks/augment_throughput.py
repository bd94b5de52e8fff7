"""Throughput of augment.py with 1 and 2 workers, and its peak memory for N and 4N images.

    python benchmarks/augment_throughput.py                      # 48 synthetic 384x384 photos, copies=2
    python benchmarks/augment_throughput.py --images 100 --size 1024 --augment geometric --workers 4

Each variant runs the augment task in a fresh process on a folder of synthetic PNGs. Throughput is outputs
per second of the task (pool start included); "cores busy" is the CPU time of the process and its workers
per second of it, which shows whether the cores were free (on a shared machine they may not be); memory is
the peak resident size of the parent process and of the largest worker (`ru_maxrss`). Prints each variant's
figures and the ratios: workers 2 vs 1 (should approach 2 on two free cores) and 4N vs N images (should stay
near 1: memory does not grow with the folder).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir
from PIL import Image

CONF = Path(__file__).resolve().parents[1] / "conf" / "batch"


def make_folder(root: Path, count: int, size: int) -> None:
    """Smooth random colour fields with some noise: photo-like work for the decoder, transforms and encoder."""
    rng = np.random.default_rng(0)
    for i in range(count):
        coarse = rng.integers(0, 255, (size // 32, size // 32, 3), dtype=np.uint8)
        image = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), dtype=np.int16)
        image = np.clip(image + rng.integers(-8, 8, image.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / f"{i:05d}.png", compress_level=1)


def measure(args: argparse.Namespace, images: int, workers: int) -> dict[str, float]:
    from fiberaug.tasks.augment import augment

    with tempfile.TemporaryDirectory() as tmp:
        source, output = Path(tmp) / "in", Path(tmp) / "out"
        source.mkdir()
        make_folder(source, images, args.size)
        overrides = [f"input_dir={source}", f"output_dir={output}", f"workers={workers}", f"copies={args.copies}",
                     f"augment={args.augment}", "contact_sheet=0"]
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("augment", overrides)
        base, cpu = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, _cpu_seconds()
        start = time.perf_counter()
        summary = augment(cfg)
        seconds = time.perf_counter() - start
    assert summary.written == images * args.copies, summary
    return {
        "outputs_per_s": summary.written / seconds,
        "cores_busy": (_cpu_seconds() - cpu) / seconds,
        "parent_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "parent_growth_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024,
        "worker_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def _cpu_seconds() -> float:
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48, help="N: images in the folder")
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--copies", type=int, default=2)
    parser.add_argument("--augment", default="photometric")
    parser.add_argument("--workers", type=int, default=2, help="the parallel variant, and the memory variants")
    parser.add_argument("--variant", nargs=2, type=int, metavar=("IMAGES", "WORKERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args, *args.variant)))
        return

    variants = {
        "N images, 1 worker": (args.images, 1),
        f"N images, {args.workers} workers": (args.images, args.workers),
        f"4N images, {args.workers} workers": (4 * args.images, args.workers),
    }
    results = {}
    for name, (images, workers) in variants.items():
        cmd = [sys.executable, __file__, "--variant", str(images), str(workers), "--size", str(args.size),
               "--copies", str(args.copies), "--augment", args.augment]
        lines = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()
        results[name] = json.loads(lines[-1])
    one, many, big = results.values()
    print(f"N={args.images} images of {args.size}x{args.size}, copies={args.copies}, augment={args.augment}")
    print(f"{'variant':<24}{'outputs/s':>11}{'cores busy':>12}{'parent MiB':>12}{'growth MiB':>12}{'worker MiB':>12}")
    for name, r in results.items():
        worker = f"{r['worker_mib']:.0f}" if r["worker_mib"] else "in parent"
        print(f"{name:<24}{r['outputs_per_s']:>11.1f}{r['cores_busy']:>12.2f}{r['parent_mib']:>12.0f}"
              f"{r['parent_growth_mib']:>12.0f}{worker:>12}")
    print(f"throughput, {args.workers} workers / 1: {many['outputs_per_s'] / one['outputs_per_s']:.2f}")
    print(f"peak memory, 4N / N images: parent {big['parent_mib'] / many['parent_mib']:.2f}, "
          f"worker {big['worker_mib'] / many['worker_mib']:.2f}")


if __name__ == "__main__":
    main()
