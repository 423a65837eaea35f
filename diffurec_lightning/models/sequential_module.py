"""Classic sequential recommenders (SASRec, GRU4Rec) as one LightningModule.

Two objectives (``objective``), both cross-entropy over all items:

- ``per_position`` (the papers'): each training sample is a user's whole training sequence and
  every position predicts its next item (causal encoders, so position j sees items up to j);
  the loss averages over the real positions of the batch. Needs ``data.train_samples=sequences``.
- ``last_position``: the representation at the most recent position, on the all-prefix
  samples the DataModule yields for every model (``data.train_samples=prefixes``). The same
  (history, next item) pairs, each seen with the history it has at evaluation time, and the same
  data path, sampling and loss as the diffusion models'; kept to compare the two.

Evaluation is the shared path of RecommenderModule either way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from diffurec_lightning.errors import ConfigError
from diffurec_lightning.models.base import (
    Batch,
    Node,
    RecommenderModule,
    require,
)
from diffurec_lightning.models.functional import cross_entropy

# The training samples each objective needs (data.train_samples).
OBJECTIVES = {"last_position": "prefixes", "per_position": "sequences"}


class SequentialRecModule(RecommenderModule):
    """Item table + sequence encoder (``net``: a config node, e.g. SASRec or GRU4Rec) + full
    softmax."""

    def __init__(
        self,
        *,
        num_items: int,
        net: Node,
        name: str = "sasrec",
        objective: str = "last_position",
        hidden_size: int = 64,
        emb_dropout: float = 0.5,
        position_embedding: bool = True,
        item_init: str = "small_normal",
        max_len: int = 50,
        transition_prior: float = 0.0,
        optimizer: Node | None = None,
        scheduler: Node | None = None,
        ks: Sequence[int] = (5, 10, 20),
        monitor: str = "val/ndcg@10",
        predict_k: int = 20,
    ) -> None:
        require(num_items >= 1, f"num_items must be >= 1, got {num_items}")
        require(hidden_size >= 1, f"model.hidden_size must be >= 1, got {hidden_size}")
        require(0 <= emb_dropout < 1, f"model.emb_dropout must lie in [0, 1), got {emb_dropout}")
        require(
            objective in OBJECTIVES,
            f"model.objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}",
        )
        super().__init__(
            optimizer=optimizer, scheduler=scheduler, ks=ks, monitor=monitor, predict_k=predict_k
        )
        self.build_items()
        self.net = self.build_net(net)
        self.build_prior()

    @property
    def train_samples(self) -> str:
        """The ``data.train_samples`` this model's objective trains on."""
        return OBJECTIVES[self.hparams.objective]

    def represent(self, seq: torch.Tensor) -> torch.Tensor:
        """(B, L) left-padded ids -> (B, d) representation of the next item."""
        return self.net(self.items(seq), seq > 0)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        seq, target = batch["seq"], batch["target"]
        if (target.dim() == 2) != (self.hparams.objective == "per_position"):
            raise ConfigError(
                f"model.objective={self.hparams.objective} trains on "
                f"data.train_samples={self.train_samples}; set it so"
            )
        if self.hparams.objective == "last_position":
            scores = self.items.scores(self.represent(seq))  # (B, N)
            loss = cross_entropy(scores.float(), target - 1).mean()
            size = len(target)
        else:
            states = self.net(self.items(seq), seq > 0, all_positions=True)  # (B, L, d)
            real = target > 0  # (B, L): positions with a next item (not padding)
            scores = self.items.scores(states[real])  # (P, N), P real positions
            loss = cross_entropy(scores.float(), target[real] - 1).mean()
            size = int(real.sum())
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        return loss

    def eval_scores(self, batch: Batch) -> torch.Tensor:
        representation = self.represent(batch["seq"])
        # Ranking in float32 whatever the autocast: bf16 scores would create spurious ties.
        with torch.autocast(self.device.type, enabled=False):
            return representation.float() @ self.items.table.weight[1:].float().t()
