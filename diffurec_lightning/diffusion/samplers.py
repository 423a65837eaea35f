"""Reverse-process samplers for x0-predicting networks, by name.

- ``ancestral``: DDPM ancestral sampling with the posterior q(x_{t-1} | x_t, x0_hat)
  (the steps of ``GaussianDiffusion.p_sample_loop``); on a respaced process it visits only the
  kept steps.
- ``skip``: DCRec's step skipping (Huang et al., arXiv 2410.21967, inference algorithm): at each
  kept level predict x0, then jump straight to the next kept level by re-noising the prediction
  with q(x_t' | x0_hat) instead of taking a posterior step.
- ``ddim``: DDIM with eta = 0 (Song et al. 2021, Eq. 12): deterministic given x_T; each step keeps
  the noise direction implied by x_t and x0_hat instead of drawing fresh noise.

All run one loop (``sample``), which visits the same levels in the same order
(``process.timestep_map`` from last to first) and returns the final x0 prediction; a sampler is
only its step rule from one level to the next. ``ancestral`` and ``skip`` call ``noise_fn(i)`` for
i = T'-1 .. 1 only, ``ddim`` never calls it (``DRAWS_STEP_NOISE``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .gaussian import GaussianDiffusion, evenly_spaced_steps

DenoiseFn = Callable[[Tensor, Tensor], Tensor]
NoiseFn = Callable[[int], Tensor]
Mean = Tensor | float
# One reverse step of a sampler: (i, t, x_i, x0_hat) -> x_{i-1}, for kept level i >= 1, t (B,) = i.
StepFn = Callable[[int, Tensor, Tensor, Tensor], Tensor]


def sampling_process(diffusion: GaussianDiffusion, steps: int | None) -> GaussianDiffusion:
    """The process a sampler runs: all T steps (steps None or T) or T' evenly spaced ones."""
    if steps is None or steps == diffusion.num_steps:
        return diffusion
    return diffusion.respaced(evenly_spaced_steps(diffusion.num_steps, steps))


def ancestral(process: GaussianDiffusion, noise_fn: NoiseFn, forward_mean: Mean) -> StepFn:
    """Posterior steps x_i -> x_{i-1} with N(0, I) noise, as ``GaussianDiffusion.p_sample_loop``
    takes them; ``forward_mean`` is not used."""
    return lambda i, t, x_t, x_start_pred: process.p_sample(x_start_pred, x_t, t, noise_fn(i))


def skip(process: GaussianDiffusion, noise_fn: NoiseFn, forward_mean: Mean) -> StepFn:
    """Re-noise the prediction to the next kept level: x_{i-1} ~ q(x_{i-1} | x0_hat).

    The re-noising uses the forward process's noise, ``noise_fn(i) + forward_mean`` (the mean is
    DCRec's history offset delta * K; 0 for plain Gaussian noise).
    """
    return lambda i, t, x_t, x_start_pred: process.q_sample(
        x_start_pred, t - 1, noise_fn(i) + forward_mean
    )


def ddim(process: GaussianDiffusion, noise_fn: NoiseFn, forward_mean: Mean) -> StepFn:
    """x_{i-1} = sqrt(abar_{i-1}) x0_hat + sqrt(1 - abar_{i-1}) eps_hat, eps_hat implied by x_i.

    eps_hat = (x_i - sqrt(abar_i) x0_hat) / sqrt(1 - abar_i) is the noise (minus the forward
    mean, which it carries along unchanged) that would have produced x_i from x0_hat.
    ``noise_fn`` is never called: only x_T is random.
    """

    def step(i: int, t: Tensor, x_t: Tensor, x_start_pred: Tensor) -> Tensor:
        sqrt_abar = process.sqrt_alphas_cumprod[i]
        implied = (x_t - sqrt_abar * x_start_pred) / process.sqrt_one_minus_alphas_cumprod[i]
        return process.q_sample(x_start_pred, t - 1, implied)

    return step


def _reverse_loop(
    process: GaussianDiffusion, denoise_fn: DenoiseFn, x_T: Tensor, step: StepFn
) -> Tensor:
    """At each kept level, from the last, predict x0, then take the sampler's ``step`` down to
    the next level (none after level 0); return the last prediction x0_hat."""
    x_t = x_T
    x_start_pred = x_T
    for i in reversed(range(process.num_steps)):
        t = torch.full((x_T.shape[0],), i, dtype=torch.long, device=x_T.device)  # (B,)
        x_start_pred = denoise_fn(x_t, process.timestep_map[t])
        if i > 0:
            x_t = step(i, t, x_t, x_start_pred)
    return x_start_pred


# Each sampler builds its step rule from (process, noise_fn, forward_mean).
SAMPLERS: dict[str, Callable[[GaussianDiffusion, NoiseFn, Mean], StepFn]] = {
    "ancestral": ancestral,
    "skip": skip,
    "ddim": ddim,
}
# Whether a sampler draws step noise (noise_fn) between its levels: noise prefetching needs it.
DRAWS_STEP_NOISE: dict[str, bool] = {"ancestral": True, "skip": True, "ddim": False}


def check_sampler(name: str, steps: int | None, num_steps: int) -> None:
    """ValueError naming the problem unless (name, steps) is a valid sampler for T = num_steps."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler '{name}'; choose one of: {', '.join(SAMPLERS)}")
    if steps is not None and not 1 <= steps <= num_steps:
        raise ValueError(f"sampler steps must be null or in 1..{num_steps} (T), got {steps}")


def sample(
    name: str,
    diffusion: GaussianDiffusion,
    denoise_fn: DenoiseFn,
    x_T: Tensor,
    noise_fn: NoiseFn,
    *,
    steps: int | None = None,
    forward_mean: Mean = 0.0,
) -> Tensor:
    """Run sampler ``name`` over ``steps`` evenly spaced levels of ``diffusion``; return x0_hat."""
    check_sampler(name, steps, diffusion.num_steps)
    process = sampling_process(diffusion, steps)
    return _reverse_loop(process, denoise_fn, x_T, SAMPLERS[name](process, noise_fn, forward_mean))
