"""Damaged caches, killed imports and the files others read: checked, cleaned, valid.

Faults are injected into real files: a truncated items.npy, a flipped byte in
sequences.parquet, SIGTERM and SIGKILL sent to a real import in a subprocess.
"""

from __future__ import annotations

import json
import math
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from diffurec_lightning.config import run_key
from diffurec_lightning.data.batching import EvalBatchSampler
from diffurec_lightning.data.scratch import stale_scratch
from diffurec_lightning.data.store import is_cached, load_store, read_meta
from diffurec_lightning.data.synthetic import prepare_synthetic
from diffurec_lightning.errors import ConfigError, DataError
from diffurec_lightning.io import write_json

FILES = ("sequences.parquet", "user_ids.parquet", "item_ids.parquet", "items.npy", "offsets.npy")


def fresh_cache(tmp_path: Path) -> tuple[Path, list[list[int]]]:
    cache = prepare_synthetic(tmp_path, num_users=50, num_items=20)
    return cache, pl.read_parquet(cache / "sequences.parquet")["items"].to_list()


def test_meta_records_size_and_checksum_of_every_file(tmp_path: Path) -> None:
    cache, _ = fresh_cache(tmp_path)
    files = read_meta(cache)["files"]
    assert sorted(files) == sorted(FILES)
    for name in FILES:
        assert files[name]["size"] == (cache / name).stat().st_size
        assert len(files[name]["sha256"]) == 64


def test_truncated_items_npy_is_rebuilt_from_parquet(tmp_path: Path) -> None:
    cache, sequences = fresh_cache(tmp_path)
    items = cache / "items.npy"
    items.write_bytes(items.read_bytes()[:100])  # np.load alone would raise a ValueError
    store = load_store(cache)
    assert [store.sequence(u).tolist() for u in range(store.num_users)] == sequences
    assert items.stat().st_size == read_meta(cache)["files"]["items.npy"]["size"]


def test_corrupt_parquet_is_refused_then_rebuilt_by_prepare(tmp_path: Path) -> None:
    cache, sequences = fresh_cache(tmp_path)
    parquet = cache / "sequences.parquet"
    data = bytearray(parquet.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte off: only the checksum sees it
    parquet.write_bytes(bytes(data))
    assert not is_cached(cache)
    with pytest.raises(DataError, match=r"sequences.parquet damaged .* force=true"):
        load_store(cache)
    assert prepare_synthetic(tmp_path, num_users=50, num_items=20) == cache  # rebuilt
    store = load_store(cache)
    assert [store.sequence(u).tolist() for u in range(store.num_users)] == sequences


def test_a_cache_of_the_old_format_is_rebuilt(tmp_path: Path) -> None:
    cache, _ = fresh_cache(tmp_path)
    meta = read_meta(cache)
    del meta["files"]
    meta["format_version"] = 1
    (cache / "meta.json").write_text(json.dumps(meta))
    assert not is_cached(cache)
    prepare_synthetic(tmp_path, num_users=50, num_items=20)
    assert is_cached(cache)


# -- killed imports --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clicks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An interaction file large enough that its import takes a while (about 2 s)."""
    rng = np.random.default_rng(0)
    n = 1_500_000
    path = tmp_path_factory.mktemp("raw") / "clicks.csv"
    pl.DataFrame(
        {
            "user_id": rng.integers(0, 60_000, n),
            "item_id": rng.integers(0, 8_000, n),
            "timestamp": rng.integers(0, 10**9, n),
        }
    ).write_csv(path)
    return path


def start_import(clicks: Path, data_dir: Path) -> subprocess.Popen:
    argv = [sys.executable, "-m", "diffurec_lightning.data.prepare", "data=custom"]
    argv += [f"data.source.path={clicks}", f"paths.data_dir={data_dir}"]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def scratch(data_dir: Path) -> list[Path]:
    return [p for p in data_dir.iterdir() if p.name.startswith(".")] if data_dir.is_dir() else []


def wait_for_scratch(process: subprocess.Popen, data_dir: Path) -> None:
    deadline = time.monotonic() + 120
    while not scratch(data_dir) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert process.poll() is None and scratch(data_dir), "the import ended before the signal"
    time.sleep(0.2)  # staging under way


def test_sigterm_during_an_import_leaves_nothing(clicks: Path, tmp_path: Path) -> None:
    process = start_import(clicks, tmp_path)
    wait_for_scratch(process, tmp_path)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert list(tmp_path.iterdir()) == []  # no scratch folder, no half-written cache


@pytest.mark.slow  # make test-all: a real run, long on 2 cores
def test_sigkill_leftovers_are_removed_by_the_next_import(clicks: Path, tmp_path: Path) -> None:
    process = start_import(clicks, tmp_path)
    wait_for_scratch(process, tmp_path)
    process.kill()
    process.wait()
    (left,) = scratch(tmp_path)
    assert stale_scratch(tmp_path) == [left]  # its process is gone
    done = start_import(clicks, tmp_path)
    _, stderr = done.communicate(timeout=240)
    assert done.returncode == 0, stderr[-2000:]
    assert scratch(tmp_path) == []
    (cache,) = tmp_path.iterdir()
    assert is_cached(cache)


# -- outputs -------------------------------------------------------------------------------
def test_json_outputs_are_valid_and_readable_by_others(tmp_path: Path) -> None:
    path = write_json(tmp_path / "case_studies.json", {"empty": {"hr@10": math.nan}, "x": [1.0]})
    text = path.read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c}")) == {
        "empty": {"hr@10": None},
        "x": [1.0],
    }
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644


def test_run_folders_are_keyed_on_the_scheduler_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("WANDB_RUN_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_ID"):
        monkeypatch.delenv(key, raising=False)
    assert run_key() == ""
    monkeypatch.setenv("SLURM_JOB_ID", "1207")
    assert run_key() == "_1207"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "1200")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    assert run_key() == "_1200_7"
    monkeypatch.setenv("WANDB_RUN_ID", "ab12cd")
    assert run_key() == "_ab12cd"
    from hydra import compose, initialize_config_dir

    from diffurec_lightning.config import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", return_hydra_config=True)
    assert str(cfg.hydra.run.dir).endswith("_toys_diffurecsys_ab12cd")


# -- more ranks than evaluation batches ------------------------------------------------------
@pytest.mark.parametrize(("users", "ranks"), [(400, 3), (9, 4), (5, 5), (1000, 2)])
def test_every_rank_gets_an_evaluation_batch(users: int, ranks: int) -> None:
    lengths = np.random.default_rng(0).integers(1, 50, users)
    shards = [
        list(EvalBatchSampler(lengths, 512, num_replicas=ranks, rank=rank)) for rank in range(ranks)
    ]
    assert all(shards), "a rank without batches never joins the evaluation's collectives"
    users_seen = sorted(u for shard in shards for batch in shard for u in batch)
    assert users_seen == list(range(users))  # each user exactly once


def test_more_ranks_than_users_is_refused() -> None:
    with pytest.raises(ConfigError, match="3 evaluation users for 4 ranks"):
        EvalBatchSampler(np.ones(3), 512, num_replicas=4, rank=0)
