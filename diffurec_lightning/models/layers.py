"""Transformer building blocks with key-padding masks and fused attention.

Shape legend: B batch, L history length, Q query length, d hidden size, H heads.
``mask`` is a (B, L) bool tensor, True where the history holds a real item; padded positions
are never attended to as keys (their own outputs are computed but never read).

Speed notes (docs/performance.md): projections that read the same input run as one matrix
product (Q/K/V, K/V); dropout, attention with dropout and the feed-forward in training use the
leaner autograd functions of functional.py on the CPU (functional.custom_kernels; on CUDA they
are PyTorch's own); attention runs through scaled_dot_product_attention
on CUDA, and on the CPU except when its probabilities need dropout or its inputs are bf16
(``attention``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from diffurec_lightning.models.functional import (
    custom_kernels,
    dropout,
    dropout_attention,
    gelu_dropout_linear,
)


def check_sizes(hidden_size: int, num_heads: int, dropout: float) -> None:
    """ValueError unless ``hidden_size`` splits into ``num_heads`` heads and ``dropout`` is a
    probability below 1 (the checks every attention network makes of its config)."""
    if num_heads < 1 or hidden_size % num_heads:
        raise ValueError(
            f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})"
        )
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must lie in [0, 1), got {dropout}")


class Dropout(nn.Dropout):
    """nn.Dropout (same arguments and state) with the cheaper mask of ``dropout``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) float steps -> (B, dim) sinusoidal features (cos half, then sin half)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.float()[:, None] * freqs[None]  # (B, half)
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


class StepEmbedding(nn.Module):
    """d_s: sinusoidal embedding of the step rescaled to s * 1000 / T, then an MLP
    (d -> expansion d -> d; DiffuRec: 4 and SiLU, DCRec: 2 and GELU)."""

    def __init__(
        self,
        hidden_size: int,
        num_steps: int,
        expansion: int = 4,
        activation: type[nn.Module] = nn.SiLU,
    ) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.num_steps = num_steps
        self.scale = 1000.0 / num_steps
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, expansion * hidden_size),
            activation(),
            nn.Linear(expansion * hidden_size, hidden_size),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        if t.dtype.is_floating_point or len(t) <= self.num_steps:
            return self.mlp(sinusoidal_embedding(t * self.scale, self.hidden_size))
        # A batch holds at most T distinct steps: embed each step once and look the rows up.
        steps = torch.arange(self.num_steps, device=t.device)
        return self.mlp(sinusoidal_embedding(steps * self.scale, self.hidden_size))[t]


def key_padding_bias(mask: torch.Tensor) -> torch.Tensor:
    """(B, L) bool -> (B, 1, 1, L) bool attention mask for SDPA (True = may attend)."""
    return mask[:, None, None, :]


def additive_mask(attn_mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A bool mask (True = may attend) as an additive bias (0 or -inf); float masks pass through.

    Converting once per forward pass spares every attention call its own conversion.
    """
    if attn_mask.dtype != torch.bool:
        return attn_mask
    return torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device).masked_fill_(
        ~attn_mask, float("-inf")
    )


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor,
    dropout_p: float,
    training: bool,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d/H) + mask) v with dropout on the probabilities in training.

    q (B, H, Q, d/H), k and v (B, H, L, d/H) -> (B, H, Q, d/H). On CUDA this is always
    scaled_dot_product_attention (fused kernels, its own dropout). On the CPU: with dropout the
    products are written out (``dropout_attention``: SDPA falls back to them anyway and its
    dropout would use the slow generator); without dropout, bf16 inputs take the written-out
    products too (``short_attention``: 2-3x faster than the CPU flash kernel at these lengths,
    docs/performance.md), float32 inputs take SDPA.
    """
    if not custom_kernels(q.device):
        p = dropout_p if training else 0.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)
    if training and dropout_p > 0.0:
        return dropout_attention(q, k, v, additive_mask(attn_mask, torch.float32), dropout_p)
    if q.dtype == torch.bfloat16:
        return short_attention(q, k, v, attn_mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def short_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor
) -> torch.Tensor:
    """SDPA's function written out for short keys on the CPU: the two products in the inputs'
    dtype, the masked softmax in float32 (as the fused kernels accumulate)."""
    scores = torch.matmul(q, k.transpose(-2, -1)).float().mul_(q.shape[-1] ** -0.5)
    scores = scores.add_(additive_mask(attn_mask, torch.float32))
    return torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)


