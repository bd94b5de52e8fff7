"""One LightningModule for DDPM training and DDPM/DDIM sampling around any noise-predicting denoiser."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch.optim.lr_scheduler import LambdaLR

from fiberaug.diffusion import denoise, guided, make_sampler, noise_scheduler
from fiberaug.errors import UserError
from fiberaug.models.base import GenerativeModule

DEFAULT_SAMPLING = {"sampler": "ddim", "steps": 50, "eta": 0.0, "guidance_scale": 2.0}


class DiffusionModule(GenerativeModule):
    """Trains `denoiser` to predict the noise added by the forward process, and samples with it.

    `denoiser` is a config with `_target_`: any callable returning an `nn.Module` with
    `forward(x, t, labels) -> eps` and `enable_gradient_checkpointing()`. It is called with `channels`,
    `image_size` and `num_classes`, and built here so that the checkpoint's hyperparameters rebuild it.
    Labels are dropped to the "no label" index with probability `cond_drop_prob` during training, which
    teaches the same network the unconditional prediction that classifier-free guidance needs.
    """

    sampling_options = ("sampler", "steps", "eta", "guidance_scale")

    def __init__(
        self,
        denoiser: Mapping[str, Any],
        image_size: int,
        channels: int,
        class_names: Sequence[str] = (),
        schedule: str = "cosine",
        num_train_timesteps: int = 1000,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        cond_drop_prob: float = 0.1,
        sampling: Mapping[str, Any] | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__(class_names)
        self.save_hyperparameters(logger=False)
        self.net = instantiate(denoiser, channels=channels, image_size=image_size, num_classes=self.num_classes)
        if gradient_checkpointing:
            self.net.enable_gradient_checkpointing()
        self.noise_scheduler = noise_scheduler(schedule, num_train_timesteps)
        self.sampling = {**DEFAULT_SAMPLING, **(sampling or {})}
        make_sampler(self.noise_scheduler, self.sampling["sampler"], self.sampling["steps"])  # fail early

    def _condition(self, labels: torch.Tensor) -> torch.Tensor | None:
        if not self.num_classes:
            return None
        if self.training and self.hparams.cond_drop_prob > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.hparams.cond_drop_prob
            labels = labels.masked_fill(drop, self.num_classes)
        return labels

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        images, labels = batch
        noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
        t = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (images.shape[0],), generator=generator,
            device=images.device,
        )
        noisy = self.noise_scheduler.add_noise(images, noise, t)
        return F.mse_loss(self.net(noisy, t, self._condition(labels)).float(), noise.float())

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        # The same timesteps and noise at every validation, so the curve shows the model, not the draw.
        generator = torch.Generator(device=self.device).manual_seed(batch_idx)
        self.log("val/loss", self._loss(batch, generator), prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        warmup = max(1, self.hparams.warmup_steps)
        scheduler = LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @torch.no_grad()
    def generate(
        self,
        labels: torch.Tensor | None,
        generators: list[torch.Generator],
        progress: bool = False,
        sampler: str | None = None,
        steps: int | None = None,
        eta: float | None = None,
        guidance_scale: float | None = None,
    ) -> torch.Tensor:
        """Sample with `sampler` (`ddpm` or `ddim`) over `steps`; unset options take the model's defaults."""
        given = {"sampler": sampler, "steps": steps, "eta": eta, "guidance_scale": guidance_scale}
        opts = {**self.sampling, **{k: v for k, v in given.items() if v is not None}}
        if opts["eta"] < 0:
            raise UserError(f"eta={opts['eta']} must be at least 0 (0: deterministic DDIM, 1: DDPM's variance)")
        sched = make_sampler(self.noise_scheduler, opts["sampler"], opts["steps"])
        eps_fn = guided(self.net, labels, self.num_classes, float(opts["guidance_scale"]))
        noise = self.noise((self.hparams.channels, self.hparams.image_size, self.hparams.image_size), generators)
        return denoise(eps_fn, sched, noise, generators, eta=float(opts["eta"]), progress=progress)
