"""Does a generator trained on your N images help a classifier trained on the same N? The README's few-shot table.

    python benchmarks/utility.py                                    # N = 5, 10, 20 per class, 3 draws, ddpm and gan
    python benchmarks/utility.py --shots 5 --draws 1 --ddpm-steps 300 --gan-steps 300     # a quick look

For each N and draw d, `data.train_per_class=N data.subset_seed=d` keeps N digits per class of the digits' training
split (`data.val_fraction=0.2`: the same 359 digits are held back for every draw). Each generator of the project's
defaults (`model=ddpm`, `model=gan`, at the digits' default 16x16) is trained by train.py on exactly those N*10 images
for a fixed number of optimizer steps, with no validation and no in-training sampling (the held-back digits are the
classifier's test set, and nothing else may look at them; `last.ckpt` is used). It draws max(--ratios)*N images per
class, and the utility task's classifier (`fiberaug.tasks.utility.arm_accuracy`, its settings from
conf/evaluate.yaml's `utility`) is trained on the same N*10 real images four ways and tested on the held-back digits:
real, real + classical (augment=geometric, the utility task's default), and real + synthetic and real + classical +
synthetic with the first r*N synthetic images per class for each ratio r. Also measured: the share of synthetic
images that are copies of the generator's training images (evaluate.py's memorisation test), since a generator that
copies its few images adds nothing. Prints a markdown table of mean +- sd over draws and the verdict, and writes every
number to --out/utility.json. Runs are kept in --out and reused when the command is run again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from fiberaug.metrics.memorisation import memorisation
from fiberaug.models import load_generator, read_checkpoint
from fiberaug.tasks.inputs import checkpoint_data
from fiberaug.tasks.utility import CONDITIONS, arm_accuracy, classical_augment, refuse_seen

ROOT = Path(__file__).resolve().parents[1]
GENERATORS = {"ddpm": ["model=ddpm"], "gan": ["model=gan"]}
# Nothing during training may look at the held-back digits (they test the classifier), nor spend time sampling.
UNSEEN = ["++trainer.limit_val_batches=0", "callbacks.model_checkpoint.monitor=null", "~callbacks.metrics",
          "~callbacks.sample_grid"]
REAL_ARMS = CONDITIONS[:2]
SYNTHETIC_ARMS = CONDITIONS[2:]


def generator_overrides(kind: str, shots: int, draw: int, steps: int) -> list[str]:
    """train.py's overrides for generator `kind` on draw `draw` of `shots` training digits per class."""
    return [*GENERATORS[kind], "data=digits", "data.val_fraction=0.2", f"data.train_per_class={shots}",
            f"data.subset_seed={draw}", f"seed={draw}", f"trainer.max_steps={steps}", *UNSEEN]


def train_generator(overrides: list[str], run_dir: Path) -> Path:
    """`last.ckpt` of a train.py run in a fresh interpreter, as a user runs it (kept, and reused when present)."""
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "train.out", "w") as log:
            result = subprocess.run([sys.executable, str(ROOT / "train.py"), *overrides, f"hydra.run.dir={run_dir}"],
                                    cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                    env={**os.environ, "HYDRA_FULL_ERROR": "1"})
        if result.returncode:
            raise SystemExit(f"train.py failed (exit {result.returncode}); see {run_dir / 'train.out'}")
    return ckpt


def per_class(labels: torch.Tensor, count: int, classes: int) -> torch.Tensor:
    """The indices of the first `count` images of each class."""
    return torch.cat([(labels == c).nonzero().flatten()[:count] for c in range(classes)])


