"""The LightningModule that joins item table, approximator and diffusion process.

Training (Algorithm 1): noise the target embedding to a random step, reconstruct it from the
history, score all items, cross-entropy. Validation, test and prediction (Algorithm 2/3): run the
reverse process from pure noise with per-user reproducible noise, then rank all items.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from diffurec_lightning.diffusion.gaussian import GaussianDiffusion
from diffurec_lightning.diffusion.noise import UserNoise, offset_noise
from diffurec_lightning.diffusion.samplers import (
    DRAWS_STEP_NOISE,
    check_sampler,
    sample,
    sampling_process,
)
from diffurec_lightning.diffusion.timesteps import make_timestep_sampler
from diffurec_lightning.errors import ConfigError
from diffurec_lightning.models.approximators import make_approximator
from diffurec_lightning.models.base import Batch, DiffusionRecommender, require
from diffurec_lightning.models.embedding import ItemEmbedding
from diffurec_lightning.models.functional import cross_entropy

# Distinct ensemble members must draw distinct noise streams for the same user.
_ENSEMBLE_SEED_STRIDE = 1_000_003
# Evaluation noise drawn ahead per batch: at most this many float32 values (64 MB) at a time.
_PREFETCH_VALUES = 1 << 24


def _check_samplers(
    eval_sampler: str,
    eval_steps: int | None,
    val_sampler: str | None,
    val_steps: int | None,
    num_steps: int,
) -> None:
    """One-line ConfigErrors for an unknown sampler or a step count outside 1..T."""
    for key, sampler, steps in (
        ("eval", eval_sampler, eval_steps),
        ("val", val_sampler or eval_sampler, val_steps),
    ):
        try:
            check_sampler(sampler, steps, num_steps)
        except ValueError as exc:
            raise ConfigError(f"model.{key}_sampler / model.{key}_steps: {exc}") from None


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
        eval_sampler: str = "ancestral",
        val_steps: int | None = None,
        val_sampler: str | None = None,
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
        # A helper, not a loop here: save_hyperparameters reads this frame's local names.
        _check_samplers(eval_sampler, eval_steps, val_sampler, val_steps, num_steps)
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
    def validation_sampling(self) -> dict[str, object]:
        """Training's validations may run a cheaper reverse process (``val_steps``,
        ``val_sampler``); test and predict always run the configured one."""
        hp = self.hparams
        return {"steps": hp.get("val_steps"), "sampler": hp.get("val_sampler")}

    def reverse(
        self,
        batch: Batch,
        member: int = 0,
        steps: int | None = None,
        sampler: str | None = None,
    ) -> torch.Tensor:
        """Run the reverse process for one ensemble member; return x0 (B, d).

        ``sampler`` (None: ``eval_sampler``) runs over ``steps`` evenly spaced steps of the
        trained schedule (respaced, Nichol & Dhariwal); None means ``eval_steps`` (None: all T).
        All noise comes from per-user streams seeded by (eval_seed, member, user), drawn in a
        fixed order, so a user's result never depends on the batch it is in. The order per user:
        x_T, then for every step its lambda rows and (except the last step, and never for the
        deterministic ``ddim``) its step noise.
        """
        hp = self.hparams
        steps = hp.get("eval_steps") if steps is None else steps
        sampler = sampler or hp.get("eval_sampler", "ancestral")
        process = sampling_process(self.diffusion, steps)
        seq = batch["seq"]
        mask = seq > 0
        seed = hp.eval_seed + _ENSEMBLE_SEED_STRIDE * member
        noise = UserNoise(seed, batch["user"], self.device)
        seq_emb = self.items(seq)  # step-independent: computed once per batch
        extra = {}
        if hasattr(self.approximator, "history_cache"):
            extra["cache"] = self.approximator.history_cache(seq_emb)
        lengths = mask.sum(1)
        width, dim = seq.shape[1], seq_emb.shape[-1]
        delta = hp.delta
        num_steps = process.num_steps
        step_noise = DRAWS_STEP_NOISE[sampler]
        # Draw the noise of several steps per generator call, within a memory budget.
        chunk = max(1, _PREFETCH_VALUES // max(1, len(seq) * (width + 1) * dim))
        calls = 0

        def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            nonlocal calls
            if calls % chunk == 0:
                ahead = min(chunk, num_steps - calls)
                vectors = ahead - (calls + ahead == num_steps) if step_noise else 0
                noise.prefetch(lengths * ahead + vectors, dim)
            calls += 1
            lam = delta + delta * noise.rows(lengths, width, dim).to(seq_emb.dtype)
            return self.approximator(seq_emb, mask, x_t, t, lam, **extra)

        x_T = noise.vectors(dim)
        return sample(sampler, process, denoise, x_T, lambda _step: noise.vectors(dim))
