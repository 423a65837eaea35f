"""Samples cut on the fly from the compact store: (history, target) pairs, left-padded per batch.

Every sample is a slice of one user's sequence in the flat item array: the history is
``items[start:end]`` (its most recent ``max_len`` items) and the target is ``items[end]``.
Training samples are all prefixes of the training part; the validation sample of a user ends
before its second-to-last item, the test sample before its last. Nothing is materialised but
three integer arrays per split.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from diffurec_lightning.data.store import SequenceStore
from diffurec_lightning.errors import ConfigError

Batch = dict[str, torch.Tensor]


class PrefixDataset(Dataset):
    """(user, history slice, target) samples, fetched a whole batch at a time."""

    def __init__(
        self,
        store: SequenceStore,
        users: np.ndarray,
        starts: np.ndarray,
        ends: np.ndarray,
        max_len: int,
    ) -> None:
        if max_len < 1:
            raise ConfigError(f"data.max_len must be >= 1, got {max_len}")
        self.items = store.items
        self.users = users.astype(np.int64)
        self.starts = starts.astype(np.int64)
        self.ends = ends.astype(np.int64)
        self.max_len = max_len
        # History length after truncation to the most recent max_len items: drives bucketing.
        self.lengths = np.minimum(self.ends - self.starts, max_len)

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, index: int) -> Batch:
        batch = self.__getitems__([index])
        return {key: value[0] for key, value in batch.items()}

    def __getitems__(self, indices: list[int]) -> Batch:
        """Collate a batch directly: left-pad to the longest history in *this* batch."""
        idx = np.asarray(indices, dtype=np.int64)
        ends, lengths = self.ends[idx], self.lengths[idx]
        width = int(lengths.max()) if len(idx) else 0
        cols = np.arange(width, dtype=np.int64)
        positions = ends[:, None] - width + cols[None, :]  # (B, L)
        real = cols[None, :] >= (width - lengths)[:, None]  # (B, L) True = real item
        seq = np.where(real, self.items[np.where(real, positions, 0)], 0)
        return {
            "seq": torch.from_numpy(seq.astype(np.int64)),
            "target": torch.from_numpy(self.items[ends].astype(np.int64)),
            "user": torch.from_numpy(self.users[idx]),
        }


def train_prefixes(store: SequenceStore, max_len: int) -> PrefixDataset:
    """Every prefix of every training sequence: i1..im gives (i1)->i2, ..., (i1..i_{m-1})->im."""
    train_lengths = store.lengths - 2
    counts = np.maximum(train_lengths - 1, 0)
    users = np.repeat(np.arange(store.num_users, dtype=np.int64), counts)
    starts = store.offsets[:-1][users]
    # Within a user, sample k (0-based) predicts the item at start + k + 1.
    first_sample = np.repeat(np.cumsum(counts) - counts, counts)
    ends = starts + (np.arange(len(users)) - first_sample) + 1
    return PrefixDataset(store, users, starts, ends, max_len)


def eval_samples(
    store: SequenceStore, split: Literal["val", "test"], max_len: int
) -> PrefixDataset:
    """One sample per user: validation predicts the second-to-last item, test the last."""
    users = np.arange(store.num_users, dtype=np.int64)
    starts = store.offsets[:-1]
    ends = store.offsets[1:] - (2 if split == "val" else 1)
    return PrefixDataset(store, users, starts, ends, max_len)
