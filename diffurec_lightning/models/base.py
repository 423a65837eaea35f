"""What every recommender module shares: optimiser, exact full-ranking evaluation, prediction.

A subclass provides ``training_step`` and ``eval_scores(batch) -> (B, N)`` scores of items 1..N;
validation, test (with per-user ranks kept for case studies) and predict_step are the same for
all models, so every model is measured by one code path. Diffusion models derive from
``DiffusionRecommender`` instead and provide only ``reverse`` (their reverse process).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import CatMetric

from diffurec_lightning.checkpoints import plain
from diffurec_lightning.errors import ConfigError
from diffurec_lightning.metrics import TopKMetrics, target_ranks, top_k_items

Batch = dict[str, torch.Tensor]

# adam: weight decay as an L2 term in the gradient (scaled by Adam's normalisation);
# adamw: decoupled weight decay (Loshchilov & Hutter), w <- w (1 - lr wd) besides the Adam step.
OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def require(condition: bool, message: str) -> None:
    """Raise a one-line ConfigError unless ``condition`` holds."""
    if not condition:
        raise ConfigError(message)


class RecommenderModule(L.LightningModule):
    """Base class: hyperparameters common to all models and the shared evaluation path."""

    def __init__(
        self,
        *,
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
        super().__init__()
        require(lr > 0 and weight_decay >= 0, "model.lr must be > 0 and model.weight_decay >= 0")
        require(
            optimizer in OPTIMIZERS,
            f"model.optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}",
        )
        betas = tuple(float(beta) for beta in betas)
        require(
            len(betas) == 2 and all(0 <= beta < 1 for beta in betas),
            f"model.betas must be two numbers in [0, 1), got {list(betas)}",
        )
        self.optimizer_name = optimizer
        self.betas = betas
        require(lr_step_size >= 1, f"model.lr_step_size must be >= 1, got {lr_step_size}")
        require(0 < lr_gamma <= 1, f"model.lr_gamma must lie in (0, 1], got {lr_gamma}")
        require(predict_k >= 1, f"model.predict_k must be >= 1, got {predict_k}")
        self.val_metrics = TopKMetrics(ks=ks, prefix="val/")
        self.test_metrics = TopKMetrics(ks=ks, prefix="test/")
        names = [f"val/{m}@{k}" for m in ("hr", "ndcg") for k in self.val_metrics.ks]
        require(
            monitor in names,
            f"monitor={monitor!r} is not a validation metric; use one of {', '.join(names)}",
        )
        # Per-user test results, gathered across ranks, for case studies and significance tests.
        self.test_users = CatMetric()
        self.test_ranks = CatMetric()
        self.best: dict[str, float] = {}
        # The latest validation (metrics, epoch, step): saved with every checkpoint, so after a
        # checkpoint is loaded it holds the validation of exactly those weights.
        self.validation: dict[str, float] = {}

    # -- to provide ----------------------------------------------------------------------
    def eval_scores(self, batch: Batch) -> torch.Tensor:
        """(B, N) float32 scores of items 1..N for each user of the batch."""
        raise NotImplementedError

    # -- optimisation --------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        params = list(self.parameters())
        # The fused kernel updates every tensor in one pass (5x faster on CPU than the per-tensor
        # loop that Adam otherwise picks there); same update up to float rounding.
        fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
        optimizer = OPTIMIZERS[self.optimizer_name](
            params, lr=hp.lr, betas=self.betas, weight_decay=hp.weight_decay, fused=fused
        )
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, hp.lr_step_size, gamma=hp.lr_gamma)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"},
        }

    # -- evaluation ----------------------------------------------------------------------
    def rank_batch(self, batch: Batch, **scoring: Any) -> torch.Tensor:
        """1-based rank of each user's target among all items (padding never ranked)."""
        scores = self.eval_scores(batch, **scoring)
        return target_ranks(F.pad(scores, (1, 0), value=float("-inf")), batch["target"])

    def validation_sampling(self) -> dict[str, Any]:
        """Keyword arguments of ``eval_scores`` at validation (a cheaper variant; {} = as test)."""
        return {}

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self.val_metrics.update(self.rank_batch(batch, **self.validation_sampling()))

    def on_validation_epoch_end(self) -> None:
        # compute() reduces sum/count states across ranks once: exact under DDP.
        values = {key: float(value) for key, value in self.val_metrics.compute().items()}
        self.val_metrics.reset()
        if not self.trainer.sanity_checking:
            self.validation = {**values, "epoch": self.current_epoch, "step": self.global_step}
        for key, value in values.items():
            self.best[key] = max(self.best.get(key, float("-inf")), value)
            self.log(key, value, prog_bar=key == self.hparams.monitor)
        self.log_dict({f"{key}_best": value for key, value in self.best.items()})

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        ranks = self.rank_batch(batch)
        self.test_metrics.update(ranks)
        self.test_users.update(batch["user"].float())
        self.test_ranks.update(ranks.float())

    def on_test_epoch_end(self) -> None:
        values = {key: float(value) for key, value in self.test_metrics.compute().items()}
        self.test_metrics.reset()
        self.log_dict(values)

    def per_user_test_ranks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(users, ranks) of the last test run, all ranks gathered, sorted by user; then reset."""
        users = self.test_users.compute().long().reshape(-1)
        ranks = self.test_ranks.compute().long().reshape(-1)
        self.test_users.reset()
        self.test_ranks.reset()
        order = torch.argsort(users)
        return users[order], ranks[order]

    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, torch.Tensor]:
        scores = F.pad(self.eval_scores(batch), (1, 0), value=float("-inf"))
        if "exclude" in batch:  # (B, H) items not to recommend (predict.exclude_history), 0 = pad
            scores = scores.scatter(1, batch["exclude"], float("-inf"))
        values, items = top_k_items(scores, self.hparams.predict_k)
        return {"user": batch["user"], "items": items, "scores": values}

    # -- checkpoint state ----------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["best_metrics"] = dict(self.best)
        # Plain data only (no OmegaConf lists in hparams): loadable with weights_only=True.
        checkpoint.update(plain(checkpoint))
        checkpoint["validation"] = dict(self.validation)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.best = dict(checkpoint.get("best_metrics", {}))
        self.validation = dict(checkpoint.get("validation", {}))


class DiffusionRecommender(RecommenderModule):
    """A recommender whose reverse process reconstructs a target embedding x0 (B, d) that is
    rounded to items through the shared item table (``self.items``).

    Subclasses provide ``reverse(batch, member, steps, sampler)``: one ensemble member's x0 from
    per-user reproducible noise, running sampler ``sampler`` over ``steps`` evenly spaced levels
    of the trained T (None: the configured sampling). ``hparams.ensemble_size`` members are averaged as softmax
    distributions (DiffuRecSys Algorithm 3).
    """

    def reverse(
        self, batch: Batch, member: int = 0, steps: int | None = None, sampler: str | None = None
    ) -> torch.Tensor:
        raise NotImplementedError

    def eval_scores(
        self, batch: Batch, steps: int | None = None, sampler: str | None = None
    ) -> torch.Tensor:
        """(B, N) ranking scores; with an ensemble, the averaged softmax distributions."""
        members = self.hparams.ensemble_size
        # Ranking in float32 whatever the autocast: bf16 scores would create spurious ties.
        with torch.autocast(self.device.type, enabled=False):
            table = self.items.table.weight[1:].float()

            def scores(member: int) -> torch.Tensor:
                return self.reverse(batch, member, steps, sampler).float() @ table.t()

            if members == 1:
                return scores(0)
            return sum(torch.softmax(scores(m), dim=-1) for m in range(members)) / members
