"""The prepared-dataset cache: one folder per dataset, written atomically, read memory-mapped.

Every dataset, benchmark or user-imported, ends up in the same format::

    <cache_dir>/
      meta.json           name, counts, source and its checksum, format version, and the
                          size and sha256 of every other file (checked on every load)
      sequences.parquet   user (int32, 0..U-1), items (list[int32]): the full chronological
                          sequence; its last item is the test target, the one before the
                          validation target, the rest is training history
      user_ids.parquet    user (int32), original_id (str)
      item_ids.parquet    item (int32, 1..N), original_id (str)
      items.npy           all sequences concatenated (int32), memory-mappable
      offsets.npy         (U + 1,) int64 start of each user's sequence in items.npy

The parquet files are the portable record; the two .npy files are the compact store that the
DataModule memory-maps, so no padded matrix of prefixes is ever materialised.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from diffurec_lightning.data.scratch import scratch_dir
from diffurec_lightning.errors import DataError
from diffurec_lightning.io import sha256_file, write_atomic

CACHE_FORMAT_VERSION = 2  # 2: meta.json records the size and sha256 of every file
MIN_SEQUENCE_LENGTH = 3  # one training item, the validation item and the test item
_RECORD = ("sequences.parquet", "user_ids.parquet", "item_ids.parquet")  # the portable record
_ARRAYS = ("items.npy", "offsets.npy")  # derived from sequences.parquet, rebuilt when damaged
_FILES = ("meta.json", *_RECORD)


@dataclass(frozen=True)
class SequenceStore:
    """Full user sequences as a flat item array plus offsets (user u owns items[offsets[u]:offsets[u+1]])."""

    items: np.ndarray
    offsets: np.ndarray
    num_items: int

    @property
    def num_users(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def num_train_prefixes(self) -> int:
        """Training samples: a training history of m items gives m - 1 (prefix, next item) pairs."""
        return int(np.maximum(self.lengths - 3, 0).sum())

    def sequence(self, user: int) -> np.ndarray:
        return self.items[self.offsets[user] : self.offsets[user + 1]]


def validate_sequences(sequences: pl.DataFrame, num_items: int, source: str) -> np.ndarray:
    """Check the invariants every cached dataset keeps; raise a one-line DataError otherwise.

    Returns the flattened item ids (all users' sequences, in order), which the check needs anyway.
    """
    missing = {"user", "items"} - set(sequences.columns)
    if missing:
        raise DataError(
            f"{source}: missing column(s) {sorted(missing)}; expected 'user' and 'items'"
        )
    num_users = sequences.height
    if num_users == 0:
        raise DataError(f"{source}: no users left; check the input file and the filtering settings")
    users = sequences["user"].to_numpy()
    if not np.array_equal(users, np.arange(num_users)):
        raise DataError(f"{source}: user indices must be 0..{num_users - 1} in order")
    lengths = sequences["items"].list.len().to_numpy()
    short = np.flatnonzero(lengths < MIN_SEQUENCE_LENGTH)
    if len(short):
        raise DataError(
            f"{source}: user {int(short[0])} has {int(lengths[short[0]])} interaction(s); every user "
            f"needs at least {MIN_SEQUENCE_LENGTH} (training, validation and test item)"
        )
    flat = sequences["items"].explode().to_numpy()
    if flat.min() < 1 or flat.max() > num_items:  # only then pay for the mask temporaries
        bad = int(flat[np.flatnonzero((flat < 1) | (flat > num_items))[0]])
        raise DataError(
            f"{source}: item id {bad} is out of range 1..{num_items} (0 is reserved for padding)"
        )
    return flat


def write_cache(
    cache_dir: Path,
    sequences: pl.DataFrame,
    user_ids: list[str] | pl.Series,
    item_ids: list[str] | pl.Series,
    meta: dict[str, Any],
) -> Path:
    """Validate and write a dataset cache atomically: built in a temp folder, then renamed."""
    cache_dir = Path(cache_dir)
    num_items = len(item_ids)
    sequences = sequences.select(
        pl.col("user").cast(pl.Int32), pl.col("items").cast(pl.List(pl.Int32))
    )
    flat = validate_sequences(sequences, num_items, str(cache_dir)).astype(np.int32, copy=False)
    if len(user_ids) != sequences.height:
        raise DataError(f"{cache_dir}: {len(user_ids)} user ids for {sequences.height} users")

    offsets = np.zeros(sequences.height + 1, dtype=np.int64)
    np.cumsum(sequences["items"].list.len().to_numpy(), out=offsets[1:])
    meta = {
        **meta,
        "format_version": CACHE_FORMAT_VERSION,
        "num_users": sequences.height,
        "num_items": num_items,
        "num_interactions": int(offsets[-1]),
        "num_train_prefixes": int(np.maximum(np.diff(offsets) - 3, 0).sum()),
    }

    with scratch_dir(cache_dir.parent, cache_dir.name, "tmp") as tmp:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary shared folder
        sequences.write_parquet(tmp / "sequences.parquet")
        pl.DataFrame(
            {"user": np.arange(sequences.height, dtype=np.int32), "original_id": user_ids},
            schema={"user": pl.Int32, "original_id": pl.String},
        ).write_parquet(tmp / "user_ids.parquet")
        pl.DataFrame(
            {"item": np.arange(1, num_items + 1, dtype=np.int32), "original_id": item_ids},
            schema={"item": pl.Int32, "original_id": pl.String},
        ).write_parquet(tmp / "item_ids.parquet")
        np.save(tmp / "items.npy", flat)
        np.save(tmp / "offsets.npy", offsets)
        meta["files"] = {name: file_record(tmp / name) for name in (*_RECORD, *_ARRAYS)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        if cache_dir.exists():
            shutil.rmtree(cache_dir)
        try:
            os.replace(tmp, cache_dir)  # the scratch folder's cleanup then finds nothing
        except OSError:
            # Another process (a DDP rank) finished the same preparation first: keep its copy.
            if not is_cached(cache_dir):
                raise
    return cache_dir


def file_record(path: Path) -> dict[str, Any]:
    """Size and sha256 of a file, as meta.json records them."""
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def damaged_files(cache_dir: Path, meta: dict[str, Any], names: tuple[str, ...]) -> list[str]:
    """Those of ``names`` that are missing or differ in size or checksum from meta.json."""
    recorded = meta.get("files", {})
    damaged = []
    for name in names:
        path = Path(cache_dir) / name
        expected = recorded.get(name)
        if (
            expected is None
            or not path.is_file()
            or path.stat().st_size != expected["size"]
            or file_record(path)["sha256"] != expected["sha256"]
        ):
            damaged.append(name)
    return damaged


def _meta_or_none(cache_dir: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((Path(cache_dir) / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def is_cached(cache_dir: Path) -> bool:
    """A complete cache of this format whose parquet record is intact (the .npy arrays are
    rebuilt from it by load_store when missing or damaged)."""
    cache_dir = Path(cache_dir)
    meta = _meta_or_none(cache_dir)
    if meta is None or meta.get("format_version") != CACHE_FORMAT_VERSION:
        return False
    return not damaged_files(cache_dir, meta, _RECORD)


def read_meta(cache_dir: Path) -> dict[str, Any]:
    return json.loads((Path(cache_dir) / "meta.json").read_text())


def load_store(cache_dir: Path) -> SequenceStore:
    """Memory-map the compact store of a prepared dataset (checked against meta.json first)."""
    cache_dir = Path(cache_dir)
    if not is_cached(cache_dir):
        meta = _meta_or_none(cache_dir)
        if meta is not None and meta.get("format_version") == CACHE_FORMAT_VERSION:
            damaged = ", ".join(damaged_files(cache_dir, meta, _RECORD))
            raise DataError(
                f"{cache_dir}: {damaged} damaged (size or checksum differs from meta.json); "
                "rebuild the cache with `python -m diffurec_lightning.data.prepare data=<name> "
                "force=true` (or delete the folder)"
            )
        raise DataError(
            f"{cache_dir}: no prepared dataset here; run `make data DATA=<name>` "
            "or `python -m diffurec_lightning.data.prepare <name>` first"
        )
    meta = read_meta(cache_dir)
    if damaged_files(cache_dir, meta, _ARRAYS):
        _rebuild_arrays(cache_dir)
        if damaged_files(cache_dir, meta, _ARRAYS):
            raise DataError(
                f"{cache_dir}: items.npy/offsets.npy rebuilt from sequences.parquet differ from "
                "meta.json; rebuild the cache with force=true"
            )
    items = np.load(cache_dir / "items.npy", mmap_mode="r")
    offsets = np.load(cache_dir / "offsets.npy")
    return SequenceStore(items=items, offsets=offsets, num_items=int(meta["num_items"]))


def _rebuild_arrays(cache_dir: Path) -> None:
    """Regenerate the .npy store from the parquet record (e.g. after copying only parquet files)."""
    sequences = pl.read_parquet(cache_dir / "sequences.parquet")
    offsets = np.zeros(sequences.height + 1, dtype=np.int64)
    np.cumsum(sequences["items"].list.len().to_numpy(), out=offsets[1:])
    for name, array in (
        ("items.npy", sequences["items"].explode().to_numpy().astype(np.int32)),
        ("offsets.npy", offsets),
    ):
        # The .npy suffix: np.save appends one to a file name that lacks it.
        write_atomic(cache_dir / name, lambda tmp, a=array: np.save(tmp, a), suffix=".npy")


def load_sequences(cache_dir: Path) -> pl.DataFrame:
    """The full sequences as a polars frame (user, items)."""
    return pl.read_parquet(Path(cache_dir) / "sequences.parquet")


def load_id_maps(cache_dir: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(user_ids, item_ids) frames mapping dense indices back to the original ids."""
    cache_dir = Path(cache_dir)
    return pl.read_parquet(cache_dir / "user_ids.parquet"), pl.read_parquet(
        cache_dir / "item_ids.parquet"
    )
