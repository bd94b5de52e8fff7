"""Training a diffusers `AutoencoderKL` on your own images, as latent diffusion trains its first stage: L1
reconstruction, a KL term and a patch-GAN discriminator (LDM's `LPIPSWithDiscriminator` without LPIPS, whose
network cannot be downloaded here), and its export as a diffusers folder for a latent diffusion model."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch.optim import Adam, Optimizer

import fiberaug
from fiberaug.errors import UserError
from fiberaug.metrics import sliced_wasserstein
from fiberaug.models.base import FiberAugModule
from fiberaug.models.gan_losses import HingeLoss
from fiberaug.nets.autoencoder_kl import autoencoder_kl, downsampling, latent_scale
from fiberaug.nets.diffusers_unet import METADATA

log = logging.getLogger(__name__)

TRAIN = ("all", "decoder")
#: At most this many training images set the exported `scaling_factor`: plenty for one standard deviation.
SCALE_IMAGES = 512


def adaptive_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """taming-transformers' adaptive weight λ = ‖∇_w L_rec‖ / (‖∇_w L_gan‖ + 1e-4), clamped to [0, 1e4] and detached,
    w the decoder's last layer: the adversarial term then pulls on the decoder about as hard as the reconstruction
    does, whatever the scale of either loss, so one `disc_weight` suits any data and network."""
    (rec_grad,) = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    (gan_grad,) = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)
    return (rec_grad.norm() / (gan_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()


def psnr(reconstructions: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Per image, in dB on pixels in [0, 1]: 10·log10(1 / MSE), reconstructions clamped to the images' range [-1, 1]
    (a perfect one reads 100 dB rather than infinity)."""
    mse = ((reconstructions.float().clamp(-1, 1) - images.float()) / 2).square().flatten(1).mean(dim=1)
    return 10 * torch.log10(1 / mse.clamp_min(1e-10))


