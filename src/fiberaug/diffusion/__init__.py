"""Diffusion maths shared by every denoiser: noise schedules (forward process) and samplers (reverse)."""

from fiberaug.diffusion.losses import LOSS_WEIGHTINGS, make_weighting, min_snr_weights, snr, training_target
from fiberaug.diffusion.sampling import denoise, guided
from fiberaug.diffusion.schedules import (
    BETA_SCHEDULES,
    PREDICTION_TYPES,
    SAMPLERS,
    linear_betas,
    make_sampler,
    noise_scheduler,
    pretrained_scheduler,
)

__all__ = [
    "BETA_SCHEDULES", "LOSS_WEIGHTINGS", "PREDICTION_TYPES", "SAMPLERS", "denoise", "guided", "linear_betas",
    "make_sampler", "make_weighting", "min_snr_weights", "noise_scheduler", "pretrained_scheduler", "snr",
    "training_target",
]
