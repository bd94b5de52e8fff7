"""Hugging Face diffusers' `AutoencoderKL` (the VAE of Stable Diffusion): built new at FiberAug's sizes, or loaded
from a diffusers folder, refused with a one-line error when the folder holds something else."""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL

from fiberaug.errors import UserError

EXPECTED = (
    "a diffusers AutoencoderKL folder (config.json with _class_name AutoencoderKL, and its weights), such as a "
    "model=autoencoder run's export/ or the vae/ folder of a Stable Diffusion download"
)


def downsampling(vae: AutoencoderKL) -> int:
    """f: how many pixels per side one latent stands for (each level but the last halves the image)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def latent_scale(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 64) -> float:
    """LDM's scale_by_std: 1 / the standard deviation of latents drawn from the images' posteriors, so that a
    diffusion model sees latents of about unit variance. Seeded: the same weights and images give the same. In float32
    without autocast: Stable Diffusion's VAE overflows in float16."""
    device = next(vae.parameters()).device
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.autocast(device.type, enabled=False):
        latents = [vae.encode(batch.to(device).float()).latent_dist.sample(generator)
                   for batch in images.split(batch_size)]
    return 1.0 / torch.cat(latents).float().std().item()


def folder_sha256(folder: Path) -> str:
    """A content hash of an autoencoder folder (its config.json and weight files), which checkpoints record instead
    of the weights."""
    files = sorted(p for p in Path(folder).iterdir() if p.name == "config.json" or p.suffix in (".safetensors", ".bin"))
    return files_sha256(files, Path(folder))


def files_sha256(files: Sequence[Path], root: Path) -> str:
    """A content hash of files (their names relative to `root`, and bytes), cached per process by the files' sizes
    and modification times, so large weights are read once."""
    return _sha256(tuple((p.relative_to(root).as_posix(), str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns)
                         for p in files))


@functools.lru_cache(maxsize=16)
def _sha256(files: tuple[tuple[str, str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for name, path, _, _ in files:
        digest.update(name.encode())
        with open(path, "rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def autoencoder_folder(path: str | Path, key: str = "model.pretrained") -> Path:
    """The folder of an AutoencoderKL: `path`, or its `vae/` (a whole Stable Diffusion download); else a one-line
    error naming `key`, the path and what is expected."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise UserError(f"{key}={path} is not a folder; pass {EXPECTED}")
    if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"
    config = folder / "config.json"
    if not config.is_file():
        raise UserError(f"{key}={path} holds no config.json; pass {EXPECTED}")
    try:
        class_name = json.loads(config.read_text()).get("_class_name")
    except (json.JSONDecodeError, AttributeError) as exc:
        raise UserError(f"{key}={path}: {config} is not a diffusers config ({exc}); pass {EXPECTED}") from exc
    if class_name != AutoencoderKL.__name__:
        raise UserError(f"{key}={path} holds a {class_name or 'config without _class_name'}, not an AutoencoderKL; "
                        f"pass {EXPECTED}")
    return folder


def load_autoencoder(path: str | Path, key: str = "model.pretrained") -> AutoencoderKL:
    """An `AutoencoderKL` from a local folder (see `autoencoder_folder`), in training mode."""
    folder = autoencoder_folder(path, key)
    try:
        vae = AutoencoderKL.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise UserError(f"{key}={path} could not be loaded as an AutoencoderKL: {exc}") from exc
    return vae.train()  # from_pretrained leaves it in eval mode


def autoencoder_kl(
    channels: int,
    image_size: int,
    pretrained: str | None = None,
    config: Mapping[str, Any] | None = None,
    block_out_channels: Sequence[int] = (64, 128, 256, 256),
    layers_per_block: int = 2,
    latent_channels: int = 4,
    norm_num_groups: int = 32,
) -> AutoencoderKL:
    """Build the autoencoder: from `pretrained` weights, from a saved `config` (weights to follow), or new.

    A new one is SD's VAE architecture (DownEncoderBlock2D / UpDecoderBlock2D levels, self-attention in the middle
    block) with one level per entry of `block_out_channels`; f = 2**(levels - 1), and `image_size` must be a
    multiple of f.
    """
    if config is not None:
        vae = AutoencoderKL.from_config(dict(config))
    elif pretrained:
        vae = load_autoencoder(pretrained)
    else:
        levels = len(block_out_channels)
        bad_groups = [width for width in block_out_channels if width % norm_num_groups]
        if bad_groups:
            raise UserError(
                f"model.vae.block_out_channels={list(block_out_channels)} must be multiples of "
                f"model.vae.norm_num_groups={norm_num_groups} (GroupNorm); {bad_groups[0]} is not"
            )
        vae = AutoencoderKL(
            in_channels=channels,
            out_channels=channels,
            down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            latent_channels=latent_channels,
            norm_num_groups=norm_num_groups,
            sample_size=image_size,
        )
    source = f"the AutoencoderKL of model.pretrained={pretrained}" if pretrained else "the AutoencoderKL"
    if vae.config.in_channels != channels:
        raise UserError(f"{source} takes {vae.config.in_channels} channels; set data.channels={vae.config.in_channels}")
    f = downsampling(vae)
    if image_size % f:
        raise UserError(
            f"data.image_size={image_size} does not fit {source} (f={f}): it takes multiples of {f}"
            + ("" if pretrained else " (or change model.vae.block_out_channels)")
        )
    return vae
