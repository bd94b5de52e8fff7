"""Training throughput: FiberAug's training loop against a bare PyTorch loop on the same model, batch and precision.

    python benchmarks/throughput.py                        # the cases that fit the device (see below)
    python benchmarks/throughput.py --cases unet128 --steps 30

Each case trains one model from the configs (`conf/model/…`) on a fixed batch of random images kept in memory,
so only the training loop is measured (`benchmarks/data_loading.py` measures the data side):

- bare: a plain PyTorch loop, as diffusers' training examples write it: the model's own loss, backward,
  gradient clipping, the optimizer step and an EMA lerp; float16 autocast with a GradScaler on CUDA, float32
  on the CPU; no TF32, no channels_last, no fused optimizer, no compile.
- FiberAug: `Trainer.fit` with the default callbacks (EMA, checkpointing off the timed steps, learning-rate
  monitor) and TensorBoard logging every 10 steps, at the same settings ("same"), with the defaults a user
  gets ("defaults": TF32 matmuls, fused AdamW on CUDA) and with every throughput option ("options": defaults
  + channels_last, and bf16-mixed instead of float16 on CUDA; `--compile` adds torch.compile).

Images per second over the timed steps (after warm-up steps), in a fresh process per variant. On CUDA the
cases are the ContextUNet and the diffusers UNet at 64 and 128 and the GAN at 64; on a CPU the 64×64 ones.
Ends with the headline ratio: FiberAug with its options over the bare loop on the diffusers UNet at the largest
size measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "context64": (64, ["model=ddpm", "model.denoiser.base_channels=64", "model.denoiser.channel_mults=[1,2,2,4]"]),
    "unet64": (64, ["experiment=fibres128_unet"]),
    "context128": (128, ["experiment=fibres128_ddpm"]),
    "unet128": (128, ["experiment=fibres128_unet"]),
    "gan64": (64, ["model=gan", "model.generator.base_channels=64", "model.discriminator.base_channels=64"]),
}
VARIANTS = ("bare", "same", "defaults", "options")


def build(case: str, options: list[str]):
    size, overrides = CASES[case]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", [*overrides, "model.gradient_checkpointing=false", *options])
    loss = {"loss": cfg.loss} if "gan" in case else {}
    model = instantiate(cfg.model, image_size=size, channels=3, class_names=[], **loss)
    return cfg, model, size


def images_per_second(seconds: float, steps: int, batch: int) -> float:
    return steps * batch / seconds


def bare(case: str, batch: int, steps: int, warmup: int, device: torch.device) -> float:
    """The plain loop; returns images per second."""
    cfg, model, size = build(case, [])
    model = model.to(device).train()
    x = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    labels = torch.full((batch,), -1, device=device)
    cuda = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    autocast = torch.autocast(device.type, dtype=torch.float16, enabled=cuda)
    nets = model.networks()
    optimizers = [torch.optim.Adam(n.parameters(), lr=1e-4) for n in nets] if "gan" in case else [
        torch.optim.AdamW(model.parameters(), lr=1e-4)]
    ema = [p.detach().clone() for p in model.parameters()] if "gan" not in case else []

    def update(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    def step() -> None:
        if "gan" in case:  # one critic and one generator step, as GANModule with loss=bce
            generator, critic = nets
            bce = torch.nn.functional.binary_cross_entropy_with_logits
            latent = lambda: torch.randn(batch, model.hparams.latent_dim, device=device)  # noqa: E731
            with autocast:
                real, fake = critic(x).float(), critic(generator(latent()).detach()).float()
                loss = bce(real, torch.ones_like(real)) + bce(fake, torch.zeros_like(fake))
            update(optimizers[1], loss)
            critic.requires_grad_(False)  # as Lightning's toggled optimizer: no critic gradients in this step
            with autocast:
                scores = critic(generator(latent())).float()
            update(optimizers[0], bce(scores, torch.ones_like(scores)))
            critic.requires_grad_(True)
            return
        with autocast:
            loss = model._loss((x, labels))
        optimizers[0].zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizers[0])
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizers[0])
        scaler.update()
        torch._foreach_lerp_(ema, [p.detach() for p in model.parameters()], 0.001)

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    return images_per_second(time.perf_counter() - start, steps, batch)


def fiberaug(case: str, variant: str, batch: int, steps: int, warmup: int, device: torch.device,
             compile_: bool) -> float:
    """FiberAug's loop through `Trainer.fit`; returns images per second over the steps after `warmup`."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    from fiberaug.tasks.train import set_matmul_precision

    cuda = device.type == "cuda"
    options = {"same": ["matmul_precision=highest"], "defaults": [],
               "options": ["model.channels_last=true", *(["model.compile=true"] if compile_ else [])]}[variant]
    cfg, model, size = build(case, options)
    set_matmul_precision(cfg.matmul_precision)
    if variant == "same" and cuda:
        model.fused = lambda: {}  # as the bare loop: no fused optimizer
    precision = ("bf16-mixed" if variant == "options" else "16-mixed") if cuda else "32"
    total = warmup + steps
    images = (torch.rand(batch, 3, size, size) * 2 - 1).repeat(total, 1, 1, 1)
    data = TensorDataset(images, torch.full((batch * total,), -1))
    loader = DataLoader(data, batch_size=batch)  # one epoch: no epoch-end work inside the timed steps

    class Clock(pl.Callback):
        """Times the batches after the warm-up ones (a GAN batch is a critic and a generator step)."""

        batches, start, end = 0, 0.0, 0.0

        def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
            self.batches += 1
            if self.batches in (warmup, total):
                if cuda:
                    torch.cuda.synchronize()
                if self.batches == warmup:
                    self.start = time.perf_counter()
                else:
                    self.end = time.perf_counter()

    clock = Clock()
    callbacks = [instantiate(c) for name, c in cfg.callbacks.items()
                 if c and name not in ("sample_grid", "metrics", "model_checkpoint")]
    with tempfile.TemporaryDirectory() as folder:
        per_batch = 2 if "gan" in case else 1  # a GAN batch is a critic and a generator step
        trainer = pl.Trainer(
            accelerator=device.type, devices=1, precision=precision, max_steps=per_batch * total,
            callbacks=[*callbacks, clock], logger=pl.loggers.TensorBoardLogger(folder), log_every_n_steps=10,
            gradient_clip_val=None if "gan" in case else 1.0, enable_checkpointing=False, enable_model_summary=False,
            num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=folder, enable_progress_bar=False,
        )
        trainer.fit(model, train_dataloaders=loader)
    return images_per_second(clock.end - clock.start, steps, batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, help="timed steps (default 50 on CUDA, 5 on a CPU)")
    parser.add_argument("--warmup", type=int, help="steps before timing (default 10 on CUDA, 2 on a CPU)")
    parser.add_argument("--compile", action="store_true", help="add torch.compile to the options variant")
    parser.add_argument("--one", nargs=2, metavar=("CASE", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    steps, warmup = args.steps or (50 if cuda else 5), args.warmup or (10 if cuda else 2)
    if args.one:
        case, variant = args.one
        rate = (bare(case, args.batch_size, steps, warmup, device) if variant == "bare" else
                fiberaug(case, variant, args.batch_size, steps, warmup, device, args.compile))
        print(json.dumps({"images_per_s": rate}))
        return

    cases = args.cases.split(",") if args.cases else (list(CASES) if cuda else ["context64", "unet64", "gan64"])
    name = torch.cuda.get_device_name() if cuda else f"CPU, {len(os.sched_getaffinity(0))} usable cores"
    print(f"device: {name}; batch {args.batch_size}, {warmup} warm-up + {steps} timed steps, torch {torch.__version__}")
    print(f"{'case':<12}" + "".join(f"{v:>12}" for v in VARIANTS) + f"{'same/bare':>12}{'options/bare':>14}")
    results: dict[str, dict[str, float]] = {}
    for case in cases:
        results[case] = {}
        for variant in VARIANTS:
            cmd = [sys.executable, __file__, "--one", case, variant, "--batch-size", str(args.batch_size),
                   "--steps", str(steps), "--warmup", str(warmup), *(["--compile"] if args.compile else [])]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if out.returncode:
                raise SystemExit(f"{case} {variant} failed:\n{out.stderr[-3000:]}")
            results[case][variant] = json.loads(out.stdout.splitlines()[-1])["images_per_s"]
        r = results[case]
        print(f"{case:<12}" + "".join(f"{r[v]:>12.1f}" for v in VARIANTS)
              + f"{r['same'] / r['bare']:>12.2f}{r['options'] / r['bare']:>14.2f}", flush=True)
    headline = next(c for c in ("unet128", "unet64", *cases) if c in results)
    r = results[headline]
    print(f"training loop / bare loop, same settings ({headline}): {r['same'] / r['bare']:.2f}")
    print(f"FiberAug with its options / plain bare loop ({headline}): {r['options'] / r['bare']:.2f}")


if __name__ == "__main__":
    main()
