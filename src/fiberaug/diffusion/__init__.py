"""Diffusion maths shared by every denoiser: noise schedules (forward process) and samplers (reverse)."""

from fiberaug.diffusion.sampling import denoise, guided
from fiberaug.diffusion.schedules import BETA_SCHEDULES, SAMPLERS, linear_betas, make_sampler, noise_scheduler

__all__ = ["BETA_SCHEDULES", "SAMPLERS", "denoise", "guided", "linear_betas", "make_sampler", "noise_scheduler"]
