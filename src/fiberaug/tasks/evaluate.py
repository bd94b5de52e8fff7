"""The evaluation task: how good generated images are, whether they copy the training images, and (task=utility)
whether they help a downstream classifier."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from fiberaug.errors import UserError
from fiberaug.files import write_atomic
from fiberaug.imaging import labelled_grid, save_png, text_band, to_uint8
from fiberaug.metrics import evaluate_images, monitor_mode
from fiberaug.models import load_generator, read_checkpoint
from fiberaug.tasks.inputs import ImageSet, align_labels, checkpoint_data, draw_samples, list_folder, read_folder
from fiberaug.tasks.sample import resolve_device

log = logging.getLogger(__name__)

SAMPLING_OPTIONS = ("sampler", "steps", "eta", "guidance_scale")


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """`task=quality` (default): metrics of fake against real images; `task=utility`: the downstream table."""
    if cfg.task == "utility":
        from fiberaug.tasks.utility import utility

        return utility(cfg)
    if cfg.task != "quality":
        raise UserError(f"task={cfg.task!r} is not known; choose quality (the default) or utility")
    return quality(cfg)


def quality(cfg: DictConfig) -> dict[str, float]:
    """Write metrics.json, report.png and nearest.png to `output_dir`; returns the metric values."""
    out = Path(cfg.output_dir)
    if (out / "metrics.json").exists() and not cfg.overwrite:
        raise UserError(f"output_dir={out} already holds metrics.json; choose another or pass overwrite=true")
    if not cfg.fake_dir and not cfg.ckpt_path:
        raise UserError("nothing to evaluate: pass fake_dir=DIR (generated images) or ckpt_path=PATH to draw them")
    device = resolve_device(cfg.device)
    model = load_generator(cfg.ckpt_path, cfg.get("adapter")).to(device) if cfg.ckpt_path else None
    data = _training_data(cfg.ckpt_path)
    size = cfg.size or (model.hparams.image_size if model is not None else None)

    fake = _fake_images(cfg, model, size)
    size = size or fake.images.shape[-1]
    real, train = _real_images(cfg, data, size)
    evaluation = evaluate_images(
        real.images, fake.images, train=train.images if train else None, real_labels=real.labels,
        fake_labels=align_labels(fake, real.class_names), class_names=real.class_names,
        metrics=list(cfg.metrics), seed=cfg.seed, inception=cfg.inception, device=device,
    )
    for name, value in evaluation.values.items():
        print(f"{name:<30} {value:>10.4f}   {legend(name)}")
    for note in evaluation.notes:
        print(f"note: {note}")

    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "metrics": evaluation.values,
        "notes": evaluation.notes,
        "real": _describe(cfg.real_dir, real, "the checkpoint's validation images"),
        "fake": _describe(cfg.fake_dir, fake, f"{len(fake.images)} samples of {cfg.ckpt_path}"),
        "train": _describe(cfg.train_dir, train, "the checkpoint's training images") if train else None,
        "seed": cfg.seed,
    }
    for role in ("real", "fake", "train"):
        if summary[role]:
            described = summary[role]
            subset = f" of {described['available']}" if described["available"] > described["count"] else ""
            print(f"{role}: {described['count']}{subset} images, {described['source']}")
    write_atomic(out / "metrics.json", json.dumps(summary, indent=2).encode())
    save_png(report_sheet(real.images, fake.images, evaluation.values), out / "report.png")
    if "nearest" in evaluation.artefacts:
        save_png(evaluation.artefacts["nearest"], out / "nearest.png")
    log.info("wrote metrics.json, report.png%s to %s", " and nearest.png" if "nearest" in evaluation.artefacts
             else "", out)
    return evaluation.values


def legend(name: str) -> str:
    """What a metric's line means, and which way is better."""
    family, _, detail = name.partition("/")
    what = {
        "swd": "SWD: sliced Wasserstein distance of 7×7 Laplacian-pyramid patches ×1e3",
        "precision": "precision: share of generated images on the real manifold",
        "recall": "recall: share of real images on the generated manifold",
        "density": "density: how crowded the real neighbourhoods of generated images are",
        "coverage": "coverage: share of real images with a generated one nearby",
        "fid": "FID", "kid": "KID", "kid_std": "KID's spread over subsets",
        "memorisation": "share of generated images that copy a training image (d1 < d2/3 or < m/3)",
        "class_consistency": "share of generated images read as their class",
        "classifier_accuracy": "the class reader's accuracy on held-out real images",
    }[family]
    if family == "swd" and detail:
        what = f"SWD at {detail}×{detail}" if detail.isdigit() else f"SWD at {detail}"
    elif family == "memorisation" and detail:
        what = "median d(nearest) / d(second nearest) training image"
    elif family == "class_consistency" and detail:
        what = f"share of class {detail} read as {detail}"
    return f"{what} ({'lower' if monitor_mode(name) == 'min' else 'higher'} is better)"


