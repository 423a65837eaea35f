"""Named noise schedules: each maps a number of steps T to the betas beta_0..beta_{T-1} (float64).

The six schedules are those of Diffusion-LM (Li et al. 2022), which DiffuRec reuses. The table is
append-only: changing a schedule would silently change every experiment that names it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

# Nichol & Dhariwal (2021) clip betas at 0.999 so that abar never collapses to exactly 0.
MAX_BETA = 0.999


def _ddpm_scale(num_steps: int) -> float:
    # DDPM's linear range 1e-4..0.02 was tuned for T = 1000; scaling by 1000/T keeps abar_T similar.
    return 1000 / num_steps


def _betas_from_alpha_bar(
    num_steps: int, alpha_bar: Callable[[Tensor], Tensor], *, from_zero: bool
) -> Tensor:
    """Discretise a continuous abar(tau), tau in [0, 1], into betas (Nichol & Dhariwal Eq. 17).

    beta_i = 1 - abar((i+1)/T) / abar(i/T). With `from_zero` (Diffusion-LM's truncated variant) the
    first beta is 1 - abar(0) and the grid stops one step early, so abar(0) < 1 is kept as a
    non-zero noise floor and the last step never reaches abar(1).
    """
    tau = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps  # (T+1,)
    abar = alpha_bar(tau)
    if from_zero:
        abar = torch.cat([abar.new_ones(1), abar[:-1]])  # abar_{-1} = 1, then abar(0..(T-1)/T)
    betas = 1 - abar[1:] / abar[:-1]
    return betas.clamp(max=MAX_BETA)


def linear(num_steps: int) -> Tensor:
    """DDPM (Ho et al. 2020): betas linear from 1e-4 to 0.02, rescaled by 1000/T."""
    scale = _ddpm_scale(num_steps)
    return torch.linspace(scale * 0.0001, scale * 0.02, num_steps, dtype=torch.float64)


def cosine(num_steps: int) -> Tensor:
    """Nichol & Dhariwal (2021) Eq. 17: abar(tau) = cos^2((tau + s)/(1 + s) * pi/2), s = 0.008."""
    return _betas_from_alpha_bar(
        num_steps, lambda tau: torch.cos((tau + 0.008) / 1.008 * math.pi / 2) ** 2, from_zero=False
    )


def sqrt(num_steps: int) -> Tensor:
    """Diffusion-LM: abar(tau) = 1 - sqrt(tau + 1e-4); noise rises quickly in the first steps."""
    return _betas_from_alpha_bar(
        num_steps, lambda tau: 1 - torch.sqrt(tau + 0.0001), from_zero=False
    )


def trunc_cos(num_steps: int) -> Tensor:
    """Diffusion-LM: abar(tau) = cos^2((tau + 0.1)/1.1 * pi/2), starting from abar(0) < 1."""
    return _betas_from_alpha_bar(
        num_steps, lambda tau: torch.cos((tau + 0.1) / 1.1 * math.pi / 2) ** 2, from_zero=True
    )


def trunc_lin(num_steps: int) -> Tensor:
    """DiffuRec's default: the rescaled DDPM line shifted up by 0.01 (method.md, forward process).

    beta from 0.01 + 0.1/T to 0.01 + 20/T; where that end exceeds 1 (T <= 20) the DiffuRec code
    ends at 0.01 + 1/T instead.
    """
    scale = _ddpm_scale(num_steps)
    start = scale * 0.0001 + 0.01
    end = scale * 0.02 + 0.01
    if end > 1:
        end = scale * 0.001 + 0.01
    return torch.linspace(start, end, num_steps, dtype=torch.float64)


def pw_lin(num_steps: int) -> Tensor:
    """Diffusion-LM's piecewise-linear schedule (needs T >= 10).

    The first 10 betas fall linearly from 0.01 + 0.1/T to 0.1/T; the remaining T - 10 rise linearly
    from 0.1/T to 20/T (both pieces contain 0.1/T, as published).
    """
    if num_steps < 10:
        raise ValueError(f"noise schedule 'pw_lin' needs num_steps >= 10, got {num_steps}")
    scale = _ddpm_scale(num_steps)
    start, mid, end = scale * 0.0001 + 0.01, scale * 0.0001, scale * 0.02
    first = torch.linspace(start, mid, 10, dtype=torch.float64)
    second = torch.linspace(mid, end, num_steps - 10, dtype=torch.float64)
    return torch.cat([first, second])


SCHEDULES: dict[str, Callable[[int], Tensor]] = {
    "linear": linear,
    "cosine": cosine,
    "sqrt": sqrt,
    "trunc_lin": trunc_lin,
    "trunc_cos": trunc_cos,
    "pw_lin": pw_lin,
}


def get_betas(name: str, num_steps: int) -> Tensor:
    """The betas (T,) float64 of a named schedule; every beta lies in (0, 1]."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown noise schedule '{name}'; choose one of: {', '.join(SCHEDULES)}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    betas = SCHEDULES[name](num_steps)
    if not bool(((betas > 0) & (betas <= 1)).all()):
        # The rescaled DDPM lines (linear, pw_lin) reach betas above 1 for T < 20.
        raise ValueError(
            f"noise schedule '{name}' gives betas outside (0, 1] for num_steps={num_steps}; "
            "use more steps or another schedule"
        )
    return betas
