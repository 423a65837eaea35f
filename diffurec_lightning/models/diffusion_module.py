"""The LightningModule that joins item table, approximator and diffusion process.

Training (Algorithm 1): noise the target embedding to a random step, reconstruct it from the
history, score all items, cross-entropy. Validation, test and prediction (Algorithm 2/3): run the
reverse process from pure noise with per-user reproducible noise, then rank all items.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from diffurec_lightning.diffusion.noise import offset_noise
from diffurec_lightning.diffusion.samplers import DRAWS_STEP_NOISE, sample
from diffurec_lightning.models.base import (
    Batch,
    DiffusionRecommender,
    Node,
    require,
)
from diffurec_lightning.models.functional import cross_entropy


class DiffusionRecModule(DiffusionRecommender):
    """DiffuRec / DiffuRecSys: which one is set by ``net`` (the approximator's ``_target_``)
    and ``offset_noise_strength``; ``net`` and ``diffusion`` are config nodes (see base.py)."""

    def __init__(
        self,
        *,
        num_items: int,
        net: Node,
        diffusion: Node,
        name: str = "diffurec",
        hidden_size: int = 128,
        emb_dropout: float = 0.3,
        position_embedding: bool = False,
        item_init: str = "small_normal",
        max_len: int = 50,
        timestep_sampler: str = "uniform",
        lambda_scale: float = 0.001,
        offset_noise_strength: float = 0.0,
        ensemble_size: int = 1,
        transition_prior: float = 0.0,
        sampler: Node | None = None,
        val_sampler: Node | None = None,
        eval_seed: int = 0,
        optimizer: Node | None = None,
        scheduler: Node | None = None,
        ks: Sequence[int] = (5, 10, 20),
        monitor: str = "val/ndcg@10",
        predict_k: int = 20,
    ) -> None:
        require(lambda_scale >= 0, f"model.lambda_scale must be >= 0, got {lambda_scale}")
        require(0 <= emb_dropout < 1, f"model.emb_dropout must lie in [0, 1), got {emb_dropout}")
        require(hidden_size >= 2, f"model.hidden_size must be >= 2, got {hidden_size}")
        super().__init__(
            num_items=num_items,
            sampler=sampler,
            val_sampler=val_sampler,
            ensemble_size=ensemble_size,
            optimizer=optimizer,
            scheduler=scheduler,
            ks=ks,
            monitor=monitor,
            predict_k=predict_k,
        )
        self.build_items()
        self.build_denoiser(net, diffusion, timestep_sampler)
        self.build_prior()

    def uncertainty(self, z: torch.Tensor) -> torch.Tensor:
        """lambda = lambda_scale + lambda_scale * z from standard normal z: N(scale, scale)."""
        scale = self.hparams.lambda_scale
        return scale + scale * z

    # -- training ------------------------------------------------------------------------
    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        seq, target = batch["seq"], batch["target"]
        mask = seq > 0
        seq_emb = self.items(seq)  # (B, L, d)
        x_start = self.items.item(target)  # (B, d)
        t, weights = self.timesteps.sample(len(target), self.device)
        noise = offset_noise(x_start, self.hparams.offset_noise_strength)
        x_t = self.diffusion.q_sample(x_start, t, noise)
        lam = self.uncertainty(torch.randn_like(seq_emb))  # drawn anew per call
        x_start_pred = self.net(seq_emb, mask, x_t, t, lam)
        scores = self.items.scores(x_start_pred)  # (B, N)
        losses = cross_entropy(scores.float(), target - 1)
        self.timesteps.update(t, losses.detach())  # the loss-aware sampler learns from these
        loss = (losses * weights).mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=len(target))
        return loss

    # -- reverse process -----------------------------------------------------------------
    def reverse(
        self,
        batch: Batch,
        member: int = 0,
        steps: int | None = None,
        sampler: str | None = None,
    ) -> torch.Tensor:
        """Run the reverse process for one ensemble member; return x0 (B, d).

        ``sampler`` (None: ``sampler.name``) runs over ``steps`` evenly spaced steps of the
        trained schedule (respaced, Nichol & Dhariwal); None means ``sampler.steps`` (None: all T).
        All noise comes from per-user streams seeded by (eval_seed, member, user), drawn in a
        fixed order, so a user's result never depends on the batch it is in. The order per user:
        x_T, then for every step its lambda rows and (except the last step, and never for the
        deterministic ``ddim``) its step noise.
        """
        sampler, steps = self.sampling(steps, sampler)
        seq = batch["seq"]
        mask = seq > 0
        noise = self.member_noise(batch, member)
        seq_emb = self.items(seq)  # step-independent: computed once per batch
        extra = {}
        if hasattr(self.net, "history_cache"):
            extra["cache"] = self.net.history_cache(seq_emb)
        dim = seq_emb.shape[-1]
        levels = self.diffusion.num_steps if steps is None else steps  # levels visited
        lambda_rows = noise.step_rows(
            mask.sum(1), seq.shape[1], dim, levels, step_vectors=DRAWS_STEP_NOISE[sampler]
        )

        def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            lam = self.uncertainty(lambda_rows().to(seq_emb.dtype))
            return self.net(seq_emb, mask, x_t, t, lam, **extra)

        def draw(_step: int) -> torch.Tensor:
            return noise.vectors(dim)

        x_T = noise.vectors(dim)
        return sample(sampler, self.diffusion, denoise, x_T, draw, steps=steps)