def measure_draw(ckpts: dict[str, Path], ratios: list[int], options: Any, augment_spec: Any,
                 classifier_seeds: list[int], sample_seed: int = 0) -> dict[str, Any]:
    """Every arm for one draw: the real ones once, the synthetic ones per generator and ratio (accuracies are means
    over `classifier_seeds`), and each generator's memorisation share. The generators must have been trained on
    the same images (compared by content), none of them held back."""
    real = held_out = real_ids = augment = None
    result: dict[str, Any] = {"generators": {}}

    def accuracy(condition: str, synthetic: tuple[torch.Tensor, torch.Tensor]) -> float:
        return float(np.mean([arm_accuracy(condition, real, synthetic, held_out, classes, seed=seed, options=options,
                                           augment=augment) for seed in classifier_seeds]))

    for name, ckpt in ckpts.items():
        checkpoint = read_checkpoint(ckpt)
        data = checkpoint_data(checkpoint)  # the checkpoint's own few-shot draw and split, rebuilt
        refuse_seen(checkpoint, data, str(ckpt))  # no held-back digit among its training images (by content)
        ids = sorted(data.item_id(item) for item in data.train_set.items)
        if real is None:
            classes, real_ids = len(data.class_names), ids
            images, labels = data.reference_images("train")
            real = (images, torch.tensor(labels))
            images, labels = data.reference_images("val")
            held_out = (images, torch.tensor(labels))
            augment = classical_augment(augment_spec, data)
            empty = (real[0][:0], real[1][:0])
            result.update(real_images=len(real[0]), held_out=len(held_out[0]),
                          **{arm: accuracy(arm, empty) for arm in REAL_ARMS})
        elif ids != real_ids:
            raise SystemExit(f"{ckpt} was trained on other images than {next(iter(ckpts.values()))}")
        shots = len(real[0]) // classes
        model = load_generator(ckpt)
        count = max(ratios) * shots * classes
        synthetic = model.sample(count, seed=sample_seed, batch_size=256)
        synthetic_labels = model.label_indices(None, count).cpu()
        row: dict[str, Any] = {"memorisation": memorisation(synthetic, real[0]).copies.float().mean().item()}
        for ratio in ratios:
            idx = per_class(synthetic_labels, ratio * shots, classes)
            row[str(ratio)] = {arm: accuracy(arm, (synthetic[idx], synthetic_labels[idx])) for arm in SYNTHETIC_ARMS}
        result["generators"][name] = row
    return result


def summarise(results: dict[int, list[dict[str, Any]]], ratios: list[int]) -> list[dict[str, Any]]:
    """Rows of mean and sd over draws: per N, generator and ratio, with the real arms beside."""
    rows = []
    for shots, draws in results.items():
        stats = lambda values: (float(np.mean(values)), float(np.std(values)))  # noqa: E731
        base = {arm: stats([d[arm] for d in draws]) for arm in REAL_ARMS}
        for name in draws[0]["generators"]:
            runs = [d["generators"][name] for d in draws]
            for ratio in ratios:
                rows.append({"shots": shots, "generator": name, "ratio": ratio, **base,
                             "memorisation": stats([r["memorisation"] for r in runs]),
                             **{arm: stats([r[str(ratio)][arm] for r in runs]) for arm in SYNTHETIC_ARMS}})
    return rows


def verdict(rows: list[dict[str, Any]]) -> list[str]:
    """Plain words: does any synthetic arm beat the better real arm by more than one standard deviation (the larger
    of the two arms')? Which came closest, and the ratio that helped most for each N and generator."""
    lines, gains = [], []
    for row in rows:
        best_real = max(REAL_ARMS, key=lambda arm: row[arm][0])
        for arm in SYNTHETIC_ARMS:
            gain, sd = row[arm][0] - row[best_real][0], max(row[arm][1], row[best_real][1])
            gains.append((gain - sd, gain, sd, row, arm, best_real))
    helped = [g for g in gains if g[0] > 0]
    margin, gain, sd, row, arm, best_real = max(gains, key=lambda g: g[0])
    where = f"N={row['shots']}, {row['generator']}, {row['ratio']}x synthetic, {arm}"
    if not helped:
        lines.append("Synthetic images did not beat the better of real and real + classical by more than one standard "
                     f"deviation at any N. Closest: {where}, {gain:+.3f} against {best_real} (sd {sd:.3f}).")
    else:
        lines.append(f"Synthetic images helped in {len(helped)} of {len(gains)} settings; most: {where}, {gain:+.3f} "
                     f"against {best_real} (sd {sd:.3f}).")
    for shots in sorted({r["shots"] for r in rows}):
        for name in sorted({r["generator"] for r in rows}):
            mine = [g for g in gains if g[3]["shots"] == shots and g[3]["generator"] == name]
            top = max(mine, key=lambda g: g[1])
            lines.append(f"N={shots}, {name}: the ratio that helped most is {top[3]['ratio']}x ({top[4]}, "
                         f"{top[1]:+.3f} against {top[5]})")
    return lines


