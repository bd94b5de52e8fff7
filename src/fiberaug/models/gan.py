"""A class-conditional GAN trained with Lightning's manual optimization: BCE, hinge or WGAN-GP, R1, DiffAugment."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from hydra.utils import instantiate
from pytorch_lightning.utilities import grad_norm
from torch import nn
from torch.optim import Adam, Optimizer
from torch.optim.lr_scheduler import LambdaLR

from fiberaug.errors import UserError
from fiberaug.models.base import GenerativeModule
from fiberaug.models.gan_losses import WassersteinLoss, adversarial_loss, gradient_penalty, r1_penalty
from fiberaug.nets.diffaugment import DiffAugment


@dataclass(frozen=True)
class GANRecipe:
    """How the two networks play under one loss (the `loss` config group, conf/loss/*.yaml).

    `r1_gamma` weights the R1 penalty γ/2 · E‖∇ₓD(x_real)‖² (0: none; `auto`: StyleGAN2-ADA's
    0.0002 · resolution² / batch). It is lazy as in StyleGAN2: added to every `r1_interval`-th critic step's
    loss (the first included) with γ multiplied by the interval, so that it weighs the same on average.
    StyleGAN2 takes it as a separate optimizer step and corrects Adam's lr and betas for the extra steps;
    here it joins the critic's own step, which needs no correction.
    """

    name: str
    n_critic: int = 1
    lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)
    gradient_penalty: float = 0.0
    r1_gamma: float | str = 0.0
    r1_interval: int = 1

    @property
    def r1(self) -> bool:
        return self.r1_gamma == "auto" or self.r1_gamma > 0

    def r1_weight(self, resolution: int, batch_size: int) -> float:
        """γ for images of `resolution`² in batches of `batch_size`, before the lazy scaling."""
        if self.r1_gamma == "auto":
            return 0.0002 * resolution**2 / batch_size
        return float(self.r1_gamma)

    @classmethod
    def from_config(cls, loss: Mapping[str, Any] | None) -> GANRecipe:
        if not loss:
            raise UserError("model=gan needs a loss: pass loss=bce, loss=hinge, loss=wasserstein or loss=r1")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(loss) - set(known))
        if unknown:
            raise UserError(f"loss.{unknown[0]} is not an option; the loss takes: {', '.join(known)}")
        recipe = cls(**{**loss, "betas": tuple(loss.get("betas", cls.betas))})
        if not isinstance(recipe.n_critic, int) or recipe.n_critic < 1:
            raise UserError(f"loss.n_critic={recipe.n_critic!r} must be an integer of at least 1")
        if recipe.gradient_penalty < 0:
            raise UserError(f"loss.gradient_penalty={recipe.gradient_penalty} must be at least 0 (0: no penalty)")
        gamma = recipe.r1_gamma
        if gamma != "auto" and (isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or gamma < 0):
            raise UserError(f"loss.r1_gamma={gamma!r} must be a number of at least 0 (0: no R1 penalty) or auto")
        if isinstance(recipe.r1_interval, bool) or not isinstance(recipe.r1_interval, int) or recipe.r1_interval < 1:
            raise UserError(f"loss.r1_interval={recipe.r1_interval!r} must be an integer of at least 1")
        if recipe.r1 and recipe.name == "wasserstein":
            raise UserError(
                f"loss.r1_gamma={gamma} applies to loss=bce and loss=hinge; loss=wasserstein has its gradient_penalty"
            )
        return recipe


class GANModule(GenerativeModule):
    """Trains `generator` against `discriminator` (the critic), one critic step per batch.

    Both networks are configs with `_target_`, called with `channels`, `image_size` and `num_classes`
    (the generator also with `latent_dim`) and built here, so that checkpoints rebuild them. Every
    training batch is one critic step, on that fresh real batch and fresh noise; every `n_critic`-th
    batch is followed by one generator step. Lightning's `global_step` counts optimizer steps, so it
    grows by `n_critic + 1` per generator step; `generator_steps` counts those and is logged.

    `diffaugment` (a DiffAugment policy, `nets/diffaugment.py`) augments every image the critic sees:
    real and generated, in the critic's and the generator's step. The penalties regularise that same
    augmented critic D∘T, their gradient taken with respect to the images before augmentation, as
    DiffAugment's and StyleGAN2-ADA's R1 are: the gradient penalty at interpolates of the un-augmented
    real and generated images, R1 at the un-augmented real ones, each through its own draw of T.

    A discriminator with `self_supervised = True` (FastGAN's) also reconstructs the augmented real images of each
    critic step from its own features (`forward(..., reconstruct=True)`); that loss joins the critic's alone.
    """

    def __init__(
        self,
        generator: Mapping[str, Any],
        discriminator: Mapping[str, Any],
        image_size: int,
        channels: int,
        class_names: Sequence[str] = (),
        loss: Mapping[str, Any] | None = None,
        latent_dim: int = 64,
        warmup_steps: int = 0,
        gradient_clip_val: float | None = None,
        gradient_checkpointing: bool = False,
        diffaugment: str | Sequence[str] | None = None,
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__(class_names, channels_last=channels_last, compile=compile)
        self.save_hyperparameters(logger=False)
        self.automatic_optimization = False
        self.recipe = GANRecipe.from_config(loss)
        self.loss = adversarial_loss(self.recipe.name)
        size = {"channels": channels, "image_size": image_size, "num_classes": self.num_classes}
        self.generator = instantiate(generator, latent_dim=latent_dim, **size)
        self.discriminator = instantiate(discriminator, **size)
        self.augment = DiffAugment(diffaugment)
        batchnorm = any(isinstance(m, nn.BatchNorm2d) for m in self.discriminator.modules())
        penalties = {"gradient_penalty": self.recipe.gradient_penalty, "r1_gamma": self.recipe.r1_gamma}
        penalties = {k: v for k, v in penalties.items() if v}
        if penalties and batchnorm:
            given = ", ".join(f"{k}={v}" for k, v in penalties.items())
            raise UserError(
                f"model.discriminator.norm=batch cannot be used with loss={self.recipe.name} ({given}): BatchNorm "
                "mixes the samples of a batch, which breaks the per-sample gradient penalties; use "
                "model.discriminator.norm=layer or none"
            )
        if penalties and compile:
            given = ", ".join(f"{k}={v}" for k, v in penalties.items())
            raise UserError(f"model.compile=true cannot be used with loss={self.recipe.name} ({given}): torch.compile "
                            "does not differentiate twice, which the penalties need; use loss=bce or loss=hinge")
        if gradient_checkpointing:
            self.generator.enable_gradient_checkpointing()
            self.discriminator.enable_gradient_checkpointing()
        self.critic_steps = 0
        self.generator_steps = 0

    @property
    def metric_names(self) -> tuple[str, ...]:
        """What `training_step` and `on_before_optimizer_step` log under this recipe."""
        names = ["loss/critic", "loss/generator", "train/real_score", "train/fake_score", "train/generator_step"]
        names += ["train/grad_norm_critic", "train/grad_norm_generator", "lr/critic", "lr/generator"]
        if isinstance(self.loss, WassersteinLoss):
            names.append("train/wasserstein")
        if self.recipe.gradient_penalty > 0:
            names.append("train/gradient_penalty")
        if self.recipe.r1:
            names.append("train/r1_penalty")
        if getattr(self.discriminator, "self_supervised", False):
            names.append("train/reconstruction")
        return tuple(names)

    def _latent(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.hparams.latent_dim, device=self.device)

    def critic(self, images: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """The critic as training sees it: the discriminator's scores of the DiffAugment-ed images."""
        return self.discriminator(self.augment(images), labels)

    def _critic_step(self, opt: Optimizer, real: torch.Tensor, labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
        with self.toggled_optimizer(opt):
            fake = self.generator(self._latent(real.shape[0]), labels).detach()
            reconstruction = None
            if getattr(self.discriminator, "self_supervised", False):  # FastGAN's: it reconstructs the real images
                real_score, reconstruction = self.discriminator(self.augment(real), labels, reconstruct=True)
            else:
                real_score = self.critic(real, labels)
            fake_score = self.critic(fake, labels)
            loss = self.loss.critic(real_score, fake_score)
            logs = {"train/real_score": real_score.float().mean(), "train/fake_score": fake_score.float().mean()}
            if reconstruction is not None:
                logs["train/reconstruction"] = reconstruction
                loss = loss + reconstruction
            if isinstance(self.loss, WassersteinLoss):
                logs["train/wasserstein"] = -loss.detach()
            if self.recipe.gradient_penalty > 0:
                logs["train/gradient_penalty"] = gradient_penalty(self.critic, real, fake, labels)
                loss = loss + self.recipe.gradient_penalty * logs["train/gradient_penalty"]
            interval = self.recipe.r1_interval
            if self.recipe.r1 and self.critic_steps % interval == 0:
                gamma = self.recipe.r1_weight(self.hparams.image_size, real.shape[0])
                logs["train/r1_penalty"] = r1_penalty(self.critic, real, labels)
                loss = loss + gamma * interval / 2 * logs["train/r1_penalty"]
            opt.zero_grad(set_to_none=True)
            self.manual_backward(loss)
            opt.step()
        return {**logs, "loss/critic": loss}

    def _generator_step(self, opt: Optimizer, n: int, labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
        with self.toggled_optimizer(opt):
            loss = self.loss.generator(self.critic(self.generator(self._latent(n), labels), labels))
            opt.zero_grad(set_to_none=True)
            self.manual_backward(loss)
            opt.step()
        return {"loss/generator": loss}

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        real, labels = batch
        real = self.memory_format(real)
        labels = labels if self.num_classes else None
        opt_g, opt_d = self.optimizers()
        sched_g, sched_d = self.lr_schedulers()
        logs = self._critic_step(opt_d, real, labels)
        sched_d.step()
        self.critic_steps += 1
        if self.critic_steps % self.recipe.n_critic == 0:
            logs |= self._generator_step(opt_g, real.shape[0], labels)
            sched_g.step()
            self.generator_steps += 1
        logs |= {"lr/generator": opt_g.param_groups[0]["lr"], "lr/critic": opt_d.param_groups[0]["lr"]}
        # "step" sets the x-axis of the logged values: optimizer steps, as for checkpoints and sample grids.
        logs |= {"train/generator_step": float(self.generator_steps), "step": float(self.global_step)}
        # Synced: under DDP each rank's values come from its own shard, and the logs show their mean.
        self.log_dict({k: v.detach() if torch.is_tensor(v) else v for k, v in logs.items()}, sync_dist=True)

    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        """Log the gradient norm and clip it: Lightning calls this after unscaling float16 gradients."""
        is_generator = optimizer is self.trainer.optimizers[0]
        name, net = ("generator", self.generator) if is_generator else ("critic", self.discriminator)
        self.log(f"train/grad_norm_{name}", grad_norm(net, norm_type=2)["grad_2.0_norm_total"], sync_dist=True)
        if clip := self.hparams.gradient_clip_val:
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")

    def networks(self) -> list[nn.Module]:
        return [self.generator, self.discriminator]  # the order of the optimizers

    def configure_optimizers(self) -> tuple[list[Optimizer], list[LambdaLR]]:
        lr, betas, warmup = self.recipe.lr, self.recipe.betas, max(1, self.hparams.warmup_steps)
        optimizers = [Adam(net.parameters(), lr=lr, betas=betas, **self.fused()) for net in self.networks()]
        # Stepped by hand after each optimizer's own step: manual optimization leaves schedulers alone.
        return optimizers, [LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup)) for opt in optimizers]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["gan"] = {"critic_steps": self.critic_steps, "generator_steps": self.generator_steps}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        counters = checkpoint.get("gan", {})
        self.critic_steps = counters.get("critic_steps", 0)
        self.generator_steps = counters.get("generator_steps", 0)

    @torch.no_grad()
    def generate(
        self, labels: torch.Tensor | None, generators: list[torch.Generator], progress: bool = False
    ) -> torch.Tensor:
        """One image per generator from its own noise: the same seed gives the same image."""
        return self.generator(self.noise((self.hparams.latent_dim,), generators), labels)
