"""Noise schedules and samplers, built on diffusers' schedulers and independent of any network."""

from __future__ import annotations

from diffusers import DDIMScheduler, DDPMScheduler, SchedulerMixin

from fiberaug.errors import UserError

# Our short names for diffusers' `beta_schedule` values.
BETA_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
SAMPLERS: dict[str, type[SchedulerMixin]] = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}


def noise_scheduler(
    schedule: str = "cosine",
    num_train_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    clip_sample: bool = True,
) -> DDPMScheduler:
    """The forward process q(x_t | x_0) = N(sqrt(ᾱ_t) x_0, (1 - ᾱ_t) I) for epsilon prediction.

    `linear`: β from `beta_start` to `beta_end` (Ho et al.); `cosine`: ᾱ_t from Nichol & Dhariwal, which
    destroys small images less abruptly. `beta_start`/`beta_end` only apply to `linear`.
    """
    if schedule not in BETA_SCHEDULES:
        raise UserError(f"model.schedule={schedule!r} is not known; choose one of: {', '.join(BETA_SCHEDULES)}")
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=BETA_SCHEDULES[schedule],
        beta_start=beta_start,
        beta_end=beta_end,
        clip_sample=clip_sample,
        prediction_type="epsilon",
        variance_type="fixed_small",
        timestep_spacing="trailing",  # a shortened schedule still starts from pure noise (t = T-1)
    )


def make_sampler(train_scheduler: SchedulerMixin, name: str, steps: int) -> SchedulerMixin:
    """A fresh sampler of kind `name` over `steps` timesteps, sharing the training schedule's ᾱ."""
    if name not in SAMPLERS:
        raise UserError(f"sampler={name!r} is not available; choose one of: {', '.join(SAMPLERS)}")
    num_train = train_scheduler.config.num_train_timesteps
    if not isinstance(steps, int) or not 1 <= steps <= num_train:
        raise UserError(f"steps={steps!r} must be an integer from 1 to {num_train} (the training timesteps)")
    sampler = SAMPLERS[name].from_config(train_scheduler.config)
    sampler.set_timesteps(steps)
    return sampler
