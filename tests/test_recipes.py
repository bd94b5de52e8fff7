"""Small-data training recipes: DiffAugment, spectral norm and R1 for the GAN; v-prediction and Min-SNR-γ for
diffusion. Each against its definition, then through short training runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, compose_config
from diffusers import DDPMPipeline
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_diffusers import UNET
from test_gan import GAN_TINY
from torch import nn

import fiberaug.models.gan as gan_module
from fiberaug.diffusion import denoise, make_sampler, make_weighting, min_snr_weights, noise_scheduler, training_target
from fiberaug.errors import UserError
from fiberaug.models import load_generator
from fiberaug.models.diffusion import DiffusionModule
from fiberaug.models.gan import GANRecipe
from fiberaug.models.gan_losses import r1_penalty
from fiberaug.nets import Discriminator, Generator
from fiberaug.nets.diffaugment import (
    DiffAugment,
    brightness,
    contrast,
    cutout,
    random_color,
    random_cutout,
    random_translation,
    saturation,
    translate,
)
from fiberaug.tasks import run_task
from fiberaug.tasks.sample import sample
from fiberaug.tasks.train import train


def _scalars(run_dir: Path, tag: str) -> dict[int, float]:
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)}


# --- DiffAugment: each op against its definition --------------------------------------------------------------


def test_translate_moves_content_and_fills_with_zeros():
    x = torch.arange(1.0, 2 * 36 + 1).view(2, 1, 6, 6)  # no zeros anywhere
    out = translate(x, dy=torch.tensor([1, -2]), dx=torch.tensor([-2, 0]))
    assert torch.equal(out[0, :, 1:, :4], x[0, :, :5, 2:])  # down 1, left 2
    assert (out[0, :, 0] == 0).all() and (out[0, :, :, 4:] == 0).all()
    assert torch.equal(out[1, :, :4], x[1, :, 2:]) and (out[1, :, 4:] == 0).all()  # up 2


def test_cutout_zeroes_a_rectangle_clipped_at_the_border():
    out = cutout(torch.ones(2, 3, 8, 8), top=torch.tensor([1, -2]), left=torch.tensor([2, 5]), height=4, width=4)
    expected = torch.ones(2, 3, 8, 8)
    expected[0, :, 1:5, 2:6] = 0
    expected[1, :, 0:2, 5:8] = 0  # rows -2..1 and columns 5..8, inside the image
    assert torch.equal(out, expected)


def test_colour_ops_change_the_statistics_as_stated():
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    delta, factor = torch.tensor([0.3, -0.2]), torch.tensor([0.5, 1.5])
    assert torch.allclose(brightness(x, delta), x + delta.view(2, 1, 1, 1))
    pixel_mean = x.mean(1, keepdim=True)
    saturated = saturation(x, factor)
    assert torch.allclose(saturated.mean(1, keepdim=True), pixel_mean, atol=1e-6)  # each pixel's gray level kept
    assert torch.allclose(saturated - pixel_mean, (x - pixel_mean) * factor.view(2, 1, 1, 1), atol=1e-6)
    contrasted = contrast(x, factor)
    assert torch.allclose(contrasted.mean((1, 2, 3)), x.mean((1, 2, 3)), atol=1e-6)
    assert torch.allclose(contrasted.std((1, 2, 3)), x.std((1, 2, 3)) * factor, atol=1e-6)
    gray = x[:, :1]
    assert torch.equal(saturation(gray, factor), gray)  # one channel: saturation is the identity


def test_random_translation_shifts_each_image_by_at_most_an_eighth():
    torch.manual_seed(0)
    x = torch.arange(1.0, 16 * 16 + 1).view(1, 1, 16, 16).expand(64, 1, 16, 16)
    out = random_translation(x)
    shifts = set()
    for image in out[:, 0]:
        rows, cols = (image > 0).any(1).nonzero(), (image > 0).any(0).nonzero()
        dy = int(rows[0]) if rows[0] > 0 else int(rows[-1]) - 15
        dx = int(cols[0]) if cols[0] > 0 else int(cols[-1]) - 15
        assert torch.equal(image, translate(x[:1], torch.tensor([dy]), torch.tensor([dx]))[0, 0])
        shifts.add((dy, dx))
    assert {max(abs(dy), abs(dx)) for dy, dx in shifts} == {0, 1, 2}  # 16/8 = 2 pixels, drawn per image


def test_random_cutout_zeroes_a_half_size_square_per_image():
    torch.manual_seed(0)
    out = random_cutout(torch.ones(64, 1, 16, 16))[:, 0]
    positions = set()
    for image in out:
        rows, cols = (image == 0).any(1).nonzero().flatten(), (image == 0).any(0).nonzero().flatten()
        assert (image == 0).sum() == len(rows) * len(cols)  # one rectangle
        for hit in (rows, cols):  # 8 wide, or cut by the border
            assert len(hit) == 8 or (len(hit) < 8 and (hit[0] == 0 or hit[-1] == 15))
        positions.add((int(rows[0]), int(cols[0])))
    assert len(positions) > 32  # each image draws its own square


def test_random_color_stays_in_the_reference_ranges():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    gray_pixels = torch.randn(256, 1, 4, 4, generator=g).expand(256, 3, 4, 4)  # channels equal: no saturation
    out = random_color(gray_pixels)
    shift = out.mean((1, 2, 3)) - gray_pixels.mean((1, 2, 3))
    scale = out.std((1, 2, 3)) / gray_pixels.std((1, 2, 3))
    assert shift.min() >= -0.5 and shift.max() <= 0.5 and shift.max() - shift.min() > 0.9  # brightness ±0.5
    assert scale.min() >= 0.5 and scale.max() < 1.5 and scale.max() - scale.min() > 0.9  # contrast ×[0.5, 1.5)

    colour = torch.randn(256, 3, 4, 4, generator=g)
    out = random_color(colour)
    chroma = lambda x: (x - x.mean(1, keepdim=True)).std((1, 2, 3))  # noqa: E731
    luma = lambda x: x.mean(1).std((1, 2))  # noqa: E731
    saturation_factor = (chroma(out) / chroma(colour)) / (luma(out) / luma(colour))  # contrast cancels
    assert saturation_factor.min() >= 0 and saturation_factor.max() < 2 and saturation_factor.max() > 1.9


def test_diffaugment_is_differentiable_through_to_the_generator():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16, requires_grad=True)
    augment = DiffAugment("color,translation,cutout")
    weights = torch.randn(4, 3, 16, 16)
    (augment(x) * weights).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0 and not torch.equal(x.grad, weights)

    for channels, num_classes in [(1, 2), (3, 0)]:  # grayscale conditional, colour unconditional
        gen = Generator(channels, image_size=16, num_classes=num_classes, latent_dim=8, base_channels=8)
        disc = Discriminator(channels, image_size=16, num_classes=num_classes, base_channels=8)
        labels = torch.tensor([0, 1, 0, 1]) if num_classes else None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fake = gen(torch.randn(4, 8), labels)
            augmented = augment(fake)
            disc(augmented, labels).float().mean().backward()
        assert augmented.dtype == fake.dtype == torch.bfloat16
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gen.parameters())


def test_diffaugment_policy_is_parsed_and_checked():
    assert DiffAugment(" color, cutout ").policy == DiffAugment(["color", "cutout"]).policy == ("color", "cutout")
    x = torch.randn(2, 1, 8, 8)
    assert DiffAugment(None)(x) is x and DiffAugment("")(x) is x and DiffAugment([])(x) is x
    with pytest.raises(UserError, match="'colour' is not known; give a comma-separated subset of color, translation"):
        DiffAugment("colour,cutout")


# --- Spectral norm and R1 ---------------------------------------------------------------------------------------


def test_spectral_norm_bounds_the_largest_singular_value_of_every_weight():
    torch.manual_seed(0)
    disc = Discriminator(channels=3, image_size=16, num_classes=3, base_channels=8, extra_layers=1, spectral_norm=True)
    layers = [m for m in disc.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding))]
    assert len(layers) == 5 and all(torch.nn.utils.parametrize.is_parametrized(m, "weight") for m in layers)
    for _ in range(30):  # one power iteration per forward pass in training mode
        disc(torch.randn(2, 3, 16, 16), torch.tensor([0, 2]))
    for m in layers:
        sigma = torch.linalg.matrix_norm(m.weight.detach().flatten(1), ord=2)
        assert sigma == pytest.approx(1.0, abs=0.01), m
    plain = Discriminator(channels=3, image_size=16, num_classes=3, base_channels=8, extra_layers=1)
    assert all(torch.linalg.matrix_norm(m.weight.flatten(1), ord=2) < 0.9 for m in plain.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear)))  # DCGAN's N(0, 0.02) weights, far from 1


def test_r1_matches_hand_computation():
    # D(x) = w·x + b has the gradient w everywhere: E‖∇D‖² = ‖w‖² = 25, and d/dw ‖w‖² = 2w.
    w = torch.tensor([3.0, 0.0, 0.0, 4.0], requires_grad=True)
    penalty = r1_penalty(lambda x, labels: x.flatten(1) @ w + 1.0, torch.randn(3, 1, 2, 2))
    assert torch.isclose(penalty, torch.tensor(25.0))
    penalty.backward()
    assert torch.allclose(w.grad, 2 * w.detach())
    # D(x) = (w·x)²/2 has the gradient (w·x)·w, so the penalty depends on where each real image is.
    v = torch.tensor([1.0, -2.0, 0.5, 1.0])
    real = torch.randn(5, 1, 2, 2)
    expected = ((real.flatten(1) @ v).square() * v.square().sum()).mean()
    assert torch.isclose(r1_penalty(lambda x, labels: (x.flatten(1) @ v).square() / 2, real), expected)


def test_r1_runs_in_float32_under_autocast_and_with_gradient_checkpointing():
    real, labels = torch.rand(2, 3, 16, 16), torch.tensor([0, 1])

    def critic(checkpointing: bool = False) -> Discriminator:
        torch.manual_seed(0)
        net = Discriminator(channels=3, image_size=16, num_classes=2, base_channels=8, extra_layers=1)
        if checkpointing:
            net.enable_gradient_checkpointing()
        return net

    x = real.clone().requires_grad_(True)
    (grads,) = torch.autograd.grad(critic()(x, labels).sum(), x)
    exact = grads.flatten(1).square().sum(1).mean()  # by hand, in float32
    results = []
    for checkpointing, autocast in [(False, False), (True, False), (False, True)]:
        net = critic(checkpointing)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            penalty = r1_penalty(net, real, labels)
        penalty.backward()
        assert penalty.dtype == torch.float32 and torch.isclose(penalty, exact, rtol=1e-5)
        results.append(torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None]))
    assert all(torch.allclose(grads, results[0], atol=1e-6) for grads in results[1:])


def test_r1_gamma_auto_follows_stylegan2_ada():
    auto = GANRecipe.from_config({"name": "bce", "r1_gamma": "auto"})
    assert auto.r1 and auto.r1_weight(16, 64) == pytest.approx(0.0002 * 16**2 / 64)
    assert auto.r1_weight(256, 32) == pytest.approx(0.0002 * 256**2 / 32)
    assert GANRecipe.from_config({"name": "hinge", "r1_gamma": 10}).r1_weight(16, 64) == 10.0
    assert not GANRecipe.from_config({"name": "bce"}).r1


def test_r1_is_lazy_with_gamma_times_the_interval(tmp_path, monkeypatch):
    """A stand-in penalty of 10⁴ makes R1's share of the logged critic loss readable: γ·interval/2·10⁴."""
    steps = []

    def huge_penalty(critic, real, labels=None):
        steps.append(critic.__self__.critic_steps)
        return r1_penalty(critic, real, labels) * 0 + 1e4

    monkeypatch.setattr(gan_module, "r1_penalty", huge_penalty)
    train(compose_config("train", [*GAN_TINY, "loss=hinge", "loss.r1_gamma=auto", "loss.r1_interval=3"], tmp_path))
    assert steps == [0, 3]  # five critic steps, the first and the fourth regularised
    gamma = 0.0002 * 16**2 / 16  # auto, for 16x16 images in batches of 16 (debug=fast)
    critic_loss = _scalars(tmp_path, "loss/critic")  # each batch logs at its last optimizer step: 2, 4, ...
    for step, loss in critic_loss.items():
        r1 = gamma * 3 / 2 * 1e4 if step in (2, 8) else 0.0
        assert 0 <= loss - r1 < 5, (step, loss)  # the hinge part lies within [0, 5) this early


