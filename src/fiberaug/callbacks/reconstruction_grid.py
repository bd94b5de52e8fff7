"""An autoencoder's picture during training: held-out images beside their reconstructions, to TensorBoard and PNG."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import pytorch_lightning as pl
import torch

from fiberaug.callbacks.sample_grid import SampleGrid
from fiberaug.imaging import labelled_grid, to_uint8

if TYPE_CHECKING:  # only for the annotation: importing the callbacks must not import diffusers
    from fiberaug.models.autoencoder import AutoencoderModule

log = logging.getLogger(__name__)


class ReconstructionGrid(SampleGrid):
    """`SampleGrid`'s schedule and files (`samples/epoch…-step….png`, TensorBoard's `reconstructions`), drawing
    real | reconstruction pairs instead of samples: the first `num_samples` validation images (training images when
    none are held out), the same ones every time, beside the autoencoder's reconstructions of them."""

    name = "reconstruction grid"
    tag = "reconstructions"

    def draw(self, trainer: pl.Trainer, model: AutoencoderModule, final: bool) -> np.ndarray:
        data = trainer.datamodule
        split = "val" if len(data.val_set) else "train"
        log.info("reconstruction grid: reconstructing %d %s images…", self.num_samples, split)
        real = data.reference_images(split, self.num_samples)[0]
        reconstructions = model.reconstruct(real.to(model.device)).float().cpu()
        pairs = torch.stack([real, reconstructions], dim=1).flatten(0, 1)  # real, its reconstruction, the next real, …
        return labelled_grid(to_uint8(pairs), ["real", "recon"])
