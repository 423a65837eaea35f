"""DCRec's denoiser: the Dual Conditional Diffusion Transformer (dcrec.md, "Denoiser").

It reconstructs the whole clean sequence S0 from its noised version S_t. The step and the clean
history H0 enter every block twice: through conditional LayerNorm (c = step embedding + H0 per
position) before self-attention, and through cross-attention to H0 (the explicit condition).

Shape legend: B batch, L sequence length (S and H0 are aligned), d hidden size.
``seq_mask`` (B, L) is True where S holds a real item, ``history_mask`` where H0 does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from diffurec_lightning.models.layers import (
    MultiHeadAttention,
    StepEmbedding,
    check_sizes,
    key_padding_bias,
    xavier_init,
)

KeyValues = tuple[torch.Tensor, torch.Tensor]


def _padded_keys(query_mask: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """Padded keys are never attended to: (B, 1, 1, Lk) bool."""
    return key_padding_bias(key_mask)


def _padded_queries(query_mask: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """The authors' code: padded query rows get uniform attention, real rows see every key,
    padding included. (B, 1, Lq, Lk) float bias."""
    rows = torch.where(query_mask, 0.0, -1e9)[:, None, :, None]  # (B, 1, Lq, 1)
    return rows.expand(-1, -1, -1, key_mask.shape[1])


ATTENTION_MASKS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "keys": _padded_keys,
    "queries": _padded_queries,
}


class CondLayerNorm(nn.Module):
    """LayerNorm without affine parameters, modulated by the condition: LN(x) (1 + scale) + shift.

    (shift, scale) = Linear(dropout(SiLU(c))); the Linear starts at zero, so at initialisation
    this is exactly a plain LayerNorm.
    """

    def __init__(self, hidden_size: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False)
        self.modulation = nn.Sequential(
            nn.SiLU(), nn.Dropout(dropout), nn.Linear(hidden_size, 2 * hidden_size)
        )
        self.zero_modulation()

    def zero_modulation(self) -> None:
        nn.init.zeros_(self.modulation[-1].weight)
        nn.init.zeros_(self.modulation[-1].bias)

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(condition).chunk(2, dim=-1)  # (B, L, d) each
        return self.norm(x) * (1 + scale) + shift


class PositionwiseFeedForward(nn.Module):
    """d -> d -> d with ReLU, as in the authors' code."""

    def __init__(self, hidden_size: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(hidden_size, hidden_size),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DualConditionalBlock(nn.Module):
    """CondLN + bidirectional self-attention, cross-attention to H0, feed-forward; all residual."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.cond_norm = CondLayerNorm(hidden_size, dropout)
        self.self_attn = MultiHeadAttention(hidden_size, num_heads, dropout)
        self.cross_norm = nn.LayerNorm(hidden_size)
        self.history_norm = nn.LayerNorm(hidden_size)
        self.cross_attn = MultiHeadAttention(hidden_size, num_heads, dropout)
        self.ffn_norm = nn.LayerNorm(hidden_size)
        self.ffn = PositionwiseFeedForward(hidden_size, dropout)
        self.dropout = nn.Dropout(dropout)

    def history_keys_values(self, history: torch.Tensor) -> KeyValues:
        """Cross-attention keys/values of LN(H0): step-independent, so samplers reuse them."""
        return self.cross_attn.keys_values(self.history_norm(history))

    def forward(
        self,
        x: torch.Tensor,
        condition: torch.Tensor,
        self_mask: torch.Tensor,
        cross_mask: torch.Tensor,
        history_kv: KeyValues,
    ) -> torch.Tensor:
        h = self.cond_norm(x, condition)
        x = x + self.dropout(self.self_attn(h, h, self_mask))
        x = x + self.dropout(self.cross_attn.attend(self.cross_norm(x), *history_kv, cross_mask))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


class DualConditionalTransformer(nn.Module):
    """Predicts S0_hat (B, L, d) from the noised sequence S_t, the step t and the clean history."""

    def __init__(
        self,
        *,
        hidden_size: int,
        num_blocks: int,
        num_heads: int,
        dropout: float,
        num_steps: int,
        attention_mask: str = "keys",
    ) -> None:
        check_sizes(hidden_size, num_heads, dropout)
        super().__init__()
        if attention_mask not in ATTENTION_MASKS:
            raise ValueError(
                f"unknown attention_mask '{attention_mask}'; "
                f"choose one of: {', '.join(ATTENTION_MASKS)}"
            )
        self.masking = ATTENTION_MASKS[attention_mask]
        self.step_embedding = StepEmbedding(hidden_size, num_steps, expansion=2, activation=nn.GELU)
        self.blocks = nn.ModuleList(
            DualConditionalBlock(hidden_size, num_heads, dropout) for _ in range(num_blocks)
        )
        self.out_norm = CondLayerNorm(hidden_size, dropout)
        xavier_init(self)
        for module in self.modules():  # xavier_init overwrote the zero modulation
            if isinstance(module, CondLayerNorm):
                module.zero_modulation()

    def history_cache(self, history: torch.Tensor) -> list[KeyValues]:
        """Per-block cross-attention keys/values of the history, computed once per batch."""
        return [block.history_keys_values(history) for block in self.blocks]

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        history: torch.Tensor,
        seq_mask: torch.Tensor,
        history_mask: torch.Tensor,
        cache: list[KeyValues] | None = None,
    ) -> torch.Tensor:
        condition = self.step_embedding(t)[:, None, :] + history  # (B, L, d)
        self_mask = self.masking(seq_mask, seq_mask)
        cross_mask = self.masking(seq_mask, history_mask)
        cache = cache if cache is not None else self.history_cache(history)
        x = x_t
        for block, history_kv in zip(self.blocks, cache, strict=True):
            x = block(x, condition, self_mask, cross_mask, history_kv)
        return self.out_norm(x, condition)  # (B, L, d)