# --- The GAN options through train.py ---------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["r1", "wasserstein"])
def test_every_critic_input_is_augmented_alike_in_a_training_run(tmp_path, monkeypatch, loss):
    """Spies on DiffAugment's outputs and the discriminator's inputs: every image the discriminator sees, real
    or generated, in the critic's step, the generator's and the penalties', comes out of the same DiffAugment."""
    augmented, seen = [], []
    augment_forward, disc_forward = DiffAugment.forward, Discriminator.forward

    def spy_augment(self, x):
        out = augment_forward(self, x)
        augmented.append((self.policy, x, out))
        return out

    def spy_disc(self, x, labels=None):
        seen.append(x)
        return disc_forward(self, x, labels)

    monkeypatch.setattr(DiffAugment, "forward", spy_augment)
    monkeypatch.setattr(Discriminator, "forward", spy_disc)
    options = ["model.diffaugment=[color,translation,cutout]", "model.discriminator.spectral_norm=true",
               "trainer.precision=16", "model.gradient_checkpointing=true", "trainer.max_steps=6"]
    if loss == "r1":
        options.append("loss.r1_interval=2")
    train(compose_config("train", [*GAN_TINY, f"loss={loss}", *options], tmp_path))

    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    # r1 (n_critic 1): 3 critic steps (2 real/fake + R1 at the 1st and 3rd) and 3 generator steps.
    # wasserstein (n_critic 5): 5 critic steps (2 real/fake + 1 gradient penalty each), 1 generator step.
    expected_calls = 3 * 2 + 2 + 3 if loss == "r1" else 5 * 3 + 1
    assert ckpt["global_step"] == 6 and len(seen) == len(augmented) == expected_calls
    assert {policy for policy, _, _ in augmented} == {("color", "translation", "cutout")}
    assert not any(torch.equal(x, out) for _, x, out in augmented)
    outputs = [out for _, _, out in augmented]
    assert all(any(x is out for out in outputs) for x in seen), "the discriminator saw an un-augmented batch"
    penalty = "train/r1_penalty" if loss == "r1" else "train/gradient_penalty"
    assert np.isfinite(list(_scalars(tmp_path, penalty).values())).all()
    assert any("parametrizations.weight.original" in k for k in ckpt["state_dict"])  # spectral norm
    model = load_generator(tmp_path / "checkpoints" / "last.ckpt")
    assert model.augment.policy == ("color", "translation", "cutout")
    assert model.sample(2, seed=0).shape == (2, 1, 16, 16)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["loss=r1", "loss.r1_gamma=-1"], "loss.r1_gamma=-1 must be a number of at least 0 (0: no R1 penalty) or auto"),
        (["loss=r1", "loss.r1_gamma=lots"], "loss.r1_gamma='lots' must be a number of at least 0"),
        (["loss=r1", "loss.r1_interval=0"], "loss.r1_interval=0 must be an integer of at least 1"),
        (["loss=wasserstein", "+loss.r1_gamma=1"], "loss.r1_gamma=1 applies to loss=bce and loss=hinge"),
        (["loss=r1", "model.discriminator.norm=batch"],
         "model.discriminator.norm=batch cannot be used with loss=bce (r1_gamma=auto)"),
        (["model.diffaugment=[color,zoom]"], "model.diffaugment=['color', 'zoom']: 'zoom' is not known"),
    ],
)
def test_bad_recipe_options_are_one_line_errors(tmp_path, overrides, message):
    with pytest.raises(SystemExit) as exc:
        run_task(train, compose_config("train", [*GAN_TINY, *overrides], tmp_path))
    assert message in str(exc.value) and "\n" not in str(exc.value)


