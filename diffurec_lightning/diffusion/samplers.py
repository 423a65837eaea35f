"""Reverse-process samplers for x0-predicting networks, by name.

- ``ancestral``: DDPM ancestral sampling with the posterior q(x_{t-1} | x_t, x0_hat)
  (``GaussianDiffusion.p_sample_loop``); on a respaced process it visits only the kept steps.
- ``skip``: DCRec's step skipping (Huang et al., arXiv 2410.21967, inference algorithm): at each
  kept level predict x0, then jump straight to the next kept level by re-noising the prediction
  with q(x_t' | x0_hat) instead of taking a posterior step.
- ``ddim``: DDIM with eta = 0 (Song et al. 2021, Eq. 12): deterministic given x_T; each step keeps
  the noise direction implied by x_t and x0_hat instead of drawing fresh noise.

All visit the same levels in the same order (``process.timestep_map`` from last to first) and
return the final x0 prediction; ``ancestral`` and ``skip`` call ``noise_fn(i)`` for
i = T'-1 .. 1 only, ``ddim`` never calls it (``DRAWS_STEP_NOISE``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .gaussian import GaussianDiffusion, evenly_spaced_steps

DenoiseFn = Callable[[Tensor, Tensor], Tensor]
NoiseFn = Callable[[int], Tensor]


def sampling_process(diffusion: GaussianDiffusion, steps: int | None) -> GaussianDiffusion:
    """The process a sampler runs: all T steps (steps None or T) or T' evenly spaced ones."""
    if steps is None or steps == diffusion.num_steps:
        return diffusion
    return diffusion.respaced(evenly_spaced_steps(diffusion.num_steps, steps))


def ancestral(
    process: GaussianDiffusion,
    denoise_fn: DenoiseFn,
    x_T: Tensor,
    noise_fn: NoiseFn,
    forward_mean: Tensor | float = 0.0,
) -> Tensor:
    """Posterior steps x_t -> x_{t-1} with N(0, I) noise; ``forward_mean`` is not used."""
    _, x_start_pred = process.p_sample_loop(denoise_fn, x_T, noise_fn)
    return x_start_pred


def _renoising_loop(
    process: GaussianDiffusion,
    denoise_fn: DenoiseFn,
    x_T: Tensor,
    next_noise: Callable[[int, Tensor, Tensor], Tensor],
) -> Tensor:
    """At each kept level predict x0, then x_{i-1} = q_sample(x0_hat, i-1, next_noise(i, x_i, x0_hat))."""
    x_t = x_T
    x_start_pred = x_T
    for i in reversed(range(process.num_steps)):
        t = torch.full((x_T.shape[0],), i, dtype=torch.long, device=x_T.device)  # (B,)
        x_start_pred = denoise_fn(x_t, process.timestep_map[t])
        if i > 0:
            x_t = process.q_sample(x_start_pred, t - 1, next_noise(i, x_t, x_start_pred))
    return x_start_pred


def skip(
    process: GaussianDiffusion,
    denoise_fn: DenoiseFn,
    x_T: Tensor,
    noise_fn: NoiseFn,
    forward_mean: Tensor | float = 0.0,
) -> Tensor:
    """Predict x0 at each kept level, re-noise it to the next one: x_{i-1} ~ q(x_{i-1} | x0_hat).

    The re-noising uses the forward process's noise, ``noise_fn(i) + forward_mean`` (the mean is
    DCRec's history offset delta * K; 0 for plain Gaussian noise).
    """
    return _renoising_loop(process, denoise_fn, x_T, lambda i, *_: noise_fn(i) + forward_mean)


def ddim(
    process: GaussianDiffusion,
    denoise_fn: DenoiseFn,
    x_T: Tensor,
    noise_fn: NoiseFn,
    forward_mean: Tensor | float = 0.0,
) -> Tensor:
    """x_{i-1} = sqrt(abar_{i-1}) x0_hat + sqrt(1 - abar_{i-1}) eps_hat, eps_hat implied by x_i.

    eps_hat = (x_i - sqrt(abar_i) x0_hat) / sqrt(1 - abar_i) is the noise (minus the forward
    mean, which it carries along unchanged) that would have produced x_i from x0_hat.
    ``noise_fn`` is never called: only x_T is random.
    """

    def implied_noise(i: int, x_t: Tensor, x_start_pred: Tensor) -> Tensor:
        sqrt_abar = process.sqrt_alphas_cumprod[i]
        return (x_t - sqrt_abar * x_start_pred) / process.sqrt_one_minus_alphas_cumprod[i]

    return _renoising_loop(process, denoise_fn, x_T, implied_noise)


SAMPLERS: dict[str, Callable[..., Tensor]] = {"ancestral": ancestral, "skip": skip, "ddim": ddim}
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
    forward_mean: Tensor | float = 0.0,
) -> Tensor:
    """Run sampler ``name`` over ``steps`` evenly spaced levels of ``diffusion``; return x0_hat."""
    check_sampler(name, steps, diffusion.num_steps)
    process = sampling_process(diffusion, steps)
    return SAMPLERS[name](process, denoise_fn, x_T, noise_fn, forward_mean)
