"""One LightningModule for DDPM training and DDPM/DDIM sampling around any noise-predicting denoiser, in pixel space
or in the latent space of a frozen autoencoder, conditioned on class labels or (Stable Diffusion) on prompts."""

from __future__ import annotations

import inspect
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from hydra.utils import get_object, instantiate
from torch.optim.lr_scheduler import LambdaLR

import fiberaug
from fiberaug.data.latents import LatentCache
from fiberaug.diffusion import (
    PREDICTION_TYPES,
    denoise,
    guided,
    linear_betas,
    make_sampler,
    make_weighting,
    noise_scheduler,
    pretrained_scheduler,
    training_target,
)
from fiberaug.errors import UserError
from fiberaug.models.base import GenerativeModule

log = logging.getLogger(__name__)

AUTOENCODER_KEY = "model.autoencoder"
#: At most this many training images estimate the latent scale of an autoencoder whose folder gives none.
SCALE_IMAGES = 256

DEFAULT_SAMPLING = {"sampler": "dpmpp", "steps": 20, "eta": 0.0, "guidance_scale": 2.0}
#: adamw: torch's (fused on CUDA) | adamw8bit: bitsandbytes' 8-bit AdamW, a quarter of the optimizer's memory.
OPTIMIZERS = ("adamw", "adamw8bit")
SAMPLING_OPTIONS = ("sampler", "steps", "eta", "guidance_scale")
#: What only a text-conditioned model samples with: a prompt (instead of the class prompts), a negative prompt (in
#: place of the empty one that guidance pushes away from), and an image size other than the training's.
TEXT_OPTIONS = ("prompt", "negative_prompt", "height", "width")


