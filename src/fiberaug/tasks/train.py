"""The training task: data, model, callbacks, loggers and trainer composed from the Hydra config."""

from __future__ import annotations

import inspect
import logging
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from fiberaug.errors import UserError

log = logging.getLogger(__name__)

# FiberAug's DataModules resume inside an epoch themselves (their state_dict), which this warning cannot see.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")


def resolve_precision(precision: str | int) -> str | int:
    """`16` means float16 mixed precision, which needs CUDA; elsewhere run bf16-mixed and say so once."""
    if str(precision) not in ("16", "16-mixed"):
        return precision
    if torch.cuda.is_available():
        return "16-mixed"
    log.warning("trainer.precision=%s: no CUDA device here, so training runs bf16-mixed instead", precision)
    return "bf16-mixed"


def loss_option(cfg: DictConfig) -> dict[str, Any]:
    """`{"loss": cfg.loss}` for a model that takes a loss (a GAN); a loss for any other model is refused."""
    if cfg.get("loss") is None:
        return {}
    if "loss" not in inspect.signature(get_class(cfg.model._target_)).parameters:
        choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
        loss, model = choices.get("loss", cfg.loss.get("name")), choices.get("model", cfg.model._target_)
        raise UserError(f"loss={loss} applies to model=gan only; model={model} has no loss option")
    return {"loss": cfg.loss}


def train(cfg: DictConfig) -> float | None:
    """Fit the configured model; returns `cfg.optimized_metric` for sweepers."""
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path and not Path(ckpt_path).is_file():
        raise UserError(f"ckpt_path={ckpt_path} is not a file; pass a run's checkpoints/last.ckpt to resume")

    model_options = loss_option(cfg)
    # Plain containers: the DataModule's arguments go into checkpoints, which load with weights_only=True.
    datamodule = instantiate(cfg.data, augment=cfg.get("augment"), _recursive_=False, _convert_="all")
    datamodule.setup("fit")  # reads and checks the data, and finds the classes, before the model is built
    model = instantiate(
        cfg.model, image_size=datamodule.image_size, channels=datamodule.channels, class_names=datamodule.class_names,
        **model_options,
    )
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c]
    trainer: pl.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, precision=resolve_precision(cfg.trainer.precision)
    )
    hparams = OmegaConf.to_container(cfg, resolve=True)
    hparams["model/params/trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    hparams["model/params/total"] = sum(p.numel() for p in model.parameters())
    for logger in trainer.loggers:
        logger.log_hyperparams(hparams)

    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    metric = trainer.callback_metrics.get(cfg.get("optimized_metric"))
    return float(metric) if metric is not None else None
