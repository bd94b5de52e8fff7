"""The GAN: networks, losses and gradient penalty, manual optimization through train.py, resume and sampling."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config, run_script
from hydra.utils import instantiate
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from fiberaug.callbacks import ModelCheckpoint
from fiberaug.errors import UserError
from fiberaug.models import load_generator
from fiberaug.models.gan import GANModule
from fiberaug.models.gan_losses import adversarial_loss, gradient_penalty
from fiberaug.nets import Discriminator, Generator
from fiberaug.tasks import run_task
from fiberaug.tasks.train import train

# A GAN small enough for seconds on two CPU cores: 16×16 digits, narrow networks, 10 optimizer steps.
GAN_TINY = [
    "model=gan",
    "debug=fast",
    "model.generator.base_channels=8",
    "model.discriminator.base_channels=8",
    "model.latent_dim=8",
    "callbacks.sample_grid.num_samples=4",
]


def _checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def _scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def _adam_steps(ckpt: dict) -> list[int]:
    """How often the generator's and the critic's Adam stepped."""
    return [int(opt["state"][0]["step"]) for opt in ckpt["optimizer_states"]]


@pytest.fixture(scope="module")
def wgan_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny WGAN-GP run through `train.py`, shared by the tests that resume or sample from it."""
    run_dir = tmp_path_factory.mktemp("wgan")
    result = run_script("train.py", *GAN_TINY, "loss=wasserstein", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_wgan_gp_trains_through_the_script(wgan_run):
    ckpt = _checkpoint(wgan_run)
    # n_critic=5: batches 1-4 step the critic, batch 5 the critic and then the generator, ... up to 10 steps.
    assert ckpt["global_step"] == 10 and ckpt["gan"] == {"critic_steps": 9, "generator_steps": 1}
    assert _adam_steps(ckpt) == [1, 9]
    for tag in ("loss/critic", "train/gradient_penalty", "train/wasserstein", "train/grad_norm_critic"):
        values = [v for _, v in _scalars(wgan_run, tag)]
        assert len(values) == 9 and np.isfinite(values).all(), tag
    assert [step for step, _ in _scalars(wgan_run, "loss/generator")] == [6]  # logged at optimizer steps
    assert (wgan_run / "samples" / "epoch0001-step0000010.png").is_file()


@pytest.mark.parametrize("loss", ["bce", "hinge"])
def test_other_losses_train_and_checkpoint(tmp_path, loss):
    train(compose_config("train", [*GAN_TINY, f"loss={loss}"], tmp_path))
    ckpt = _checkpoint(tmp_path)
    assert ckpt["global_step"] == 10 and ckpt["gan"] == {"critic_steps": 5, "generator_steps": 5}
    assert ckpt["hyper_parameters"]["loss"]["name"] == loss
    assert np.isfinite([v for _, v in _scalars(tmp_path, "loss/generator")]).all()


def test_n_critic_critic_steps_per_generator_step_each_with_its_scheduler(tmp_path):
    overrides = ["loss=wasserstein", "loss.n_critic=3", "model.warmup_steps=4"]
    train(compose_config("train", [*GAN_TINY, *overrides], tmp_path))
    ckpt = _checkpoint(tmp_path)
    # Eight batches, each one critic step on its own real batch; the generator after every third.
    assert _adam_steps(ckpt) == [2, 8] and ckpt["global_step"] == 10
    steps = [1, 2, 4, 5, 6, 8, 9, 10]
    assert _scalars(tmp_path, "train/generator_step") == list(zip(steps, [0, 0, 1, 1, 1, 2, 2, 2]))
    # Each warmup schedule advances with its own network's steps: lr · min(1, (steps + 1) / 4).
    lr = lambda steps: pytest.approx(1e-4 * min(1.0, (steps + 1) / 4))  # noqa: E731
    assert [v for _, v in _scalars(tmp_path, "lr/generator")] == [lr(n) for n in (0, 0, 1, 1, 1, 2, 2, 2)]
    assert [v for _, v in _scalars(tmp_path, "lr/critic")] == [lr(n) for n in range(1, 9)]


def test_losses_match_their_formulas():
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    softplus = nn.functional.softplus
    bce, hinge, wgan = (adversarial_loss(name) for name in ("bce", "hinge", "wasserstein"))
    assert torch.isclose(bce.critic(real, fake), softplus(-real).mean() + softplus(fake).mean())
    assert torch.isclose(bce.generator(fake), softplus(-fake).mean())  # non-saturating: -log σ(D(G(z)))
    assert torch.isclose(hinge.critic(real, fake), torch.tensor((0 + 2) / 2 + (1.5 + 0) / 2))
    assert torch.isclose(wgan.critic(real, fake), fake.mean() - real.mean())
    assert torch.isclose(wgan.generator(fake), -fake.mean()) and torch.isclose(hinge.generator(fake), -fake.mean())
    with pytest.raises(UserError, match="loss.name='lsgan' is not known; choose one of: bce, hinge, wasserstein"):
        adversarial_loss("lsgan")


def test_gradient_penalty_matches_hand_computation_on_a_linear_critic():
    # D(x) = w·x + b has the gradient w everywhere, so the penalty is (‖w‖ − 1)² = (5 − 1)².
    w = torch.tensor([3.0, 0.0, 0.0, 4.0], requires_grad=True)
    critic = lambda x, labels: x.flatten(1) @ w + 1.0  # noqa: E731
    real, fake = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2)
    penalty = gradient_penalty(critic, real, fake)
    assert torch.isclose(penalty, torch.tensor(16.0))
    penalty.backward()  # possible only with create_graph=True: d/dw (‖w‖ − 1)² = 2(‖w‖ − 1) w / ‖w‖
    assert torch.allclose(w.grad, 2 * 4 * w.detach() / 5)


