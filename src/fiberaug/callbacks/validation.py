"""A validation after the last training step, so that every run with held-out images ends with its `loss/val`."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl

from fiberaug.callbacks.common import validates


class FinalValidation(pl.Callback):
    """Validates after the run's last step where Lightning would not: a run that `trainer.max_steps` stops inside an
    epoch, or whose last epoch is not one of `trainer.check_val_every_n_epoch`'s.

    A sweep compares its jobs by their last `loss/val`, and a short run (100 steps of a 10-epoch validation
    interval) would otherwise have none; the checkpoint callback ranks this validation like any other, so the final
    weights compete for `best-….ckpt`. Lightning's loop decides when to validate in one private method, which this
    extends rather than copies.
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        loop = trainer.fit_loop.epoch_loop
        lightning_decides = loop._should_check_val_fx

        def should_validate(data_fetcher: Any) -> bool:
            return lightning_decides(data_fetcher) or (_last_step(trainer) and validates(trainer, pl_module))

        loop._should_check_val_fx = should_validate


def _last_step(trainer: pl.Trainer) -> bool:
    """Whether the step just taken ends the run (by `max_steps`, or as the last batch of the last epoch)."""
    if 0 < trainer.max_steps <= trainer.global_step:
        return True
    last_batch = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
    return bool(trainer.max_epochs) and last_batch and trainer.current_epoch + 1 >= trainer.max_epochs
