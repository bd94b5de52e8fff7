"""Diffusion maths against closed forms: the forward process, DDPM/DDIM steps, and guidance."""

from __future__ import annotations

import math

import pytest
import torch

from fiberaug.diffusion import denoise, guided, make_sampler, noise_scheduler
from fiberaug.errors import UserError

T = 1000


def test_linear_and_cosine_schedules_match_their_formulas():
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    expected_linear = torch.cumprod(1 - betas, 0)
    assert torch.allclose(noise_scheduler("linear").alphas_cumprod.double(), expected_linear, atol=1e-6)

    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731  Nichol & Dhariwal
    expected_cosine = torch.tensor([f(t + 1) / f(0) for t in range(T)], dtype=torch.float64)
    assert torch.allclose(noise_scheduler("cosine").alphas_cumprod.double(), expected_cosine, atol=1e-4)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("timesteps", [21, 50, 100, 250, 1000, 4000])
def test_every_accepted_schedule_ends_in_pure_noise(schedule, timesteps):
    """Sampling starts from N(0, I), so the forward process must reach it at t = T whatever T is."""
    assert noise_scheduler(schedule, timesteps).alphas_cumprod[-1] < 1e-3


def test_linear_betas_scale_with_the_number_of_timesteps():
    betas = noise_scheduler("linear", 100).betas.double()
    assert torch.allclose(betas, torch.linspace(1e-3, 0.2, 100, dtype=torch.float64), atol=1e-7)  # × 1000/100
    with pytest.raises(UserError, match=r"num_train_timesteps=20 is too short .* use at least 21"):
        noise_scheduler("linear", 20)
    with pytest.raises(UserError, match="num_train_timesteps=0 must be a positive integer"):
        noise_scheduler("cosine", 0)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_forward_process_mean_and_variance(schedule):
    sched = noise_scheduler(schedule)
    t = torch.tensor([0, 250, 500, 999])
    alpha_bar = sched.alphas_cumprod[t].view(-1, 1)
    x0 = torch.full((4, 1), 0.7)
    # Exact: the mean is sqrt(ᾱ)·x0 and the noise is scaled by sqrt(1-ᾱ), not (1-ᾱ).
    assert torch.allclose(sched.add_noise(x0, torch.zeros(4, 1), t), alpha_bar.sqrt() * x0)
    assert torch.allclose(sched.add_noise(torch.zeros(4, 1), torch.ones(4, 1), t), (1 - alpha_bar).sqrt())
    # Empirical, over many draws.
    g = torch.Generator().manual_seed(0)
    xt = sched.add_noise(x0.expand(4, 200_000), torch.randn(4, 200_000, generator=g), t)
    assert torch.allclose(xt.mean(1, keepdim=True), alpha_bar.sqrt() * x0, atol=0.01)
    assert torch.allclose(xt.var(1, keepdim=True), 1 - alpha_bar, atol=0.01)


def test_ddim_with_eta_one_and_all_steps_matches_ddpm():
    sched = noise_scheduler("linear", clip_sample=False)
    ddpm, ddim = make_sampler(sched, "ddpm", T), make_sampler(sched, "ddim", T)
    assert torch.equal(ddpm.timesteps, ddim.timesteps)
    for t in [999, 500, 10, 1]:
        assert torch.allclose(ddim._get_variance(t, t - 1), ddpm._get_variance(t), rtol=1e-5)
    x, eps = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    for t in [999, 500, 10]:
        gens = lambda: [torch.Generator().manual_seed(i) for i in range(2)]  # noqa: E731  same noise for both
        a = ddpm.step(eps, t, x, generator=gens()).prev_sample
        b = ddim.step(eps, t, x, eta=1.0, generator=gens()).prev_sample
        assert torch.allclose(a, b, atol=1e-5)


