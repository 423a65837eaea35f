"""The LightningModule that joins item table, approximator and diffusion process.

Training (Algorithm 1): noise the target embedding to a random step, reconstruct it from the
history, score all items, cross-entropy. Validation, test and prediction (Algorithm 2/3): run the
reverse process from pure noise with per-user reproducible noise, then rank all items.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from diffurec_lightning.diffusion.gaussian import GaussianDiffusion
from diffurec_lightning.diffusion.noise import UserNoise, offset_noise
from diffurec_lightning.diffusion.timesteps import LossAwareSampler, make_timestep_sampler
from diffurec_lightning.errors import ConfigError
from diffurec_lightning.metrics import TopKMetrics, target_ranks, top_k_items
from diffurec_lightning.models.approximators import make_approximator
from diffurec_lightning.models.embedding import ItemEmbedding

Batch = dict[str, torch.Tensor]
# Distinct ensemble members must draw distinct noise streams for the same user.
_ENSEMBLE_SEED_STRIDE = 1_000_003


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


class DiffusionRecModule(L.LightningModule):
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
        eval_seed: int = 0,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        lr_step_size: int = 100,
        lr_gamma: float = 0.1,
        ks: Sequence[int] = (5, 10, 20),
        monitor: str = "val/ndcg@10",
        predict_k: int = 20,
    ) -> None:
        super().__init__()
        _require(num_items >= 1, f"num_items must be >= 1, got {num_items}")
        _require(num_steps >= 1, f"model.num_steps (T) must be >= 1, got {num_steps}")
        _require(delta >= 0, f"model.delta must be >= 0, got {delta}")
        _require(0 <= dropout < 1 and 0 <= emb_dropout < 1, "model dropouts must lie in [0, 1)")
        _require(hidden_size >= 2 and num_blocks >= 1, "model.hidden_size >= 2 and num_blocks >= 1")
        _require(hidden_size % num_heads == 0, "model.hidden_size must be divisible by num_heads")
        _require(ensemble_size >= 1, f"model.ensemble_size must be >= 1, got {ensemble_size}")
        _require(lr > 0 and weight_decay >= 0, "model.lr must be > 0 and weight_decay >= 0")
        _require(lr_step_size >= 1 and 0 < lr_gamma <= 1, "lr_step_size >= 1, 0 < lr_gamma <= 1")
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
            )
            self.diffusion = GaussianDiffusion(
                num_steps=num_steps, schedule=schedule, variance=variance
            )
            self.timesteps = make_timestep_sampler(timestep_sampler, num_steps=num_steps)
        except ValueError as exc:
            raise ConfigError(f"model: {exc}") from None
        self.val_metrics = TopKMetrics(ks=ks, prefix="val/")
        self.test_metrics = TopKMetrics(ks=ks, prefix="test/")
        self.best: dict[str, float] = {}

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
        losses = F.cross_entropy(scores.float(), target - 1, reduction="none")
        if isinstance(self.timesteps, LossAwareSampler):
            self.timesteps.update(t, losses.detach())
        loss = (losses * weights).mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=len(target))
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = torch.optim.Adam(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, hp.lr_step_size, gamma=hp.lr_gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    # -- reverse process -----------------------------------------------------------------
    def reverse(self, batch: Batch, member: int = 0, diffusion: GaussianDiffusion | None = None):
        """Run the reverse process for one ensemble member; return x0 (B, d).

        All noise comes from per-user streams seeded by (eval_seed, member, user), drawn in a
        fixed order, so a user's result never depends on the batch it is in.
        """
        diffusion = diffusion or self.diffusion
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

        def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            lam = delta + delta * noise.rows(lengths, width, dim).to(seq_emb.dtype)
            return self.approximator(seq_emb, mask, x_t, t, lam, **extra)

        x_T = noise.vectors(dim)
        x_0, _ = diffusion.p_sample_loop(denoise, x_T, lambda _step: noise.vectors(dim))
        return x_0

    def eval_scores(self, batch: Batch, diffusion: GaussianDiffusion | None = None) -> torch.Tensor:
        """(B, N) ranking scores; with an ensemble, the averaged softmax distributions."""
        members = self.hparams.ensemble_size
        # Ranking in float32 whatever the autocast: bf16 scores would create spurious ties.
        with torch.autocast(self.device.type, enabled=False):
            table = self.items.table.weight[1:].float()
            if members == 1:
                return self.reverse(batch, 0, diffusion).float() @ table.t()
            probs = sum(
                torch.softmax(self.reverse(batch, m, diffusion).float() @ table.t(), dim=-1)
                for m in range(members)
            )
            return probs / members

    # -- evaluation ----------------------------------------------------------------------
    def _rank_batch(self, batch: Batch) -> torch.Tensor:
        scores = self.eval_scores(batch)
        return target_ranks(F.pad(scores, (1, 0), value=float("-inf")), batch["target"])

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self.val_metrics.update(self._rank_batch(batch))

    def on_validation_epoch_end(self) -> None:
        values = {key: float(value) for key, value in self.val_metrics.compute().items()}
        self.val_metrics.reset()
        for key, value in values.items():
            self.best[key] = max(self.best.get(key, float("-inf")), value)
        # The values are already reduced across ranks (sum states), so no further sync.
        for key, value in values.items():
            self.log(key, value, prog_bar=key == self.hparams.monitor)
        self.log_dict({f"{key}_best": value for key, value in self.best.items()})

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self.test_metrics.update(self._rank_batch(batch))

    def on_test_epoch_end(self) -> None:
        values = {key: float(value) for key, value in self.test_metrics.compute().items()}
        self.test_metrics.reset()
        self.log_dict(values)

    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, torch.Tensor]:
        values, items = top_k_items(
            F.pad(self.eval_scores(batch), (1, 0), value=float("-inf")), self.hparams.predict_k
        )
        return {"user": batch["user"], "items": items, "scores": values}

    # -- checkpoint state ----------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["best_metrics"] = dict(self.best)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.best = dict(checkpoint.get("best_metrics", {}))
