"""Diffusion math (plain torch, no networks)."""

from .gaussian import VARIANCES, GaussianDiffusion, evenly_spaced_steps
from .noise import UserNoise, offset_noise
from .schedules import SCHEDULES, get_betas
from .timesteps import (
    TIMESTEP_SAMPLERS,
    LossAwareSampler,
    UniformSampler,
    make_timestep_sampler,
)

__all__ = [
    "SCHEDULES",
    "TIMESTEP_SAMPLERS",
    "VARIANCES",
    "GaussianDiffusion",
    "LossAwareSampler",
    "UniformSampler",
    "UserNoise",
    "evenly_spaced_steps",
    "get_betas",
    "make_timestep_sampler",
    "offset_noise",
]
