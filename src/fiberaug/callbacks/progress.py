"""A progress bar that counts what ends the run."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import RichProgressBar


class ProgressBar(RichProgressBar):
    """Lightning's Rich progress bar; a run that `trainer.max_steps` ends shows one bar for the whole run, its
    optimizer steps against `max_steps`, rather than each epoch's batches against an `Epoch N/-2` that never comes.

    It reads only the step counter per step (an int on the host), like Lightning's bar: no device sync.
    """

    @property
    def by_steps(self) -> bool:
        return self.trainer.max_steps > 0 and self.trainer.max_epochs in (None, -1)

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if self.by_steps else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        if not self.by_steps:
            return super()._get_train_description(current_epoch)
        return f"{f'Epoch {current_epoch}, steps':{len(self.validation_description)}}"

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not (self.by_steps and self.progress is not None and self.train_progress_bar_id is not None):
            super().on_train_epoch_start(trainer, pl_module)
            if self.by_steps:  # a resumed run starts part-way
                self._update(self.train_progress_bar_id, trainer.global_step)
            return
        description = self._get_train_description(trainer.current_epoch)
        styled = f"[{self.theme.description}]{description}" if self.theme.description else description
        self.progress.update(self.train_progress_bar_id, description=styled)
        self.refresh()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.by_steps:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()  # a run resumed inside an epoch
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()
