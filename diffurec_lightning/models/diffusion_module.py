"""The LightningModule that joins item table, approximator and diffusion process.

Training (Algorithm 1): noise the target embedding to a random step, reconstruct it from the
history, score all items, cross-entropy. Validation, test and prediction (Algorithm 2/3): run the
reverse process from pure noise with per-user reproducible noise, then rank all items.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from diffurec_lightning.diffusion.gaussian import GaussianDiffusion, evenly_spaced_steps
from diffurec_lightning.diffusion.noise import UserNoise, offset_noise
from diffurec_lightning.diffusion.timesteps import make_timestep_sampler
from diffurec_lightning.errors import ConfigError
from diffurec_lightning.models.approximators import make_approximator
from diffurec_lightning.models.base import Batch, DiffusionRecommender, require
from diffurec_lightning.models.embedding import ItemEmbedding, cross_entropy

# Distinct ensemble members must draw distinct noise streams for the same user.
_ENSEMBLE_SEED_STRIDE = 1_000_003
# Evaluation noise drawn ahead per batch: at most this many float32 values (64 MB) at a time.
_PREFETCH_VALUES = 1 << 24


class DiffusionRecModule(DiffusionRecommender):
    """DiffuRec / DiffuRecSys: which one is set by ``approximator`` and ``offset``."""

    def __init__(
        self,
        *,
        num_items: int,
        name: str = "diffurec",
        approximator: str = "diffurec",
        hidden_size: int = 128,
        num_blocks: int = 4,
        num_heads: int = 4,
        dropout: float = 0.1,
        block_output_dropout: bool = False,
        emb_dropout: float = 0.3,
        position_embedding: bool = False,
        item_init: str = "small_normal",
        max_len: int = 50,
        num_steps: int = 32,
        schedule: str = "trunc_lin",
        variance: str = "fixed_large",
        timestep_sampler: str = "uniform",
        delta: float = 0.001,
        offset: float = 0.0,
        ensemble_size: int = 1,
        eval_steps: int | None = None,
        eval_seed: int = 0,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        optimizer: str = "adam",
        betas: Sequence[float] = (0.9, 0.999),
        lr_step_size: int = 100,
        lr_gamma: float = 0.1,
        ks: Sequence[int] = (5, 10, 20),
        monitor: str = "val/ndcg@10",
        predict_k: int = 20,
    ) -> None:
        require(num_items >= 1, f"num_items must be >= 1, got {num_items}")
        require(num_steps >= 1, f"model.num_steps (T) must be >= 1, got {num_steps}")
        require(delta >= 0, f"model.delta must be >= 0, got {delta}")
        require(0 <= dropout < 1 and 0 <= emb_dropout < 1, "model dropouts must lie in [0, 1)")
        require(hidden_size >= 2 and num_blocks >= 1, "model.hidden_size >= 2 and num_blocks >= 1")
        require(hidden_size % num_heads == 0, "model.hidden_size must be divisible by num_heads")
        require(ensemble_size >= 1, f"model.ensemble_size must be >= 1, got {ensemble_size}")
        require(
            eval_steps is None or 1 <= eval_steps <= num_steps,
            f"model.eval_steps must lie in 1..num_steps ({num_steps}) or be null, got {eval_steps}",
        )
        super().__init__(
            lr=lr,
            weight_decay=weight_decay,
            optimizer=optimizer,
            betas=betas,
            lr_step_size=lr_step_size,
            lr_gamma=lr_gamma,
            ks=ks,
            monitor=monitor,
            predict_k=predict_k,
        )
        self.save_hyperparameters()
        try:
            self.items = ItemEmbedding(
                num_items=num_items,
                hidden_size=hidden_size,
                dropout=emb_dropout,
                init=item_init,
                position_embedding=position_embedding,
                max_len=max_len,
            )
            self.approximator = make_approximator(
                approximator,
                hidden_size=hidden_size,
                num_blocks=num_blocks,
                num_heads=num_heads,
                dropout=dropout,
                num_steps=num_steps,
                block_output_dropout=block_output_dropout,
            )
            self.diffusion = GaussianDiffusion(
                num_steps=num_steps, schedule=schedule, variance=variance
            )
            self.timesteps = make_timestep_sampler(timestep_sampler, num_steps=num_steps)
        except ValueError as exc:
            raise ConfigError(f"model: {exc}") from None

    # -- training ------------------------------------------------------------------------
    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        seq, target = batch["seq"], batch["target"]
        mask = seq > 0
        seq_emb = self.items(seq)  # (B, L, d)
        x_start = self.items.item(target)  # (B, d)
        t, weights = self.timesteps.sample(len(target), self.device)
        x_t = self.diffusion.q_sample(x_start, t, offset_noise(x_start, self.hparams.offset))
        delta = self.hparams.delta
        lam = delta + delta * torch.randn_like(seq_emb)  # lambda ~ N(delta, delta), per call
        x_start_pred = self.approximator(seq_emb, mask, x_t, t, lam)
        scores = self.items.scores(x_start_pred)  # (B, N)
        losses = cross_entropy(scores.float(), target - 1)
        self.timesteps.update(t, losses.detach())  # the loss-aware sampler learns from these
        loss = (losses * weights).mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=len(target))
        return loss

    # -- reverse process -----------------------------------------------------------------
    def reverse(self, batch: Batch, member: int = 0, steps: int | None = None) -> torch.Tensor:
        """Run the reverse process for one ensemble member; return x0 (B, d).

        ``steps`` < T runs a respaced process over that many evenly spaced steps of the trained
        schedule (Nichol & Dhariwal); None means ``eval_steps`` (None: all T). All noise comes from per-user streams seeded by (eval_seed, member, user), drawn in a
        fixed order, so a user's result never depends on the batch it is in. The order per user:
        x_T, then for every step its lambda rows and (except the last step) its step noise.
        """
        diffusion = self.diffusion
        steps = self.hparams.get("eval_steps") if steps is None else steps
        if steps is not None and steps != diffusion.num_steps:
            diffusion = diffusion.respaced(evenly_spaced_steps(diffusion.num_steps, steps))
        seq = batch["seq"]
        mask = seq > 0
        seed = self.hparams.eval_seed + _ENSEMBLE_SEED_STRIDE * member
        noise = UserNoise(seed, batch["user"], self.device)
        seq_emb = self.items(seq)  # step-independent: computed once per batch
        extra = {}
        if hasattr(self.approximator, "history_cache"):
            extra["cache"] = self.approximator.history_cache(seq_emb)
        lengths = mask.sum(1)
        width, dim = seq.shape[1], seq_emb.shape[-1]
        delta = self.hparams.delta
        num_steps = diffusion.num_steps
        # Draw the noise of several steps per generator call, within a memory budget.
        chunk = max(1, _PREFETCH_VALUES // max(1, len(seq) * (width + 1) * dim))
        calls = 0

        def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            nonlocal calls
            if calls % chunk == 0:
                steps = min(chunk, num_steps - calls)
                step_noise = steps - (calls + steps == num_steps)  # the last step draws none
                noise.prefetch(lengths * steps + step_noise, dim)
            calls += 1
            lam = delta + delta * noise.rows(lengths, width, dim).to(seq_emb.dtype)
            return self.approximator(seq_emb, mask, x_t, t, lam, **extra)

        x_T = noise.vectors(dim)
        x_0, _ = diffusion.p_sample_loop(denoise, x_T, lambda _step: noise.vectors(dim))
        return x_0
