"""The training objective: what the denoiser is taught to predict, and how much each timestep counts."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from diffusers import DDPMScheduler

from fiberaug.errors import UserError

LOSS_WEIGHTINGS = ("none", "min_snr")
Weighting = Callable[[DDPMScheduler, torch.Tensor], torch.Tensor]


def training_target(
    scheduler: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """The noise for epsilon prediction; for v prediction v = √ᾱ_t·ε − √(1−ᾱ_t)·x0 (Salimans & Ho 2022).

    From ε, x0 = (x_t − √(1−ᾱ_t)·ε)/√ᾱ_t amplifies the prediction's error where ᾱ_t ≈ 0 (the first
    sampling steps); from v, x0 = √ᾱ_t·x_t − √(1−ᾱ_t)·v never does.
    """
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    return noise


def snr(scheduler: DDPMScheduler, t: torch.Tensor) -> torch.Tensor:
    """The signal-to-noise ratio ᾱ_t / (1 − ᾱ_t) of x_t, in float32."""
    alpha_bar = scheduler.alphas_cumprod.to(t.device)[t].float()
    return alpha_bar / (1 - alpha_bar)


def min_snr_weights(scheduler: DDPMScheduler, t: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
    """Min-SNR-γ (Hang et al. 2023): per-sample weights that cap the x0-error weight of each timestep at γ.

    The ε loss weighs x0's error by SNR, so nearly clean timesteps dominate and their gradients fight the
    noisy ones'; min(SNR, γ)/SNR turns that weight into min(SNR, γ). v's loss weighs it by SNR + 1, hence
    min(SNR, γ)/(SNR + 1) (as diffusers' training examples do).
    """
    ratio = snr(scheduler, t)
    capped = ratio.clamp(max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return capped / (ratio + 1)
    return capped / ratio


def make_weighting(name: str, min_snr_gamma: float = 5.0) -> Weighting | None:
    """The per-sample weights of `name`, as a function of the schedule and timesteps; None for equal weights."""
    if name == "none":
        return None
    if name == "min_snr":
        if isinstance(min_snr_gamma, bool) or not isinstance(min_snr_gamma, (int, float)) or min_snr_gamma <= 0:
            raise UserError(f"model.min_snr_gamma={min_snr_gamma!r} must be a positive number (the paper's: 5)")
        return partial(min_snr_weights, gamma=float(min_snr_gamma))
    raise UserError(f"model.loss_weighting={name!r} is not known; choose one of: {', '.join(LOSS_WEIGHTINGS)}")
