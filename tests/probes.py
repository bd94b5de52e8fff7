"""Callbacks that tests add to runs of the real scripts (`+callbacks.NAME._target_=probes.X`, with tests/ on
PYTHONPATH): they record what each DDP rank did, or stop a run the way a crash would."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from pytorch_lightning.callbacks import WeightAveraging

from fiberaug.models.base import GenerativeModule


class RankProbe(pl.Callback):
    """Saves, per rank, to `dirpath/rank<r>.pt`: the raw and averaged weights, each optimizer's step counts, the
    torch random state at the first batch, the last training loss, the logged values, and how often it sampled."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)
        self.record: dict[str, Any] = {"samples": 0}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        sample, record = GenerativeModule.sample, self.record

        def counted(module: GenerativeModule, *args: Any, **kwargs: Any) -> torch.Tensor:
            record["samples"] += 1
            return sample(module, *args, **kwargs)

        GenerativeModule.sample = counted

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self.record.setdefault("rng", torch.get_rng_state())

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           idx: int) -> None:
        if outputs:  # a manually optimised model (the GAN) returns nothing
            self.record["loss"] = float(outputs["loss"])

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        average = next((c._average_model.module for c in trainer.callbacks
                        if isinstance(c, WeightAveraging) and c._average_model is not None), None)
        self.record |= {
            "params": {k: v.detach().clone() for k, v in pl_module.named_parameters()},
            "average": {k: v.detach().clone() for k, v in average.named_parameters()} if average else None,
            "optimizer_steps": [int(o.state[o.param_groups[0]["params"][0]]["step"]) for o in trainer.optimizers],
            "logged": {k: float(v) for k, v in trainer.callback_metrics.items()},
        }
        self.dirpath.mkdir(parents=True, exist_ok=True)
        torch.save(self.record, self.dirpath / f"rank{trainer.global_rank}.pt")


class KillOnce(pl.Callback):
    """Kills its process with SIGKILL, as a crash or a lost node would, after training step `step` of sweep job
    `job`, the first time only (`marker` remembers it), so that the same command run again goes on."""

    def __init__(self, marker: str, job: int, step: int) -> None:
        self.marker, self.job, self.step = Path(marker), job, step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           idx: int) -> None:
        if trainer.global_step == self.step and HydraConfig.get().job.num == self.job and not self.marker.exists():
            self.marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
