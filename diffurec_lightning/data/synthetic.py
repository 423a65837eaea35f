"""A small synthetic dataset with a deterministic next-item rule, for learning tests and demos.

Each user's sequence is a run of consecutive item ids that wraps around: after item i always
comes item i % N + 1. A model that learns the rule ranks the true next item first.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from diffurec_lightning.data.store import is_cached, write_cache


def synthetic_sequences(
    num_users: int = 400, num_items: int = 60, min_len: int = 6, max_len: int = 16, seed: int = 0
) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    sequences = []
    for _ in range(num_users):
        start = int(rng.integers(num_items))
        length = int(rng.integers(min_len, max_len + 1))
        sequences.append([(start + k) % num_items + 1 for k in range(length)])
    return sequences


def prepare_synthetic(
    data_dir: Path, num_users: int = 400, num_items: int = 60, seed: int = 0, force: bool = False
) -> Path:
    cache_dir = Path(data_dir) / f"synthetic-u{num_users}-i{num_items}-s{seed}"
    if not force and is_cached(cache_dir):
        return cache_dir
    sequences = synthetic_sequences(num_users, num_items, seed=seed)
    frame = pl.DataFrame(
        {"user": np.arange(num_users, dtype=np.int32), "items": sequences},
        schema={"user": pl.Int32, "items": pl.List(pl.Int32)},
    )
    meta = {"name": "synthetic", "source": "generated", "source_sha256": None, "seed": seed}
    return write_cache(
        cache_dir,
        frame,
        [str(u) for u in range(num_users)],
        [str(i) for i in range(1, num_items + 1)],
        meta,
    )