# --- v-prediction and Min-SNR-γ ---------------------------------------------------------------------------------


def _oracle(scheduler, x0: torch.Tensor):
    """A perfect denoiser: knows x0, so from any x_t it infers the exact noise and returns the training target."""

    def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha_bar = scheduler.alphas_cumprod[t]
        eps = (x - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()
        return training_target(scheduler, x0, eps, t.expand(x.shape[0]))

    return predict


def test_v_target_is_its_definition():
    sched, x0, eps = noise_scheduler(prediction_type="v_prediction"), torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2)
    t = torch.tensor([0, 400, 999])
    alpha_bar = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(training_target(sched, x0, eps, t), alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x0)
    assert torch.equal(training_target(noise_scheduler(), x0, eps, t), eps)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize(("sampler", "eta"), [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0)])
def test_an_oracle_of_the_training_target_samples_x0(prediction_type, sampler, eta):
    x0 = 0.9 * torch.tanh(torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0)))
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(2)]  # noqa: E731
    sched = noise_scheduler(prediction_type=prediction_type)
    oracle = _oracle(sched, x0)
    out = denoise(oracle, make_sampler(sched, sampler, 10), torch.randn(2, 1, 4, 4), gens(), eta=eta)
    assert torch.allclose(out, x0, atol=1e-5)
    # The same oracle read as the other prediction type ends a thousand times further off: the test tells them apart.
    other = noise_scheduler(prediction_type="epsilon" if prediction_type == "v_prediction" else "v_prediction")
    wrong = denoise(oracle, make_sampler(other, sampler, 10), torch.randn(2, 1, 4, 4), gens(), eta=eta)
    assert (wrong - x0).abs().max() > 0.01