def _training_data(ckpt_path: str | None) -> Any:
    """The DataModule a .ckpt was trained on (None for export folders and when no checkpoint is given)."""
    if not ckpt_path or not Path(ckpt_path).expanduser().is_file():
        return None
    return checkpoint_data(read_checkpoint(Path(ckpt_path).expanduser()))


def _fake_images(cfg: DictConfig, model: Any, size: int | None) -> ImageSet:
    if cfg.fake_dir:
        return read_folder(cfg.fake_dir, size or _first_size(cfg.fake_dir), name="fake_dir")
    options = {k: cfg[k] for k in SAMPLING_OPTIONS if cfg.get(k) is not None and k in model.sampling_options}
    labels = OmegaConf.to_object(cfg.labels) if OmegaConf.is_config(cfg.labels) else cfg.labels
    return draw_samples(model, cfg.num_samples, cfg.seed, cfg.batch_size, labels, **options)


def _real_images(cfg: DictConfig, data: Any, size: int) -> tuple[ImageSet, ImageSet | None]:
    """The reference set and the memorisation set: the folders given, else the checkpoint's own split."""
    limit, seed = cfg.max_images, cfg.seed
    train = read_folder(cfg.train_dir, size, limit, name="train_dir", seed=seed) if cfg.train_dir else None
    if cfg.real_dir:
        real = read_folder(cfg.real_dir, size, limit, name="real_dir", seed=seed)
    elif data is not None:
        split = "val" if len(data.val_set) else "train"
        if split == "train":
            log.warning("the checkpoint's run held no images back: measuring against its training images")
        images, labels = data.reference_images(split, limit)
        real = ImageSet(images, labels, list(data.class_names), available=len(getattr(data, f"{split}_set")))
    else:
        raise UserError("no real images: pass real_dir=DIR (a checkpoint from train.py also brings its own)")
    if train is None and data is not None:
        images, _ = data.reference_images("train", limit)
        train = ImageSet(images, available=len(data.train_set))
    return real, train


def _first_size(folder: str) -> int:
    """The short side of the folder's first readable image: the size both sets are compared at."""
    root, paths = list_folder(folder, name="fake_dir")
    for path in paths:
        try:
            with Image.open(path) as im:
                return min(im.size)
        except (OSError, ValueError, SyntaxError):
            continue
    raise UserError(f"fake_dir={root}: none of its {len(paths)} image files could be read")


def _describe(given: str | None, images: ImageSet, otherwise: str) -> dict[str, Any]:
    """Where a set came from and how many of its images were used (of how many, when `max_images` took a subset)."""
    return {"source": str(given) if given else otherwise, "count": len(images.images),
            "available": images.available or len(images.images), "size": list(images.images.shape[1:])}


def report_sheet(real: torch.Tensor, fake: torch.Tensor, values: dict[str, float], count: int = 16) -> np.ndarray:
    """report.png: `count` real images beside `count` generated ones, each set a grid enlarged like the sample
    grids under its caption, with the headline metrics beneath in text large enough to read."""
    sets = [to_uint8(images[:count]) for images in (real, fake)]
    channels = max(s.shape[3] for s in sets)
    height, width = min(s.shape[1] for s in sets), min(s.shape[2] for s in sets)
    grids = [labelled_grid(np.repeat(s, channels // s.shape[3], axis=3)[:, :height, :width]) for s in sets]
    panels = [np.concatenate([text_band([title], g.shape[1], channels), g])
              for title, g in zip((f"real ({len(sets[0])})", f"generated ({len(sets[1])})"), grids, strict=True)]
    rows = max(p.shape[0] for p in panels)
    top = np.concatenate([np.pad(p, ((0, rows - p.shape[0]), (0, 0), (0, 0))) for p in panels], axis=1)
    lines = [f"{k}: {v:.4g}" for k, v in values.items() if k.count("/") == 0]
    return np.concatenate([top, text_band(lines, top.shape[1], channels)])
