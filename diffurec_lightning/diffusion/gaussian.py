"""Gaussian diffusion over target embeddings: the forward process q and the x0-predicting reverse p.

Shapes: B = batch, d = embedding size; x tensors are (B, d) (any (B, ...) works), t is (B,) long
with 0 <= t < T. Equation numbers refer to Ho et al. 2020 (DDPM) unless stated otherwise; the
reverse process follows method.md ("Reverse process"). The network is an argument, never a member.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .schedules import get_betas


def _first_step_variance(betas: Tensor, posterior_variance: Tensor) -> Tensor:
    # The posterior variance is 0 at s = 0, so its log is clipped to the value at s = 1 (as in
    # improved-diffusion). Step 0 never adds noise, so this value only has to be finite; with a
    # single step there is no s = 1 and beta_0 stands in.
    return posterior_variance[1:2] if len(betas) > 1 else betas[:1]


def _fixed_large_log_variance(betas: Tensor, posterior_variance: Tensor) -> Tensor:
    # Sec. 3.2: sigma_s^2 = beta_s, the upper bound on the reverse variance (the DiffuRec code).
    return torch.log(torch.cat([_first_step_variance(betas, posterior_variance), betas[1:]]))


def _posterior_log_variance(betas: Tensor, posterior_variance: Tensor) -> Tensor:
    # Eq. 7: sigma_s^2 = beta_tilde_s, the lower bound (the DiffuRecSys text).
    first = _first_step_variance(betas, posterior_variance)
    return torch.log(torch.cat([first, posterior_variance[1:]]))


VARIANCES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "fixed_large": _fixed_large_log_variance,
    "posterior": _posterior_log_variance,
}


def _at(values: Tensor, t: Tensor, x: Tensor) -> Tensor:
    """values[t] shaped to broadcast against x: (B,) -> (B, 1, ..., 1)."""
    return values[t].view(-1, *([1] * (x.dim() - 1)))


def evenly_spaced_steps(num_steps: int, count: int) -> list[int]:
    """`count` steps spread evenly over 0..T-1 (both ends included when count >= 2).

    A single step is the last one, T-1: the reverse process starts from pure noise.
    """
    if not 1 <= count <= num_steps:
        raise ValueError(f"count must be in 1..{num_steps}, got {count}")
    if count == 1:
        return [num_steps - 1]
    # round(k (T-1) / (count-1)) half up, in integers; spacing >= 1 keeps the steps distinct.
    return [(2 * k * (num_steps - 1) + count - 1) // (2 * (count - 1)) for k in range(count)]


class GaussianDiffusion(nn.Module):
    """Precomputed schedule quantities and the q/p operations of a T-step Gaussian diffusion.

    Everything is computed once in float64 and kept as non-persistent float32 buffers: they follow
    `.to(device)` and stay out of checkpoints, since they are rebuilt from the config.
    """

    betas: Tensor
    alphas_cumprod: Tensor
    alphas_cumprod_prev: Tensor
    sqrt_alphas_cumprod: Tensor
    sqrt_one_minus_alphas_cumprod: Tensor
    posterior_variance: Tensor
    posterior_log_variance_clipped: Tensor
    posterior_mean_coef1: Tensor
    posterior_mean_coef2: Tensor
    model_log_variance: Tensor
    timestep_map: Tensor

    def __init__(
        self, *, num_steps: int = 32, schedule: str = "trunc_lin", variance: str = "fixed_large"
    ) -> None:
        super().__init__()
        if variance not in VARIANCES:
            raise ValueError(
                f"unknown variance '{variance}'; choose one of: {', '.join(VARIANCES)}"
            )
        self.schedule = schedule
        self.variance = variance
        betas = get_betas(schedule, num_steps)
        self._set_schedule(betas, torch.arange(num_steps), device=torch.device("cpu"))

    def _set_schedule(self, betas: Tensor, timestep_map: Tensor, *, device: torch.device) -> None:
        self._betas64 = betas  # (T,) float64, kept for respacing
        alphas = 1.0 - betas
        abar = torch.cumprod(alphas, dim=0)
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)  # Eq. 7, beta_tilde
        buffers = {
            "betas": betas,
            # q(x_s | x_0) = N(sqrt(abar_s) x_0, (1 - abar_s) I), Eq. 4
            "alphas_cumprod": abar,
            "alphas_cumprod_prev": abar_prev,
            "sqrt_alphas_cumprod": abar.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - abar).sqrt(),
            # q(x_{s-1} | x_s, x_0) = N(c1 x_0 + c2 x_s, beta_tilde_s I), Eq. 6-7
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": _posterior_log_variance(betas, posterior_variance),
            "posterior_mean_coef1": betas * abar_prev.sqrt() / (1.0 - abar),
            "posterior_mean_coef2": (1.0 - abar_prev) * alphas.sqrt() / (1.0 - abar),
            # p(x_{s-1} | x_s) variance, per the variance choice
            "model_log_variance": VARIANCES[self.variance](betas, posterior_variance),
        }
        for name, value in buffers.items():
            self.register_buffer(name, value.to(device, torch.float32), persistent=False)
        self.register_buffer("timestep_map", timestep_map.to(device, torch.long), persistent=False)

    @property
    def num_steps(self) -> int:
        return int(self.betas.shape[0])

    def extra_repr(self) -> str:
        text = f"num_steps={self.num_steps}, schedule={self.schedule}, variance={self.variance}"
        if not torch.equal(self.timestep_map.cpu(), torch.arange(self.num_steps)):
            text += f", steps={self.timestep_map.tolist()}"  # a respaced process
        return text

    def q_sample(self, x_start: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise (Eq. 4, reparameterised)."""
        return (
            _at(self.sqrt_alphas_cumprod, t, x_start) * x_start
            + _at(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
        )

    def q_posterior_mean_variance(
        self, x_start: Tensor, x_t: Tensor, t: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0) (Eq. 6-7)."""
        mean = (
            _at(self.posterior_mean_coef1, t, x_t) * x_start
            + _at(self.posterior_mean_coef2, t, x_t) * x_t
        )
        variance = _at(self.posterior_variance, t, x_t).expand_as(x_t)
        log_variance = _at(self.posterior_log_variance_clipped, t, x_t).expand_as(x_t)
        return mean, variance, log_variance

    def p_mean_variance(
        self, x_start_pred: Tensor, x_t: Tensor, t: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Mean and log variance of p(x_{t-1} | x_t) when the network predicts x_0 directly.

        The mean is the posterior mean (Eq. 7) with x_0 replaced by the prediction (method.md).
        """
        mean, _, _ = self.q_posterior_mean_variance(x_start_pred, x_t, t)
        log_variance = _at(self.model_log_variance, t, x_t).expand_as(x_t)
        return mean, log_variance

    def p_sample(self, x_start_pred: Tensor, x_t: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_{t-1} = mu + sigma_t noise, with no noise at t = 0 (DDPM Algorithm 2)."""
        mean, log_variance = self.p_mean_variance(x_start_pred, x_t, t)
        last = (t == 0).view(-1, *([1] * (x_t.dim() - 1)))  # (B, 1)
        return torch.where(last, mean, mean + torch.exp(0.5 * log_variance) * noise)

    def p_sample_loop(
        self,
        denoise_fn: Callable[[Tensor, Tensor], Tensor],
        x_T: Tensor,
        noise_fn: Callable[[int], Tensor],
    ) -> tuple[Tensor, Tensor]:
        """Run the reverse process from x_T down to x_0; returns (x_0, last x_start_pred).

        denoise_fn(x_t, model_t) predicts x_0, where model_t = timestep_map[t] is the ORIGINAL step
        index (for the step embedding). noise_fn(i) gives the noise for step i (shaped like x_T);
        it is called for i = T-1 .. 1 only, never for the final step, which adds no noise.
        Gradients and autocast follow the caller's context.
        """
        x_t = x_T
        x_start_pred = x_T
        for i in reversed(range(self.num_steps)):
            t = torch.full((x_T.shape[0],), i, dtype=torch.long, device=x_T.device)  # (B,)
            x_start_pred = denoise_fn(x_t, self.timestep_map[t])
            noise = noise_fn(i) if i > 0 else torch.zeros_like(x_t)
            x_t = self.p_sample(x_start_pred, x_t, t, noise)
        return x_t, x_start_pred

    def respaced(self, use_steps: Sequence[int]) -> GaussianDiffusion:
        """A process that visits only `use_steps` of this one (Nichol & Dhariwal Sec. 4).

        Keeping abar at the kept steps fixes the new betas: beta'_i = 1 - abar[s_i] / abar[s_{i-1}].
        `timestep_map` holds the original indices, so the network sees the steps it was trained on.
        """
        steps = sorted({int(s) for s in use_steps})
        if not steps or steps[0] < 0 or steps[-1] >= self.num_steps:
            raise ValueError(f"use_steps must be a non-empty subset of 0..{self.num_steps - 1}")
        abar = torch.cumprod(1.0 - self._betas64, dim=0)[steps]  # (T',) float64
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        spaced = copy.deepcopy(self)
        timestep_map = self.timestep_map.cpu()[steps]  # composes when respacing twice
        spaced._set_schedule(1.0 - abar / abar_prev, timestep_map, device=self.betas.device)
        return spaced
