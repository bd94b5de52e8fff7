"""Noise schedules and samplers, built on diffusers' schedulers and independent of any network."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    SchedulerMixin,
    UniPCMultistepScheduler,
)

from fiberaug.errors import UserError

# Our short names for diffusers' `beta_schedule` values.
BETA_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
SAMPLERS: dict[str, type[SchedulerMixin]] = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "dpmpp": DPMSolverMultistepScheduler,
    "unipc": UniPCMultistepScheduler,
}
# The multistep solvers' settings: DPM-Solver++ 2M (Lu et al. 2022) and UniPC's second-order B(h) (Zhao et al. 2023),
# diffusers' defaults for guided sampling.
SOLVER_OPTIONS: dict[str, dict[str, Any]] = {
    "dpmpp": {"algorithm_type": "dpmsolver++", "solver_order": 2},
    "unipc": {"solver_order": 2, "solver_type": "bh2"},
}
# What the denoiser predicts, in diffusers' names: the noise, or v = √ᾱ·ε − √(1−ᾱ)·x0 (Salimans & Ho 2022).
PREDICTION_TYPES = ("epsilon", "v_prediction")
REFERENCE_TIMESTEPS = 1000  # the T that Ho et al.'s linear β range was chosen for


def linear_betas(num_train_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> tuple[float, float]:
    """Ho et al.'s β range for T = 1000, scaled by 1000 / T as in Improved DDPM (Nichol & Dhariwal 2021).

    Unscaled, a short schedule leaves most of the signal at t = T (ᾱ_T = 0.36 at T = 100) while
    sampling starts from pure noise; scaled, ᾱ_T stays near e^-10 for every T.
    """
    scale = REFERENCE_TIMESTEPS / num_train_timesteps
    return beta_start * scale, beta_end * scale


def noise_scheduler(
    schedule: str = "cosine",
    num_train_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    clip_sample: bool = True,
    prediction_type: str = "epsilon",
) -> DDPMScheduler:
    """The forward process q(x_t | x_0) = N(sqrt(ᾱ_t) x_0, (1 - ᾱ_t) I), for a denoiser predicting `prediction_type`.

    `linear`: β from `beta_start` to `beta_end` at T = 1000 (Ho et al.), scaled to other T (`linear_betas`);
    `cosine`: ᾱ_t from Nichol & Dhariwal, which destroys small images less abruptly. Both end near pure
    noise (ᾱ_T < 1e-3) for every T they accept. The samplers are built from this config, so they read the
    denoiser's output as the same `prediction_type`, and so does an exported pipeline.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise UserError(
            f"model.prediction_type={prediction_type!r} is not known; choose one of: {', '.join(PREDICTION_TYPES)}"
        )
    if schedule not in BETA_SCHEDULES:
        raise UserError(f"model.schedule={schedule!r} is not known; choose one of: {', '.join(BETA_SCHEDULES)}")
    if not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
        raise UserError(f"model.num_train_timesteps={num_train_timesteps!r} must be a positive integer")
    beta_start, beta_end = linear_betas(num_train_timesteps, beta_start, beta_end)
    if schedule == "linear" and beta_end >= 1:
        shortest = int(beta_end * num_train_timesteps) + 1  # the first T whose scaled β_end is below 1
        raise UserError(
            f"model.num_train_timesteps={num_train_timesteps} is too short for the linear schedule (its last β "
            f"would be {beta_end:.2f} ≥ 1); use at least {shortest}, or model.schedule=cosine"
        )
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=BETA_SCHEDULES[schedule],
        beta_start=beta_start,
        beta_end=beta_end,
        clip_sample=clip_sample,
        prediction_type=prediction_type,
        variance_type="fixed_small",
        timestep_spacing="trailing",  # a shortened schedule still starts from pure noise (t = T-1)
    )


def pretrained_scheduler(folder: Path, prediction_type: str | None = None) -> DDPMScheduler:
    """The forward process a pretrained model learned, from its diffusers scheduler folder (any scheduler class):
    its betas, timesteps and spacing, and its prediction type, which fine-tuning must keep. x0 is not clipped: it is
    a latent."""
    config = DDPMScheduler.load_config(str(folder))
    learned = config.get("prediction_type", "epsilon")
    if prediction_type not in (None, learned):
        raise UserError(f"model.prediction_type={prediction_type} differs from the {learned} that {folder} learned; "
                        f"set model.prediction_type={learned} (or null: the folder's)")
    return DDPMScheduler.from_config(config, clip_sample=False, prediction_type=learned)


def make_sampler(train_scheduler: SchedulerMixin, name: str, steps: int) -> SchedulerMixin:
    """A fresh sampler of kind `name` over `steps` timesteps, sharing the training schedule's ᾱ."""
    if name not in SAMPLERS:
        raise UserError(f"sampler={name!r} is not available; choose one of: {', '.join(SAMPLERS)}")
    num_train = train_scheduler.config.num_train_timesteps
    if not isinstance(steps, int) or not 1 <= steps <= num_train:
        raise UserError(f"steps={steps!r} must be an integer from 1 to {num_train} (the training timesteps)")
    options = dict(SOLVER_OPTIONS.get(name, {}))
    if name in SOLVER_OPTIONS and train_scheduler.config.clip_sample:
        # Their form of DDPM/DDIM's clipped x0: thresholding at the 1.0 ceiling clips x0 to [-1, 1].
        options |= {"thresholding": True, "sample_max_value": 1.0}
    sampler = SAMPLERS[name].from_config(train_scheduler.config, **options)
    sampler.set_timesteps(steps)
    return sampler
