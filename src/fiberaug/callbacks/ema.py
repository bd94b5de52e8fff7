"""An exponential moving average of the weights that never makes the CPU wait for the GPU."""

from __future__ import annotations

import functools
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import WeightAveraging


class EMA(WeightAveraging):
    """Lightning's `WeightAveraging` (checkpoints, resume, the average swapped in for validation), updated by
    one queued `lerp` per step: average ← average + (1 − decay)·(weights − average).

    torch's `AveragedModel.update_parameters` asks the device whether it has averaged yet (`n_averaged == 0`)
    at every update, a host-device sync that stalls every training step on a GPU. Here the average starts as
    the initial weights (Lightning copies the model when training starts) and only trainable weights move, so
    frozen ones (a LoRA base, an autoencoder) stay bit-identical; buffers are copied after every step and before
    every validation, so the average never swaps stale ones in (a latent scale estimated when fitting starts).
    Frozen weights are shared with the average, not copied: they never change, and a copy of Stable Diffusion's
    frozen UNet would cost 3.4 GiB to average a LoRA's few MiB; so are whole modules the model names in
    `frozen_modules()` (a latent model's autoencoder, buffers included).
    """

    def __init__(self, decay: float = 0.999) -> None:
        super().__init__()
        if not 0 <= decay < 1:
            raise ValueError(f"callbacks.ema.decay={decay} must lie in [0, 1)")
        self.decay = decay

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            super().setup(trainer, pl_module, stage)
            return
        frozen_weights = [p for p in pl_module.parameters() if not p.requires_grad]
        for weight in frozen_weights:  # deepcopy returns the weight itself
            weight.__deepcopy__ = functools.partial(_itself, weight)
        try:
            self._setup_sharing_frozen_modules(trainer, pl_module, stage)
        finally:
            for weight in frozen_weights:
                del weight.__deepcopy__

    def _setup_sharing_frozen_modules(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        frozen = pl_module.frozen_modules() if hasattr(pl_module, "frozen_modules") else {}
        if not frozen:
            super().setup(trainer, pl_module, stage)
            return
        modules = dict(pl_module._modules)
        for name in frozen:  # out of the model while Lightning deep-copies it into the average
            del pl_module._modules[name]
        try:
            super().setup(trainer, pl_module, stage)
        finally:
            pl_module._modules.clear()
            pl_module._modules.update(modules)
        copied = self._average_model.module._modules
        rebuilt = {name: frozen[name] if name in frozen else copied[name] for name in modules}  # the same order
        copied.clear()
        copied.update(rebuilt)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step <= self._latest_update_step:  # no optimizer step in this batch (accumulation)
            return
        average = self._average_model.module
        pairs = [(a, p) for a, p in zip(average.parameters(), pl_module.parameters(), strict=True) if p.requires_grad]
        with torch.no_grad():
            if pairs:
                torch._foreach_lerp_([a for a, _ in pairs], [p.detach() for _, p in pairs], 1 - self.decay)
        self._copy_buffers(pl_module)
        self._latest_update_step = trainer.global_step

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._average_model is not None:
            self._copy_buffers(pl_module)
        super().on_validation_epoch_start(trainer, pl_module)

    @torch.no_grad()
    def _copy_buffers(self, pl_module: pl.LightningModule) -> None:
        buffers = list(zip(self._average_model.module.buffers(), pl_module.buffers(), strict=True))
        if buffers:
            torch._foreach_copy_([a for a, _ in buffers], [b for _, b in buffers])


def _itself(weight: torch.nn.Parameter, memo: dict[int, Any]) -> torch.nn.Parameter:
    return weight
