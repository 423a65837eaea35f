"""Batch samplers: deterministic shuffling, length bucketing, and exact sharding across ranks."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler

from diffurec_lightning.errors import ConfigError

# Bucketing sorts by length inside windows of this many batches: wide enough to group similar
# lengths, narrow enough that every epoch still mixes the data well.
BUCKET_WINDOW_BATCHES = 50


def padding_fraction(lengths: np.ndarray, batches: list[np.ndarray]) -> float:
    """Share of token positions that are padding when each batch is padded to its own longest."""
    real = padded = 0
    for batch in batches:
        batch_lengths = lengths[batch]
        real += int(batch_lengths.sum())
        padded += int(batch_lengths.max()) * len(batch)
    return 1.0 - real / padded if padded else 0.0


class TrainBatchSampler(Sampler[list[int]]):
    """Shuffled (optionally length-bucketed) batches; each rank gets an equal share of batches.

    The order depends only on (seed, epoch), so a run is reproducible and every rank agrees on
    the same global order before taking its share.
    """

    def __init__(
        self,
        lengths: np.ndarray,
        batch_size: int,
        *,
        seed: int,
        bucketing: bool = True,
        shuffle: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.bucketing = bucketing
        self.shuffle = shuffle
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def sampler(self) -> TrainBatchSampler:
        """Lightning starts every epoch (and a resumed one) by calling ``set_epoch`` on
        ``dataloader.sampler`` and ``dataloader.batch_sampler.sampler``; this is how it finds ours.
        Without it every epoch would repeat epoch 0's order."""
        return self

    def global_batches(self) -> list[np.ndarray]:
        """All batches of this epoch, in order, before sharding."""
        rng = np.random.default_rng([self.seed, self.epoch])
        n = len(self.lengths)
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        if self.bucketing:
            window = self.batch_size * BUCKET_WINDOW_BATCHES
            order = np.concatenate(
                [
                    chunk[np.argsort(self.lengths[chunk], kind="stable")]
                    for chunk in np.array_split(order, max(1, -(-n // window)))
                ]
            )
        batches = [order[i : i + self.batch_size] for i in range(0, n, self.batch_size)]
        if self.bucketing and self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.global_batches()
        # Every rank must run the same number of steps (DDP all-reduces each one): drop the tail.
        per_rank = len(batches) // self.num_replicas
        for batch in batches[self.rank : per_rank * self.num_replicas : self.num_replicas]:
            yield batch.tolist()

    def __len__(self) -> int:
        return (-(-len(self.lengths) // self.batch_size)) // self.num_replicas


class EvalBatchSampler(Sampler[list[int]]):
    """Every sample exactly once across all ranks (no padding duplicates), grouped by length.

    Ranks may get different numbers of batches; metrics are sums over users, reduced once at
    epoch end, so the result is exact whatever the number of devices.
    """

    def __init__(
        self,
        lengths: np.ndarray,
        batch_size: int,
        *,
        bucketing: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        self.lengths = np.asarray(lengths)
        if len(self.lengths) < num_replicas:
            raise ConfigError(
                f"{len(self.lengths)} evaluation users for {num_replicas} ranks: every rank "
                f"needs at least one; run on at most {len(self.lengths)} devices"
            )
        self.batch_size = batch_size
        self.bucketing = bucketing
        self.num_replicas = num_replicas
        self.rank = rank

    def global_batches(self) -> list[np.ndarray]:
        n = len(self.lengths)
        order = np.argsort(self.lengths, kind="stable") if self.bucketing else np.arange(n)
        size = self.batch_size
        if -(-n // size) < self.num_replicas:
            # Fewer batches than ranks: a rank without any would never join the collectives of
            # the evaluation. Smaller batches (n // ranks users) give every rank at least one;
            # the metrics are sums over users, so the batch size changes nothing.
            size = n // self.num_replicas
        return [order[i : i + size] for i in range(0, n, size)]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches()[self.rank :: self.num_replicas]:
            yield batch.tolist()

    def __len__(self) -> int:
        return len(self.global_batches()[self.rank :: self.num_replicas])
