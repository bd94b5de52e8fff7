"""task=utility: do a model's images help a classifier that has only a few real images per class?

A small classifier is trained on `shots` real images per class, with and without classical augmentation and
`synthetic_per_class` generated images per class (or the data set in `synthetic_dir` that sample.py wrote), once
per seed, and tested on held-out real images that the generator never saw (the checkpoint records its training
images by content; an overlap is refused).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from fiberaug.data import build_transforms
from fiberaug.data.pipelines import reseed
from fiberaug.errors import UserError
from fiberaug.files import write_atomic
from fiberaug.metrics.utility import Augment, downstream_accuracy
from fiberaug.models import load_generator, read_checkpoint
from fiberaug.tasks.inputs import align_labels, checkpoint_data, read_folder
from fiberaug.tasks.sample import resolve_device

log = logging.getLogger(__name__)

CONDITIONS = ("real", "real + classical", "real + synthetic", "real + classical + synthetic")


def utility(cfg: DictConfig) -> dict[str, Any]:
    """Print the accuracy table and write it to `output_dir/utility.json`; returns what it writes."""
    options = cfg.utility
    out = Path(cfg.output_dir)
    if (out / "utility.json").exists() and not cfg.overwrite:
        raise UserError(f"output_dir={out} already holds utility.json; choose another or pass overwrite=true")
    if cfg.synthetic_dir and not cfg.ckpt_path:  # a data set sample.py wrote names its checkpoint
        cfg.ckpt_path = _data_set_checkpoint(Path(cfg.synthetic_dir).expanduser())
    if not cfg.ckpt_path or not Path(cfg.ckpt_path).expanduser().is_file():
        raise UserError(f"task=utility needs ckpt_path=<run>/checkpoints/<file>.ckpt (got {cfg.ckpt_path})")
    checkpoint = read_checkpoint(Path(cfg.ckpt_path).expanduser())
    data = _labelled_data(cfg, checkpoint)
    held_out, held_labels = data.reference_images("val")
    refuse_seen(checkpoint, data, cfg.ckpt_path)

    pool, pool_labels = data.reference_images("train")
    pool_labels = torch.tensor(pool_labels)
    classes = len(data.class_names)
    if cfg.synthetic_dir:
        synthetic, synthetic_labels = _written(cfg.synthetic_dir, data, pool.shape[1:])
        per_class = round(len(synthetic) / classes, 1)
    else:
        device = resolve_device(cfg.device)
        model = load_generator(cfg.ckpt_path).to(device)
        if model.num_classes != classes:
            raise UserError(f"ckpt_path={cfg.ckpt_path} draws {model.num_classes} classes, the data has {classes}: "
                            "utility needs a class-conditional model of the same classes")
        per_class = options.synthetic_per_class
        synthetic = model.sample(per_class * classes, seed=cfg.seed, batch_size=cfg.batch_size, progress=True)
        synthetic_labels = model.label_indices(None, per_class * classes).cpu()
    augment = classical_augment(cfg.augment, data)

    results: dict[str, list[float]] = {name: [] for name in CONDITIONS}
    for seed in range(cfg.seed, cfg.seed + options.seeds):
        idx = _few_shot(pool_labels, options.shots, classes, seed)
        real = (pool[idx], pool_labels[idx])
        for name in CONDITIONS:
            results[name].append(arm_accuracy(name, real, (synthetic, synthetic_labels),
                                              (held_out, torch.tensor(held_labels)), classes, seed=seed,
                                              options=options, augment=augment))
    table = {
        "shots_per_class": options.shots,
        "synthetic_per_class": per_class,
        "synthetic": str(cfg.synthetic_dir) if cfg.synthetic_dir else f"{len(synthetic)} drawn from {cfg.ckpt_path}",
        "seeds": options.seeds,
        "held_out": len(held_out),
        "generator_trained_on": len(checkpoint["fiberaug"]["data"]["train"]),
        "classes": data.class_names,
        "accuracy": {name: {"mean": float(np.mean(v)), "std": float(np.std(v)), "runs": v}
                     for name, v in results.items()},
    }
    _print_table(table)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "utility.json", json.dumps(table, indent=2).encode())
    return table


Images = tuple[torch.Tensor, torch.Tensor]  # images in [-1, 1] and their class indices


def arm_accuracy(condition: str, real: Images, synthetic: Images, held_out: Images, classes: int, *, seed: int,
                 options: Any, augment: Augment) -> float:
    """One arm of the comparison (one of CONDITIONS): the classifier trained from `seed` on the real images, with the
    synthetic ones added in the synthetic arms and `augment` applied in the classical ones; its held-out accuracy.
    `options`: the task's `utility` settings (steps, batch_size, lr)."""
    images, labels = real
    if "synthetic" in condition:
        images, labels = torch.cat([images, synthetic[0]]), torch.cat([labels, synthetic[1]])
    return downstream_accuracy(images, labels, *held_out, classes, seed=seed, steps=options.steps,
                               batch_size=options.batch_size, lr=options.lr,
                               augment=augment if "classical" in condition else None)


