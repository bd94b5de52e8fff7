"""Albumentations pipelines described as data, shared by training and batch augmentation.

A pipeline spec (one file of `conf/augment/`) is either

* albumentations' own serialisation (`A.to_dict` / `A.save`): a mapping with a `transform` entry, or
* a mapping with a `transforms` list whose items name any transform by `_target_`, for example
  `{_target_: albumentations.HorizontalFlip, p: 0.5}`, nested `OneOf`/`SomeOf` included.

An empty list means no augmentation.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import yaml
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fiberaug.errors import UserError

RESIZE_POLICIES = ("resize", "random_crop")
PIPELINES_DIR = Path(__file__).resolve().parents[3] / "conf" / "augment"


def resolve_pipeline(value: Any) -> Any:
    """A pipeline named on a command line: a file of `conf/augment/` by name, else a path to a YAML/JSON file.

    Anything else (a mapping) is returned as it is, for `load_spec`.
    """
    if not isinstance(value, (str, Path)):
        return value
    for path in (PIPELINES_DIR / f"{value}.yaml", Path(value)):
        if path.is_file():
            return path
    names = ", ".join(sorted(p.stem for p in PIPELINES_DIR.glob("*.yaml")))
    raise UserError(f"augment={value}: not a pipeline of conf/augment/ ({names}) nor a YAML/JSON file")


def load_spec(spec: Any) -> dict[str, Any]:
    """A plain dict from a spec given as a mapping, a DictConfig, or a path to a YAML/JSON file."""
    if spec is None:
        return {"transforms": []}
    if isinstance(spec, (str, Path)):
        path = Path(spec)
        if not path.is_file():
            raise UserError(f"augment pipeline file {path} does not exist; pass a YAML or JSON pipeline file")
        loaded = yaml.safe_load(path.read_text())
        if not isinstance(loaded, Mapping):
            raise UserError(f"augment pipeline file {path} holds {type(loaded).__name__}, not a mapping")
        return dict(loaded)
    if isinstance(spec, DictConfig):
        return OmegaConf.to_container(spec, resolve=True)  # type: ignore[return-value]
    return dict(spec)


def build_transforms(spec: Any) -> list[A.BasicTransform]:
    """The transforms of a pipeline spec, ready to be placed in a `Compose`."""
    spec = load_spec(spec)
    if "transform" in spec:
        compose = A.from_dict(spec)
        return list(compose.transforms) if isinstance(compose, A.Compose) else [compose]
    items = spec.get("transforms", [] if "generative" in spec else None)  # a generative step alone
    if not isinstance(items, list):
        raise UserError(
            f"augment pipeline has keys {sorted(spec)}; expected `transforms: [...]` "
            "or albumentations' serialised form with a `transform` entry"
        )
    transforms = []
    for item in items:
        try:
            transform = instantiate(item, _convert_="all")
        except InstantiationException as exc:
            target = item.get("_target_") if isinstance(item, Mapping) else item
            raise UserError(f"augment pipeline: cannot build transform {target!r}: {exc}") from exc
        if not isinstance(transform, (A.BasicTransform, A.BaseCompose)):
            raise UserError(f"augment pipeline: {item!r} is not an albumentations transform")
        transforms.append(transform)
    return transforms


def reseed(pipeline: A.BaseCompose, seed: int) -> None:
    """Give the whole pipeline one pair of generators seeded by `seed`.

    albumentations' own `Compose(seed=)`/`set_random_seed` seeds every transform's generator with the
    same value, so their draws coincide: two `p=0.5` flips fire together or not at all. One stream
    shared by all transforms keeps them independent and still reproducible.
    """
    pipeline.set_random_state(np.random.default_rng(seed), random.Random(seed))


def scaled_side(image_size: int, policy: str = "resize", crop_scale: float = 1.0) -> int:
    """The short side images are scaled to before cropping (see `sized_pipeline`)."""
    if policy not in RESIZE_POLICIES:
        raise UserError(f"data.resize_policy={policy!r} is not known; choose one of: {', '.join(RESIZE_POLICIES)}")
    if not 0 < crop_scale <= 1:
        raise UserError(f"data.crop_scale={crop_scale} must lie in (0, 1]")
    return image_size if policy == "resize" else max(image_size, round(image_size / crop_scale))


def scale_transform(side: int) -> A.SmallestMaxSize:
    """Scale the short side to `side` (area interpolation when shrinking): the deterministic first step of a pipeline.

    An image already at that scale passes through unchanged, so images decoded and scaled once (the decoded-image
    cache) and images scaled inside the pipeline come out alike.
    """
    return A.SmallestMaxSize(max_size=side, area_for_downscale="image")


def sized_pipeline(
    image_size: int,
    policy: str = "resize",
    crop_scale: float = 1.0,
    augment: Any = None,
    train: bool = True,
    seed: int | None = None,
) -> A.Compose:
    """Scale, augment and cut images to `image_size`² so a large photo never enters the model whole.

    `resize`: the short side becomes `image_size` and the centre is kept. `random_crop`: the short side
    becomes `image_size / crop_scale` and a random square is cut (the centre one for validation), so
    `crop_scale=0.25` shows the model a quarter of the short side at a time. Augmentations run between
    scaling and cropping, so rotations do not bring in black corners.
    """
    if augment is not None and "generative" in load_spec(augment):
        raise UserError("the augment pipeline has a generative step, which runs in augment.py only (it writes a "
                        "data set of variants to train on: data.synthetic_root or data.root); training draws "
                        "classical steps on the fly")
    crop = A.RandomCrop if policy == "random_crop" and train else A.CenterCrop
    transforms = [
        scale_transform(scaled_side(image_size, policy, crop_scale)),
        *(build_transforms(augment) if train else []),
        crop(image_size, image_size, pad_if_needed=True),
    ]
    pipeline = A.Compose(transforms)
    if seed is not None:
        reseed(pipeline, seed)
    return pipeline
