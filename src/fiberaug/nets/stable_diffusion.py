"""Stable Diffusion's text-conditioned UNet, CLIP text encoder and tokenizer behind FiberAug's denoiser interface, with
PEFT LoRA on the UNet's attention (optionally on the text encoder too) and exports in diffusers' LoRA format and PEFT's.

The VAE is not here: `DiffusionModule` takes it through its frozen-autoencoder path (the pipeline's `vae/`), with the
latent cache. The denoiser is `net(x, t, context) -> prediction`, `context` the prompts' embeddings
(`encode_prompts`), so classifier-free guidance mixes a prompt's prediction with a negative prompt's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from torch import nn

from fiberaug.errors import UserError
from fiberaug.nets.autoencoder_kl import files_sha256

#: What a diffusers Stable Diffusion folder holds (`StableDiffusionPipeline.save_pretrained`, or a download of one).
PARTS = {
    "model_index.json": "model_index.json",
    "unet/": "unet/config.json",
    "vae/": "vae/config.json",
    "text_encoder/": "text_encoder/config.json",
    "tokenizer/": "tokenizer",
    "scheduler/": "scheduler/scheduler_config.json",
}
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' LoRA format, as `load_lora_weights` reads it
METADATA = "fiberaug.json"


def pipeline_folder(pretrained: str | Path, key: str = "model.pretrained") -> Path:
    """The local folder of a Stable Diffusion pipeline: `pretrained` itself, or a hub id's download (only where the
    machine reaches the hub); else a one-line error naming the parts that are missing."""
    path = Path(pretrained).expanduser()
    if not path.exists() and str(pretrained).count("/") == 1 and not str(pretrained).startswith((".", "~", "/")):
        from huggingface_hub import snapshot_download

        patterns = ["model_index.json", "unet/*", "vae/*", "text_encoder/*", "tokenizer/*", "scheduler/*"]
        path = Path(snapshot_download(str(pretrained), allow_patterns=patterns))
    if not path.is_dir():
        raise UserError(f"{key}={pretrained} is not a folder; pass a Stable Diffusion pipeline folder "
                        f"({', '.join(PARTS)})")
    missing = [name for name, part in PARTS.items()
               if not ((path / part).is_dir() and any((path / part).iterdir())
                       if name == "tokenizer/" else (path / part).is_file())]
    if missing:
        raise UserError(f"{key}={pretrained} is not a Stable Diffusion pipeline folder: it lacks "
                        f"{', '.join(missing)} (a diffusers folder holds {', '.join(PARTS)})")
    return path.resolve()


def pipeline_sha256(folder: Path) -> str:
    """A content hash of the parts a checkpoint references instead of holding (UNet, text encoder, tokenizer,
    scheduler; the VAE has its own), cached per process by the files' sizes and times."""
    parts = ("unet", "text_encoder", "tokenizer", "scheduler")
    files = sorted(p for part in parts for p in (folder / part).rglob("*") if p.is_file())
    return files_sha256(files, folder)


