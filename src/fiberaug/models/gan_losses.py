"""Adversarial losses on the critic's raw scores, the WGAN-GP gradient penalty and the R1 penalty."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from fiberaug.errors import UserError

Critic = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


class AdversarialLoss:
    """The two players' losses from the critic's scores of real and generated images (one score per sample)."""

    def critic(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def generator(self, fake: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class NonSaturatingLoss(AdversarialLoss):
    """Goodfellow et al. (2014) on logits; the generator maximises log D(G(z)), which does not saturate early."""

    def critic(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        real, fake = real.float(), fake.float()
        return F.binary_cross_entropy_with_logits(real, torch.ones_like(real)) + F.binary_cross_entropy_with_logits(
            fake, torch.zeros_like(fake)
        )

    def generator(self, fake: torch.Tensor) -> torch.Tensor:
        fake = fake.float()
        return F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))


class HingeLoss(AdversarialLoss):
    """Geometric GAN / SNGAN: the critic only learns from samples inside the margin."""

    def critic(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        return F.relu(1 - real.float()).mean() + F.relu(1 + fake.float()).mean()

    def generator(self, fake: torch.Tensor) -> torch.Tensor:
        return -fake.float().mean()


class WassersteinLoss(AdversarialLoss):
    """WGAN: the critic's score gap estimates the Wasserstein-1 distance if the critic is 1-Lipschitz."""

    def critic(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        return fake.float().mean() - real.float().mean()

    def generator(self, fake: torch.Tensor) -> torch.Tensor:
        return -fake.float().mean()


LOSSES: dict[str, type[AdversarialLoss]] = {
    "bce": NonSaturatingLoss, "hinge": HingeLoss, "wasserstein": WassersteinLoss
}


def adversarial_loss(name: str) -> AdversarialLoss:
    if name not in LOSSES:
        raise UserError(f"loss.name={name!r} is not known; choose one of: {', '.join(LOSSES)}")
    return LOSSES[name]()


def gradient_penalty(
    critic: Critic,
    real: torch.Tensor,
    fake: torch.Tensor,
    labels: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Gulrajani et al.'s two-sided penalty E[(‖∇D(x̂)‖₂ − 1)²], x̂ a random real-fake interpolate per sample.

    It runs in float32 with autocast off: under float16 the input gradients can underflow and the norm
    loses precision, and a float32 pass needs no knowledge of the loss scaler. `create_graph=True` lets
    the penalty's own gradient reach the critic's weights.
    """
    alpha = torch.rand(real.shape[0], 1, 1, 1, generator=generator, device=real.device)
    mixed = (alpha * real.float() + (1 - alpha) * fake.float()).requires_grad_(True)
    with torch.autocast(device_type=real.device.type, enabled=False):
        scores = critic(mixed, labels)
        (grads,) = torch.autograd.grad(scores.float().sum(), mixed, create_graph=True)
    return (grads.flatten(1).norm(dim=1) - 1).square().mean()


def r1_penalty(critic: Critic, real: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Mescheder et al.'s R1 regulariser E[‖∇ₓD(x)‖₂²] at the real images; the caller weights it by γ/2.

    It pushes the critic's gradient on the data towards zero, which keeps the game from oscillating around
    its equilibrium. As the gradient penalty, it runs in float32 with autocast off (float16 input gradients
    underflow, and their squares all the more) and keeps its graph so that the critic's weights learn from it.
    """
    real = real.detach().float().requires_grad_(True)
    with torch.autocast(device_type=real.device.type, enabled=False):
        scores = critic(real, labels)
        (grads,) = torch.autograd.grad(scores.float().sum(), real, create_graph=True)
    return grads.flatten(1).square().sum(dim=1).mean()