class DiffusionModule(GenerativeModule):
    """Trains `denoiser` to predict the noise added by the forward process (or v), and samples with it.

    `denoiser` is a config with `_target_`: any callable returning an `nn.Module` with
    `forward(x, t, labels) -> eps` (or v) and `enable_gradient_checkpointing()`. It is called with `channels`,
    `image_size` and `num_classes` (and `pretrained` when given), and built here so that the
    checkpoint's hyperparameters rebuild it. Optional abilities of a denoiser: `add_lora(**config)` (for
    `lora`), `config` (its architecture, recorded so that checkpoints of a pretrained denoiser rebuild
    without the pretrained files) and `save_pretrained(...)` (an export to `<run dir>/export` when
    training ends).

    Labels are dropped to the "no label" index with probability `cond_drop_prob` during training, which
    teaches the same network the unconditional prediction that classifier-free guidance needs.
    `lora` (PEFT `LoraConfig` arguments) freezes the pretrained denoiser and trains adapters only.

    `prediction_type` (`epsilon` or `v_prediction`) is what the denoiser predicts; the schedule carries it
    to every sampler and to the export. `loss_weighting="min_snr"` weighs each sample's squared error by
    Min-SNR-γ (`min_snr_gamma`); the validation loss is the same weighted objective, so compare `loss/val`
    only between runs with the same prediction type and weighting.

    `autoencoder` (a diffusers AutoencoderKL folder) makes it latent diffusion: the denoiser is built for the latent
    shape (latent channels, `image_size / f`) and learns (z − shift)·scale of posterior samples z, and `generate`
    decodes. The autoencoder is frozen (eval mode, no gradients, so outside the optimizer and the EMA) and left out of
    every state_dict: checkpoints record its path and content hash instead. `scale` is the folder's `scaling_factor`,
    else 1/std of the latents of the first training images, estimated when fitting starts and kept in the
    `latent_scale` buffer (so a resumed run reuses it). Samplers do not clip x0 in latent space. With `latent_cache`,
    the posterior of each image the data sends with a pixel digest is computed once and kept (`fiberaug.data.latents`:
    up to `latent_cache_mb` MiB in memory, the rest in the data's cache folder); latents are still drawn from it
    afresh at every step.

    A text-conditioned denoiser (Stable Diffusion's, `fiberaug.nets.stable_diffusion`) is built from the pipeline
    folder `pretrained`, whose `vae/` is the autoencoder and whose scheduler the noise schedule (`prediction_type`
    None: the folder's). It is conditioned on prompts: an image's caption where the data has one, else
    `prompt_template` with `{class}` its class name; `cond_drop_prob` is then the caption dropout (the empty prompt,
    for guidance). Its frozen weights are left out of checkpoints, which record the folder's path and content hash;
    `noise_offset` adds Guttenberg's offset noise (brighter darks and darker lights than SD learns otherwise).
    """

    metric_names = ("loss/train", "loss/val")

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
        channels_last: bool = False,
        compile: bool = False,
        pretrained: str | None = None,
        lora: Mapping[str, Any] | None = None,
        lora_on_random_base: bool = False,
        merge_lora: bool = False,
        prediction_type: str = "epsilon",
        loss_weighting: str = "none",
        min_snr_gamma: float = 5.0,
        autoencoder: str | None = None,
        latent_cache: bool = True,
        latent_cache_mb: float = 1024,
        prompt_template: str = "{class}",
        lora_text_encoder: Mapping[str, Any] | None = None,
        noise_offset: float = 0.0,
        optimizer: str = "adamw",
    ) -> None:
        super().__init__(class_names, channels_last=channels_last, compile=compile)
        self.save_hyperparameters(logger=False)
        self.autoencoder = None
        self.latent_cache: LatentCache | None = None
        self.latent_shape = (channels, image_size, image_size)
        self.text_conditioned = getattr(get_object(denoiser["_target_"]), "text_conditioned", False)
        self.base_record: dict[str, str] | None = None
        if self.text_conditioned:
            pretrained, autoencoder = self._attach_pipeline(pretrained, autoencoder, prompt_template)
        if autoencoder:
            self._attach_autoencoder(autoencoder, channels, image_size)
        if self.text_conditioned:
            self.noise_scheduler = pretrained_scheduler(Path(pretrained) / "scheduler", prediction_type)
        else:
            self.noise_scheduler = noise_scheduler(
                schedule, num_train_timesteps, clip_sample=not autoencoder, prediction_type=prediction_type
            )
            _check_pretrained_prediction(pretrained, prediction_type)
        self.loss_weights = make_weighting(loss_weighting, min_snr_gamma)
        if optimizer not in OPTIMIZERS:
            raise UserError(f"model.optimizer={optimizer!r} is not known; choose one of: {', '.join(OPTIMIZERS)}")
        self.net = self._build_denoiser(denoiser, self.latent_shape[0], self.latent_shape[1], pretrained)
        if lora:
            self._add_lora(lora, pretrained, lora_on_random_base)
        if lora_text_encoder:
            if not hasattr(self.net, "add_text_encoder_lora"):
                raise UserError("model.lora_text_encoder needs a text-conditioned denoiser (model=sd_lora)")
            self.net.add_text_encoder_lora(**lora_text_encoder)
        if gradient_checkpointing:
            self.net.enable_gradient_checkpointing()
        self.sampling = {**DEFAULT_SAMPLING, **(sampling or {})}
        make_sampler(self.noise_scheduler, self.sampling["sampler"], self.sampling["steps"])  # fail early

    def _attach_pipeline(self, pretrained: str | None, autoencoder: str | None, prompt_template: str
                         ) -> tuple[str, str]:
        """A Stable Diffusion folder: checked, recorded by path and content hash, its VAE the autoencoder; its frozen
        weights kept out of every state_dict."""
        from fiberaug.nets.stable_diffusion import pipeline_folder, pipeline_sha256

        if not pretrained:
            raise UserError("model.pretrained is not set: pass a Stable Diffusion pipeline folder (model_index.json, "
                            "unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
        if "{class}" not in prompt_template and self.num_classes:
            log.warning("model.prompt_template=%r has no {class}: every class gets the same prompt", prompt_template)
        try:
            prompt_template.format_map({"class": ""})
        except (KeyError, IndexError, ValueError) as exc:
            raise UserError(f"model.prompt_template={prompt_template!r} is not a template with {{class}} as its only "
                            f"field ({exc})") from exc
        folder = pipeline_folder(pretrained)
        self.hparams.pretrained = str(folder)
        self.base_record = {"path": str(folder), "sha256": pipeline_sha256(folder)}
        self.register_state_dict_post_hook(_without_frozen_net)
        self.register_load_state_dict_post_hook(_frozen_net_not_missing)
        return str(folder), autoencoder or str(folder / "vae")

    def _attach_autoencoder(self, path: str, channels: int, image_size: int) -> None:
        """Load the frozen autoencoder and set the latent shape, scale and shift, and what checkpoints record."""
        # Here, not at the top: diffusers' AutoencoderKL imports peft and transformers, which pixel models never need.
        from fiberaug.nets.autoencoder_kl import autoencoder_folder, downsampling, folder_sha256, load_autoencoder

        folder = autoencoder_folder(path, AUTOENCODER_KEY).resolve()
        vae = load_autoencoder(path, AUTOENCODER_KEY).eval().requires_grad_(False)
        if vae.config.in_channels != channels:
            raise UserError(
                f"{AUTOENCODER_KEY}={path} takes {vae.config.in_channels} channels, the data has {channels}: set "
                f"data.channels={vae.config.in_channels}"
            )
        f = downsampling(vae)
        if image_size % f:
            raise UserError(f"data.image_size={image_size} does not fit {AUTOENCODER_KEY}={path} (f={f}): it takes "
                            f"multiples of {f}")
        # The raw config: AutoencoderKL's fills in SD's 0.18215 where the folder gives no scaling_factor.
        config = json.loads((folder / "config.json").read_text())
        scale = config.get("scaling_factor")
        self.register_buffer("latent_scale", torch.tensor(math.nan if scale is None else float(scale)))
        self.latent_shift = float(config.get("shift_factor") or 0.0)
        self.autoencoder_record = {"path": str(folder), "sha256": folder_sha256(folder)}
        self.hparams.autoencoder = str(folder)  # absolute: the checkpoint rebuilds from any working directory
        self.autoencoder = vae
        self.latent_shape = (vae.config.latent_channels, image_size // f, image_size // f)
        self.register_state_dict_post_hook(_without_autoencoder)
        self.register_load_state_dict_post_hook(_autoencoder_not_missing)

    def frozen_modules(self) -> dict[str, torch.nn.Module]:
        """Submodules that never train, which the EMA shares instead of copying."""
        return {} if self.autoencoder is None else {"autoencoder": self.autoencoder}

    def train(self, mode: bool = True) -> DiffusionModule:
        """The autoencoder stays in eval mode whatever Lightning switches: it is frozen."""
        super().train(mode)
        if self.autoencoder is not None:
            self.autoencoder.eval()
        return self

    def _build_denoiser(
        self, denoiser: Mapping[str, Any], channels: int, image_size: int, pretrained: str | None
    ) -> torch.nn.Module:
        if not pretrained:
            return instantiate(denoiser, channels=channels, image_size=image_size, num_classes=self.num_classes)
        if "pretrained" not in inspect.signature(get_object(denoiser["_target_"])).parameters:
            raise UserError(f"model.pretrained applies to diffusers denoisers, not to {denoiser['_target_']}")
        net = instantiate(
            denoiser, channels=channels, image_size=image_size, num_classes=self.num_classes, pretrained=pretrained
        )
        if self.text_conditioned:  # rebuilt from its folder: checkpoints hold only what trains
            return net
        if net.num_classes != self.num_classes:
            if net.num_classes:
                raise UserError(
                    f"the UNet of model.pretrained={pretrained} knows {net.num_classes} classes, the data "
                    f"{self.num_classes}: fine-tune on data with the same classes, or pretrain unconditionally"
                )
            log.warning("the UNet of model.pretrained=%s is unconditional: training ignores the labels", pretrained)
            self.class_names = self.hparams.class_names = []
        # Checkpoints rebuild the architecture from its config; their state_dict brings the weights.
        self.hparams.denoiser = {**denoiser, "config": net.config}
        return net

    def _add_lora(self, lora: Mapping[str, Any], pretrained: str | None, on_random_base: bool) -> None:
        if not hasattr(self.net, "add_lora"):
            raise UserError(
                f"model.lora needs a denoiser with LoRA support (model=diffusers_lora), not {type(self.net).__name__}"
            )
        if not pretrained:
            if not on_random_base:
                raise UserError(
                    "model.pretrained is not set: LoRA fine-tunes a pretrained UNet; pass model.pretrained=PATH "
                    "(an export folder such as outputs/train/runs/<run>/export, or a hub id), or force LoRA "
                    "on a randomly initialised UNet with model.lora_on_random_base=true"
                )
            log.warning("LoRA on a randomly initialised UNet (model.lora_on_random_base=true): expect little")
        self.net.add_lora(**lora)
        trainable = sum(p.numel() for p in self.net.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.net.parameters())
        log.info("LoRA: %d trainable parameters of %d (%.2f%%)", trainable, total, 100 * trainable / total)

    def prompts(self, labels: torch.Tensor | None, captions: Sequence[str] | None, count: int) -> list[str]:
        """Each image's prompt: its caption where it has one, else the template with its class name ("" for none)."""
        names = [self.class_names[i] if 0 <= i < self.num_classes else "" for i in labels.tolist()] \
            if labels is not None else [""] * count
        template = self.hparams.prompt_template
        return [caption or " ".join(template.format_map({"class": name}).split())
                for caption, name in zip(captions or [""] * count, names, strict=True)]

    def _condition(self, labels: torch.Tensor, captions: Sequence[str] | None = None) -> torch.Tensor | None:
        drop = None
        if self.training and self.hparams.cond_drop_prob > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.hparams.cond_drop_prob
        if self.text_conditioned:
            prompts = self.prompts(labels, captions, len(labels))
            dropped = drop.tolist() if drop is not None else [False] * len(prompts)
            return self.net.encode_prompts(["" if d else p for p, d in zip(prompts, dropped, strict=True)])
        if not self.num_classes:
            return None
        return labels.masked_fill(drop, self.num_classes) if drop is not None else labels

    def _loss(self, batch: Sequence[Any], generator: torch.Generator | None = None) -> torch.Tensor:
        images, labels, *rest = batch
        digests = next((r for r in rest if torch.is_tensor(r)), None)
        captions = next((r for r in rest if isinstance(r, (list, tuple))), None)
        if self.autoencoder is not None:
            images = self.encode(images, generator, digests)
        images = self.memory_format(images)
        noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
        if self.hparams.noise_offset:  # a shift of each image's channel means too, which plain noise hardly makes
            shape = (*images.shape[:2], 1, 1)
            noise = noise + self.hparams.noise_offset * torch.randn(shape, generator=generator, device=images.device,
                                                                     dtype=images.dtype)
        t = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (images.shape[0],), generator=generator,
            device=images.device,
        )
        noisy = self.noise_scheduler.add_noise(images, noise, t)
        prediction = self.net(noisy, t, self._condition(labels, captions)).float()
        target = training_target(self.noise_scheduler, images, noise, t).float()
        if self.loss_weights is None:
            return F.mse_loss(prediction, target)
        per_sample = F.mse_loss(prediction, target, reduction="none").flatten(1).mean(dim=1)
        return (per_sample * self.loss_weights(self.noise_scheduler, t)).mean()

    @torch.no_grad()
    def encode(
        self, images: torch.Tensor, generator: torch.Generator | None = None, digests: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The denoiser's training targets: posterior samples, shifted and scaled; the posteriors from the latent
        cache where the images come with pixel digests."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        if digests is not None and self.latent_cache is not None:
            moments = self.latent_cache.moments(digests, images, self.posterior_moments)
        else:
            moments = self.posterior_moments(images)
        latents = DiagonalGaussianDistribution(moments).sample(generator)
        return (latents - self.latent_shift) * self.latent_scale

    @torch.no_grad()
    def posterior_moments(self, images: torch.Tensor) -> torch.Tensor:
        """The encoder's mean and log-variance, stacked on the channels. In float32 without autocast: Stable
        Diffusion's VAE overflows in float16."""
        with torch.autocast(images.device.type, enabled=False):
            return self.autoencoder.encode(images.float()).latent_dist.parameters

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from (scaled) latents, in float32 without autocast."""
        with torch.autocast(latents.device.type, enabled=False):
            images = self.autoencoder.decode(latents.float() / self.latent_scale + self.latent_shift).sample
        return images.clamp(-1, 1)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.text_conditioned and hasattr(datamodule, "serve_captions"):
            datamodule.serve_captions()
        if self.autoencoder is not None and torch.isnan(self.latent_scale):  # not from the folder nor a checkpoint
            self.estimate_latent_scale()
        if self.autoencoder is not None and self.hparams.latent_cache:
            self.start_latent_cache()

    def start_latent_cache(self) -> None:
        """Ask the data for pixel digests (training images too when their pipeline gives each a few fixed forms)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if not hasattr(datamodule, "serve_digests"):
            return
        refusal = datamodule.latent_cache_refusal()
        datamodule.serve_digests(train=refusal is None)
        folder = datamodule.latent_cache_dir
        self.latent_cache = LatentCache(
            self.autoencoder_record["sha256"], int(self.hparams.latent_cache_mb * 2**20), folder
        )
        where = f"up to {self.hparams.latent_cache_mb:g} MiB in memory, " + (f"on disk in {folder}" if folder else
                                                                              "no disk tier")
        if refusal:
            log.info("latent cache: validation images only (%s); %s. Training batches are encoded as drawn: %s",
                     where, refusal, "augment=none or flip with data.resize_policy=resize caches them too")
        else:
            log.info("latent cache: every image and flip encoded once (%s)", where)

    def on_train_epoch_end(self) -> None:
        if self.latent_cache is not None:
            encoded, reused = self.latent_cache.take_counts()
            if encoded:
                log.info("latent cache: encoded %d images, reused %d (%.1f MiB in memory)", encoded, reused,
                         self.latent_cache.memory_used / 2**20)

    def estimate_latent_scale(self) -> None:
        """LDM's scale_by_std on the first training images, the same on every process (rank 0's)."""
        from fiberaug.nets.autoencoder_kl import latent_scale

        images = self.trainer.datamodule.reference_images("train", SCALE_IMAGES)[0]
        scale = self.trainer.strategy.broadcast(latent_scale(self.autoencoder, images), src=0)
        self.latent_scale.fill_(scale)
        log.info("latent scale %.6g: 1/std of the latents of %d training images (%s=%s gives no scaling_factor)",
                 scale, len(images), AUTOENCODER_KEY, self.hparams.autoencoder)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.autoencoder is not None:
            checkpoint["fiberaug"]["autoencoder"] = dict(self.autoencoder_record)
        if self.base_record is not None:
            checkpoint["fiberaug"]["base"] = dict(self.base_record)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        recorded = checkpoint.get("fiberaug", {})
        for key, now, what in ((AUTOENCODER_KEY, self.autoencoder_record if self.autoencoder is not None else None,
                                "the denoiser learned the latents of the autoencoder as it was"),
                               ("model.pretrained", self.base_record,
                                "its adapters were trained on the base as it was")):
            then = recorded.get("autoencoder" if key == AUTOENCODER_KEY else "base")
            if now and then and then["sha256"] != now["sha256"]:
                log.warning("%s=%s changed since this checkpoint was saved (sha256 %s… then, %s… now): %s", key,
                            now["path"], then["sha256"][:12], now["sha256"][:12], what)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        # Not in the progress bar: Lightning reads progress-bar values after every batch, a host-device sync per step.
        self.log("loss/train", loss, sync_dist=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        # The same timesteps and noise at every validation, so the curve shows the model, not the draw.
        generator = torch.Generator(device=self.device).manual_seed(batch_idx)
        self.log("loss/val", self._loss(batch, generator), prog_bar=True, sync_dist=True)

    def networks(self) -> list[torch.nn.Module]:
        return [self.net]

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.parameters() if p.requires_grad]
        hp = self.hparams
        if hp.optimizer == "adamw8bit":
            try:
                from bitsandbytes.optim import AdamW8bit
            except ImportError as exc:
                raise UserError("model.optimizer=adamw8bit needs bitsandbytes, which is not installed: pip install "
                                "'fiberaug[bnb]' (CUDA), or use model.optimizer=adamw") from exc
            optimizer = AdamW8bit(params, lr=hp.lr, weight_decay=hp.weight_decay)
        else:
            optimizer = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay, **self.fused())
        warmup = max(1, self.hparams.warmup_steps)
        scheduler = LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @property
    def sampling_options(self) -> tuple[str, ...]:
        return SAMPLING_OPTIONS + (TEXT_OPTIONS if self.text_conditioned else ())

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
        prompt: str | None = None,
        negative_prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
    ) -> torch.Tensor:
        """Sample with `sampler` over `steps`; unset options take the model's defaults. A text-conditioned model
        draws `prompt` (else each label's class prompt), guided away from `negative_prompt` (else the empty one), at
        `height` × `width` (else the training's size)."""
        given = {"sampler": sampler, "steps": steps, "eta": eta, "guidance_scale": guidance_scale}
        opts = {**self.sampling, **{k: v for k, v in given.items() if v is not None}}
        if opts["eta"] < 0:
            raise UserError(f"eta={opts['eta']} must be at least 0 (0: deterministic DDIM, 1: DDPM's variance)")
        sched = make_sampler(self.noise_scheduler, opts["sampler"], opts["steps"])
        if self.text_conditioned:
            count = len(generators)
            condition = self.net.encode_prompts([prompt] * count if prompt else self.prompts(labels, None, count))
            uncondition = self.net.encode_prompts([negative_prompt or ""] * count)
        else:
            if prompt or negative_prompt or height or width:
                raise UserError("prompt, negative_prompt, height and width apply to text-conditioned models "
                                "(model=sd_lora), not to this one")
            condition = labels
            uncondition = None if labels is None else torch.full_like(labels, self.num_classes)
        eps_fn = guided(self.net, condition, uncondition, float(opts["guidance_scale"]))
        noise = self.noise(self._sample_shape(height, width), generators)
        samples = denoise(eps_fn, sched, noise, generators, eta=float(opts["eta"]), progress=progress)
        if self.autoencoder is None:
            return samples
        if torch.isnan(self.latent_scale):
            raise UserError(f"the latent scale is unknown: {AUTOENCODER_KEY}={self.hparams.autoencoder} gives no "
                            "scaling_factor and no training estimated one; sample from a trained checkpoint")
        return self.decode(samples)

    def _sample_shape(self, height: int | None, width: int | None) -> tuple[int, ...]:
        """The latent (or image) shape of samples `height` × `width` pixels, by default the training's size."""
        channels, h, w = self.latent_shape
        if height is None and width is None:
            return self.latent_shape
        f = self.hparams.image_size // h
        size = {"height": height or h * f, "width": width or w * f}
        bad = {k: v for k, v in size.items() if not isinstance(v, int) or v < f or v % f}
        if bad:
            raise UserError(f"{', '.join(f'{k}={v!r}' for k, v in bad.items())} must be a positive multiple of {f} "
                            "(the autoencoder's downsampling)")
        return channels, size["height"] // f, size["width"] // f

    def on_train_end(self) -> None:
        """Export denoisers that have a standard format (diffusers) to `<run dir>/export`, with the final weights."""
        if hasattr(self.net, "save_pretrained") and self.trainer.is_global_zero:
            folder = Path(self.trainer.default_root_dir) / "export"
            # A pipeline's export carries the sampler it draws with by default, as plain diffusers would load it.
            scheduler = make_sampler(self.noise_scheduler, self.sampling["sampler"], self.sampling["steps"]) \
                if self.text_conditioned else self.noise_scheduler
            self.net.save_pretrained(folder, scheduler, self.export_metadata(), self.hparams.merge_lora)
            if self.autoencoder is not None and not self.text_conditioned:  # a pipeline's base holds its VAE
                for pipeline in (folder, folder / "merged"):
                    if pipeline.is_dir():
                        self.export_autoencoder(pipeline / "vae")
            log.info("exported the model to %s", folder)

    def export_autoencoder(self, folder: Path) -> None:
        """The autoencoder as a diffusers folder beside the UNet, its config holding the scale and shift used."""
        self.autoencoder.save_pretrained(str(folder), safe_serialization=True)
        config = json.loads((folder / "config.json").read_text())
        config |= {"scaling_factor": self.latent_scale.item(), "shift_factor": self.latent_shift or None}
        (folder / "config.json").write_text(json.dumps(config, indent=2))

    def export_metadata(self) -> dict[str, Any]:
        """What a diffusers folder does not hold: class names, sampling defaults, and the base of a LoRA adapter."""
        base = self.hparams.pretrained if self.hparams.lora else None
        if base and Path(base).expanduser().exists():
            base = str(Path(base).expanduser().resolve())
        if self.text_conditioned:
            return {"fiberaug_version": fiberaug.__version__, "class_names": self.class_names, "base": self.base_record,
                    "prompt_template": self.hparams.prompt_template, "image_size": self.hparams.image_size,
                    "sampling": self.sampling}
        return {
            "fiberaug_version": fiberaug.__version__,
            "class_names": self.class_names,
            "schedule": self.hparams.schedule,
            "sampling": self.sampling,
            "base": base,
            "autoencoder": None if self.autoencoder is None else {
                **self.autoencoder_record,
                "scaling_factor": self.latent_scale.item(),
                "shift_factor": self.latent_shift,
            },
        }

    @classmethod
    def from_export(cls, folder: str | Path, adapter: str | Path | None = None) -> DiffusionModule:
        """A model from a diffusers export folder, plus a LoRA adapter folder when given.

        A LoRA run's export holds only the adapter; its base is the folder recorded in `fiberaug.json`. A latent
        diffusion export holds its autoencoder in `vae/`.
        """
        from fiberaug.nets.diffusers_unet import read_metadata

        folder = Path(folder).expanduser()
        meta = read_metadata(folder)
        if (folder / "text_encoder").is_dir() or (folder / "pytorch_lora_weights.safetensors").is_file():
            return cls._from_pipeline(folder, meta)
        if (folder / "adapter_config.json").is_file():
            if adapter or not meta.get("base"):
                raise UserError(f"{folder} holds a LoRA adapter: pass its base export as ckpt_path and it as adapter=")
            return cls.from_export(meta["base"], adapter=folder)
        unet_path, scheduler_path = folder / "unet" / "config.json", folder / "scheduler" / "scheduler_config.json"
        if not (unet_path.is_file() and scheduler_path.is_file()):
            raise UserError(f"{folder} is not a diffusers export (no unet/ and scheduler/); pass a .ckpt or an export/")
        unet_config, scheduler_config = json.loads(unet_path.read_text()), json.loads(scheduler_path.read_text())
        num_classes = max(0, (unet_config.get("num_class_embeds") or 0) - 1)
        vae_path = folder / "vae" / "config.json"
        vae_config = json.loads(vae_path.read_text()) if vae_path.is_file() else None
        f = 2 ** (len(vae_config["block_out_channels"]) - 1) if vae_config else 1
        model = cls(
            denoiser={"_target_": "fiberaug.nets.diffusers_unet.diffusers_unet"},
            image_size=unet_config["sample_size"] * f,
            channels=vae_config["in_channels"] if vae_config else unet_config["in_channels"],
            class_names=meta.get("class_names", [str(i) for i in range(num_classes)]),
            schedule=meta.get("schedule") or _schedule_name(scheduler_config, folder),
            num_train_timesteps=scheduler_config["num_train_timesteps"],
            sampling=meta.get("sampling"),
            pretrained=str(folder),
            prediction_type=scheduler_config.get("prediction_type", "epsilon"),
            autoencoder=str(folder / "vae") if vae_config else None,
        )
        if adapter:
            model.net.load_adapter(Path(adapter).expanduser())
        return model.eval()

    @classmethod
    def _from_pipeline(cls, folder: Path, meta: Mapping[str, Any]) -> DiffusionModule:
        """A Stable Diffusion pipeline folder (a download, or an sd_lora run's export/merged), or an sd_lora run's
        export: its adapter (diffusers' LoRA format) on the base folder it records."""
        from fiberaug.nets.stable_diffusion import LORA_WEIGHTS, pipeline_folder

        adapter = (folder / LORA_WEIGHTS).is_file()
        base = pipeline_folder(meta["base"]["path"] if adapter and meta.get("base") else folder, "ckpt_path")
        unet = json.loads((base / "unet" / "config.json").read_text())
        vae = json.loads((base / "vae" / "config.json").read_text())
        model = cls(
            denoiser={"_target_": "fiberaug.nets.stable_diffusion.StableDiffusionUNet"},
            image_size=meta.get("image_size") or unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1),
            channels=vae["in_channels"],
            class_names=meta.get("class_names", []),
            sampling=meta.get("sampling", {"steps": 25, "guidance_scale": 7.5}),
            pretrained=str(base),
            prediction_type=None,
            prompt_template=meta.get("prompt_template", "{class}"),
        )
        if adapter:
            model.net.load_lora(folder)
        return model.eval()


