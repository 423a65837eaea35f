"""Approximators f_theta: reconstruct the target item representation x0 from the history and x_t.

Both take the normalised history embedding ``seq_emb`` (B, L, d), its ``mask`` (B, L), the
noised target ``x_t`` (B, d), the step ``t`` (B,) and the uncertainty ``lam`` (B, L, d)
(lambda ~ N(lambda_scale, lambda_scale), drawn by the caller so that evaluation noise stays
reproducible), and return x0_hat (B, d): the output at the most recent history position.

Each is built from a ``model.net`` config node (``_target_`` = the class), and counts its own
useful FLOPs (``flops``, ``step_independent_flops``; the definition is in flops.py).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from diffurec_lightning import flops
from diffurec_lightning.models.layers import (
    CrossAttentionBlock,
    Dropout,
    SelfAttentionBlock,
    StepEmbedding,
    additive_mask,
    check_sizes,
    key_padding_bias,
    xavier_init,
)

# Step-independent keys/values an approximator may compute once per batch (``history_cache``).
Cache = tuple[Tensor, Tensor] | None


class Approximator(nn.Module):
    """Shared parts: the size checks, step embedding, ``num_blocks`` blocks of class ``block``,
    output dropout and LayerNorm, the conditioning and the readout. A subclass names its
    ``block`` and says in ``mix`` how the blocks combine history and condition."""

    # The block class: built as block(hidden_size, num_heads, dropout, block_output_dropout).
    block: type[nn.Module]
    # Forward FLOPs of the blocks for samples of `length` real items (flops.py).
    block_flops = staticmethod(flops.diffurec_blocks)

    def __init__(
        self,
        *,
        hidden_size: int,
        num_blocks: int,
        num_heads: int,
        dropout: float,
        num_steps: int,
        block_output_dropout: bool = False,
    ) -> None:
        if hidden_size < 2 or num_blocks < 1 or num_steps < 1:
            raise ValueError("hidden_size must be >= 2, num_blocks and num_steps >= 1")
        check_sizes(hidden_size, num_heads, dropout)
        super().__init__()
        # Construction order is the order of the seeded weight draws: keep it.
        self.step_embedding = StepEmbedding(hidden_size, num_steps)
        self.out_dropout = Dropout(dropout)
        self.out_norm = nn.LayerNorm(hidden_size)
        self.hidden_size = hidden_size
        self.num_blocks = num_blocks
        self.blocks = nn.ModuleList(
            self.block(hidden_size, num_heads, dropout, block_output_dropout)
            for _ in range(num_blocks)
        )
        xavier_init(self)

    def flops(self, lengths: torch.Tensor) -> float:
        """Useful forward FLOPs of one call for a batch of histories with ``lengths`` real items."""
        return flops.approximator_flops(
            self.block_flops, lengths, self.hidden_size, self.num_blocks
        )

    def step_independent_flops(self, lengths: torch.Tensor) -> float:
        """The part of ``flops`` that does not depend on the step (computed once per batch)."""
        return 0.0

    def mix(self, seq_emb: Tensor, condition: Tensor, attn_mask: Tensor, cache: Cache) -> Tensor:
        """The blocks' output (B, L', d) from the history (B, L, d) and the condition."""
        raise NotImplementedError

    def forward(
        self,
        seq_emb: torch.Tensor,
        mask: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        lam: torch.Tensor,
        cache: Cache = None,
    ) -> torch.Tensor:
        """x0_hat (B, d); ``cache`` may carry ``history_cache(seq_emb)`` where a subclass has one."""
        attn_mask = additive_mask(key_padding_bias(mask))
        # lambda_i * (x_s + d_s): the noised target scaled per history position, (B, L, d).
        condition = lam * (x_t + self.step_embedding(t))[:, None, :]
        h = self.mix(seq_emb, condition, attn_mask, cache)
        return self.out_norm(self.out_dropout(h[:, -1]))  # (B, d)


class DiffuRecApproximator(Approximator):
    """DiffuRec (Eq. 15): z_i = e_i + lambda_i (x_s + d_s), then a Transformer over z."""

    block = SelfAttentionBlock

    def mix(self, seq_emb: Tensor, condition: Tensor, attn_mask: Tensor, cache: Cache) -> Tensor:
        h = seq_emb + condition  # (B, L, d)
        last = len(self.blocks) - 1
        for index, block in enumerate(self.blocks):
            # Each block feeds the next (the public code fed every block the raw input).
            h = block(h, attn_mask, last_only=index == last)
        return h


class CrossAttentionApproximator(Approximator):
    """DiffuRecSys (Eq. 16): z_i = CrossAttention(e_i, lambda_i (x_s + d_s)) in every block."""

    block = CrossAttentionBlock
    block_flops = staticmethod(flops.cross_attention_blocks)

    def step_independent_flops(self, lengths: torch.Tensor) -> float:
        # The first cross-attention's keys and values: the history alone.
        return float((4.0 * lengths.to(torch.float64) * self.hidden_size**2).sum())

    def history_cache(self, seq_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of the first cross-attention: they depend on the history alone, so the
        reverse loop computes them once per batch instead of once per step."""
        first = self.blocks[0]
        return first.cross.keys_values(first.cross_norm(seq_emb))

    def mix(self, seq_emb: Tensor, condition: Tensor, attn_mask: Tensor, cache: Cache) -> Tensor:
        # Every block's cross-attention queries read the same condition: one product for all.
        first = self.blocks[0].cross
        queries = first.project(condition, *(block.cross.query for block in self.blocks))
        h = seq_emb
        last = len(self.blocks) - 1
        for index, block in enumerate(self.blocks):
            h = block(
                h,
                condition,
                attn_mask,
                last_only=index == last,
                cross_kv=cache if index == 0 else None,
                cross_query=queries[index],
            )
        return h
