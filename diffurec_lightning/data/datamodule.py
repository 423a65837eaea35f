"""The LightningDataModule: prepares the cache once, then streams batches from the compact store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from torch.utils.data import DataLoader

from diffurec_lightning.data.batching import EvalBatchSampler, TrainBatchSampler, padding_fraction
from diffurec_lightning.data.datasets import (
    TRAIN_SAMPLES,
    PrefixDataset,
    eval_samples,
    train_samples,
)
from diffurec_lightning.data.sources import DataSource
from diffurec_lightning.data.store import SequenceStore, load_store, read_meta
from diffurec_lightning.errors import ConfigError

# standard: train on the training part, select on validation, test. refit: train on training +
# validation items (a fixed number of epochs chosen beforehand on validation), then test.
PROTOCOLS = ("standard", "refit")


def _passthrough(batch: Any) -> Any:
    # The dataset's __getitems__ already collates; the loader must not touch the batch.
    return batch


class SequenceDataModule(L.LightningDataModule):
    """Sequences of one dataset: ``source`` (data/sources.py) prepares its cache folder, ``name``
    labels it in run names and reports.

    ``train_samples``: ``prefixes`` (one target per sample) or ``sequences`` (a target at every
    position, for per-position objectives). ``protocol``: ``standard`` or ``refit`` (the
    validation item joins the training data, and there is no validation split).
    """

    def __init__(
        self,
        *,
        name: str,
        source: DataSource,
        data_dir: str,
        max_len: int = 50,
        batch_size: int = 512,
        eval_batch_size: int = 512,
        bucketing: bool = True,
        num_workers: int = 0,
        seed: int = 0,
        train_samples: str = "prefixes",
        protocol: str = "standard",
    ) -> None:
        super().__init__()
        if train_samples not in TRAIN_SAMPLES:
            raise ConfigError(
                f"data.train_samples must be one of {', '.join(TRAIN_SAMPLES)}, "
                f"got {train_samples!r}"
            )
        if protocol not in PROTOCOLS:
            raise ConfigError(
                f"data.protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}"
            )
        for key, value in (("max_len", max_len), ("batch_size", batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"data.{key} must be an integer >= 1, got {value!r}")
        if not isinstance(eval_batch_size, int) or eval_batch_size < 1:
            raise ConfigError(
                f"data.eval_batch_size must be an integer >= 1, got {eval_batch_size!r}"
            )
        if not callable(getattr(source, "prepare", None)):
            raise ConfigError(
                f"data.source must be a data source with prepare(), e.g. {{_target_: "
                f"diffurec_lightning.data.sources.BenchmarkSource, name: toys}}; got {source!r}"
            )
        self.name = name
        self.source = source
        self.data_dir = Path(data_dir)
        self.max_len = max_len
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.bucketing = bucketing
        self.num_workers = num_workers
        self.seed = seed
        self.train_samples = train_samples
        self.protocol = protocol
        self.cache_dir: Path | None = None
        self.store: SequenceStore | None = None
        self._datasets: dict[str, PrefixDataset] = {}

    # -- preparation ---------------------------------------------------------------------
    def prepare_data(self) -> None:
        self.cache_dir = self.source.prepare(self.data_dir)

    def setup(self, stage: str | None = None) -> None:
        if self.store is not None:
            return
        # Other ranks did not run prepare_data; resolving the folder again is cheap when cached.
        self.cache_dir = self.source.prepare(self.data_dir)
        self.store = load_store(self.cache_dir)
        self._datasets = {
            "train": train_samples(
                self.store,
                self.train_samples,
                self.max_len,
                extra_items=1 if self.protocol == "refit" else 0,
            ),
            "val": eval_samples(self.store, "val", self.max_len),
            "test": eval_samples(self.store, "test", self.max_len),
        }
        if len(self._datasets["train"]) == 0:
            raise ConfigError(
                f"{self.cache_dir}: no training prefixes (every training history has one item)"
            )

    @property
    def num_items(self) -> int:
        if self.cache_dir is None:
            self.prepare_data()
        return int(read_meta(self.cache_dir)["num_items"])

    def dataset(self, split: str) -> PrefixDataset:
        if split == "val" and self.protocol == "refit":
            raise ConfigError(
                "data.protocol=refit trains on the validation items, so it has no validation: "
                "run it through the refit protocol (python -m diffurec_lightning.train "
                "data.protocol=refit), which disables validation"
            )
        if not self._datasets:
            self.setup()
        return self._datasets[split]

    # -- loaders -------------------------------------------------------------------------
    def _ranks(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 1, 0
        return trainer.world_size, trainer.global_rank

    def train_batch_sampler(self) -> TrainBatchSampler:
        world, rank = self._ranks()
        return TrainBatchSampler(
            self.dataset("train").lengths,
            self.batch_size,
            seed=self.seed,
            bucketing=self.bucketing,
            num_replicas=world,
            rank=rank,
        )

    def eval_batch_sampler(self, split: str) -> EvalBatchSampler:
        world, rank = self._ranks()
        return EvalBatchSampler(
            self.dataset(split).lengths,
            self.eval_batch_size,
            bucketing=self.bucketing,
            num_replicas=world,
            rank=rank,
        )

    def _loader(self, split: str, batch_sampler: Any) -> DataLoader:
        return DataLoader(
            self.dataset(split),
            batch_sampler=batch_sampler,
            collate_fn=_passthrough,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.train_batch_sampler())

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_sampler("val"))

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_sampler("test"))

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    # -- reporting -----------------------------------------------------------------------
    def padding_fraction(self, split: str = "train") -> float:
        """Padding share of the token positions in this split's batches (epoch 0 order)."""
        sampler = self.train_batch_sampler() if split == "train" else self.eval_batch_sampler(split)
        return padding_fraction(self.dataset(split).lengths, sampler.global_batches())

    def item_counts(self) -> np.ndarray:
        """Interactions per item id over all users' full sequences (index 0 = padding = 0)."""
        if self.store is None:
            self.setup()
        return np.bincount(np.asarray(self.store.items), minlength=self.store.num_items + 1)
