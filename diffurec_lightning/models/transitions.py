"""Transition counts of the training sequences: what the Markov baseline scores with, and the
ranking prior a neural model may add (``model.transition_prior``, ``TransitionPrior``).

C[a, b] counts how often item b directly followed item a in the training prefixes (each
consecutive pair of each training sequence once), kept as CSR tensors so that a checkpoint
carries them. Counts come from training sequences only (models/counting.py states the protocol).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy import sparse
from torch import nn

from diffurec_lightning.data.datasets import PrefixDataset
from diffurec_lightning.errors import ConfigError

CSR = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def transitions(dataset: PrefixDataset) -> tuple[np.ndarray, np.ndarray]:
    """(previous item, next item) pairs of the training prefixes: each prefix's most recent item
    and its target, i.e. every consecutive pair of every training sequence, counted once."""
    items = np.asarray(dataset.items)
    return items[dataset.ends - 1].astype(np.int64), items[dataset.ends].astype(np.int64)


def csr_rows(
    crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor, rows: torch.Tensor, width: int
) -> torch.Tensor:
    """Dense (B, width) float64 copy of the CSR matrix rows ``rows`` (B,)."""
    start = crow[rows]
    count = crow[rows + 1] - start  # (B,)
    owner = torch.repeat_interleave(torch.arange(len(rows), device=rows.device), count)
    first = torch.repeat_interleave(torch.cumsum(count, 0) - count, count)
    index = start[owner] + torch.arange(len(owner), device=rows.device) - first
    out = torch.zeros(len(rows), width, dtype=torch.float64, device=val.device)
    out[owner, col[index]] = val[index].double()  # columns are unique within a CSR row
    return out


def transition_counts(dataset: PrefixDataset, size: int, normalize: bool = False) -> CSR:
    """The transition counts C (size x size; row a = the items that followed a) of the training
    prefixes as CSR tensors (crow, col, val); ``normalize``: each row a distribution."""
    source, target = transitions(dataset)
    ones = np.ones(len(source), dtype=np.float64)
    counts = sparse.csr_matrix((ones, (source, target)), shape=(size, size))
    counts.sum_duplicates()
    if normalize:
        totals = np.asarray(counts.sum(axis=1)).ravel()
        counts = (sparse.diags(1.0 / np.maximum(totals, 1.0)) @ counts).tocsr()
    return (
        torch.from_numpy(counts.indptr.astype(np.int64)),
        torch.from_numpy(counts.indices.astype(np.int64)),
        torch.from_numpy(counts.data.astype(np.float32)),
    )


def recent_transitions(
    counts: CSR,
    seq: torch.Tensor,
    weights: Sequence[float],
    width: int,
) -> torch.Tensor:
    """(B, width) float64: sum over k of weights[k] * C[k+1-th most recent item of seq] (seq
    left-padded (B, L); a padded position reads the empty row 0)."""
    total = torch.zeros(len(seq), width, dtype=torch.float64, device=seq.device)
    for back, weight in enumerate(weights, start=1):
        if seq.shape[1] >= back and weight != 0:
            total += weight * csr_rows(*counts, seq[:, -back], width)
    return total


def resize_buffers(module: nn.Module, names: Sequence[str], state_dict: dict, prefix: str) -> None:
    """Give ``module``'s count buffers the checkpoint's shapes before it copies them in: their
    sizes are the data's, unknown when the module is built."""
    for name in names:
        saved = state_dict.get(prefix + name)
        if saved is not None:
            module._buffers[name] = torch.empty_like(saved, device=module._buffers[name].device)


class TransitionPrior(nn.Module):
    """A neural model's ranking prior from the Markov baseline's counts (opt-in,
    ``model.transition_prior``): log(1 + C[last, j] + second_last_weight * C[second-to-last, j])
    for every item j, C counted on the training sequences only, as MarkovRecommender counts.

    The module adds ``weight`` times this to its log-softmax scores at validation, test and
    predict; training is unchanged. Buffers: the CSR counts, saved with the checkpoint.
    """

    _count_buffers = ("crow", "col", "val")

    def __init__(self, num_items: int, second_last_weight: float = 0.5) -> None:
        super().__init__()
        self.num_items = num_items
        self.second_last_weight = second_last_weight
        self.register_buffer("crow", torch.zeros(0, dtype=torch.long))
        self.register_buffer("col", torch.zeros(0, dtype=torch.long))
        self.register_buffer("val", torch.zeros(0))

    def fitted(self) -> bool:
        return self.crow.numel() == self.num_items + 2  # CSR: one offset per row, plus one

    def fit(self, dataset: PrefixDataset) -> None:
        device = self.crow.device
        crow, col, val = transition_counts(dataset, self.num_items + 1)
        self.crow, self.col, self.val = crow.to(device), col.to(device), val.to(device)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """(B, L) left-padded histories -> (B, N) float32 log-count prior of items 1..N."""
        if not self.fitted():
            raise ConfigError(
                "model.transition_prior: the counts are not fitted (fit the model, or load a "
                "checkpoint trained with the prior)"
            )
        weights = (1.0, self.second_last_weight)
        counts = recent_transitions(
            (self.crow, self.col, self.val), seq, weights, self.num_items + 1
        )
        return torch.log1p(counts[:, 1:]).float()

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        resize_buffers(self, self._count_buffers, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args)