class _LabelOracle(nn.Module):
    """A DiffusionModule denoiser that knows one clean image per label, the "no label" index included."""

    def __init__(self, scheduler, images: torch.Tensor) -> None:
        super().__init__()
        self.scheduler, self.images = scheduler, images

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return _oracle(self.scheduler, self.images[labels])(x, t)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_guidance_extrapolates_x0_for_either_prediction_type(prediction_type, sampler):
    """At every step the guided x0 is x0(∅) + w·(x0(y) − x0(∅)), so that is what the sampler ends at."""
    model = DiffusionModule(
        denoiser={"_target_": "fiberaug.nets.ContextUNet", "base_channels": 8, "channel_mults": [1, 2]},
        image_size=4, channels=1, class_names=["a", "b"], prediction_type=prediction_type,
    )
    images = torch.stack([torch.full((1, 4, 4), 0.5), torch.full((1, 4, 4), -0.3), torch.full((1, 4, 4), 0.2)])
    model.net = _LabelOracle(model.noise_scheduler, images)  # labels a, b and the "no label" row
    out = model.sample(2, labels=["a", "b"], sampler=sampler, steps=8, guidance_scale=2.0)
    assert torch.allclose(out[0], torch.full((1, 4, 4), 0.2 + 2.0 * (0.5 - 0.2)), atol=1e-4)
    assert torch.allclose(out[1], torch.full((1, 4, 4), 0.2 + 2.0 * (-0.3 - 0.2)), atol=1e-4)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_match_the_formula(prediction_type):
    sched = noise_scheduler("linear", prediction_type=prediction_type)
    t = torch.tensor([0, 10, 50, 100, 300, 999])
    alpha_bar = sched.alphas_cumprod[t].double()
    snr = alpha_bar / (1 - alpha_bar)
    denominator = snr if prediction_type == "epsilon" else snr + 1
    expected = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / denominator
    assert torch.allclose(min_snr_weights(sched, t, gamma=5.0).double(), expected, rtol=1e-5)
    assert torch.allclose(make_weighting("min_snr", 2.0)(sched, t).double(),
                          torch.minimum(snr, torch.tensor(2.0, dtype=torch.float64)) / denominator, rtol=1e-5)
    assert snr[0] > 5 > snr[-1]  # the timesteps reach both sides of γ
    assert make_weighting("none") is None


