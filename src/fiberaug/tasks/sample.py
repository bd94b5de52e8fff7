"""The sampling task: images from a trained model, as separate PNG files and one grid."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from fiberaug.errors import UserError
from fiberaug.imaging import labelled_grid, save_png, to_uint8
from fiberaug.models import load_generator

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={device}: no CUDA device here; use device=cpu or device=auto")
    return torch.device(device)


def lighten_decoding(model: torch.nn.Module) -> None:
    """A latent model's autoencoder decodes one image at a time (memory bounded whatever `batch_size`), and in
    overlapping tiles where the images are larger than the autoencoder was built for (its `sample_size`)."""
    autoencoder = getattr(model, "autoencoder", None)
    if autoencoder is None:
        return
    autoencoder.enable_slicing()
    if model.hparams.image_size > autoencoder.config.sample_size:
        autoencoder.enable_tiling()
        log.info("decoding in tiles: %d px images, an autoencoder built for %d px", model.hparams.image_size,
                 autoencoder.config.sample_size)


def sample(cfg: DictConfig) -> Path:
    """Write `num_samples` images and `grid.png` to `output_dir`; returns that folder."""
    out = Path(cfg.output_dir)
    if (out / "grid.png").exists() and not cfg.overwrite:
        raise UserError(f"output_dir={out} already holds samples (grid.png); choose another or pass overwrite=true")
    device = resolve_device(cfg.device)
    model = load_generator(cfg.ckpt_path, cfg.get("adapter")).to(device)
    lighten_decoding(model)

    requested = {k: cfg.get(k) for k in ("sampler", "steps", "eta", "guidance_scale") if cfg.get(k) is not None}
    ignored = sorted(set(requested) - set(model.sampling_options))
    if ignored:
        log.info("note: %s do not apply to %s and are ignored", ", ".join(ignored), type(model).__name__)
    options = {k: v for k, v in requested.items() if k in model.sampling_options}
    labels = OmegaConf.to_object(cfg.labels) if OmegaConf.is_config(cfg.labels) else cfg.labels

    images = to_uint8(
        model.sample(cfg.num_samples, labels=labels, seed=cfg.seed, batch_size=cfg.batch_size, progress=True, **options)
    )
    label_idx = model.label_indices(labels, cfg.num_samples)
    for i, image in enumerate(images):
        suffix = f"_{model.class_names[label_idx[i]]}" if label_idx is not None else ""
        save_png(image, out / f"{i:05d}{suffix}.png")
    save_png(labelled_grid(images, model.label_names(labels)), out / "grid.png")
    log.info("wrote %d images and grid.png to %s", len(images), out)
    return out