class AutoencoderModule(FiberAugModule):
    """Trains `vae`, a diffusers `AutoencoderKL`, to reconstruct its training images, against `discriminator`.

    The autoencoder's loss is L1(x, x̂) + `kl_weight`·KL + λ·`disc_weight`·L_gan, x̂ decoded from a sample of the
    posterior. The KL of each image is divided by its number of values, as the L1 is a mean over them: LDM sums both
    over each image, and the same `kl_weight` (LDM's 1e-6) then means the same here. From the `disc_start`-th
    autoencoder step on, the patch discriminator joins: the decoder's adversarial term is the hinge generator loss
    weighted by the adaptive λ (`adaptive_weight`), and the discriminator takes a hinge step on the batch and its
    reconstructions (those of the autoencoder step just taken, not recomputed). Before it, the discriminator is never
    run, so its weights and BatchNorm statistics stay as initialised. Lightning's `global_step` counts optimizer steps:
    one per batch before `disc_start`, two after; `autoencoder_steps` counts batches and is logged.

    `vae` holds `autoencoder_kl`'s architecture options; `pretrained` (a diffusers AutoencoderKL folder) replaces
    them, its architecture recorded so that checkpoints rebuild without the folder. `train="decoder"` fine-tunes a
    pretrained autoencoder's decoder only (as Stability adapted Stable Diffusion's VAE): the encoder and quant_conv
    are frozen, so the latent space, and with it any diffusion model trained in it, stays valid.

    `class_names` is taken as by every model (`train.py` passes the data's) and ignored: an autoencoder is
    unconditional. Validation logs the L1 as `loss/val`, the PSNR as `val/psnr` and the SWD of the first
    `swd_images` validation images' reconstructions against them as `val/swd`, all from the posterior's mean.
    """

    metric_names = (
        "loss/autoencoder", "train/reconstruction", "train/kl", "train/adversarial", "train/adaptive_weight",
        "loss/discriminator", "train/real_score", "train/fake_score", "train/autoencoder_step",
        "loss/val", "val/psnr", "val/swd",
    )

    def __init__(
        self,
        image_size: int,
        channels: int,
        discriminator: Mapping[str, Any],
        class_names: Sequence[str] = (),
        vae: Mapping[str, Any] | None = None,
        pretrained: str | None = None,
        train: str = "all",
        lr: float = 1e-4,
        betas: Sequence[float] = (0.5, 0.9),
        kl_weight: float = 1e-6,
        disc_start: int = 10000,
        disc_weight: float = 0.5,
        swd_images: int = 256,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.automatic_optimization = False
        if train not in TRAIN:
            raise UserError(f"model.train={train!r} is not known; choose one of: {', '.join(TRAIN)}")
        if train == "decoder" and not pretrained:
            raise UserError(
                "model.train=decoder fine-tunes the decoder of an existing autoencoder: set model.pretrained=PATH (an "
                "AutoencoderKL folder), or train the whole one with model.train=all"
            )
        if not isinstance(disc_start, int) or disc_start < 0:
            raise UserError(f"model.disc_start={disc_start!r} must be an integer of at least 0 (in autoencoder steps)")
        vae = dict(vae or {})
        self.vae = autoencoder_kl(channels, image_size, pretrained=pretrained, **vae)
        if pretrained and "config" not in vae:
            # Checkpoints rebuild the architecture from its config; their state_dict brings the weights.
            self.hparams.vae = {**vae, "config": dict(self.vae.config)}
        if train == "decoder":
            self.vae.encoder.requires_grad_(False)
            if self.vae.quant_conv is not None:
                self.vae.quant_conv.requires_grad_(False)
        self.discriminator = instantiate(discriminator, channels=channels, image_size=image_size)
        self.loss = HingeLoss()
        self.autoencoder_steps = 0
        self._swd_sets: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])

    @property
    def downsampling(self) -> int:
        """f: how many pixels per side one latent stands for."""
        return downsampling(self.vae)

    def _posterior(self, images: torch.Tensor) -> Any:
        """The encoder's Gaussian for each image; without a graph when the encoder is frozen."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.hparams.train == "all"):
            return self.vae.encode(images).latent_dist

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] decoded from the posterior's mean, as `AutoencoderKL.forward` does (not clamped)."""
        return self.vae(images).sample

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images = batch[0]
        opt_ae, opt_d = self.optimizers()
        adversarial = self.autoencoder_steps >= self.hparams.disc_start
        with self.toggled_optimizer(opt_ae):
            posterior = self._posterior(images)
            reconstructions = self.vae.decode(posterior.sample()).sample
            rec = F.l1_loss(reconstructions.float(), images.float())
            kl = posterior.kl().float().mean() / images[0].numel()
            loss = rec + self.hparams.kl_weight * kl
            logs = {"train/reconstruction": rec, "train/kl": kl}
            if adversarial:
                gan = self.loss.generator(self.discriminator(reconstructions))
                weight = self.hparams.disc_weight * adaptive_weight(rec, gan, self.vae.decoder.conv_out.weight)
                loss = loss + weight * gan
                logs |= {"train/adversarial": gan, "train/adaptive_weight": weight}
            opt_ae.zero_grad(set_to_none=True)
            self.manual_backward(loss)
            opt_ae.step()
        logs["loss/autoencoder"] = loss
        self.autoencoder_steps += 1
        if adversarial:
            logs |= self._discriminator_step(opt_d, images, reconstructions.detach())
        # "step" sets the x-axis of the logged values: optimizer steps, as for checkpoints and sample grids.
        logs |= {"train/autoencoder_step": float(self.autoencoder_steps), "step": float(self.global_step)}
        self.log_dict({k: v.detach() if torch.is_tensor(v) else v for k, v in logs.items()}, sync_dist=True)

    def _discriminator_step(
        self, opt: Optimizer, real: torch.Tensor, fake: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        with self.toggled_optimizer(opt):
            real_score, fake_score = self.discriminator(real), self.discriminator(fake)
            loss = self.loss.critic(real_score, fake_score)
            opt.zero_grad(set_to_none=True)
            self.manual_backward(loss)
            opt.step()
        return {
            "loss/discriminator": loss, "train/real_score": real_score.float().mean(),
            "train/fake_score": fake_score.float().mean(),
        }

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images = batch[0]
        reconstructions = self.reconstruct(images)
        self.log("loss/val", F.l1_loss(reconstructions.float(), images.float()), prog_bar=True, sync_dist=True)
        self.log("val/psnr", psnr(reconstructions, images).mean(), sync_dist=True)
        real, fake = self._swd_sets
        room = self.hparams.swd_images - sum(len(x) for x in real)
        if room > 0:
            real.append(images[:room].float().cpu())
            fake.append(reconstructions[:room].float().clamp(-1, 1).cpu())

    def on_validation_epoch_end(self) -> None:
        real, fake = self._swd_sets
        if real:
            swd = sliced_wasserstein(torch.cat(real), torch.cat(fake), seed=0)["swd"]
            self.log("val/swd", swd, sync_dist=True)
        self._swd_sets = ([], [])

    def configure_optimizers(self) -> list[Optimizer]:
        betas = tuple(self.hparams.betas)
        trainable = [p for p in self.vae.parameters() if p.requires_grad]
        return [
            Adam(trainable, lr=self.hparams.lr, betas=betas, **self.fused()),
            Adam(self.discriminator.parameters(), lr=self.hparams.lr, betas=betas, **self.fused()),
        ]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["autoencoder"] = {"autoencoder_steps": self.autoencoder_steps}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.autoencoder_steps = checkpoint.get("autoencoder", {}).get("autoencoder_steps", 0)

    def on_train_end(self) -> None:
        """Export the final weights to `<run dir>/export`, scaled by the training images' latents."""
        if self.trainer.is_global_zero:
            folder = Path(self.trainer.default_root_dir) / "export"
            self.export(folder, self.trainer.datamodule.reference_images("train", SCALE_IMAGES)[0])
            log.info("exported the autoencoder (f=%d) to %s", self.downsampling, folder)

    def export(self, folder: Path, images: torch.Tensor) -> None:
        """A diffusers folder (`AutoencoderKL.from_pretrained(folder)`, safetensors) whose config's `scaling_factor`
        is `latent_scale` of `images`, or, when only the decoder trained, the pretrained one's (the latents did not
        change); and `fiberaug.json`, what diffusers does not record: f and the training settings."""
        decoder_only = self.hparams.train == "decoder"
        if decoder_only:
            source = f"kept from model.pretrained={self.hparams.pretrained} (its encoder did not train)"
        else:
            self.vae.register_to_config(scaling_factor=latent_scale(self.vae, images))
            source = f"1/std of the latents of {len(images)} training images"
        self.vae.save_pretrained(str(folder), safe_serialization=True)
        settings = ("train", "pretrained", "kl_weight", "disc_start", "disc_weight", "lr", "betas")
        metadata = {
            "fiberaug_version": fiberaug.__version__,
            "f": self.downsampling,
            "scaling_factor": self.vae.config.scaling_factor,
            "scaling_factor_from": source,
            "training": {key: self.hparams[key] for key in settings} | {"autoencoder_steps": self.autoencoder_steps},
        }
        (folder / METADATA).write_text(json.dumps(metadata, indent=2))
