"""The sampling task: a synthetic data set from a trained model, written batch by batch, resumably, with a record of
how each image was made (`fiberaug.jobs`: the job in run.json, one manifest line per image)."""

from __future__ import annotations

import hashlib
import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tqdm import tqdm

from fiberaug.data.images import write_image
from fiberaug.errors import UserError
from fiberaug.files import locked_folder, write_atomic
from fiberaug.imaging import labelled_grid, save_png, to_uint8
from fiberaug.jobs import MANIFEST, Manifest, read_records, start_job, versions
from fiberaug.models import load_generator
from fiberaug.models.base import GenerativeModule

log = logging.getLogger(__name__)

METADATA = "metadata.jsonl"
PREVIEW = ".preview/grid.png"  # hidden: ImageFolder readers and data=folder skip it
PREVIEW_IMAGES = 64
PACKAGES = ("fiberaug", "torch", "pytorch-lightning", "diffusers", "numpy", "pillow")


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


def content_sha256(path: Path) -> str:
    """The SHA-256 of a checkpoint file, or of an export folder's files (their relative names and bytes)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def sample(cfg: DictConfig) -> Path:
    """Write the data set to `output_dir` (continuing the same job if it was interrupted); returns that folder."""
    out = Path(cfg.output_dir).expanduser()
    device = resolve_device(cfg.device)
    model = load_generator(cfg.ckpt_path, cfg.get("adapter")).to(device)
    lighten_decoding(model)
    options = _options(cfg, model)
    labels = OmegaConf.to_object(cfg.labels) if OmegaConf.is_config(cfg.labels) else cfg.labels
    count = _count(cfg, model, labels)
    if cfg.batch_size < 1:
        raise UserError(f"batch_size={cfg.batch_size} must be at least 1")
    label_idx = model.label_indices(labels, count)
    settings = {k: v for k, v in {**getattr(model, "sampling", {}), **options}.items() if k in model.sampling_options}
    checkpoint = Path(cfg.ckpt_path).expanduser().resolve()
    adapter = Path(cfg.adapter).expanduser().resolve() if cfg.get("adapter") else None
    job = {
        "tool": "sample", "checkpoint_sha256": content_sha256(checkpoint),
        "adapter_sha256": content_sha256(adapter) if adapter else None, "seed": cfg.seed,
        "labels": labels, "sampling": settings, "batch_size": cfg.batch_size,
    }
    run = {"job": job, "checkpoint": str(checkpoint), "adapter": str(adapter) if adapter else None,
           "model": type(model).__name__, "class_names": model.class_names, "command": shlex.join(sys.argv),
           "versions": versions(*PACKAGES)}
    out.mkdir(parents=True, exist_ok=True)
    with locked_folder(out):
        resumed = start_job(out, run, cfg.overwrite, "sample", lambda r: [r["file_name"]], (METADATA, PREVIEW))
        made = {r["index"]: r for r in read_records(out / MANIFEST) if (out / r["file_name"]).is_file()} \
            if resumed else {}
        before = len(made)
        provenance = {"checkpoint_sha256": job["checkpoint_sha256"], "model": run["model"], **settings}
        _write(model, out, made, count, label_idx, cfg, options, provenance)
        rows = [made[i] for i in sorted(made)]
        write_atomic(out / METADATA, b"".join(json.dumps(_metadata(r)).encode() + b"\n" for r in rows))
        _preview(out, rows[:PREVIEW_IMAGES], model.label_names(labels))
    log.info("sample: %d images in %s (%d written now, %d from an earlier run of this job)%s", len(made), out,
             len(made) - before, before,
             f"; the folder holds {len(made) - count} beyond num_samples" if len(made) > count else "")
    return out


def _options(cfg: DictConfig, model: GenerativeModule) -> dict[str, Any]:
    requested = {k: cfg.get(k) for k in ("sampler", "steps", "eta", "guidance_scale") if cfg.get(k) is not None}
    ignored = sorted(set(requested) - set(model.sampling_options))
    if ignored:
        log.info("note: %s do not apply to %s and are ignored", ", ".join(ignored), type(model).__name__)
    return {k: v for k, v in requested.items() if k in model.sampling_options}


def _count(cfg: DictConfig, model: GenerativeModule, labels: Any) -> int:
    """num_samples, or num_per_class times the classes drawn."""
    per_class = cfg.get("num_per_class")
    if per_class is None:
        if cfg.num_samples < 1:
            raise UserError(f"num_samples={cfg.num_samples} must be at least 1")
        return cfg.num_samples
    if not model.num_classes:
        raise UserError(f"num_per_class={per_class}: this model was trained without classes; pass num_samples")
    if not isinstance(per_class, int) or per_class < 1:
        raise UserError(f"num_per_class={per_class!r} must be an integer of at least 1")
    return per_class * len(model.label_names(labels))


def _write(
    model: GenerativeModule, out: Path, made: dict[int, dict], count: int, label_idx: torch.Tensor | None,
    cfg: DictConfig, options: dict[str, Any], provenance: dict[str, Any],
) -> None:
    """Sample the batches that are not all made yet (the same batches as an uninterrupted run), each image written
    atomically before its manifest line, so memory stays one batch whatever `count`."""
    manifest = Manifest(out / MANIFEST)
    try:
        with tqdm(total=count, initial=sum(i < count for i in made), desc="sampling", unit="img") as bar:
            for start in range(0, count, cfg.batch_size):
                stop = min(start + cfg.batch_size, count)
                if all(i in made for i in range(start, stop)):
                    continue
                images = to_uint8(model.sample_range(start, stop, label_idx, cfg.seed, **options))
                for i, image in zip(range(start, stop), images):
                    if i in made:
                        continue
                    label = model.class_names[label_idx[i]] if label_idx is not None else None
                    name = f"{label}/{i:06d}.png" if label is not None else f"{i:06d}.png"
                    data = write_image(out / name, image)
                    record = {"index": i, "file_name": name, "label": label, "seed": cfg.seed, "status": "ok",
                              "sha256": hashlib.sha256(data).hexdigest(), **provenance}
                    manifest.append(record)
                    made[i] = record
                    bar.update()
    finally:
        manifest.close()


def _metadata(record: dict[str, Any]) -> dict[str, Any]:
    """A metadata.jsonl row (Hugging Face ImageFolder: `file_name` first, then the image's columns)."""
    row = {k: v for k, v in record.items() if k != "status"}
    if row["label"] is None:
        del row["label"]
    return row


def _preview(out: Path, rows: list[dict[str, Any]], column_names: list[str]) -> None:
    """The first images as one grid, a column per class drawn (as the training's sample grids)."""
    if rows:
        save_png(labelled_grid(np.stack([_read(out / r["file_name"]) for r in rows]), column_names), out / PREVIEW)


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        array = np.asarray(image)
    return array[..., None] if array.ndim == 2 else array