def _without_frozen_net(module: DiffusionModule, state_dict: dict[str, Any], prefix: str, metadata: Any) -> None:
    """A pretrained pipeline's frozen weights stay out of state dicts (checkpoints, the EMA's): its folder has them."""
    for name, parameter in module.net.named_parameters():
        if not parameter.requires_grad:
            state_dict.pop(f"{prefix}net.{name}", None)


def _frozen_net_not_missing(module: DiffusionModule, keys: Any) -> None:
    """Loading a state dict without the frozen weights keeps those loaded from the pipeline's folder."""
    frozen = {f"net.{name}" for name, p in module.net.named_parameters() if not p.requires_grad}
    keys.missing_keys[:] = [k for k in keys.missing_keys if not any(k == n or k.endswith(f".{n}") for n in frozen)]


def _without_autoencoder(module: DiffusionModule, state_dict: dict[str, Any], prefix: str, metadata: Any) -> None:
    """State dicts (checkpoints, the EMA's average) leave out the frozen autoencoder: it is loaded from its folder."""
    for key in [k for k in state_dict if k.startswith(f"{prefix}autoencoder.")]:
        del state_dict[key]


def _autoencoder_not_missing(module: DiffusionModule, keys: Any) -> None:
    """Loading a state dict without the autoencoder's weights keeps those loaded from its folder."""
    names = {f"autoencoder.{name}" for name in module.autoencoder.state_dict()}
    keys.missing_keys[:] = [k for k in keys.missing_keys if not any(k == n or k.endswith(f".{n}") for n in names)]


