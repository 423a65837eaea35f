"""Useful floating-point work of one sample: the yardstick of the benchmark.

Definition (docs/performance.md): the matrix-multiply FLOPs (2 m n k per (m x k)(k x n) product)
that the model's output depends on, for the REAL (non-padding) items of a history only:

* every projection, feed-forward layer and attention product (Q K^T and A V over real keys) of
  every block, at every real position, except the last block, whose queries, output projection and
  feed-forward are needed at the most recent position only (its keys and values still cover every
  real position);
* the step-embedding MLP (once per sample) and the scores of all N items (x0_hat . E^T);
* training = 3 x forward (backward = two products per forward product), evaluation = T
  approximator calls + one scoring per user, with work that does not depend on the step (the
  first cross-attention's keys and values) counted once.

Padding, softmax, LayerNorm, dropout and other element-wise work are not useful FLOPs: a faster
implementation may skip them, so they must not inflate the figure.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

# Forward FLOPs of the approximator blocks for samples of `length` real items (a float tensor, so
# a whole batch is counted at once), hidden size d and a number of blocks.
BlockFlops = Callable[[torch.Tensor, int, int], torch.Tensor]


def _self_attention(length: torch.Tensor, d: int, queries: torch.Tensor | int) -> torch.Tensor:
    # Q and output projection for the queries, K and V for every real item, two attention products.
    return 4.0 * queries * d * d + 4.0 * length * d * d + 4.0 * queries * length * d


def _feed_forward(positions: torch.Tensor | int, d: int) -> torch.Tensor:
    return 16.0 * positions * d * d  # d -> 4d -> d


def diffurec_blocks(length: torch.Tensor, d: int, num_blocks: int) -> torch.Tensor:
    full = _self_attention(length, d, length) + _feed_forward(length, d)
    last = _self_attention(length, d, 1) + _feed_forward(1, d)
    return (num_blocks - 1) * full + last


def cross_attention_blocks(length: torch.Tensor, d: int, num_blocks: int) -> torch.Tensor:
    # Every block's cross-attention has one query per history position (the scaled noised target).
    cross = _self_attention(length, d, length)
    full = cross + _self_attention(length, d, length) + _feed_forward(length, d)
    last = cross + _self_attention(length, d, 1) + _feed_forward(1, d)
    return (num_blocks - 1) * full + last


def approximator_flops(blocks: BlockFlops, lengths: torch.Tensor, d: int, num_blocks: int) -> float:
    """Forward FLOPs of one approximator call for every sample of a batch (lengths (B,) real):
    its blocks (an approximator's ``block_flops``) and the step-embedding MLP."""
    step_mlp = 16.0 * d * d  # d -> 4d -> d, once per sample
    length = lengths.to(torch.float64)
    return float((blocks(length, d, num_blocks) + step_mlp).sum())


class CountsFlops(Protocol):
    """A network that counts its useful FLOPs (the approximators do)."""

    hidden_size: int

    def flops(self, lengths: torch.Tensor) -> float: ...

    def step_independent_flops(self, lengths: torch.Tensor) -> float: ...


def training_flops(net: CountsFlops, lengths: torch.Tensor, num_items: int) -> float:
    """Useful FLOPs of one training step (forward + backward) on a batch."""
    scoring = 2.0 * num_items * net.hidden_size * len(lengths)
    return 3.0 * (net.flops(lengths) + scoring)


def evaluation_flops(
    net: CountsFlops, lengths: torch.Tensor, num_items: int, num_steps: int
) -> float:
    """Useful FLOPs of the reverse process (num_steps calls) plus one full ranking; work that
    does not depend on the step is counted once."""
    scoring = 2.0 * num_items * net.hidden_size * len(lengths)
    cached = net.step_independent_flops(lengths)
    return num_steps * net.flops(lengths) - (num_steps - 1) * cached + scoring
