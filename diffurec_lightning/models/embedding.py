"""The item table: embeds histories and scores all items against a representation."""

from __future__ import annotations

import torch
from torch import nn

from diffurec_lightning.models.layers import Dropout

# How the item table starts. N(0, 1) is PyTorch's default, kept by the reference code; it makes
# the initial logits huge (cross-entropy ~50) and learning very slow (see method.md), so the
# default here is a small normal.
ITEM_INITS = {
    "small_normal": lambda weight: nn.init.normal_(weight, std=0.02),
    "reference": lambda weight: nn.init.normal_(weight, std=1.0),
}


class ItemEmbedding(nn.Module):
    """Item table E (N+1, d), row 0 = padding; histories are embedded, dropped out, normalised."""

    def __init__(
        self,
        *,
        num_items: int,
        hidden_size: int,
        dropout: float,
        init: str = "small_normal",
        position_embedding: bool = False,
        max_len: int = 50,
        position_init: str = "small_normal",
    ) -> None:
        super().__init__()
        for key, value in (("item_init", init), ("position_init", position_init)):
            if value not in ITEM_INITS:
                raise ValueError(f"unknown {key} '{value}'; choose one of: {', '.join(ITEM_INITS)}")
        self.num_items = num_items
        self.table = nn.Embedding(num_items + 1, hidden_size)
        ITEM_INITS[init](self.table.weight)
        # Positions count back from the most recent item, so left padding does not shift them.
        self.positions = nn.Embedding(max_len, hidden_size) if position_embedding else None
        if self.positions is not None:
            ITEM_INITS[position_init](self.positions.weight)
        self.dropout = Dropout(dropout)
        self.norm = nn.LayerNorm(hidden_size)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        emb = self.table(seq)  # (B, L, d)
        if self.positions is not None:
            length = seq.shape[1]
            recency = torch.arange(length - 1, -1, -1, device=seq.device).clamp_max(
                self.positions.num_embeddings - 1
            )
            emb = emb + self.positions(recency)[None]
        return self.norm(self.dropout(emb))

    def item(self, items: torch.Tensor) -> torch.Tensor:
        """Raw embeddings of target items (x0 of the diffusion), no dropout or normalisation."""
        return self.table(items)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, d) -> (B, N) dot-product scores of items 1..N (the padding row is never scored)."""
        return x @ self.table.weight[1:].t()