def table(rows: list[dict[str, Any]]) -> str:
    cell = lambda stat: f"{stat[0]:.3f} ± {stat[1]:.3f}"  # noqa: E731
    lines = ["| N per class | real | real + classical | generator | synthetic per real | memorised | real + synthetic "
             "| real + classical + synthetic |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['shots']} | {cell(r['real'])} | {cell(r['real + classical'])} | {r['generator']} | "
                     f"{r['ratio']} | {r['memorisation'][0]:.3f} | {cell(r['real + synthetic'])} | "
                     f"{cell(r['real + classical + synthetic'])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shots", default="5,10,20", help="images per class the classifier and generators get")
    parser.add_argument("--draws", type=int, default=3, help="draws of those images per N (subset seeds 0, 1, ...)")
    parser.add_argument("--ratios", default="1,5,10", help="synthetic images per real one")
    parser.add_argument("--generators", default="ddpm,gan")
    parser.add_argument("--ddpm-steps", type=int, default=500, help="optimizer steps of each DDPM")
    parser.add_argument("--gan-steps", type=int, default=800, help="optimizer steps of each GAN")
    parser.add_argument("--classifier-seeds", type=int, default=1, help="classifiers per arm and draw (averaged)")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "benchmarks" / "utility"))
    args = parser.parse_args()

    evaluate = OmegaConf.load(ROOT / "conf" / "evaluate.yaml")
    options, augment_spec = evaluate.utility, OmegaConf.load(ROOT / "conf" / "augment" / "geometric.yaml")
    ratios = [int(r) for r in args.ratios.split(",")]
    steps = {"ddpm": args.ddpm_steps, "gan": args.gan_steps}
    kinds = args.generators.split(",")
    out = Path(args.out)
    print(f"generators {kinds} ({', '.join(f'{k}: {steps[k]} steps' for k in kinds)}), classifier "
          f"{options.steps} steps x {args.classifier_seeds} seeds per arm; runs in {out}", flush=True)
    results: dict[int, list[dict[str, Any]]] = {}
    for shots in (int(s) for s in args.shots.split(",")):
        for draw in range(args.draws):
            ckpts = {kind: train_generator(generator_overrides(kind, shots, draw, steps[kind]),
                                           out / f"n{shots}" / f"draw{draw}" / kind) for kind in kinds}
            measured = measure_draw(ckpts, ratios, options, augment_spec, list(range(args.classifier_seeds)))
            results.setdefault(shots, []).append(measured)
            print(f"  N={shots} draw {draw}: real {measured['real']:.3f}, real + classical "
                  f"{measured['real + classical']:.3f}; " + "; ".join(
                      f"{k} (memorised {v['memorisation']:.2f}) " + ", ".join(
                          f"{r}x {v[str(r)]['real + synthetic']:.3f}" for r in ratios)
                      for k, v in measured["generators"].items()), flush=True)
    rows = summarise(results, ratios)
    words = verdict(rows)
    print("\n" + table(rows) + "\n\n" + "\n".join(words))
    out.mkdir(parents=True, exist_ok=True)
    (out / "utility.json").write_text(json.dumps({"settings": vars(args), "classifier": OmegaConf.to_container(options),
                                                  "draws": results, "rows": rows, "verdict": words}, indent=2))


if __name__ == "__main__":
    main()
