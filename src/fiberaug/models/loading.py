"""Rebuilding a trained model from what `train.py` wrote: a checkpoint, or a diffusers export folder.

`sample.py`, `evaluate.py` and the utility task all start here. A checkpoint names its own class, so only
that model's code (and libraries) is imported: a GAN checkpoint never imports diffusers.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch

from fiberaug.errors import UserError
from fiberaug.models.base import GenerativeModule


def read_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A FiberAug checkpoint's contents; anything else is refused with a one-line error naming the file."""
    refused = f"ckpt_path={path} is not a FiberAug checkpoint (a .ckpt written by train.py) or export folder"
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types, with long texts meant for pickles it refuses
        raise UserError(f"{refused}: torch cannot read it ({type(exc).__name__})") from exc
    if not isinstance(checkpoint, dict) or not checkpoint.get("fiberaug"):
        raise UserError(f"{refused}: it has no 'fiberaug' entry")
    return checkpoint


def load_generator(
    ckpt_path: str | Path | None, adapter: str | Path | None = None, map_location: str | torch.device = "cpu"
) -> GenerativeModule:
    """Rebuild a model from a checkpoint written by `train.py` (importing only that model's code), or
    from a diffusers export folder, optionally with a LoRA adapter folder."""
    if not ckpt_path:
        raise UserError("ckpt_path is not set: pass a run's checkpoints/last.ckpt or its export/ folder")
    path = Path(ckpt_path).expanduser()
    if path.is_dir():
        from fiberaug.models.diffusion import DiffusionModule

        return DiffusionModule.from_export(path, adapter)
    if not path.is_file():
        raise UserError(f"ckpt_path={path} does not exist; pass a run's checkpoints/last.ckpt or its export/ folder")
    if adapter:
        raise UserError(f"adapter={adapter} applies to export folders; a LoRA run's .ckpt already holds its adapter")
    checkpoint = read_checkpoint(path, map_location)
    module_name, _, class_name = checkpoint["fiberaug"]["module"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    if not issubclass(cls, GenerativeModule):
        raise UserError(
            f"ckpt_path={path} holds {class_name}, which does not generate images; pass a generative model's "
            "checkpoint (an autoencoder's run serves latent diffusion through its export/: model.autoencoder=…)"
        )
    model = cls(**checkpoint["hyper_parameters"])
    model.load_state_dict(checkpoint["state_dict"])
    model.on_load_checkpoint(checkpoint)
    return model.eval()
