"""Training-step samplers: draw t per sample with an importance weight that keeps the loss unbiased.

Both samplers share one interface: `sample(batch_size, device, generator)` -> (t, weights) and
`update(t, losses)`, which the training loop calls every step (a no-op for the uniform sampler),
and `state_dict()` / `load_state_dict(state)`, which the modules write into and read from their
checkpoints, so that a resumed run draws t as the interrupted one would have.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def _check_num_steps(num_steps: int) -> int:
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return num_steps


def _draw_device(generator: torch.Generator | None, device: torch.device | str) -> torch.device:
    # A generator can only fill tensors on its own device.
    return generator.device if generator is not None else torch.device(device)


class UniformSampler:
    """t ~ U{0..T-1}, all weights 1 (DDPM training, and DiffuRec in practice)."""

    def __init__(self, *, num_steps: int) -> None:
        self.num_steps = _check_num_steps(num_steps)

    def sample(
        self,
        batch_size: int,
        device: torch.device | str,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Steps (B,) long and weights (B,) float, both on `device`."""
        draw_on = _draw_device(generator, device)
        t = torch.randint(self.num_steps, (batch_size,), generator=generator, device=draw_on)
        return t.to(device), torch.ones(batch_size, device=device)

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Nothing to learn: uniform sampling ignores the losses."""

    def state_dict(self) -> dict[str, Any]:
        """Nothing learnt, nothing to save."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore (a loss-aware sampler's state, if given, does not apply)."""


class LossAwareSampler:
    """Importance sampling by the loss second moment (Nichol & Dhariwal 2021, Sec. 3.3).

    Keeps the last `history_per_term` losses of every step. Until every step has a full history t
    is uniform; then p(t) ∝ sqrt(E[L_t^2]), mixed with `uniform_prob` of the uniform distribution so
    that no step starves, and each sample is weighted by 1 / (T p(t)). The history lives on the CPU
    and is per process: under DDP each rank learns its own p(t), which keeps the loss unbiased.

    The history is plain tensors rather than module buffers on purpose: buffers would follow the
    module to the GPU and to bf16 (``bf16-true``), and DDP would overwrite every rank's with rank
    0's at each forward. Checkpoints hold the state of the rank that writes them (rank 0), which
    every rank resumes from.
    """

    def __init__(
        self, *, num_steps: int, history_per_term: int = 10, uniform_prob: float = 0.001
    ) -> None:
        self.num_steps = _check_num_steps(num_steps)
        if history_per_term < 1:
            raise ValueError(f"history_per_term must be >= 1, got {history_per_term}")
        if not 0.0 <= uniform_prob <= 1.0:
            raise ValueError(f"uniform_prob must lie in [0, 1], got {uniform_prob}")
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        # A ring buffer per step: slot = (number of losses seen so far) mod history_per_term.
        self._history = torch.zeros(num_steps, history_per_term, dtype=torch.float64)  # (T, H)
        self._seen = torch.zeros(num_steps, dtype=torch.long)  # (T,)

    def warmed_up(self) -> bool:
        return bool((self._seen >= self.history_per_term).all())

    def probabilities(self) -> Tensor:
        """p(t) for every step: (T,) float64 on the CPU, summing to 1."""
        uniform = torch.full((self.num_steps,), 1.0 / self.num_steps, dtype=torch.float64)
        if not self.warmed_up():
            return uniform
        rms = self._history.pow(2).mean(dim=1).sqrt()  # (T,) sqrt(E[L_t^2])
        if rms.sum() <= 0:
            return uniform
        return (1.0 - self.uniform_prob) * rms / rms.sum() + self.uniform_prob * uniform

    def sample(
        self,
        batch_size: int,
        device: torch.device | str,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Steps (B,) long and importance weights 1 / (T p(t)) (B,) float, both on `device`."""
        p = self.probabilities().to(_draw_device(generator, device))
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        weights = 1.0 / (self.num_steps * p[t])
        return t.to(device), weights.to(device, torch.float32)

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Record per-sample losses (B,) for steps t (B,); the newest ones win when a step overflows."""
        t = t.detach().to("cpu", torch.long)
        losses = losses.detach().to("cpu", torch.float64)
        order = torch.argsort(t, stable=True)  # group by step, keep arrival order within a step
        t, losses = t[order], losses[order]
        counts = torch.bincount(t, minlength=self.num_steps)  # (T,) new losses per step
        first = torch.cumsum(counts, dim=0) - counts  # (T,) where each step's group starts
        rank = torch.arange(len(t)) - first[t]  # (B,) arrival index within the step
        # Only a step's newest H losses survive; dropping the rest keeps the slots distinct.
        keep = rank >= counts[t] - self.history_per_term
        slot = (self._seen[t] + rank) % self.history_per_term
        self._history[t[keep], slot[keep]] = losses[keep]
        self._seen += counts

    def state_dict(self) -> dict[str, Any]:
        """The loss history (T, H) float64 and the losses seen per step (T,), as copies."""
        return {"history": self._history.clone(), "seen": self._seen.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()``'s result; an empty state (a checkpoint written before
        samplers saved theirs, or by a uniform sampler) keeps the fresh, uniform state."""
        if not state:
            return
        history, seen = state["history"], state["seen"]
        expected = (self.num_steps, self.history_per_term)
        if tuple(history.shape) != expected or tuple(seen.shape) != expected[:1]:
            raise ValueError(
                f"the loss-aware sampler state holds a {tuple(history.shape)} history; "
                f"this sampler keeps {expected} (num_steps, history_per_term)"
            )
        self._history = history.to("cpu", torch.float64).clone()
        self._seen = seen.to("cpu", torch.long).clone()


TIMESTEP_SAMPLERS: dict[str, type[UniformSampler] | type[LossAwareSampler]] = {
    "uniform": UniformSampler,
    "loss_aware": LossAwareSampler,
}


def make_timestep_sampler(name: str, *, num_steps: int) -> UniformSampler | LossAwareSampler:
    """The named training-step sampler for a T-step process."""
    if name not in TIMESTEP_SAMPLERS:
        raise ValueError(
            f"unknown timestep sampler '{name}'; choose one of: {', '.join(TIMESTEP_SAMPLERS)}"
        )
    return TIMESTEP_SAMPLERS[name](num_steps=num_steps)
