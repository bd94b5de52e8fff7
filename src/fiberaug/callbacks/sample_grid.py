"""A grid of samples from fixed seeds during training, to TensorBoard and to PNG files."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger

from fiberaug.callbacks.common import evaluation_model
from fiberaug.imaging import labelled_grid, save_png, to_uint8

log = logging.getLogger(__name__)


class SampleGrid(pl.Callback):
    """Every `every_n_epochs` epochs and when training ends, sample `num_samples` images from seed `seed`.

    The seeds stay fixed, so successive grids show how the same starting noise develops. A class-conditional
    model gets one column per class, its name written over it (see `labelled_grid`). When a weight-averaging (EMA)
    callback is present, its averaged weights generate, as they are what the checkpoints hold. Nothing is drawn before
    the first epoch completes, so a run that ends inside it (a smoke test) draws no grid: on a CPU a large
    model's grid can take minutes, far longer than such a run trains.
    """

    def __init__(
        self, dirpath: str, every_n_epochs: int = 10, num_samples: int = 16, seed: int = 0, **sample_options: Any
    ) -> None:
        self.dirpath = Path(dirpath)
        self.every_n_epochs = every_n_epochs
        self.num_samples = num_samples
        self.seed = seed
        self.sample_options = sample_options
        self._last_step = -1
        self._completed_an_epoch = False
        self._epoch = 0  # of the last batch: Lightning has counted one more epoch by the time training ends

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._completed_an_epoch = trainer.current_epoch > 0  # a run resumed after its first epoch

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self._epoch = trainer.current_epoch

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ready = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        self._completed_an_epoch |= ready >= trainer.num_training_batches
        due = self.every_n_epochs > 0 and (trainer.current_epoch + 1) % self.every_n_epochs == 0
        if self._completed_an_epoch and due:
            self._log(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._completed_an_epoch:
            log.info("no final sample grid: the run ended inside its first epoch (sample.py ckpt_path=… draws one)")
            return
        self._log(trainer, pl_module)

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step == self._last_step or not trainer.is_global_zero:
            return
        self._last_step = trainer.global_step
        model = evaluation_model(trainer, pl_module)
        images = model.sample(self.num_samples, seed=self.seed, batch_size=self.num_samples, **self.sample_options)
        grid = labelled_grid(to_uint8(images), model.label_names())
        save_png(grid, self.dirpath / f"epoch{self._epoch:04d}-step{trainer.global_step:07d}.png")
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("samples", grid, trainer.global_step, dataformats="HWC")
