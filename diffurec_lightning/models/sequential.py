"""Classic sequential encoders: history embedding (B, L, d) + mask (B, L) -> representation (B, d).

The representation is scored against the shared item table by the LightningModule, so every
encoder here is trained with cross-entropy over all items. With ``all_positions=True`` they
return the representation after every position instead, (B, L, d), for the per-position
objective (position j predicts the item at j + 1; both encoders are causal, so position j sees
the items up to j only). Shape legend: B batch, L history length, d hidden size; ``mask`` is
True where the history holds a real item (left padding). Each is built from a ``model.net``
config node whose ``_target_`` is the class.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from diffurec_lightning.models.layers import SelfAttentionBlock, key_padding_bias, xavier_init


def causal_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, 1, L, L) bool: position i attends to real positions j <= i, and always to itself.

    The diagonal keeps the rows of left-padded positions (which have no real key before them)
    from being all-masked, which would give NaN outputs; those rows are never read.
    """
    length = mask.shape[1]
    lower = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
    eye = torch.eye(length, dtype=torch.bool, device=mask.device)
    return (lower[None] & mask[:, None, :] | eye[None])[:, None]


class SASRec(nn.Module):
    """SASRec (Kang & McAuley, ICDM 2018): causal self-attention blocks, the last position read.

    Positions are learned by the item embedding (counted back from the most recent item).
    """

    def __init__(
        self,
        *,
        hidden_size: int,
        num_blocks: int = 2,
        num_heads: int = 1,
        dropout: float = 0.5,
        block_output_dropout: bool = False,
    ) -> None:
        super().__init__()
        if num_blocks < 1:
            raise ValueError(f"network.num_blocks must be >= 1, got {num_blocks}")
        self.blocks = nn.ModuleList(
            SelfAttentionBlock(hidden_size, num_heads, dropout, block_output_dropout)
            for _ in range(num_blocks)
        )
        self.out_norm = nn.LayerNorm(hidden_size)
        xavier_init(self)

    def forward(
        self, seq_emb: torch.Tensor, mask: torch.Tensor, all_positions: bool = False
    ) -> torch.Tensor:
        causal = causal_mask(mask)
        h = seq_emb
        if all_positions:
            for block in self.blocks:
                h = block(h, causal)
            return self.out_norm(h)  # (B, L, d)
        for block in self.blocks[:-1]:
            h = block(h, causal)
        # Only the most recent position is read; under the causal mask it sees every real key.
        h = self.blocks[-1](h, key_padding_bias(mask), last_only=True)  # (B, 1, d)
        return self.out_norm(h[:, -1])


class GRU4Rec(nn.Module):
    """GRU4Rec (Hidasi et al., ICLR 2016): a GRU over the real items, last state projected to d.

    Histories are left-padded; they are right-aligned and packed so that padding never enters
    the recurrence (a GRU state would change on padded inputs).
    """

    def __init__(
        self, *, hidden_size: int, state_size: int = 128, num_layers: int = 1, dropout: float = 0.3
    ) -> None:
        super().__init__()
        if num_layers < 1 or state_size < 1:
            raise ValueError("network.num_layers and network.state_size must be >= 1")
        self.gru = nn.GRU(
            hidden_size,
            state_size,
            num_layers=num_layers,
            batch_first=True,
            dropout=dropout if num_layers > 1 else 0.0,
        )
        self.dropout = nn.Dropout(dropout)
        self.project = nn.Linear(state_size, hidden_size)

    def forward(
        self, seq_emb: torch.Tensor, mask: torch.Tensor, all_positions: bool = False
    ) -> torch.Tensor:
        batch, length, dim = seq_emb.shape
        lengths = mask.sum(1).clamp_min(1)  # (B,)
        shift = (length - lengths)[:, None]  # (B, 1) padding columns of each row
        columns = torch.arange(length, device=mask.device)[None]
        # Column j of the right-aligned row is column j + (L - length) of the left-padded one.
        index = (columns + shift) % length
        aligned = seq_emb.gather(1, index[..., None].expand(-1, -1, dim))  # (B, L, d)
        packed = pack_padded_sequence(
            aligned, lengths.cpu(), batch_first=True, enforce_sorted=False
        )
        outputs, state = self.gru(packed)  # state (layers, B, state)
        if not all_positions:
            return self.project(self.dropout(state[-1]))  # (B, d)
        outputs, _ = pad_packed_sequence(outputs, batch_first=True, total_length=length)
        # Back to the left-padded layout; padded columns get some real output, never read.
        back = (columns - shift) % length
        states = outputs.gather(1, back[..., None].expand(-1, -1, outputs.shape[-1]))
        return self.project(self.dropout(states))  # (B, L, d)