def test_gradient_penalty_is_taken_at_per_sample_interpolates():
    # D(x) = (w·x)² / 2 has the gradient (w·x) w: its norm depends on where each sample is interpolated.
    w = torch.tensor([1.0, -2.0, 0.5, 1.0])
    critic = lambda x, labels: (x.flatten(1) @ w).square() / 2  # noqa: E731
    real, fake = torch.randn(4, 1, 2, 2), torch.randn(4, 1, 2, 2)
    alpha = torch.rand(4, 1, 1, 1, generator=torch.Generator().manual_seed(3))
    mixed = (alpha * real + (1 - alpha) * fake).flatten(1)
    expected = ((mixed @ w).abs() * w.norm() - 1).square().mean()
    assert torch.isclose(gradient_penalty(critic, real, fake, generator=torch.Generator().manual_seed(3)), expected)


def test_gradient_penalty_runs_in_float32_under_autocast():
    torch.manual_seed(0)
    critic = Discriminator(channels=1, image_size=16, num_classes=3, base_channels=8)
    real, fake, labels = torch.rand(4, 1, 16, 16), torch.rand(4, 1, 16, 16), torch.tensor([0, 1, 2, 0])
    exact = gradient_penalty(critic, real, fake, labels, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = gradient_penalty(critic, real, fake, labels, generator=torch.Generator().manual_seed(0))
    assert mixed.dtype == torch.float32 and torch.allclose(mixed, exact, rtol=1e-5)


def test_gradient_checkpointing_supports_the_penalty_double_backward():
    real, fake, labels = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16), torch.tensor([0, 1])
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        critic = Discriminator(channels=3, image_size=16, num_classes=2, base_channels=8, extra_layers=1)
        if checkpointing:
            critic.enable_gradient_checkpointing()
        gradient_penalty(critic, real, fake, labels, generator=torch.Generator().manual_seed(1)).backward()
        grads.append(torch.cat([p.grad.flatten() for p in critic.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


@pytest.mark.parametrize(("channels", "size"), [(1, 16), (3, 32), (3, 64)])
def test_networks_are_sized_from_the_data(channels, size):
    torch.manual_seed(0)
    gen = Generator(channels, size, num_classes=4, latent_dim=16, base_channels=8, extra_layers=1)
    disc = Discriminator(channels, size, num_classes=4, base_channels=8, extra_layers=1)
    images = gen(torch.randn(5, 16), torch.tensor([0, 1, 2, 3, 0]))
    assert images.shape == (5, channels, size, size) and images.abs().max() <= 1
    assert disc(images, torch.tensor([0, 1, 2, 3, 0])).shape == (5,)
    weights = torch.cat([m.weight.flatten() for m in disc.modules() if isinstance(m, nn.Conv2d)])
    assert abs(weights.std().item() - 0.02) < 0.002  # DCGAN's N(0, 0.02)


@pytest.mark.parametrize("size", [8, 24, 48])
def test_sizes_other_than_powers_of_two_from_16_are_refused(size):
    message = f"data.image_size={size} does not fit the DCGAN generator: it takes powers of two from 16 up"
    with pytest.raises(UserError, match=message):
        Generator(channels=1, image_size=size)


def test_model_gan_config_and_command_line_precedence(tmp_path):
    cfg = compose_config("train", ["model=gan"], tmp_path)
    assert cfg.loss.name == "bce" and cfg.trainer.max_steps == 4000 and cfg.trainer.gradient_clip_val is None
    assert cfg.callbacks.ema is None and cfg.callbacks.model_checkpoint.monitor == "val/swd"
    cfg = compose_config("train", ["model=gan", "loss=wasserstein", "model.latent_dim=32", "trainer.max_steps=7"])
    assert (cfg.loss.name, cfg.loss.n_critic, cfg.model.latent_dim, cfg.trainer.max_steps) == ("wasserstein", 5, 32, 7)


def test_unlabelled_images_train_an_unconditional_gan(image_folder, tmp_path):
    data = ["data=folder", f"data.root={image_folder()}", "data.labels=none", "data.image_size=16", "data.channels=3"]
    train(compose_config("train", [*GAN_TINY, *data, "trainer.max_steps=4"], tmp_path / "run"))
    model = load_generator(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert model.num_classes == 0 and model.generator.embedding is None
    assert model.sample(2, seed=0).shape == (2, 3, 16, 16)


@pytest.mark.parametrize(("loss", "has_batchnorm"), [("wasserstein", False), ("bce", True)])
def test_critic_batchnorm_only_without_a_gradient_penalty(tmp_path, loss, has_batchnorm):
    norm = [] if loss == "wasserstein" else ["model.discriminator.norm=batch"]
    cfg = compose_config("train", ["model=gan", f"loss={loss}", *norm], tmp_path)
    model = instantiate(cfg.model, image_size=16, channels=1, class_names=["a", "b"], loss=cfg.loss)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.discriminator.modules()) == has_batchnorm
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.generator.modules())


def test_resume_continues_the_step_counts(wgan_run, tmp_path):
    cfg = compose_config(
        "train", [*GAN_TINY, "loss=wasserstein", f"ckpt_path={wgan_run / 'checkpoints' / 'last.ckpt'}",
                  "trainer.max_steps=16"], tmp_path,
    )
    train(cfg)
    ckpt = _checkpoint(tmp_path)
    # From 9 critic + 1 generator steps: the 10th critic step is followed by the 2nd generator step.
    assert ckpt["global_step"] == 16 and ckpt["gan"] == {"critic_steps": 14, "generator_steps": 2}
    assert _adam_steps(ckpt) == [2, 14]
    assert min(step for step, _ in _scalars(tmp_path, "loss/critic")) == 12


def test_resume_from_an_epoch_boundary_ends_bit_identical(tmp_path):
    """Noise, gradient-penalty interpolates and data order continue where the checkpoint left them."""
    train(compose_config("train", [*GAN_TINY, "loss=wasserstein"], tmp_path / "whole"))
    train(compose_config("train", [*GAN_TINY, "loss=wasserstein", "trainer.max_steps=5"], tmp_path / "first"))
    resume = tmp_path / "first" / "checkpoints" / "last.ckpt"
    train(compose_config("train", [*GAN_TINY, "loss=wasserstein", f"ckpt_path={resume}"], tmp_path / "resumed"))
    whole, resumed = _checkpoint(tmp_path / "whole"), _checkpoint(tmp_path / "resumed")
    assert all(torch.equal(whole["state_dict"][k], v) for k, v in resumed["state_dict"].items())
    for a, b in zip(whole["optimizer_states"], resumed["optimizer_states"], strict=True):
        assert all(torch.equal(a["state"][i]["exp_avg"], s["exp_avg"]) for i, s in b["state"].items())
    assert whole["gan"] == resumed["gan"]


def test_a_snapshot_is_kept_at_every_snapshot_epoch_the_last_one_included(tmp_path):
    # Five batches an epoch, each a critic and a generator step: epochs end at steps 10 and 20.
    snapshots = ["callbacks.model_checkpoint.monitor=null", "callbacks.model_checkpoint.save_top_k=-1",
                 "callbacks.model_checkpoint.filename='epoch{epoch:04d}-step{step:07d}'"]
    overrides = [*snapshots, "callbacks.model_checkpoint.every_n_epochs=1", "trainer.max_steps=20"]
    train(compose_config("train", [*GAN_TINY, *overrides], tmp_path))
    snapshots = sorted(p.name for p in (tmp_path / "checkpoints").glob("epoch*.ckpt"))
    assert snapshots == ["epoch0000-step0000010.ckpt", "epoch0001-step0000020.ckpt"]


# Ranked by a value that never improves (the generator's step, lower is better): the best stays the first save.
NEVER_BETTER = ["callbacks.model_checkpoint.monitor=train/generator_step", "callbacks.model_checkpoint.mode=min",
                "callbacks.model_checkpoint.every_n_epochs=1"]


def test_last_checkpoint_is_the_state_at_the_last_save_point_not_the_best(tmp_path, monkeypatch):
    """A run killed at step 35 resumes from its last epoch end (step 30), though its best checkpoint is step 10."""
    step = GANModule.training_step

    def crash(self, batch, batch_idx):
        if self.global_step == 34:
            raise RuntimeError("killed")
        step(self, batch, batch_idx)

    monkeypatch.setattr(GANModule, "training_step", crash)
    with pytest.raises(RuntimeError, match="killed"):
        train(compose_config("train", [*GAN_TINY, *NEVER_BETTER, "trainer.max_steps=40"], tmp_path))
    (best,) = (tmp_path / "checkpoints").glob("best-*.ckpt")
    assert torch.load(best, map_location="cpu", weights_only=True)["global_step"] == 10
    assert _checkpoint(tmp_path)["global_step"] == 30


def test_step_triggered_save_points_write_last_once_each(tmp_path, monkeypatch):
    """Lightning writes last.ckpt after every step-triggered top-k check itself; it is not written twice."""
    written = []
    save = ModelCheckpoint._save_checkpoint

    def record(self, trainer, filepath):
        written.append((trainer.global_step, Path(filepath).name))
        save(self, trainer, filepath)

    monkeypatch.setattr(ModelCheckpoint, "_save_checkpoint", record)
    overrides = [*NEVER_BETTER, "~callbacks.model_checkpoint.every_n_epochs", "trainer.max_steps=20",
                 "+callbacks.model_checkpoint.every_n_train_steps=4"]
    train(compose_config("train", [*GAN_TINY, *overrides], tmp_path))
    assert [step for step, name in written if name == "last.ckpt"] == [4, 8, 12, 16, 20]


def test_a_run_stopped_between_save_points_ends_with_its_final_state(tmp_path, monkeypatch):
    """A stop as `trainer.max_time`'s timer or early stopping makes it (`should_stop`), here after the batch that
    ends at step 36, between the epoch ends at 30 and 40: last.ckpt is the state at 36."""
    step = GANModule.training_step

    def stop(self, batch, batch_idx):
        step(self, batch, batch_idx)
        self.trainer.should_stop = self.global_step == 36

    monkeypatch.setattr(GANModule, "training_step", stop)
    train(compose_config("train", [*GAN_TINY, *NEVER_BETTER, "trainer.max_steps=100"], tmp_path))
    ckpt = _checkpoint(tmp_path)
    assert ckpt["global_step"] == 36 and ckpt["gan"] == {"critic_steps": 18, "generator_steps": 18}


def test_precision_16_trains_the_wgan_gp(tmp_path, caplog):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA, where precision=16 runs float16")
    overrides = ["loss=wasserstein", "trainer.precision=16", "trainer.max_steps=6"]
    cfg = compose_config("train", [*GAN_TINY, *overrides], tmp_path)
    with caplog.at_level(logging.WARNING):
        train(cfg)
    assert "training runs bf16-mixed instead" in caplog.text
    assert _checkpoint(tmp_path)["gan"] == {"critic_steps": 5, "generator_steps": 1}
    assert np.isfinite([v for _, v in _scalars(tmp_path, "train/gradient_penalty")]).all()


def test_gradient_clipping_bounds_each_networks_gradient(tmp_path):
    train(compose_config("train", [*GAN_TINY, "model.gradient_clip_val=0.001", "trainer.max_steps=2"], tmp_path))
    # After Adam's first step exp_avg = (1 - β₁)·g, with β₁ = 0.5 for loss=bce: the gradient that was applied.
    for opt in _checkpoint(tmp_path)["optimizer_states"]:
        applied = torch.cat([2 * state["exp_avg"].flatten() for state in opt["state"].values()])
        assert 0.001 * 0.99 <= applied.norm() <= 0.001 * 1.001
    assert min(v for _, v in _scalars(tmp_path, "train/grad_norm_critic")) > 0.01  # the norm before clipping


def test_sample_script_on_a_gan_checkpoint(wgan_run, tmp_path):
    ckpt = wgan_run / "checkpoints" / "last.ckpt"
    result = run_script(
        "sample.py", f"ckpt_path={ckpt}", "num_samples=4", "labels=[3,7]", "sampler=ddim", "steps=5",
        f"output_dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sampler, steps do not apply to GANModule and are ignored" in result.stdout
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.png")) == [
        ".preview.png", "3/000000.png", "3/000002.png", "7/000001.png", "7/000003.png"
    ]
    assert np.asarray(Image.open(tmp_path / "3" / "000000.png")).shape == (16, 16)


def test_gan_samples_follow_seed_and_label(wgan_run):
    model = load_generator(wgan_run / "checkpoints" / "last.ckpt")
    trained, loaded = _checkpoint(wgan_run)["state_dict"], model.state_dict()
    assert loaded.keys() == trained.keys() and all(torch.equal(loaded[k], trained[k]) for k in trained)
    a = model.sample(3, labels=[1], seed=5, batch_size=3)
    assert torch.equal(a, model.sample(3, labels=[1], seed=5, batch_size=3))
    # Another batch size: the same noise, only the kernels' summation order may differ.
    assert torch.allclose(a, model.sample(3, labels=[1], seed=5, batch_size=2), atol=1e-5)
    assert not torch.equal(a, model.sample(3, labels=[1], seed=6))
    assert not torch.equal(a, model.sample(3, labels=[2], seed=5))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["~loss"], "model=gan needs a loss: pass loss=bce, loss=hinge, loss=wasserstein or loss=r1"),
        (["loss=wasserstein", "model.discriminator.norm=batch"],
         "model.discriminator.norm=batch cannot be used with loss=wasserstein"),
        (["data.image_size=24"], "data.image_size=24 does not fit the DCGAN generator"),
        (["model.generator.norm=group"], "model.generator.norm='group' is not known; choose one of: batch, layer"),
        (["loss.n_critic=0"], "loss.n_critic=0 must be an integer of at least 1"),
        (["+loss.lambda=10"], "loss.lambda is not an option; the loss takes: name, n_critic"),
    ],
)
def test_bad_gan_options_are_refused_before_training(tmp_path, overrides, message):
    cfg = compose_config("train", [*GAN_TINY, *overrides], tmp_path)
    with pytest.raises(SystemExit) as exc:
        run_task(train, cfg)
    assert message in str(exc.value)
    assert not (tmp_path / "checkpoints").exists()


def test_a_loss_for_a_model_without_one_is_a_one_line_error(tmp_path):
    result = run_script("train.py", "model=ddpm", "loss=wasserstein", f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: loss=wasserstein applies to model=gan only; model=ddpm has no loss option"
    )
