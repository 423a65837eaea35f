"""Classic sequential recommenders (SASRec, GRU4Rec) as one LightningModule.

Objective: cross-entropy over all items of the representation at the most recent position, on
the all-prefix samples the DataModule yields for every model. For SASRec this is the same set
of (history, next item) pairs as its per-position causal objective, but every pair is seen with
the history it has at evaluation time (most recent item last, recency positions), and the data
path, sampling and loss are identical to the diffusion models', so a comparison measures the
networks alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from diffurec_lightning.errors import ConfigError
from diffurec_lightning.models.base import Batch, RecommenderModule, require
from diffurec_lightning.models.embedding import ItemEmbedding
from diffurec_lightning.models.sequential import make_network


class SequentialRecModule(RecommenderModule):
    """Item table + sequence encoder (``network.name``: sasrec | gru4rec) + full softmax."""

    def __init__(
        self,
        *,
        num_items: int,
        network: Mapping[str, Any],
        name: str = "sasrec",
        hidden_size: int = 64,
        emb_dropout: float = 0.5,
        position_embedding: bool = True,
        item_init: str = "small_normal",
        max_len: int = 50,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        lr_step_size: int = 100,
        lr_gamma: float = 1.0,
        ks: Sequence[int] = (5, 10, 20),
        monitor: str = "val/ndcg@10",
        predict_k: int = 20,
    ) -> None:
        require(num_items >= 1, f"num_items must be >= 1, got {num_items}")
        require(hidden_size >= 1, f"model.hidden_size must be >= 1, got {hidden_size}")
        require(0 <= emb_dropout < 1, f"model.emb_dropout must lie in [0, 1), got {emb_dropout}")
        network = dict(network)
        require("name" in network, "model.network needs a name: sasrec | gru4rec")
        super().__init__(
            lr=lr,
            weight_decay=weight_decay,
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

    def represent(self, seq: torch.Tensor) -> torch.Tensor:
        """(B, L) left-padded ids -> (B, d) representation of the next item."""
        return self.network(self.items(seq), seq > 0)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        scores = self.items.scores(self.represent(batch["seq"]))  # (B, N)
        loss = F.cross_entropy(scores.float(), batch["target"] - 1)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["target"]))
        return loss

    def eval_scores(self, batch: Batch) -> torch.Tensor:
        representation = self.represent(batch["seq"])
        # Ranking in float32 whatever the autocast: bf16 scores would create spurious ties.
        with torch.autocast(self.device.type, enabled=False):
            return representation.float() @ self.items.table.weight[1:].float().t()
