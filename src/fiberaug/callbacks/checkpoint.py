"""Checkpointing whose `last.ckpt` is always the state at the end of training, whose ranking sees every
validation, the last one included, and whose best score survives a resume into a new run dir."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning import callbacks

from fiberaug.callbacks.common import validates


class ModelCheckpoint(callbacks.ModelCheckpoint):
    """Lightning's `ModelCheckpoint`, whose `last.ckpt` is the state at every save point and at the end.

    Lightning (2.6) writes `last.ckpt` only where it saved a top-k checkpoint at the same step: with a monitor it is
    a copy of the best one, so a resume would lose every step after the best, and a run that stops between
    validations (at its last step, by `trainer.max_time`, by early stopping) would end without its final state.
    Here every save point writes it, and so do the final step or epoch and a stop. Saving in `on_train_end` would
    be too late: an EMA callback has by then copied its average over the raw weights that a resume needs. Those
    saves of `last.ckpt` alone do not count as the step's save: Lightning skips any save at a step it has saved
    already, and the validation that may still follow the final step (or a GAN's epoch-end ranking) has to be
    ranked.

    In a run without a validation loop (a GAN) the epoch-end saves are made after the epoch's last
    batch instead of in `on_train_epoch_end`: Lightning resumes a checkpoint written there one batch
    into the finished epoch when no validation has run, which breaks an exact resume.

    A monitor that a callback measures on its own schedule (`SampleMetrics`' `val/swd`, every
    `every_n_epochs` epochs) ranks only the saves at the step it was measured: at other validations its
    value is an earlier step's (or absent, which Lightning would refuse), so no top-k save is made there.
    """

    _last_written: tuple[int, str] | None = None  # (step, best path) of the last `last.ckpt` written

    def _save_topk_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, Any]) -> None:
        source = next((c for c in trainer.callbacks if self.monitor in getattr(c, "metric_names", ())), None)
        if getattr(source, "measured_step", trainer.global_step) == trainer.global_step:
            super()._save_topk_checkpoint(trainer, monitor_candidates)
        if self._last_global_step_saved != trainer.global_step:  # no top-k save here: Lightning skips last.ckpt
            self._refresh_last(trainer)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch and not validates(trainer, pl_module):
            super().on_train_epoch_end(trainer, pl_module)
        if 0 < trainer.max_steps <= trainer.global_step:
            self._refresh_last(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if validates(trainer, pl_module):
            super().on_train_epoch_end(trainer, pl_module)
        last_epoch = trainer.max_epochs is not None and 0 < trainer.max_epochs <= trainer.current_epoch + 1
        if trainer.should_stop or last_epoch:  # should_stop: max_time, early stopping, mid-epoch too
            self._refresh_last(trainer)

    def _save_last_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, Any]) -> None:
        """Lightning's, once per state: its step-triggered saves write `last.ckpt` after any top-k check."""
        state = (trainer.global_step, self.best_model_path)
        if state != self._last_written:
            super()._save_last_checkpoint(trainer, monitor_candidates)
            self._last_written = state

    def _refresh_last(self, trainer: pl.Trainer) -> None:
        """Write `last.ckpt` now without counting the step as saved, so that a ranking may still follow."""
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            previous = self._last_global_step_saved
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            self._last_global_step_saved = previous

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the ranking when a run resumes into another folder (Lightning drops it there), so the first
        validation after a resume is saved as best only if it beats the best before it. Files of the earlier
        run are never deleted: Lightning removes only checkpoints inside this run's own folder. A run resuming in
        its own folder (a sweep job run again) keeps writing `last.ckpt` there, not `last-v1.ckpt`."""
        if state_dict.get("dirpath") == self.dirpath:
            self.last_model_path = state_dict.get("last_model_path", self.last_model_path)
        self.best_model_score = state_dict["best_model_score"]
        self.best_model_path = state_dict["best_model_path"]
        self.best_k_models = state_dict.get("best_k_models", self.best_k_models)
        self.kth_best_model_path = state_dict.get("kth_best_model_path", self.kth_best_model_path)
        self.kth_value = state_dict.get("kth_value", self.kth_value)