def test_ddim_with_eta_zero_is_deterministic_and_shortened_schedules_start_from_noise():
    sched = noise_scheduler()
    ddim = make_sampler(sched, "ddim", 10)
    assert ddim.timesteps[0] == T - 1 and len(ddim.timesteps) == 10
    eps_fn = lambda x, t: 0.1 * x  # noqa: E731
    noise = torch.randn(2, 1, 4, 4)
    a = denoise(eps_fn, ddim, noise, [torch.Generator().manual_seed(0)] * 2, eta=0.0)
    b = denoise(eps_fn, make_sampler(sched, "ddim", 10), noise, [torch.Generator().manual_seed(9)] * 2, eta=0.0)
    assert torch.equal(a, b)


def test_classifier_free_guidance_combines_predictions():
    def net(x, t, labels):
        return labels.float().view(-1, 1) * torch.ones_like(x)  # the prediction is the label

    labels, null, x, t = torch.tensor([2, 2]), torch.tensor([10, 10]), torch.zeros(2, 3), torch.tensor(5)
    assert torch.equal(guided(net, labels, null, guidance_scale=1.0)(x, t), torch.full((2, 3), 2.0))
    assert torch.equal(guided(net, labels, null, guidance_scale=0.0)(x, t), torch.full((2, 3), 10.0))
    assert torch.equal(guided(net, labels, null, guidance_scale=3.0)(x, t), torch.full((2, 3), -14.0))


def test_unknown_sampler_schedule_and_steps_are_refused():
    sched = noise_scheduler()
    with pytest.raises(UserError, match="sampler=.euler. is not available; choose one of: ddpm, ddim, dpmpp, unipc"):
        make_sampler(sched, "euler", 10)
    with pytest.raises(UserError, match="steps=0 must be an integer from 1 to 1000"):
        make_sampler(sched, "ddim", 0)
    with pytest.raises(UserError, match="model.schedule='sigmoid' is not known"):
        noise_scheduler("sigmoid")


def _ddim_by_hand(eps_fn, sched, steps: int, x: torch.Tensor, seeds: list[int], eta: float) -> torch.Tensor:
    """Song et al.'s DDIM update written out, with the noise re-derived from the clipped x_0 (GLIDE)."""
    alpha_bar, T = sched.alphas_cumprod.double(), sched.config.num_train_timesteps
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    x = x.double()
    for t in make_sampler(sched, "ddim", steps).timesteps.tolist():
        prev = t - T // steps
        a_t, a_prev = alpha_bar[t], alpha_bar[prev] if prev >= 0 else torch.tensor(1.0, dtype=torch.float64)
        x0 = ((x - (1 - a_t).sqrt() * eps_fn(x, t)) / a_t.sqrt()).clamp(-1, 1)
        eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        z = torch.cat([torch.randn((1, *x.shape[1:]), generator=g) for g in gens]).double()
        x = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).sqrt() * eps + (sigma * z if eta > 0 else 0)
    return x.clamp(-1, 1).float()


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_as_configured_follows_the_clipped_update_and_eta(eta):
    """FiberAug's DDIM (the project's schedule and sampler, not diffusers' defaults) against the formula.

    The prediction puts x_0 far outside [-1, 1] at the first, noisiest step, so clipping and re-deriving
    the noise from the clipped x_0 change the result, and eta = 1 adds noise that eta = 0 does not.
    """
    sched = noise_scheduler()
    eps_fn = lambda x, t: 0.5 - 2.0 * x  # noqa: E731
    x = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    seeds = [7, 8, 9]
    got = denoise(eps_fn, make_sampler(sched, "ddim", 3), x, [torch.Generator().manual_seed(s) for s in seeds], eta=eta)
    assert torch.allclose(got, _ddim_by_hand(eps_fn, sched, 3, x, seeds, eta), atol=2e-3)  # float32 vs float64
    if eta:
        other = denoise(eps_fn, make_sampler(sched, "ddim", 3), x, [torch.Generator().manual_seed(s) for s in seeds],
                        eta=0.0)
        assert (got - other).abs().max() > 0.05, "eta made no difference"