class MultiHeadAttention(nn.Module):
    """Multi-head attention over a key/value sequence with padded keys masked out."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.out = nn.Linear(hidden_size, hidden_size)
        self.dropout = dropout

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)  # (B, H, n, d/H)

    def project(self, x: torch.Tensor, *layers: nn.Linear) -> list[torch.Tensor]:
        """x through several of the projections in ONE matrix product, split into heads."""
        if len(layers) == 1:
            return [self._heads(layers[0](x))]
        weight = torch.cat([layer.weight for layer in layers])  # (k d, d)
        bias = torch.cat([layer.bias for layer in layers])
        return [self._heads(part) for part in F.linear(x, weight, bias).chunk(len(layers), -1)]

    def keys_values(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected keys and values; callers may compute them once and reuse them."""
        keys, values = self.project(context, self.key, self.value)
        return keys, values

    def attend(
        self,
        query: torch.Tensor | None,
        keys: torch.Tensor,
        values: torch.Tensor,
        attn_mask: torch.Tensor,
        projected: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention of ``query`` (B, Q, d) over projected keys/values; ``projected`` may carry
        the query already projected and split into heads (B, H, Q, d/H)."""
        q = projected if projected is not None else self._heads(self.query(query))
        attended = attention(q, keys, values, attn_mask, self.dropout, self.training)
        b, _, n, _ = attended.shape
        return self.out(attended.transpose(1, 2).reshape(b, n, -1))  # (B, Q, d)

    def forward(
        self, query: torch.Tensor, context: torch.Tensor, attn_mask: torch.Tensor
    ) -> torch.Tensor:
        if query is context:  # self-attention: Q, K and V in one product
            q, keys, values = self.project(query, self.query, self.key, self.value)
            return self.attend(None, keys, values, attn_mask, projected=q)
        keys, values = self.keys_values(context)
        return self.attend(query, keys, values, attn_mask)


class FeedForward(nn.Module):
    """Position-wise d -> 4d -> d with GELU."""

    def __init__(self, hidden_size: int, dropout: float) -> None:
        super().__init__()
        self.up = nn.Linear(hidden_size, 4 * hidden_size)
        self.down = nn.Linear(4 * hidden_size, hidden_size)
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout.p > 0:  # same function, less memory for backward
            return gelu_dropout_linear(self.up(x), self.dropout.p, self.down.weight, self.down.bias)
        return self.down(self.dropout(F.gelu(self.up(x))))


class SelfAttentionBlock(nn.Module):
    """Pre-LayerNorm Transformer block: self-attention then feed-forward, both residual.

    ``output_dropout``: dropout on the block's output too, as the DiffuRec code's
    TransformerBlock does (``return self.dropout(hidden)``), residual path included.
    """

    def __init__(
        self, hidden_size: int, num_heads: int, dropout: float, output_dropout: bool = False
    ) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(hidden_size)
        self.attn = MultiHeadAttention(hidden_size, num_heads, dropout)
        self.ffn_norm = nn.LayerNorm(hidden_size)
        self.ffn = FeedForward(hidden_size, dropout)
        self.dropout = Dropout(dropout)
        self.output_dropout = Dropout(dropout) if output_dropout else None

    def forward(
        self, h: torch.Tensor, attn_mask: torch.Tensor, last_only: bool = False
    ) -> torch.Tensor:
        """With ``last_only`` only the most recent position is computed (keys use all of them)."""
        normed = self.attn_norm(h)
        query, h = (normed[:, -1:], h[:, -1:]) if last_only else (normed, h)
        h = h + self.dropout(self.attn(query, normed, attn_mask))
        h = h + self.dropout(self.ffn(self.ffn_norm(h)))
        return self.output_dropout(h) if self.output_dropout is not None else h


class CrossAttentionBlock(nn.Module):
    """DiffuRecSys block (Eq. 16): cross-attention between the noised target and the history,
    then self-attention over the history, then feed-forward; all pre-LayerNorm residual.

    The cross-attention queries are the scaled noised target ``condition`` (B, L, d); keys and
    values are the (normalised) history, so what the target draws from the history is added to
    every history position.
    """

    def __init__(
        self, hidden_size: int, num_heads: int, dropout: float, output_dropout: bool = False
    ) -> None:
        super().__init__()
        self.cross_norm = nn.LayerNorm(hidden_size)
        self.cross = MultiHeadAttention(hidden_size, num_heads, dropout)
        self.block = SelfAttentionBlock(hidden_size, num_heads, dropout, output_dropout)
        self.dropout = Dropout(dropout)

    def forward(
        self,
        h: torch.Tensor,
        condition: torch.Tensor,
        attn_mask: torch.Tensor,
        last_only: bool = False,
        cross_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        cross_query: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``cross_kv`` may carry precomputed keys/values of ``cross_norm(h)`` (step-independent
        for the first block, so the reverse loop computes them once per batch); ``cross_query``
        the projected queries of ``condition`` (B, H, L, d/H), which the approximator computes
        for all blocks in one product."""
        keys, values = (
            cross_kv if cross_kv is not None else self.cross.keys_values(self.cross_norm(h))
        )
        attended = self.cross.attend(condition, keys, values, attn_mask, projected=cross_query)
        h = h + self.dropout(attended)
        return self.block(h, attn_mask, last_only=last_only)


def xavier_init(module: nn.Module) -> None:
    """Xavier-normal weights and zero biases for every Linear inside ``module``."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.xavier_normal_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
