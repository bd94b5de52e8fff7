"""The small-data recipes side by side, measured with evaluate.py: the table of the README's "Training recipes".

    python benchmarks/recipes.py gan --data ../shared/data/fibres128    # GAN on 64x64 fibre tiles, 4 recipes
    python benchmarks/recipes.py ddpm                                   # DDPM on 32x32 digits, 4 objectives
    python benchmarks/recipes.py ddpm --steps 600 --eval-at 200,600     # a smaller budget
    python benchmarks/recipes.py ddpm --others-steps 800                # the others only to the headline's 40%
    python benchmarks/recipes.py gan --only 0,2,4 --minutes 8           # DCGAN, DCGAN + DiffAugment + R1, FastGAN
                                                                        # at equal wall-clock time

Every recipe is trained by `train.py` from the same seed and data for the same number of optimizer steps (ddpm:
--others-steps for all but the first)
and measured by `evaluate.py` against the images the run held back (the training images for memorisation).
`gan` trains on a folder (the fibre tiles: 400 training tiles of positions 0-9, the 80 of positions 10 and 11 held
back, data.val_pattern);
`ddpm` on the bundled digits at 32x32 with data.val_fraction=0.2 (1438 training, 359 held-back digits), its
checkpoints measured at each step of --eval-at. Prints a markdown table and, last, the headline ratio.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLOOR = "real training tiles (the floor)"

DCGAN = ["model=gan", "model.generator.base_channels=32", "model.discriminator.base_channels=32"]
GAN_RECIPES = {
    "plain (bce)": [*DCGAN, "loss=bce"],
    "DiffAugment": [*DCGAN, "loss=bce", "model.diffaugment=[color,translation,cutout]"],
    "DiffAugment + R1": [*DCGAN, "loss=r1", "model.diffaugment=[color,translation,cutout]"],
    "DiffAugment + SN": [*DCGAN, "loss=hinge", "model.diffaugment=[color,translation,cutout]",
                         "model.discriminator.spectral_norm=true", "model.discriminator.norm=none"],
    # Its own defaults: hinge, DiffAugment color + translation; widths as experiment=fibres64_fastgan.
    "FastGAN": ["model=fastgan", "model.generator.width=32", "model.discriminator.width=32"],
    # The paper's few-shot batch (experiment=fibres64_fastgan): four times the steps in the same time.
    "FastGAN, batch 8": ["model=fastgan", "model.generator.width=32", "model.discriminator.width=32",
                         "data.batch_size=8"],
    "FastGAN, widths 16, batch 8": ["model=fastgan", "model.generator.width=16", "model.discriminator.width=16",
                                    "data.batch_size=8"],
}
DDPM_RECIPES = {
    "epsilon": ["model.prediction_type=epsilon", "model.loss_weighting=none"],
    "v-prediction": ["model.prediction_type=v_prediction", "model.loss_weighting=none"],
    "epsilon + min-SNR": ["model.prediction_type=epsilon", "model.loss_weighting=min_snr"],
    "v-prediction + min-SNR": ["model.prediction_type=v_prediction", "model.loss_weighting=min_snr"],
}
COLUMNS = {
    "gan": ["swd", "precision", "recall", "density", "coverage", "memorisation", "memorisation/repeats"],
    "ddpm": ["swd", "class_consistency", "precision", "recall", "memorisation"],
}


def run(script: str, *overrides: str, log: Path) -> None:
    """A top-level script in a fresh interpreter, as a user runs it; its output goes to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        result = subprocess.run([sys.executable, str(ROOT / script), *overrides], cwd=ROOT, stdout=f,
                                stderr=subprocess.STDOUT, env={**os.environ, "HYDRA_FULL_ERROR": "1"})
    if result.returncode:
        raise SystemExit(f"{script} failed (exit {result.returncode}); see {log}")


def measure(ckpt: Path, out: Path, num_samples: int, seed: int) -> dict[str, float]:
    run("evaluate.py", f"ckpt_path={ckpt}", f"num_samples={num_samples}", f"output_dir={out}", "overwrite=true",
        f"seed={seed}", "metrics=[swd,prdc,memorisation,class_consistency]", log=out / "evaluate.out")
    return json.loads((out / "metrics.json").read_text())["metrics"]


def real_floor(common: list[str], samples: int, seed: int) -> dict[str, float]:
    """`samples` of the training images measured as a generator's samples are, against the held-back ones: what a
    generator that drew the training set itself would score (other positions differ from the held-back ones)."""
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from fiberaug.metrics import evaluate_images

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        data = instantiate(compose("train", common).data)
    data.setup("fit")
    train, held = data.reference_images("train")[0], data.reference_images("val")[0]
    drawn = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:samples]]
    return evaluate_images(held, drawn, train=train, metrics=("swd", "prdc"), seed=seed).values


