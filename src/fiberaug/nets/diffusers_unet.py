"""Hugging Face diffusers' `UNet2DModel` behind FiberAug's denoiser interface, with PEFT LoRA and export.

The adapter turns `unet(x, t, class_labels=...).sample` into `net(x, t, labels) -> eps`, so the same
`DiffusionModule` trains it. Its exports are plain diffusers folders (`DDPMPipeline.from_pretrained`)
and, for LoRA runs, PEFT adapter folders (`adapter_model.safetensors` + `adapter_config.json`).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMPipeline, SchedulerMixin, UNet2DModel
from torch import nn

from fiberaug.errors import UserError

METADATA = "fiberaug.json"  # what plain diffusers folders lack: class names, sampling defaults, the LoRA base


class DiffusersUNet(nn.Module):
    """A `UNet2DModel` (optionally wrapped by PEFT) as a FiberAug denoiser.

    A class-conditional UNet has `num_class_embeds = num_classes + 1`: the last row is "no label".
    """

    def __init__(self, unet: UNet2DModel) -> None:
        super().__init__()
        self.unet = unet

    @property
    def config(self) -> dict[str, Any]:
        """The architecture, enough to rebuild the network without its weights."""
        return dict(self.base_unet.config)

    @property
    def base_unet(self) -> UNet2DModel:
        return self.unet.get_base_model() if self.has_lora else self.unet

    @property
    def has_lora(self) -> bool:
        return hasattr(self.unet, "peft_config")

    @property
    def num_classes(self) -> int:
        return max(0, (self.base_unet.config.num_class_embeds or 0) - 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.num_classes and labels is None:
            labels = torch.full((x.shape[0],), self.num_classes, device=x.device, dtype=torch.long)
        return self.unet(x, t.expand(x.shape[0]), class_labels=labels if self.num_classes else None).sample

    def enable_gradient_checkpointing(self) -> None:
        self.base_unet.enable_gradient_checkpointing()

    def add_lora(self, **lora: Any) -> None:
        """Freeze the UNet and inject trainable LoRA adapters (PEFT `LoraConfig` arguments)."""
        from peft import LoraConfig, get_peft_model

        self.unet.requires_grad_(False)
        self.unet = get_peft_model(self.unet, LoraConfig(**lora))

    def load_adapter(self, path: str | Path) -> None:
        """Apply a LoRA adapter saved in PEFT's format, frozen, for sampling."""
        from peft import PeftModel

        if not (Path(path) / "adapter_config.json").is_file():
            raise UserError(f"adapter={path} has no adapter_config.json; pass a LoRA run's export/ folder")
        self.unet = PeftModel.from_pretrained(self.unet, str(path))

    def save_pretrained(
        self, folder: Path, scheduler: SchedulerMixin, metadata: Mapping[str, Any], merge_lora: bool = False
    ) -> None:
        """A diffusers pipeline folder; with LoRA, the adapter in PEFT's format (and the merged pipeline in merged/)."""
        folder.mkdir(parents=True, exist_ok=True)
        if self.has_lora:
            self.unet.save_pretrained(str(folder))
            if merge_lora:
                merged = copy.deepcopy(self.unet).merge_and_unload()
                DDPMPipeline(unet=merged, scheduler=scheduler).save_pretrained(str(folder / "merged"))
                (folder / "merged" / METADATA).write_text(json.dumps({**metadata, "base": None}, indent=2))
        else:
            DDPMPipeline(unet=self.unet, scheduler=scheduler).save_pretrained(str(folder))
        (folder / METADATA).write_text(json.dumps(dict(metadata), indent=2))


def read_metadata(folder: Path) -> dict[str, Any]:
    path = Path(folder) / METADATA
    return json.loads(path.read_text()) if path.is_file() else {}


def load_unet(pretrained: str | Path) -> UNet2DModel:
    """A `UNet2DModel` from an export/pipeline folder (its `unet/`), a UNet folder, or a hub id."""
    path = Path(pretrained).expanduser()
    if path.is_dir():
        source, subfolder = str(path), "unet" if (path / "unet").is_dir() else None
        if not (path / (subfolder or "") / "config.json").is_file():
            raise UserError(
                f"model.pretrained={pretrained} holds no diffusers UNet (no unet/config.json or config.json); "
                "pass an export folder such as outputs/train/runs/<run>/export"
            )
    else:
        source, subfolder = str(pretrained), "unet"
    try:
        return UNet2DModel.from_pretrained(source, subfolder=subfolder)
    except (OSError, ValueError) as exc:
        raise UserError(f"model.pretrained={pretrained} could not be loaded as a UNet2DModel: {exc}") from exc


def diffusers_unet(
    channels: int,
    image_size: int,
    num_classes: int,
    pretrained: str | None = None,
    config: Mapping[str, Any] | None = None,
    block_out_channels: Sequence[int] = (64, 128, 128),
    attention: Sequence[bool] = (False, True, True),
    layers_per_block: int = 2,
    norm_num_groups: int = 32,
    attention_head_dim: int = 8,
    dropout: float = 0.0,
) -> DiffusersUNet:
    """Build the denoiser: from `pretrained` weights, from a saved `config` (weights to follow), or new.

    A new UNet has one level per entry of `block_out_channels`, with self-attention where `attention`
    says; each level but the last halves the image, so `image_size` must be a multiple of 2**(levels-1).
    """
    if pretrained and config is None:
        unet = load_unet(pretrained)
    elif config is not None:
        unet = UNet2DModel.from_config(dict(config))
    else:
        levels = len(block_out_channels)
        if len(attention) != levels:
            raise UserError(f"model.denoiser.attention={list(attention)} needs one entry per block_out_channels level")
        factor = 2 ** (levels - 1)
        if image_size % factor or image_size < factor:
            raise UserError(
                f"data.image_size={image_size} does not fit a UNet with {levels} levels: it takes multiples of "
                f"{factor} (or change model.denoiser.block_out_channels)"
            )
        unet = UNet2DModel(
            sample_size=image_size,
            in_channels=channels,
            out_channels=channels,
            block_out_channels=tuple(block_out_channels),
            down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention),
            up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
            layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups,
            attention_head_dim=attention_head_dim,
            dropout=dropout,
            num_class_embeds=num_classes + 1 if num_classes else None,
        )
    net = DiffusersUNet(unet.train())  # from_pretrained leaves it in eval mode
    _check_fits(net, channels, image_size, pretrained)
    return net


def _check_fits(net: DiffusersUNet, channels: int, image_size: int, pretrained: str | None) -> None:
    cfg = net.base_unet.config
    source = f"the UNet of model.pretrained={pretrained}" if pretrained else "the UNet"
    if cfg.in_channels != channels:
        raise UserError(f"{source} takes {cfg.in_channels} channels; set data.channels={cfg.in_channels}")
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    if size != image_size:
        raise UserError(f"{source} was trained at {size}x{size}; set data.image_size={size}")
