"""Benchmark data: the cache, samples and batching (fetching and pickles: test_data_files.py)."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from hydra.utils import instantiate

from diffurec_lightning.data.batching import EvalBatchSampler, TrainBatchSampler
from diffurec_lightning.data.benchmarks import prepare_benchmark
from diffurec_lightning.data.datamodule import SequenceDataModule
from diffurec_lightning.data.datasets import (
    eval_samples,
    train_prefixes,
    train_samples,
    train_sequences,
)
from diffurec_lightning.data.sources import (
    BenchmarkSource,
    FileSource,
    SyntheticSource,
    legacy_data_config,
)
from diffurec_lightning.data.store import load_id_maps, load_store, write_cache
from diffurec_lightning.errors import ConfigError, DataError


def toys(mirror: Path | None = None) -> BenchmarkSource:
    return BenchmarkSource("toys", str(mirror) if mirror else None)


EXPECTED = {
    "toys": (19_412, 11_924, 109_361),
    "beauty": (22_363, 12_101, 131_413),
    "ml-1m": (6_040, 3_706, 982_089),
}


def tiny_cache(tmp_path: Path, sequences: list[list[int]], num_items: int) -> Path:
    frame = pl.DataFrame(
        {"user": list(range(len(sequences))), "items": sequences},
        schema={"user": pl.Int32, "items": pl.List(pl.Int32)},
    )
    return write_cache(
        tmp_path / "tiny",
        frame,
        [f"u{u}" for u in range(len(sequences))],
        [f"i{i}" for i in range(1, num_items + 1)],
        {"name": "tiny"},
    )


# -- real benchmark files ------------------------------------------------------------------
@pytest.mark.parametrize("name", list(EXPECTED))
def test_benchmark_counts(name: str, data_dir: Path, mirror: Path) -> None:
    store = load_store(prepare_benchmark(name, data_dir, mirror))
    users, items, prefixes = EXPECTED[name]
    assert (store.num_users, store.num_items, store.num_train_prefixes) == (users, items, prefixes)
    assert len(train_prefixes(store, max_len=50)) == prefixes
    assert isinstance(store.items, np.memmap)  # the compact store is memory-mapped, not loaded


def test_cache_matches_the_pickle(data_dir: Path, mirror: Path) -> None:
    raw = pickle.loads((mirror / "toys" / "dataset.pkl").read_bytes())  # checksum-known file
    cache = prepare_benchmark("toys", data_dir, mirror)
    store = load_store(cache)
    for user in (0, 1, 777, 19_411):
        expected = raw["train"][user] + raw["val"][user] + raw["test"][user]
        assert store.sequence(user).tolist() == expected
    user_ids, item_ids = load_id_maps(cache)
    inverse_smap = {v: str(k) for k, v in raw["smap"].items()}
    assert item_ids["original_id"][41] == inverse_smap[42]
    assert user_ids["original_id"][5] == {v: str(k) for k, v in raw["umap"].items()}[5]


def test_val_and_test_samples_follow_the_protocol(data_dir: Path, mirror: Path) -> None:
    raw = pickle.loads((mirror / "toys" / "dataset.pkl").read_bytes())
    store = load_store(prepare_benchmark("toys", data_dir, mirror))
    val, test = eval_samples(store, "val", 50), eval_samples(store, "test", 50)
    batch_val, batch_test = val.__getitems__([2]), test.__getitems__([2])
    history = raw["train"][2]
    assert batch_val["seq"][0][-len(history) :].tolist() == history
    assert int(batch_val["target"][0]) == raw["val"][2][0]
    assert batch_test["seq"][0][-len(history) - 1 :].tolist() == history + raw["val"][2]
    assert int(batch_test["target"][0]) == raw["test"][2][0]


def test_datamodule_yields_batches_for_every_benchmark(data_dir: Path, mirror: Path) -> None:
    for name in EXPECTED:
        dm = SequenceDataModule(
            name=name, source=BenchmarkSource(name, str(mirror)), data_dir=str(data_dir), max_len=50
        )
        dm.prepare_data()
        dm.setup()
        batch = next(iter(dm.train_dataloader()))
        assert batch["seq"].dtype == torch.long and batch["seq"].shape[0] == 512
        assert batch["seq"].shape[1] <= 50
        assert bool((batch["seq"][:, -1] > 0).all())  # most recent item last, never padding
        assert dm.num_items == EXPECTED[name][1]


def test_bucketing_cuts_padding_on_toys(data_dir: Path, mirror: Path) -> None:
    dm = SequenceDataModule(name="toys", source=toys(mirror), data_dir=str(data_dir))
    dm.setup()
    bucketed = dm.padding_fraction("train")
    dm.bucketing = False
    plain = dm.padding_fraction("train")
    assert plain > 0.8  # most positions of a naive batch are padding on Toys
    assert bucketed < 0.2


# -- samples from a hand-written store ------------------------------------------------------
def test_prefixes_and_eval_samples_exact(tmp_path: Path) -> None:
    # user 0: train 1 2 3 | val 4 | test 5 ; user 1: train 6 | val 7 | test 8
    store = load_store(tiny_cache(tmp_path, [[1, 2, 3, 4, 5], [6, 7, 8]], num_items=8))
    train = train_prefixes(store, max_len=2)
    batch = train.__getitems__(list(range(len(train))))
    assert batch["seq"].tolist() == [[0, 1], [1, 2]]  # (1)->2, (1,2)->3; user 1 has none
    assert batch["target"].tolist() == [2, 3]
    assert batch["user"].tolist() == [0, 0]
    val = eval_samples(store, "val", max_len=2).__getitems__([0, 1])
    assert val["seq"].tolist() == [[2, 3], [0, 6]] and val["target"].tolist() == [4, 7]
    test = eval_samples(store, "test", max_len=5).__getitems__([1, 0])
    assert test["seq"].tolist() == [[0, 6, 7], [1, 2, 3, 4]] or test["seq"].shape[1] == 4
    assert test["seq"].tolist() == [[0, 0, 6, 7], [1, 2, 3, 4]]
    assert test["target"].tolist() == [8, 5]


def test_sequence_samples_exact(tmp_path: Path) -> None:
    # user 0: train 1 2 3 4 | val 5 | test 6 ; user 1: train 6 (no pair) ; user 2: train 1 2
    store = load_store(tiny_cache(tmp_path, [[1, 2, 3, 4, 5, 6], [6, 7, 8], [1, 2, 3, 4]], 8))
    train = train_sequences(store, max_len=5)
    assert len(train) == 2 and train.users.tolist() == [0, 2]
    batch = train.__getitems__([0, 1])
    assert batch["seq"].tolist() == [[1, 2, 3], [0, 0, 1]]  # left-padded to the batch
    assert batch["target"].tolist() == [[2, 3, 4], [0, 0, 2]]  # next item, 0 under padding
    assert batch["user"].tolist() == [0, 2]
    short = train_sequences(store, max_len=2).__getitems__([0])
    assert short["seq"].tolist() == [[2, 3]] and short["target"].tolist() == [[3, 4]]
    # refit: the validation item becomes the last target; user 1 gains its first pair
    refit = train_sequences(store, max_len=5, extra_items=1)
    batch = refit.__getitems__(list(range(len(refit))))
    assert batch["seq"].tolist() == [[1, 2, 3, 4], [0, 0, 0, 6], [0, 0, 1, 2]]
    assert batch["target"].tolist() == [[2, 3, 4, 5], [0, 0, 0, 7], [0, 0, 2, 3]]
    prefixes = train_prefixes(store, max_len=5, extra_items=1)
    pairs = prefixes.__getitems__(list(range(len(prefixes))))
    assert len(prefixes) == 4 + 1 + 2 and 5 in pairs["target"].tolist()
    with pytest.raises(ConfigError, match="prefixes, sequences"):
        train_samples(store, "windows", max_len=5)


def test_sequences_hold_the_prefix_pairs_on_toys(data_dir: Path, mirror: Path) -> None:
    """Without truncation every (history, next item) pair of the prefixes is one position."""
    store = load_store(prepare_benchmark("toys", data_dir, mirror))
    longest = int(store.lengths.max())
    sequences = train_sequences(store, max_len=longest)
    batch = sequences.__getitems__(list(range(len(sequences))))
    assert int((batch["target"] > 0).sum()) == store.num_train_prefixes
    assert bool(((batch["target"] > 0) == (batch["seq"] > 0)).all())
    truncated = train_sequences(store, max_len=50)
    assert (truncated.lengths <= 50).all() and len(truncated) == len(sequences)


def test_datamodule_train_samples_and_protocol_options(
    tmp_path: Path, data_dir: Path, mirror: Path
) -> None:
    dm = SequenceDataModule(
        name="toys", source=toys(mirror), data_dir=str(data_dir), train_samples="sequences"
    )
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["target"].shape == batch["seq"].shape  # a target per position
    assert len(dm.dataset("train")) == int((load_store(dm.cache_dir).lengths >= 4).sum())
    for key, value in (("train_samples", "windows"), ("protocol", "leave-one-out")):
        with pytest.raises(ConfigError, match=f"data.{key} must be one of"):
            SequenceDataModule(name="toys", source=toys(), data_dir=str(tmp_path), **{key: value})


def test_refit_training_set_and_unchanged_test_inputs(data_dir: Path, mirror: Path) -> None:
    options = {"name": "toys", "source": toys(mirror), "data_dir": str(data_dir)}
    standard = SequenceDataModule(**options)
    refit = SequenceDataModule(**options, protocol="refit")
    standard.setup()
    refit.setup()
    users_with_val = int((standard.store.lengths >= 3).sum())  # every user has a validation item
    assert users_with_val == EXPECTED["toys"][0]
    assert len(refit.dataset("train")) == len(standard.dataset("train")) + users_with_val

    # The added samples are exactly the (training sequence -> validation item) pairs.
    def pairs(dataset) -> set[tuple[int, int]]:
        return set(zip(dataset.ends.tolist(), dataset.users.tolist(), strict=True))

    added = pairs(refit.dataset("train")) - pairs(standard.dataset("train"))
    assert added == pairs(standard.dataset("val"))
    every = list(range(len(standard.dataset("test"))))
    for key in ("seq", "target", "user"):
        assert torch.equal(
            standard.dataset("test").__getitems__(every)[key],
            refit.dataset("test").__getitems__(every)[key],
        )
    with pytest.raises(ConfigError, match="no validation"):
        refit.val_dataloader()


def test_max_len_must_be_positive(tmp_path: Path) -> None:
    store = load_store(tiny_cache(tmp_path, [[1, 2, 3]], num_items=3))
    with pytest.raises(ConfigError, match="max_len must be >= 1"):
        train_prefixes(store, max_len=0)
    with pytest.raises(ConfigError, match="max_len must be an integer >= 1"):
        SequenceDataModule(name="toys", source=toys(), data_dir=str(tmp_path), max_len=0)


def test_write_cache_rejects_bad_sequences_and_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="out of range 1..3"):
        tiny_cache(tmp_path, [[1, 2, 4]], num_items=3)
    with pytest.raises(DataError, match="at least 3"):
        tiny_cache(tmp_path, [[1, 2]], num_items=3)
    assert list(tmp_path.iterdir()) == []


def test_arrays_are_rebuilt_from_parquet(tmp_path: Path) -> None:
    cache = tiny_cache(tmp_path, [[1, 2, 3, 4], [2, 3, 1]], num_items=4)
    (cache / "items.npy").unlink()
    assert load_store(cache).sequence(1).tolist() == [2, 3, 1]


# -- batching ------------------------------------------------------------------------------
def test_train_sampler_is_deterministic_and_complete() -> None:
    lengths = np.random.default_rng(0).integers(1, 50, size=1000)
    sampler = TrainBatchSampler(lengths, 64, seed=3)
    first = list(sampler)
    assert first == list(TrainBatchSampler(lengths, 64, seed=3))
    assert sorted(i for batch in first for i in batch) == list(range(1000))
    sampler.set_epoch(1)
    assert list(sampler) != first  # a new order every epoch
    spread = [np.ptp(lengths[b]) for b in first]
    assert np.mean(spread) < 5  # bucketing groups similar lengths


def test_train_sampler_shards_equal_steps_per_rank() -> None:
    lengths = np.arange(1, 1001)
    shards = [
        list(TrainBatchSampler(lengths, 64, seed=0, num_replicas=3, rank=r)) for r in range(3)
    ]
    assert (
        len({len(s) for s in shards})
        == 1
        == len(
            {len(TrainBatchSampler(lengths, 64, seed=0, num_replicas=3, rank=r)) for r in range(3)}
        )
    )
    seen = [i for shard in shards for batch in shard for i in batch]
    assert len(seen) == len(set(seen))


def test_eval_sampler_gives_every_user_to_exactly_one_rank() -> None:
    lengths = np.random.default_rng(1).integers(1, 30, size=101)
    shards = [list(EvalBatchSampler(lengths, 10, num_replicas=2, rank=r)) for r in range(2)]
    seen = sorted(i for shard in shards for batch in shard for i in batch)
    assert seen == list(range(101))  # no user dropped, none duplicated


def test_removed_cache_copy_is_prepared_again(tmp_path: Path, mirror: Path) -> None:
    cache = prepare_benchmark("beauty", tmp_path, mirror)
    shutil.rmtree(cache)
    assert load_store(prepare_benchmark("beauty", tmp_path, mirror)).num_users == 22_363


def test_sources_keep_the_cache_folders_of_before(tmp_path: Path) -> None:
    """The cache keys of the flat data config that came before data.source: existing caches
    stay valid."""
    clicks = tmp_path / "clicks.csv"
    clicks.write_text("user_id,item_id,timestamp\n")
    stat = clicks.stat()
    options = {"format": "auto", "user_col": "user_id", "item_col": "item_id",
               "time_col": "timestamp", "rating_col": None, "min_rating": None,
               "separator": None, "k_core": 5}  # fmt: skip
    key = {
        **options,
        "path": str(clicks.resolve()),
        "size": stat.st_size,
        "mtime": stat.st_mtime_ns,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    assert FileSource(str(clicks)).cache_dir(tmp_path) == tmp_path / f"custom-clicks-{digest}"
    cache = SyntheticSource(num_users=30, num_items=20, seed=2).prepare(tmp_path)
    assert cache == tmp_path / "synthetic-u30-i20-s2"


def test_data_configs_saved_before_sources_still_load() -> None:
    old = {"_target_": "diffurec_lightning.data.datamodule.SequenceDataModule", "max_len": 50}
    toys = legacy_data_config({**old, "name": "toys", "mirror": "/m"})
    assert toys["source"] == {
        "_target_": "diffurec_lightning.data.sources.BenchmarkSource", "name": "toys",
        "mirror": "/m",
    }  # fmt: skip
    assert "mirror" not in toys and toys["max_len"] == 50
    custom = legacy_data_config({**old, "name": "custom", "path": "x.csv", "k_core": 3})
    assert instantiate(custom["source"]) == FileSource("x.csv", k_core=3)
    synthetic = legacy_data_config(
        {**old, "name": "synthetic", "num_items": 9, "synthetic_seed": 4}
    )
    assert instantiate(synthetic["source"]) == SyntheticSource(num_items=9, seed=4)
    assert legacy_data_config(toys) == toys  # already in the new form
