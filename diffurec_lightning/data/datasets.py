"""Samples cut on the fly from the compact store: (history, target) pairs, left-padded per batch.

Every sample is a slice of one user's sequence in the flat item array: the history is
``items[start:end]`` (its most recent ``max_len`` items) and the target is ``items[end]``.
Training samples are all prefixes of the training part (``prefixes``), or one whole training
sequence per user with the next item as target at every position (``sequences``, the
per-position objective of SASRec and GRU4Rec); the validation sample of a user ends before its
second-to-last item, the test sample before its last. Nothing is materialised but three integer
arrays per split.

The refit protocol (``extra_items=1``) counts the validation item as training data: each
user's training part is one item longer, so its prefixes (or its sequence) gain one target.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from diffurec_lightning.data.store import SequenceStore
from diffurec_lightning.errors import ConfigError

Batch = dict[str, torch.Tensor]


TRAIN_SAMPLES = ("prefixes", "sequences")


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

    def _slices(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Item positions (B, L) of the left-padded histories and where they are real."""
        ends, lengths = self.ends[idx], self.lengths[idx]
        width = int(lengths.max()) if len(idx) else 0
        cols = np.arange(width, dtype=np.int64)
        positions = ends[:, None] - width + cols[None, :]  # (B, L)
        real = cols[None, :] >= (width - lengths)[:, None]  # (B, L) True = real item
        return positions, real

    def __getitems__(self, indices: list[int]) -> Batch:
        """Collate a batch directly: left-pad to the longest history in *this* batch."""
        idx = np.asarray(indices, dtype=np.int64)
        positions, real = self._slices(idx)
        seq = np.where(real, self.items[np.where(real, positions, 0)], 0)
        return {
            "seq": torch.from_numpy(seq.astype(np.int64)),
            "target": torch.from_numpy(self.items[self.ends[idx]].astype(np.int64)),
            "user": torch.from_numpy(self.users[idx]),
        }


class SequenceDataset(PrefixDataset):
    """Whole training sequences: ``seq`` (B, L) as for prefixes, ``target`` (B, L) the item after
    each position (0 where ``seq`` is padding), so position j predicts the item at j + 1."""

    def __getitems__(self, indices: list[int]) -> Batch:
        idx = np.asarray(indices, dtype=np.int64)
        positions, real = self._slices(idx)
        seq = np.where(real, self.items[np.where(real, positions, 0)], 0)
        # The last target is items[end], the last training item: never past the training part.
        target = np.where(real, self.items[np.where(real, positions + 1, 0)], 0)
        return {
            "seq": torch.from_numpy(seq.astype(np.int64)),
            "target": torch.from_numpy(target.astype(np.int64)),
            "user": torch.from_numpy(self.users[idx]),
        }


def _train_lengths(store: SequenceStore, extra_items: int) -> np.ndarray:
    """Items per user that training may read: all but validation and test (refit: all but test)."""
    if extra_items not in (0, 1):
        raise ValueError(f"extra_items must be 0 or 1, got {extra_items}")
    return store.lengths - 2 + extra_items


def train_prefixes(store: SequenceStore, max_len: int, extra_items: int = 0) -> PrefixDataset:
    """Every prefix of every training sequence: i1..im gives (i1)->i2, ..., (i1..i_{m-1})->im.

    ``extra_items=1`` (refit) makes the validation item i_{m+1} part of it: (i1..im)->i_{m+1}.
    """
    train_lengths = _train_lengths(store, extra_items)
    counts = np.maximum(train_lengths - 1, 0)
    users = np.repeat(np.arange(store.num_users, dtype=np.int64), counts)
    starts = store.offsets[:-1][users]
    # Within a user, sample k (0-based) predicts the item at start + k + 1.
    first_sample = np.repeat(np.cumsum(counts) - counts, counts)
    ends = starts + (np.arange(len(users)) - first_sample) + 1
    return PrefixDataset(store, users, starts, ends, max_len)


def train_sequences(store: SequenceStore, max_len: int, extra_items: int = 0) -> SequenceDataset:
    """One sample per user with a training sequence i1..im of m >= 2 items: input i1..i_{m-1},
    targets i2..im (both cut to the most recent max_len positions). It holds the same
    (history, next item) pairs as ``train_prefixes`` when no sequence is longer than max_len + 1.
    """
    train_lengths = _train_lengths(store, extra_items)
    users = np.flatnonzero(train_lengths >= 2).astype(np.int64)
    starts = store.offsets[:-1][users]
    ends = starts + train_lengths[users] - 1
    return SequenceDataset(store, users, starts, ends, max_len)


def train_samples(
    store: SequenceStore, kind: str, max_len: int, extra_items: int = 0
) -> PrefixDataset:
    """The training set of ``data.train_samples`` (prefixes | sequences)."""
    if kind not in TRAIN_SAMPLES:
        raise ConfigError(
            f"data.train_samples must be one of {', '.join(TRAIN_SAMPLES)}, got {kind!r}"
        )
    make = train_prefixes if kind == "prefixes" else train_sequences
    return make(store, max_len, extra_items)


def eval_samples(
    store: SequenceStore, split: Literal["val", "test"], max_len: int
) -> PrefixDataset:
    """One sample per user: validation predicts the second-to-last item, test the last."""
    users = np.arange(store.num_users, dtype=np.int64)
    starts = store.offsets[:-1]
    ends = store.offsets[1:] - (2 if split == "val" else 1)
    return PrefixDataset(store, users, starts, ends, max_len)
