"""The float16 paths, which only CUDA runs (on the CPU `precision=16` becomes bf16-mixed): loss scaling,
clipping after unscaling, the float32 gradient penalty, float32 LoRA adapters, and sampling on the GPU.

Skipped on machines without CUDA; run them on one with `make test PYTEST_ARGS=tests/test_cuda.py`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, compose_config
from PIL import Image
from test_gan import GAN_TINY, _scalars

from fiberaug.models import load_generator
from fiberaug.models.gan_losses import gradient_penalty
from fiberaug.nets import Discriminator
from fiberaug.tasks.train import resolve_precision, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA, where precision=16 is float16")


def _checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def test_precision_16_trains_in_float16_with_a_loss_scaler(tmp_path):
    assert resolve_precision(16) == "16-mixed"
    train(compose_config("train", [*TINY, "trainer.precision=16", "trainer.max_steps=6"], tmp_path))
    ckpt = _checkpoint(tmp_path)
    assert ckpt["global_step"] == 6
    assert ckpt["MixedPrecision"]["scale"] > 0, "no GradScaler state: the run was not float16 mixed precision"
    assert np.isfinite([v for _, v in _scalars(tmp_path, "loss/train")]).all()


def test_gan_clips_the_unscaled_gradient_under_float16(tmp_path, monkeypatch):
    """Each applied gradient has norm `clip`: clipping the scaled one would leave clip / scale (~1e-8)."""
    applied: list[float] = []
    step = torch.optim.Adam.step

    def recording_step(self, *args, **kwargs):
        grads = [p.grad.float().flatten() for group in self.param_groups for p in group["params"] if p.grad is not None]
        applied.append(torch.cat(grads).norm().item())
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    overrides = ["trainer.precision=16", "model.gradient_clip_val=0.001", "trainer.max_steps=8"]
    train(compose_config("train", [*GAN_TINY, *overrides], tmp_path))
    assert applied, "no optimizer step was taken"
    assert all(0.001 * 0.99 <= norm <= 0.001 * 1.001 for norm in applied), applied
    assert min(v for _, v in _scalars(tmp_path, "train/grad_norm_critic")) > 0.01  # the norm before clipping


def test_wgan_gp_trains_under_float16_with_a_float32_penalty(tmp_path):
    train(compose_config("train", [*GAN_TINY, "loss=wasserstein", "trainer.precision=16", "trainer.max_steps=6"],
                         tmp_path))
    assert _checkpoint(tmp_path)["gan"] == {"critic_steps": 5, "generator_steps": 1}
    assert np.isfinite([v for _, v in _scalars(tmp_path, "train/gradient_penalty")]).all()

    torch.manual_seed(0)
    critic = Discriminator(channels=1, image_size=16, num_classes=3, base_channels=8).cuda()
    real, fake = torch.rand(4, 1, 16, 16, device="cuda"), torch.rand(4, 1, 16, 16, device="cuda")
    labels = torch.tensor([0, 1, 2, 0], device="cuda")
    exact = gradient_penalty(critic, real, fake, labels, generator=torch.Generator("cuda").manual_seed(0))
    with torch.autocast("cuda", dtype=torch.float16):
        mixed = gradient_penalty(critic, real, fake, labels, generator=torch.Generator("cuda").manual_seed(0))
    assert mixed.dtype == torch.float32 and torch.allclose(mixed, exact, rtol=1e-4)


def test_lora_adapters_stay_float32_under_16_mixed(tmp_path):
    overrides = [
        "model=diffusers_lora", *(o for o in TINY if not o.startswith("model.denoiser")),
        "model.denoiser.block_out_channels=[16,32]", "model.denoiser.attention=[false,true]",
        "model.lora_on_random_base=true", "model.lora.r=2", "trainer.precision=16", "trainer.max_steps=3",
    ]
    train(compose_config("train", overrides, tmp_path))
    state = _checkpoint(tmp_path)["state_dict"]
    assert {v.dtype for k, v in state.items() if "lora_" in k} == {torch.float32}


def test_samples_on_the_gpu_match_the_cpu(trained_run):
    model = load_generator(trained_run / "checkpoints" / "last.ckpt")
    cpu = model.sample(4, seed=3, steps=4)
    gpu = model.to("cuda").sample(4, seed=3, steps=4)
    assert gpu.device.type == "cpu" and torch.allclose(cpu, gpu, atol=2e-2)


def test_sample_py_on_cuda_denoises_under_float16_autocast_close_to_the_cpu(trained_run, tmp_path, monkeypatch):
    from fiberaug.models.base import GenerativeModule
    from fiberaug.tasks.sample import sample

    dtypes = []
    original = GenerativeModule.sample_draws

    def recording(model, *args, **kwargs):
        dtypes.append(torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None)
        return original(model, *args, **kwargs)

    monkeypatch.setattr(GenerativeModule, "sample_draws", recording)
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    common = [f"ckpt_path={ckpt}", "num_samples=4", "steps=4", "filter.max_copy_ratio=null"]
    gpu = sample(compose_config("sample", [*common, "device=cuda", f"output_dir={tmp_path / 'gpu'}"]))
    cpu = sample(compose_config("sample", [*common, "device=cpu", f"output_dir={tmp_path / 'cpu'}"]))
    assert dtypes == [torch.float16, None]
    for path in sorted(cpu.rglob("[!.]*/*.png")):
        a = np.asarray(Image.open(path), dtype=int)
        b = np.asarray(Image.open(gpu / path.relative_to(cpu)), dtype=int)
        assert np.abs(a - b).max() <= 8, path


def test_adam_and_adamw_are_fused_on_cuda(tmp_path):
    from fiberaug.models.diffusion import DiffusionModule

    model = DiffusionModule(denoiser={"_target_": "fiberaug.nets.ContextUNet", "base_channels": 8},
                            image_size=8, channels=1).cuda()
    optimizer = model.configure_optimizers()["optimizer"]
    assert optimizer.defaults["fused"] is True


def test_a_training_step_that_does_not_log_never_waits_for_the_gpu(tmp_path):
    """torch raises on any host-device synchronisation inside the steps between two logging steps."""
    import pytorch_lightning as pl

    import fiberaug.tasks.train as train_task

    class Strict(pl.Callback):
        def on_train_batch_start(self, trainer, *args) -> None:
            quiet = (trainer.global_step + 1) % trainer.log_every_n_steps and trainer.global_step > 0
            torch.cuda.set_sync_debug_mode("error" if quiet else "default")

        def on_train_batch_end(self, *args) -> None:
            torch.cuda.set_sync_debug_mode("default")

    instantiate = train_task.instantiate
    try:
        train_task.instantiate = lambda cfg, *a, **k: instantiate(
            cfg, *a, **({**k, "callbacks": [*k["callbacks"], Strict()]} if "callbacks" in k else k))
        train(compose_config("train", [*TINY, "trainer.max_steps=8", "trainer.log_every_n_steps=4"], tmp_path))
    finally:
        train_task.instantiate = instantiate
        torch.cuda.set_sync_debug_mode("default")