def torch_load_step(ckpt: Path) -> int:
    """The optimizer steps a checkpoint was saved at."""
    import torch

    return int(torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=["gan", "ddpm"])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "fibres128"), help="gan: images")
    parser.add_argument("--steps", type=int, help="optimizer steps (default: gan 3000, ddpm 2000)")
    parser.add_argument("--eval-at", default="400,800,2000", help="ddpm: the steps whose checkpoints are measured")
    parser.add_argument("--others-steps", type=int,
                        help="ddpm: steps of the recipes after the first (default: --steps); the headline asks "
                             "whether they reach the first's quality at its --steps within 40%% of them")
    parser.add_argument("--minutes", type=float, help="gan: train each recipe for this wall-clock time instead of "
                        "--steps (Lightning's trainer.max_time)")
    parser.add_argument("--held-out", default="*_s1[01].png",
                        help="gan: the images held back for measuring (data.val_pattern; default: positions 10, 11)")
    parser.add_argument("--samples", type=int, default=500, help="generated images per measurement")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "recipes"))
    parser.add_argument("--only", help="a comma-separated subset of the recipes, by position (0, 1, ...)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    recipes = GAN_RECIPES if args.model == "gan" else DDPM_RECIPES
    if args.only:
        recipes = {k: v for i, (k, v) in enumerate(recipes.items()) if str(i) in args.only.split(",")}
    steps = args.steps or (3000 if args.model == "gan" else 2000)
    eval_at = [steps] if args.model == "gan" else sorted({int(s) for s in args.eval_at.split(",")} | {steps})
    others_steps = args.others_steps or steps
    if args.model == "gan" and others_steps != steps:
        raise SystemExit("--others-steps is for ddpm: every GAN recipe trains --steps steps")
    if args.model == "gan":
        if not Path(args.data).is_dir():
            raise SystemExit(f"--data {args.data} is not a folder of images")
        # Split by position (the fibre tiles' README): a position's tiles share their starting noise.
        common = ["data=folder", f"data.root={args.data}", "data.image_size=64", "data.channels=3",
                  "data.labels=none", f"data.val_pattern='{args.held_out}'", "data.batch_size=32",
                  "callbacks.sample_grid.num_samples=36"]
        if args.minutes:  # equal wall-clock: the steps are whatever each recipe reaches
            seconds = round(args.minutes * 60)
            common += [f"+trainer.max_time=00:00:{seconds // 60:02d}:{seconds % 60:02d}"]
            steps = others_steps = 10**7
            eval_at = [steps]
    else:
        every = math.gcd(*eval_at, others_steps)  # a checkpoint at every step measured
        # The checkpoints are measured afterwards, so no sampling during training.
        common = ["data.image_size=32", "data.val_fraction=0.2", "~callbacks.metrics",
                  "callbacks.model_checkpoint.monitor=null",
                  "callbacks.model_checkpoint.save_top_k=-1",
                  f"+callbacks.model_checkpoint.every_n_train_steps={every}",
                  "callbacks.model_checkpoint.filename='step{step:07d}'"]
    out = Path(args.out) / args.model
    print(f"{args.model}: {steps} optimizer steps, seed {args.seed}, {args.samples} samples per measurement; "
          f"runs in {out}", flush=True)
    rows: dict[str, dict[int, dict[str, float]]] = {}
    for i, (name, overrides) in enumerate(recipes.items()):
        budget = steps if i == 0 else others_steps
        slug = "".join(c for c in name.replace("+", "_") if c.isalnum() or c == "_")
        run_dir = out / slug
        start = time.perf_counter()
        if not (run_dir / "checkpoints" / "last.ckpt").is_file():
            run("train.py", *common, *overrides, f"trainer.max_steps={budget}", f"seed={args.seed}",
                f"hydra.run.dir={run_dir}", log=run_dir / "train.out")
        trained = time.perf_counter() - start
        rows[name] = {}
        for step in sorted({s for s in eval_at if s <= budget} | {budget}):
            ckpt = run_dir / "checkpoints" / ("last.ckpt" if step == budget else f"step{step:07d}.ckpt")
            rows[name][step] = measure(ckpt, run_dir / f"eval-{step}", args.samples, args.seed)
        if args.minutes:  # measured at whatever step the time allowed
            reached = torch_load_step(run_dir / "checkpoints" / "last.ckpt")
            rows[name] = {reached: rows[name].pop(budget)}
        print(f"  {name}: trained in {trained / 60:.1f} min; " + ", ".join(
            f"step {s}: swd {v['swd']:.1f}" for s, v in rows[name].items()), flush=True)

    if args.model == "gan":
        rows[FLOOR] = {0: real_floor(common, args.samples, args.seed)}
    columns = COLUMNS[args.model]
    print(f"\n| recipe | steps | {' | '.join(columns)} |\n| --- | --- |{' --- |' * len(columns)}")
    for name, by_step in rows.items():
        for step, values in by_step.items():
            cells = " | ".join(f"{values[c]:.3f}" if c in values else "–" for c in columns)
            print(f"| {name} | {step if name != FLOOR else '–'} | {cells} |")
    first, *others = [name for name in rows if name != FLOOR]
    if args.model == "gan":
        final = {name: next(iter(by_step.values())) if args.minutes else by_step[steps]
                 for name, by_step in rows.items() if name != FLOOR}
        best = min(others, key=lambda n: final[n]["swd"]) if others else first
        print(f"\nrecall of {best}: {final[best]['recall']:.3f}")
        print(f"SWD {best} / {first}: {final[best]['swd'] / final[first]['swd']:.2f}")
        print(f"SWD {FLOOR} / {first}: {rows[FLOOR][0]['swd'] / final[first]['swd']:.2f}")
    else:
        target = rows[first][steps]
        reached = {n: next((s for s, v in rows[n].items() if v["swd"] <= target["swd"] and
                            v["class_consistency"] >= target["class_consistency"]), None) for n in rows}
        for n, s in reached.items():
            print(f"steps for {n} to reach {first}'s SWD and class consistency at {steps}: {s or 'not within budget'}")
        best = min((n for n in others if reached[n]), key=lambda n: reached[n], default=None)
        ratio = reached[best] / steps if best else float("nan")
        print(f"steps to {first}'s quality, {best} / {first}: {ratio:.2f}")


if __name__ == "__main__":
    main()
