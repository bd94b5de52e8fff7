"""A grid of samples from fixed seeds during training, to TensorBoard and to PNG files."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger

from fiberaug.callbacks.common import evaluation_model, sampling_options
from fiberaug.imaging import labelled_grid, save_png, to_uint8
from fiberaug.models.base import GenerativeModule

log = logging.getLogger(__name__)


class SampleGrid(pl.Callback):
    """Every `every_n_epochs` epochs and when training ends, sample `num_samples` images from seed `seed`.

    The seeds stay fixed, so successive grids show how the same starting noise develops. A class-conditional
    model gets one column per class, its name written over it (see `labelled_grid`). When a weight-averaging (EMA)
    callback is present, its averaged weights generate, as they are what the checkpoints hold.

    Sized to the run, since on a CPU a grid can take longer than a short run trains: nothing is drawn before the
    first epoch completes (a smoke test draws no grid), no grid but the final one before step `min_steps` (a small
    folder's epochs are a step or two long), and a run that ends before it draws its final grid with
    `short_run_steps` sampler steps. Each grid says in the log what it draws and how long it took.
    """

    #: How the log names the picture, and its TensorBoard tag.
    name = "sample grid"
    tag = "samples"

    def __init__(
        self,
        dirpath: str,
        every_n_epochs: int = 10,
        num_samples: int = 16,
        seed: int = 0,
        min_steps: int = 500,
        short_run_steps: int = 10,
        **sample_options: Any,
    ) -> None:
        self.dirpath = Path(dirpath)
        self.every_n_epochs = every_n_epochs
        self.num_samples = num_samples
        self.seed = seed
        self.min_steps = min_steps
        self.short_run_steps = short_run_steps
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
        if self._completed_an_epoch and due and trainer.global_step >= self.min_steps:
            self._log(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._completed_an_epoch:
            log.info("no final sample grid: the run ended inside its first epoch (sample.py ckpt_path=… draws one)")
            return
        self._log(trainer, pl_module, final=True)

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, final: bool = False) -> None:
        if trainer.global_step == self._last_step or not trainer.is_global_zero:
            return
        self._last_step = trainer.global_step
        start = time.perf_counter()
        grid = self.draw(trainer, evaluation_model(trainer, pl_module), final)
        path = self.dirpath / f"epoch{self._epoch:04d}-step{trainer.global_step:07d}.png"
        save_png(grid, path)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(self.tag, grid, trainer.global_step, dataformats="HWC")
        log.info("%s: %s in %.1f s", self.name, path, time.perf_counter() - start)

    def draw(self, trainer: pl.Trainer, model: GenerativeModule, final: bool) -> np.ndarray:
        """The picture: `num_samples` samples from seed `seed`, one column per class, as an H×W×C uint8 array."""
        options = sampling_options(model, self.sample_options)
        how = ""
        if final and trainer.global_step < self.min_steps and "steps" in model.sampling_options:
            options.setdefault("steps", self.short_run_steps)
            how = f" with {options['steps']} sampler steps (a run shorter than callbacks.sample_grid.min_steps)"
        log.info("sample grid: drawing %d samples%s…", self.num_samples, how)
        images = model.sample(self.num_samples, seed=self.seed, batch_size=self.num_samples, **options)
        return labelled_grid(to_uint8(images), model.label_names())