def test_min_snr_weighs_each_samples_loss():
    model = DiffusionModule(
        denoiser={"_target_": "fiberaug.nets.ContextUNet", "base_channels": 8, "channel_mults": [1, 2]},
        image_size=8, channels=1, prediction_type="v_prediction", loss_weighting="min_snr", min_snr_gamma=2.0,
    )
    images = torch.rand(6, 1, 8, 8) * 2 - 1
    loss = model._loss((images, torch.zeros(6, dtype=torch.long)), torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)  # the same draws as _loss makes
    noise = torch.randn(images.shape, generator=g)
    t = torch.randint(0, 1000, (6,), generator=g)
    sched = model.noise_scheduler
    with torch.no_grad():
        per_sample = (model.net(sched.add_noise(images, noise, t), t, None) - sched.get_velocity(images, noise, t))
    per_sample = per_sample.square().flatten(1).mean(1)
    alpha_bar = sched.alphas_cumprod[t]
    snr = alpha_bar / (1 - alpha_bar)
    assert torch.isclose(loss, (per_sample * snr.clamp(max=2.0) / (snr + 1)).mean(), rtol=1e-5)
    assert not torch.isclose(loss, per_sample.mean(), rtol=1e-2)  # the weights matter


def test_v_prediction_with_min_snr_trains_in_mixed_precision_with_checkpointing(tmp_path):
    options = ["model.prediction_type=v_prediction", "model.loss_weighting=min_snr", "trainer.precision=16",
               "model.gradient_checkpointing=true", "trainer.max_steps=5"]
    train(compose_config("train", [*TINY, *options], tmp_path))
    losses = list(_scalars(tmp_path, "loss/train").values())
    assert len(losses) == 5 and np.isfinite(losses).all()
    model = load_generator(tmp_path / "checkpoints" / "last.ckpt")
    assert model.noise_scheduler.config.prediction_type == "v_prediction" and model.hparams.loss_weighting == "min_snr"
    assert (tmp_path / "samples" / "epoch0000-step0000005.png").is_file()  # sampled at the end of its one epoch