class StableDiffusionUNet(nn.Module):
    """A `UNet2DConditionModel` with the CLIP text encoder and tokenizer of the same pipeline. The text encoder is
    frozen unless `add_text_encoder_lora` gives it adapters; `add_lora` freezes the UNet and gives it adapters.
    Built from `pretrained` (a pipeline folder) alone: its architecture and weights come from there, so `channels`,
    `image_size` and `num_classes` only have to fit it."""

    text_conditioned = True

    def __init__(self, channels: int, image_size: int, num_classes: int, pretrained: str | None = None) -> None:
        super().__init__()
        from transformers import AutoTokenizer, CLIPTextModel

        if not pretrained:
            raise UserError("model.pretrained is not set: pass a Stable Diffusion pipeline folder (model_index.json, "
                            "unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
        folder = pipeline_folder(pretrained)
        self.unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").train()
        self.text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").eval()
        self.tokenizer = AutoTokenizer.from_pretrained(folder, subfolder="tokenizer")
        self.text_encoder.requires_grad_(False)
        if self.unet.config.in_channels != channels:
            raise UserError(f"the UNet of model.pretrained={pretrained} takes {self.unet.config.in_channels} latent "
                            f"channels, its autoencoder gives {channels}")
        self._embeddings: dict[str, torch.Tensor] = {}

    @property
    def text_encoder_trains(self) -> bool:
        return any(p.requires_grad for p in self.text_encoder.parameters())

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t.expand(x.shape[0]), encoder_hidden_states=context.to(x.dtype)).sample

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """The text encoder's last hidden states, as Stable Diffusion's pipeline computes them; each prompt encoded
        once while the text encoder is frozen (class prompts, captions and the empty prompt repeat every epoch)."""
        if self.text_encoder_trains:
            return self._encode(list(prompts))
        device = self.text_encoder.device
        new = [p for p in dict.fromkeys(prompts) if p not in self._embeddings or
               self._embeddings[p].device != device]
        if new:
            with torch.no_grad():
                self._embeddings.update(zip(new, self._encode(new), strict=True))
        return torch.stack([self._embeddings[p] for p in prompts])

    def _encode(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.text_encoder.device))[0]

    def train(self, mode: bool = True) -> StableDiffusionUNet:
        """The text encoder trains (dropout) only while it has adapters."""
        super().train(mode)
        self.text_encoder.train(mode and self.text_encoder_trains)
        return self

    def enable_gradient_checkpointing(self) -> None:
        self.unet.enable_gradient_checkpointing()
        if self.text_encoder_trains:
            self.text_encoder.gradient_checkpointing_enable()

    def add_lora(self, **lora: Any) -> None:
        """Trainable LoRA adapters on the UNet (PEFT `LoraConfig` arguments); the base stays frozen."""
        from peft import LoraConfig

        self.unet.requires_grad_(False)
        self.unet.add_adapter(LoraConfig(**lora))

    def add_text_encoder_lora(self, **lora: Any) -> None:
        """Trainable LoRA adapters on the text encoder, through PEFT's model wrapper (transformers' own adapter
        integration needs a newer PEFT than the one pinned here)."""
        from peft import LoraConfig, get_peft_model

        self.text_encoder = get_peft_model(self.text_encoder, LoraConfig(**lora))
        self._embeddings.clear()

    def load_lora(self, folder: Path) -> None:
        """Apply an sd_lora export (frozen, for sampling): the UNet's adapter in diffusers' LoRA format, the text
        encoder's in PEFT's."""
        from peft import PeftModel

        state_dict, alphas = StableDiffusionPipeline.lora_state_dict(str(folder), weight_name=LORA_WEIGHTS)
        unet = {k: v for k, v in state_dict.items() if k.startswith("unet.")}
        StableDiffusionPipeline.load_lora_into_unet(unet, alphas, unet=self.unet)
        if (folder / "peft" / "text_encoder").is_dir():
            self.text_encoder = PeftModel.from_pretrained(self.text_encoder, str(folder / "peft" / "text_encoder"))
        self.requires_grad_(False)
        self._embeddings.clear()

    def save_pretrained(self, folder: Path, scheduler: Any, metadata: Mapping[str, Any], merge_lora: bool = False
                        ) -> None:
        """The adapters in diffusers' LoRA format (`pipe.load_lora_weights(folder)`) and in PEFT's (`peft/unet`,
        `peft/text_encoder`), the scheduler FiberAug trained with, `fiberaug.json`; with `merge_lora`, the whole
        pipeline with the adapters fused in `merged/`."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft import PeftModel
        from peft.utils import get_peft_model_state_dict

        folder.mkdir(parents=True, exist_ok=True)
        layers = {"unet_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(self.unet))}
        _save_peft(self.unet, folder / "peft" / "unet")
        if isinstance(self.text_encoder, PeftModel):
            wrapped = get_peft_model_state_dict(self.text_encoder)
            layers["text_encoder_lora_layers"] = convert_state_dict_to_diffusers(
                {k.removeprefix("base_model.model."): v for k, v in wrapped.items()})
            self.text_encoder.save_pretrained(str(folder / "peft" / "text_encoder"))
        StableDiffusionPipeline.save_lora_weights(str(folder), safe_serialization=True, **layers)
        scheduler.save_pretrained(str(folder / "scheduler"))
        (folder / METADATA).write_text(json.dumps(dict(metadata), indent=2))
        if merge_lora:
            pipe = StableDiffusionPipeline.from_pretrained(metadata["base"]["path"], safety_checker=None,
                                                           requires_safety_checker=False)
            pipe.load_lora_weights(str(folder), weight_name=LORA_WEIGHTS)
            pipe.fuse_lora()
            pipe.unload_lora_weights()
            pipe.scheduler = type(pipe.scheduler).from_config(scheduler.config)
            pipe.save_pretrained(str(folder / "merged"))
            (folder / "merged" / METADATA).write_text(json.dumps({**metadata, "base": None}, indent=2))


def _save_peft(model: nn.Module, folder: Path) -> None:
    """PEFT's adapter format: adapter_config.json and adapter_model.safetensors."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    model.peft_config["default"].save_pretrained(str(folder))
    save_file({k: v.contiguous() for k, v in get_peft_model_state_dict(model).items()},
              str(folder / "adapter_model.safetensors"))
