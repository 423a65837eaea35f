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

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from diffurec_lightning.errors import ConfigError
from diffurec_lightning.models.base import Batch, RecommenderModule, require
from diffurec_lightning.models.embedding import ItemEmbedding
from diffurec_lightning.models.functional import cross_entropy
from diffurec_lightning.models.sequential import make_network

# The training samples each objective needs (data.train_samples).
OBJECTIVES = {"last_position": "prefixes", "per_position": "sequences"}


class SequentialRecModule(RecommenderModule):
    """Item table + sequence encoder (``network.name``: sasrec | gru4rec) + full softmax."""

    def __init__(
        self,
        *,
        num_items: int,
        network: Mapping[str, Any],
        name: str = "sasrec",
        objective: str = "last_position",
        hidden_size: int = 64,
        emb_dropout: float = 0.5,
        position_embedding: bool = True,
        item_init: str = "small_normal",
        max_len: int = 50,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        optimizer: str = "adam",
        betas: Sequence[float] = (0.9, 0.999),
        lr_step_size: int = 100,
        lr_gamma: float = 1.0,
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
        network = dict(network)
        require("name" in network, "model.network needs a name: sasrec | gru4rec")
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
        self.save_hyperparameters(ignore=["network"])
        self.hparams["network"] = network
        try:
            self.items = ItemEmbedding(
                num_items=num_items,
                hidden_size=hidden_size,
                dropout=emb_dropout,
                init=item_init,
                position_embedding=position_embedding,
                max_len=max_len,
            )
            options = {key: value for key, value in network.items() if key != "name"}
            self.network = make_network(network["name"], hidden_size=hidden_size, **options)
        except ValueError as exc:
            raise ConfigError(f"model: {exc}") from None

    @property
    def train_samples(self) -> str:
        """The ``data.train_samples`` this model's objective trains on."""
        return OBJECTIVES[self.hparams.objective]

    def represent(self, seq: torch.Tensor) -> torch.Tensor:
        """(B, L) left-padded ids -> (B, d) representation of the next item."""
        return self.network(self.items(seq), seq > 0)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        seq, target = batch["seq"], batch["target"]
        if (target.dim() == 2) != (self.hparams.objective == "per_position"):
            raise ConfigError(
                f"model.objective={self.hparams.objective} trains on "
                f"data.train_samples={self.train_samples}; set it so"
            )
        if self.hparams.objective == "last_position":
            scores = self.items.scores(self.represent(seq))  # (B, N)
            loss = F.cross_entropy(scores.float(), target - 1)
            size = len(target)
        else:
            states = self.network(self.items(seq), seq > 0, all_positions=True)  # (B, L, d)
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