def _check_pretrained_prediction(pretrained: str | None, prediction_type: str) -> None:
    """A pretrained export must be fine-tuned with the prediction type it learned (its scheduler says which)."""
    config = Path(pretrained).expanduser() / "scheduler" / "scheduler_config.json" if pretrained else None
    if config is None or not config.is_file():
        return
    learned = json.loads(config.read_text()).get("prediction_type", "epsilon")
    if learned != prediction_type:
        raise UserError(
            f"model.pretrained={pretrained} predicts {learned}; set model.prediction_type={learned} to fine-tune it"
        )


def _schedule_name(config: Mapping[str, Any], folder: Path) -> str:
    """Our name for the noise schedule of a diffusers folder written elsewhere; refuse ones we cannot sample."""
    betas = (config.get("beta_start"), config.get("beta_end"))
    expected = linear_betas(config["num_train_timesteps"])
    linear = config.get("beta_schedule") == "linear" and all(map(math.isclose, betas, expected))
    cosine = config.get("beta_schedule") == "squaredcos_cap_v2"
    if config.get("prediction_type", "epsilon") not in PREDICTION_TYPES or not (linear or cosine):
        raise UserError(
            f"{folder}/scheduler has beta_schedule={config.get('beta_schedule')!r}, betas {betas}, prediction_type="
            f"{config.get('prediction_type')!r}; FiberAug samples {' or '.join(PREDICTION_TYPES)} models with cosine "
            f"betas or linear ones from {expected[0]:g} to {expected[1]:g} (1e-4 to 0.02 scaled by 1000/T)"
        )
    return "linear" if linear else "cosine"
