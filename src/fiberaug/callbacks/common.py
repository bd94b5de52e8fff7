"""What FiberAug's callbacks ask of a run: which weights to judge, and whether it validates."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import WeightAveraging
from pytorch_lightning.utilities.model_helpers import is_overridden

from fiberaug.models.base import GenerativeModule


def evaluation_model(trainer: pl.Trainer, pl_module: pl.LightningModule) -> GenerativeModule:
    """The weights checkpoints hold: the weight-averaging (EMA) callback's average when there is one."""
    for callback in trainer.callbacks:
        if isinstance(callback, WeightAveraging) and callback._average_model is not None:
            return callback._average_model.module
    return pl_module


def validates(trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
    """Whether the run has a validation loop: a `validation_step` and images held back (a GAN has neither)."""
    datamodule = trainer.datamodule
    held_back = len(datamodule.val_set) > 0 if getattr(datamodule, "val_set", None) is not None else True
    return is_overridden("validation_step", pl_module) and trainer.limit_val_batches != 0 and held_back


def sampling_options(model: GenerativeModule, options: dict[str, Any]) -> dict[str, Any]:
    """Those of a callback's sampling options that `model` takes (`steps` for diffusion, none for a GAN), so one
    callback config serves every model."""
    return {key: value for key, value in options.items() if key in model.sampling_options}