@pytest.fixture(scope="module")
def v_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny unconditional diffusers UNet trained for v through train.py; returns its run dir."""
    run_dir = tmp_path_factory.mktemp("v_unet")
    train(compose_config("train", [*UNET, "data.labels=none", "model.prediction_type=v_prediction",
                                   "trainer.max_steps=3"], run_dir))
    return run_dir


def _pixels(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.rglob("*.png"))}


def test_v_export_samples_through_sample_py_as_its_checkpoint(v_export, tmp_path):
    config = json.loads((v_export / "export" / "scheduler" / "scheduler_config.json").read_text())
    assert config["prediction_type"] == "v_prediction"
    assert DiffusionModule.from_export(v_export / "export").noise_scheduler.config.prediction_type == "v_prediction"
    images = {}
    for source in ("export", "checkpoints/last.ckpt"):
        out = tmp_path / source.replace("/", "_")
        sample(compose_config("sample", [f"ckpt_path={v_export / source}", "num_samples=2", "steps=3",
                                         f"output_dir={out}"]))
        images[source] = _pixels(out)
    assert list(images["export"]) == [".preview.png", "000000.png", "000001.png"]
    assert all(np.array_equal(images["export"][k], images["checkpoints/last.ckpt"][k]) for k in images["export"])


def test_a_v_export_written_elsewhere_is_read_as_v(v_export, tmp_path):
    """Without fiberaug.json (a folder from plain diffusers) the schedule and prediction type come from scheduler/."""
    shutil.copytree(v_export / "export", tmp_path / "export", ignore=shutil.ignore_patterns("fiberaug.json"))
    model = DiffusionModule.from_export(tmp_path / "export")
    assert model.noise_scheduler.config.prediction_type == "v_prediction" and model.hparams.schedule == "cosine"


def test_v_export_samples_in_plain_diffusers_as_in_fiberaug(v_export):
    """DDPMPipeline reads v from the export's scheduler: with the same noise it draws our DDPM sample."""
    from fiberaug.seeding import derive_seed

    pipeline = DDPMPipeline.from_pretrained(str(v_export / "export"))
    assert pipeline.scheduler.config.prediction_type == "v_prediction"
    generator = torch.Generator().manual_seed(derive_seed(4, 0))
    theirs = pipeline(batch_size=1, num_inference_steps=5, generator=generator, output_type="np").images
    ours = DiffusionModule.from_export(v_export / "export").sample(1, seed=4, sampler="ddpm", steps=5)
    assert np.allclose(theirs[0], (ours[0].permute(1, 2, 0).numpy() + 1) / 2, atol=1e-4)


