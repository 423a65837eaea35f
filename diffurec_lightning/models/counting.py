"""Count-based baselines: item popularity and first/second-order Markov chains.

Nothing here takes a gradient step. The counts are fitted in one pass over the training prefixes
(the same (history, next item) samples the neural models train on) when fitting starts, and are
kept as buffers, so a checkpoint carries them and ``make eval CKPT=...`` works. Scores go through
the shared RecommenderModule ranking and metrics, pessimistic tie rule included.

Protocol: counts come from training sequences only. The validation input is the training
sequence; the test input also ends with the validation item (method.md), which is then the
"last item" the test scores condition on, but the validation transitions themselves are never
counted, for validation or for test.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from diffurec_lightning.data.datasets import PrefixDataset
from diffurec_lightning.errors import ConfigError
from diffurec_lightning.models.base import Batch, RecommenderModule, require
from diffurec_lightning.models.transitions import (
    csr_rows,
    recent_transitions,
    resize_buffers,
    transition_counts,
    transitions,
)

__all__ = ["MarkovRecommender", "PopularityRecommender", "csr_rows", "transitions"]


class PopularityRecommender(RecommenderModule):
    """Every user gets the same ranking: how often each item is a training target."""

    # No epochs to speak of: one validation right after the counts are fitted (train.build
    # applies these to the trainer and records them in the run's config).
    trainer_overrides: ClassVar[dict[str, Any]] = {
        "max_epochs": 1,
        "check_val_every_n_epoch": 1,
        "limit_train_batches": 1,
        "log_every_n_steps": 1,
    }
    _count_buffers: ClassVar[tuple[str, ...]] = ("popularity",)

    def __init__(
        self,
        *,
        num_items: int,
        name: str = "pop",
        ks: Sequence[int] = (5, 10, 20),
        monitor: str = "val/ndcg@10",
        predict_k: int = 20,
    ) -> None:
        require(num_items >= 1, f"num_items must be >= 1, got {num_items}")
        super().__init__(ks=ks, monitor=monitor, predict_k=predict_k)
        # Sized by fit_counts (or by the checkpoint being loaded); empty = not fitted.
        self.register_buffer("popularity", torch.zeros(0))

    # -- fitting -------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage == "fit":
            datamodule = getattr(self.trainer, "datamodule", None)
            if datamodule is None or not hasattr(datamodule, "dataset"):
                raise ConfigError(
                    f"model={self.hparams.name} fits its counts from a SequenceDataModule"
                )
            self.fit_counts(datamodule.dataset("train"))

    def fit_counts(self, dataset: PrefixDataset) -> None:
        targets = np.asarray(dataset.items)[dataset.ends]
        counts = np.bincount(targets, minlength=self.hparams.num_items + 1).astype(np.float32)
        counts[0] = 0.0  # padding is never a target
        self.popularity = torch.from_numpy(counts).to(self.device)

    def fitted(self) -> bool:
        return self.popularity.numel() == self.hparams.num_items + 1

    # -- Lightning plumbing: nothing to optimise -------------------------------------------
    def configure_optimizers(self) -> None:
        return None

    def training_step(self, batch: Batch, batch_idx: int) -> None:
        return None  # the counts were fitted in setup("fit")

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        resize_buffers(self, self._count_buffers, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args)

    # -- scoring -------------------------------------------------------------------------
    def _require_fitted(self) -> None:
        if not self.fitted():
            raise ConfigError(
                f"model={self.hparams.name} has no counts: fit it (train=true) or load a checkpoint"
            )

    def eval_scores(self, batch: Batch) -> torch.Tensor:
        self._require_fitted()
        return self.popularity[1:].unsqueeze(0).expand(len(batch["seq"]), -1)


class MarkovRecommender(PopularityRecommender):
    """score(j) = last_weight * C[last, j] + second_last_weight * C[second-to-last, j]
    + backoff * popularity(j) / max popularity.

    C counts the training transitions a -> b of consecutive items; order 2 adds the items that
    followed the second-to-last item too (a mixture of two first-order predictions, which is the
    floor method.md quotes; a separate skip-one count matrix for the second-to-last item scored
    lower on Toys: validation HR@10 0.091 against 0.095). ``normalize`` turns each row into a
    conditional distribution first. The backoff is tiny: it only orders the items the
    transitions leave tied (most of them). Scores are float64 so that the backoff survives next
    to counts in the thousands.
    """

    _count_buffers = ("popularity", "crow", "col", "val")

    def __init__(
        self,
        *,
        num_items: int,
        name: str = "markov",
        order: int = 2,
        last_weight: float = 1.0,
        second_last_weight: float = 0.5,
        backoff: float = 1e-6,
        normalize: bool = False,
        ks: Sequence[int] = (5, 10, 20),
        monitor: str = "val/ndcg@10",
        predict_k: int = 20,
    ) -> None:
        require(order in (1, 2), f"model.order must be 1 or 2, got {order}")
        require(
            last_weight > 0 and second_last_weight >= 0,
            "model.last_weight must be > 0 and model.second_last_weight >= 0",
        )
        require(0 <= backoff < 1e-3, f"model.backoff must lie in [0, 1e-3), got {backoff}")
        super().__init__(
            num_items=num_items, name=name, ks=ks, monitor=monitor, predict_k=predict_k
        )
        # The transition counts C as a CSR matrix (N+1, N+1): row a = items that followed a.
        self.register_buffer("crow", torch.zeros(0, dtype=torch.long))
        self.register_buffer("col", torch.zeros(0, dtype=torch.long))
        self.register_buffer("val", torch.zeros(0))

    def fit_counts(self, dataset: PrefixDataset) -> None:
        super().fit_counts(dataset)
        counts = transition_counts(dataset, self.hparams.num_items + 1, self.hparams.normalize)
        self.crow, self.col, self.val = (part.to(self.device) for part in counts)

    def eval_scores(self, batch: Batch) -> torch.Tensor:
        self._require_fitted()
        seq, hp = batch["seq"], self.hparams
        popularity = self.popularity.double()
        scores = hp.backoff * (popularity / popularity.max().clamp(min=1.0)).expand(len(seq), -1)
        weights = (hp.last_weight, hp.second_last_weight)[: hp.order]
        counts = (self.crow, self.col, self.val)
        scores = scores + recent_transitions(counts, seq, weights, hp.num_items + 1)
        return scores[:, 1:]