class _LabelSpy(torch.nn.Module):
    """A denoiser that predicts zero noise and records the labels it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        self.seen.append(labels)
        return torch.zeros_like(x)


def test_training_hides_labels_at_cond_drop_prob_so_guidance_has_an_unconditional_model():
    from fiberaug.models.diffusion import DiffusionModule

    model = DiffusionModule(denoiser={"_target_": "fiberaug.nets.ContextUNet", "base_channels": 8},
                            image_size=8, channels=1, class_names=list("abcd"), cond_drop_prob=0.25)
    model.net = _LabelSpy()
    batch = (torch.zeros(4000, 1, 8, 8), torch.randint(0, 4, (4000,)))
    torch.manual_seed(0)
    model.train()
    model._loss(batch)
    hidden = (model.net.seen[-1] == 4).float().mean().item()  # 4 = the "no label" index
    assert 0.22 < hidden < 0.28, f"{hidden:.1%} of the labels were hidden in training, not 25%"
    model.eval()
    model._loss(batch)
    assert torch.equal(model.net.seen[-1], batch[1]), "labels were hidden outside training"


def test_the_validation_loss_of_given_weights_is_the_same_at_every_validation():
    """Its timesteps and noise come from a generator of the batch's own, so neither the global random state nor an
    earlier validation moves it, and checkpoint ranking and sweeps compare models, not draws."""
    from fiberaug.models.diffusion import DiffusionModule

    model = DiffusionModule(denoiser={"_target_": "fiberaug.nets.ContextUNet", "base_channels": 8},
                            image_size=8, channels=1, class_names=list("ab")).eval()
    logged = []
    model.log = lambda name, value, **_: logged.append((name, value.item()))
    batch = (torch.rand(8, 1, 8, 8) * 2 - 1, torch.randint(0, 2, (8,)))
    for seed in (1, 2, 1):
        torch.manual_seed(seed)
        model.validation_step(batch, batch_idx=0)
    model.validation_step(batch, batch_idx=1)
    names, values = zip(*logged)
    assert set(names) == {"loss/val"} and values[0] == values[1] == values[2]
    assert values[3] != values[0]  # another batch draws other timesteps and noise: the loss is not a constant


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", ["ddim", "dpmpp", "unipc"])
def test_every_deterministic_sampler_reconstructs_a_known_signal_under_guidance(name, prediction_type):
    """An exact denoiser for a data set of one image per class: it predicts x0 = A for the label and (A + B) / 2
    without it, so guidance at w predicts x0 = (A + B) / 2 + w (A - B) / 2 at every step, which an exact solver
    must end at, in 10 steps, whatever the network predicts (ε or v)."""
    sched = noise_scheduler("cosine", prediction_type=prediction_type, clip_sample=True)
    a, b = torch.linspace(-0.5, 0.5, 16).view(1, 1, 4, 4), torch.full((1, 1, 4, 4), 0.1)
    alphas = sched.alphas_cumprod

    def net(x, t, labels):
        x0 = torch.where(labels.view(-1, 1, 1, 1) == 0, a, (a + b) / 2)
        ab = alphas[t.long()].view(-1, 1, 1, 1)
        eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
        return eps if prediction_type == "epsilon" else ab.sqrt() * eps - (1 - ab).sqrt() * x0

    eps_fn = guided(net, torch.tensor([0, 0]), torch.tensor([1, 1]), guidance_scale=2.0)
    sampler = make_sampler(sched, name, 10)
    out = denoise(eps_fn, sampler, torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0)),
                  [torch.Generator().manual_seed(i) for i in range(2)])
    assert type(sampler).__name__ == {"ddim": "DDIMScheduler", "dpmpp": "DPMSolverMultistepScheduler",
                                      "unipc": "UniPCMultistepScheduler"}[name]
    error = (out - (1.5 * a - 0.5 * b)).abs().max().item()
    assert error < 1e-3, error