def test_fine_tuning_needs_the_prediction_type_of_its_base(tmp_path):
    denoiser = {"_target_": "fiberaug.nets.diffusers_unet.diffusers_unet", "block_out_channels": [16, 32],
                "attention": [False, False], "norm_num_groups": 8}
    base = DiffusionModule(denoiser=denoiser, image_size=8, channels=1, prediction_type="v_prediction")
    base.net.save_pretrained(tmp_path, base.noise_scheduler, base.export_metadata())
    with pytest.raises(UserError, match=f"model.pretrained={tmp_path} predicts v_prediction; set "
                                        "model.prediction_type=v_prediction to fine-tune it"):
        DiffusionModule(denoiser=denoiser, image_size=8, channels=1, pretrained=str(tmp_path))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.prediction_type=sample", "model.prediction_type='sample' is not known; choose one of: epsilon, v_"),
        ("model.loss_weighting=p2", "model.loss_weighting='p2' is not known; choose one of: none, min_snr"),
        ("model.min_snr_gamma=0", "model.min_snr_gamma=0 must be a positive number"),
    ],
)
def test_bad_diffusion_options_are_one_line_errors(tmp_path, override, message):
    overrides = [*TINY, override] + (["model.loss_weighting=min_snr"] if "gamma" in override else [])
    with pytest.raises(SystemExit, match=message.replace("(", r"\(")):
        run_task(train, compose_config("train", overrides, tmp_path))


def test_defaults_are_what_measured_best_and_the_gan_options_default_off():
    ddpm, gan = compose_config("train", []).model, compose_config("train", ["model=gan"])
    assert (ddpm.prediction_type, ddpm.loss_weighting, ddpm.min_snr_gamma) == ("v_prediction", "none", 5.0)
    assert compose_config("train", ["model=diffusers"]).model.prediction_type == "v_prediction"
    assert gan.model.diffaugment is None and gan.model.discriminator.spectral_norm is False
    for loss in ("bce", "hinge"):
        assert compose_config("train", ["model=gan", f"loss={loss}"]).loss.r1_gamma == 0