def _data_set_checkpoint(folder: Path) -> str:
    """The checkpoint a sample.py data set records in its run.json."""
    try:
        return json.loads((folder / "run.json").read_text())["checkpoint"]
    except (OSError, ValueError, KeyError):
        raise UserError(f"synthetic_dir={folder} holds no run.json of sample.py naming its checkpoint: pass "
                        "ckpt_path=<the run's .ckpt> too") from None


def _written(folder: str, data: Any, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """A written data set's images at the real images' size and channels, labelled by its class folders."""
    written = read_folder(folder, data.image_size, name="synthetic_dir")
    labels = align_labels(written, data.class_names)
    if labels is None:
        raise UserError(f"synthetic_dir={folder}: its class folders {written.class_names} must be among the real "
                        f"classes {list(data.class_names)}")
    images = written.images
    if images.shape[1] != shape[0]:
        images = images.mean(dim=1, keepdim=True) if shape[0] == 1 else images.expand(-1, shape[0], -1, -1)
    return images, torch.tensor(labels)


def _labelled_data(cfg: DictConfig, checkpoint: dict[str, Any]) -> Any:
    """`data=…` when given (set up here), else the data the checkpoint was trained on; it must have classes."""
    if cfg.get("data") is not None:
        data = instantiate(cfg.data, augment=None, _recursive_=False, _convert_="all")
        data.setup("fit")
    else:
        data = checkpoint_data(checkpoint)
        if data is None:
            raise UserError(f"ckpt_path={cfg.ckpt_path} records no training data (an older checkpoint): pass data=…")
    if not data.class_names:
        raise UserError("task=utility needs labelled images (class sub-folders, or data=digits)")
    if not len(data.val_set):
        raise UserError("task=utility needs held-out images: data.val_fraction must be above 0")
    return data


def refuse_seen(checkpoint: dict[str, Any], data: Any, ckpt_path: str) -> None:
    """Held-out images must be new to the generator, or its copies would pass for help."""
    record = checkpoint["fiberaug"].get("data")
    if record is None:
        raise UserError(f"ckpt_path={ckpt_path} does not record the images it was trained on (an older "
                        "checkpoint), so the held-out images cannot be checked against them; retrain it")
    seen = set(record["train"])
    overlap = sum(data.item_id(item) in seen for item in data.val_set.items)
    if overlap:
        raise UserError(f"{overlap} of the {len(data.val_set)} held-out images trained ckpt_path={ckpt_path}; hold "
                        "them out (the split the model was trained with: same data.split_seed and val_fraction)")


def _few_shot(labels: torch.Tensor, shots: int, classes: int, seed: int) -> torch.Tensor:
    """`shots` indices per class, drawn by `seed`; a class with fewer images is refused."""
    generator = torch.Generator().manual_seed(seed)
    picked = []
    for c in range(classes):
        members = (labels == c).nonzero().flatten()
        if len(members) < shots:
            raise UserError(f"utility.shots={shots}: class {c} has only {len(members)} training images")
        picked.append(members[torch.randperm(len(members), generator=generator)[:shots]])
    return torch.cat(picked)


def classical_augment(spec: Any, data: Any) -> Augment:
    """The `augment=` pipeline applied to each image of a batch (at the data's size), drawn from the batch's seed."""
    pipeline = A.Compose([*build_transforms(spec), A.CenterCrop(data.image_size, data.image_size, pad_if_needed=True)])

    def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        reseed(pipeline, int(torch.randint(0, 2**31, (), generator=generator)))
        arrays = ((images.permute(0, 2, 3, 1).numpy() + 1) / 2).astype(np.float32)
        out = np.stack([pipeline(image=a)["image"] for a in arrays])
        return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous() * 2 - 1

    return augment


def _print_table(table: dict[str, Any]) -> None:
    print(f"held-out accuracy, {table['shots_per_class']} real images per class, mean ± std over {table['seeds']} "
          f"seeds, {table['held_out']} held-out images")
    for name, row in table["accuracy"].items():
        print(f"  {name:<30} {row['mean']:.3f} ± {row['std']:.3f}")
