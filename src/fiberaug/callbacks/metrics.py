"""Sample-quality metrics during training, logged as `val/<name>` and usable as the checkpoint monitor."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl

from fiberaug.callbacks.common import evaluation_model, sampling_options, validates
from fiberaug.metrics import CHEAP, evaluate_images

log = logging.getLogger(__name__)


class SampleMetrics(pl.Callback):
    """Draws `num_samples` images from fixed seeds and measures them with `fiberaug.metrics` against the
    validation images (the training images for a model without a validation split); memorisation is always
    measured against the training images.

    Measured every `every_n_epochs`-th epoch, whether or not its metrics rank the checkpoints: a model with a
    validation loop at the end of that epoch's validation (none when the epoch does not validate); a GAN, which
    has none, after the epoch's last batch, just before the checkpoint callback makes that epoch's saves.
    `measured_step` says when, so that `ModelCheckpoint` ranks by these metrics only where they are fresh. Nothing is
    measured before step `min_steps` (a note says so once): a small folder's epochs are a step or two long, and
    a hundred samples of a barely trained model would cost many times its training and say nothing. The
    weights measured are the ones checkpoints hold (the EMA average when there is one). Rank 0 measures and the
    others receive its values, so every process logs and ranks alike.
    """

    def __init__(
        self,
        metrics: Sequence[str] = CHEAP,
        num_samples: int = 128,
        every_n_epochs: int = 10,
        seed: int = 0,
        max_reference: int = 2000,
        min_steps: int = 500,
        **sample_options: Any,
    ) -> None:
        self.metrics = list(metrics)
        self.num_samples = num_samples
        self.every_n_epochs = every_n_epochs
        self.min_steps = min_steps
        self._noted = False
        self.seed = seed
        self.max_reference = max_reference
        self.sample_options = sample_options
        self._reference: dict[str, Any] | None = None
        self.measured_step: int | None = None  # the global step of the last measurement

    @property
    def metric_names(self) -> tuple[str, ...]:
        """What it logs, for `optimized_metric`: the mean of each measure (per-level and per-class values besides)."""
        names = {"swd": ["swd"], "prdc": ["precision", "recall", "density", "coverage"], "fid": ["fid", "kid"],
                 "memorisation": ["memorisation", "memorisation/median_ratio"],
                 "class_consistency": ["class_consistency", "classifier_accuracy"]}
        return tuple(f"val/{name}" for metric in self.metrics for name in names.get(metric, [metric]))

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and self._due(trainer):
            self._measure(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # After the epoch's last batch, where the checkpoint callback makes its epoch-end saves without validation.
        last = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        if last and self._due(trainer) and not validates(trainer, pl_module):
            self._measure(trainer, pl_module)

    def _due(self, trainer: pl.Trainer) -> bool:
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return False
        if trainer.global_step < self.min_steps:
            if not self._noted:
                self._noted = True
                log.info("sample metrics: none before step %d (callbacks.metrics.min_steps; now at step %d)",
                         self.min_steps, trainer.global_step)
            return False
        return True

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        values = None
        if trainer.is_global_zero:
            log.info("sample metrics: drawing %d samples, measuring %s…", self.num_samples, ", ".join(self.metrics))
            start = time.perf_counter()
            reference = self._reference_images(trainer)
            model = evaluation_model(trainer, pl_module)
            fake = model.sample(self.num_samples, seed=self.seed, batch_size=self.num_samples,
                                **sampling_options(model, self.sample_options))
            labels = model.label_indices(None, self.num_samples)
            values = evaluate_images(
                reference["real"], fake, train=reference["train"], real_labels=reference["labels"],
                fake_labels=labels.tolist() if labels is not None else None, class_names=model.class_names,
                metrics=self.metrics, seed=self.seed, sheet_rows=0,
            ).values
            log.info("sample metrics: %s in %.1f s", ", ".join(f"{k} {v:.4g}" for k, v in values.items()
                                                             if "/" not in k), time.perf_counter() - start)
        values = trainer.strategy.broadcast(values, src=0)
        self.measured_step = trainer.global_step
        pl_module.log_dict({f"val/{name}": value for name, value in values.items()}, sync_dist=False)

    def _reference_images(self, trainer: pl.Trainer) -> dict[str, Any]:
        """Decoded once per run: the validation (or training) images and the training images, on the CPU."""
        if self._reference is None:
            data = trainer.datamodule
            split = "val" if len(data.val_set) else "train"
            real, labels = data.reference_images(split, self.max_reference)
            train = real if split == "train" else data.reference_images("train", self.max_reference)[0]
            self._reference = {"real": real, "labels": labels, "train": train}
        return self._reference

