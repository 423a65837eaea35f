"""The published benchmark datasets: where they live, their checksums, and their conversion.

The files are the DiffuRec repository's preprocessed pickles (5-core, chronological
leave-one-out). They are fetched from GitHub, or copied from a local mirror folder laid out like
``<mirror>/<name>/dataset.pkl`` (the ``DIFFUREC_DATA_MIRROR`` variable or ``data.source.mirror``), then
checked against the SHA-256 below before the restricted unpickler ever sees them.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from diffurec_lightning.data.safe_pickle import safe_load
from diffurec_lightning.data.store import is_cached, read_meta, write_cache
from diffurec_lightning.errors import DataError
from diffurec_lightning.io import copy_file, sha256_file, write_atomic

MIRROR_ENV = "DIFFUREC_DATA_MIRROR"
_REPO = "https://github.com/WHUIR/DiffuRec/raw/main/datasets/data"


@dataclass(frozen=True)
class Benchmark:
    name: str
    url: str
    sha256: str


BENCHMARKS: dict[str, Benchmark] = {
    "toys": Benchmark(
        "toys",
        f"{_REPO}/toys/dataset.pkl",
        "e6e8f7f188326a3370749055e2a736fbd16ac036f42fe051ebd8eb891ff7bd4a",
    ),
    "beauty": Benchmark(
        "beauty",
        f"{_REPO}/amazon_beauty/dataset.pkl",
        "1d5ba224ff02584bcde37d3dd9fd3191d440829e7fcb7fe42dcfd313dd2144cb",
    ),
    "ml-1m": Benchmark(
        "ml-1m",
        f"{_REPO}/ml-1m/dataset.pkl",
        "24517f75352c088e6163b0f1a1d61932390c08d837e191e02d09d1d35dc63ea4",
    ),
}


def get_benchmark(name: str) -> Benchmark:
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise DataError(
            f"unknown dataset '{name}'; choose one of: {', '.join(BENCHMARKS)} "
            "(or data=custom data.source.path=<your file>)"
        ) from None


def _verify(path: Path, expected: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise DataError(
            f"{path}: wrong SHA-256 {actual[:12]}… (expected {expected[:12]}…); the file is "
            "corrupt or not the published one: delete it and download it again"
        )


def _download(url: str, target: Path) -> None:
    """Stream ``url`` to ``target`` with a progress bar; the file appears only when complete."""
    from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

    def stream(tmp: str) -> None:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with Progress(
                *Progress.get_default_columns(), DownloadColumn(), TransferSpeedColumn()
            ) as bar:
                task = bar.add_task(f"download {target.parent.name}", total=total)
                for block in iter(lambda: response.read(1 << 16), b""):
                    out.write(block)
                    bar.advance(task, len(block))

    try:
        write_atomic(target, stream, suffix=".part")
    except (urllib.error.URLError, OSError) as exc:
        raise DataError(
            f"could not download {url} ({exc}); when offline, set {MIRROR_ENV} to a folder "
            "holding <name>/dataset.pkl (e.g. ../shared/data)"
        ) from None


def fetch_raw(name: str, raw_dir: Path, mirror: str | Path | None = None) -> Path:
    """Return a verified local copy of a benchmark pickle: cached, mirrored, or downloaded."""
    bench = get_benchmark(name)
    target = Path(raw_dir) / name / "dataset.pkl"
    if target.is_file():
        try:
            _verify(target, bench.sha256)
            return target
        except DataError:
            target.unlink()  # a stale or damaged copy: fetch it afresh below
    mirror = mirror or os.environ.get(MIRROR_ENV)
    if mirror:
        source = Path(mirror) / name / "dataset.pkl"
        if not source.is_file():
            raise DataError(
                f"{source}: not found in the data mirror; the mirror folder must hold "
                f"{name}/dataset.pkl (unset {MIRROR_ENV} to download instead)"
            )
        _verify(source, bench.sha256)
        copy_file(source, target)
    else:
        _download(bench.url, target)
    try:
        _verify(target, bench.sha256)
    except DataError:
        target.unlink(missing_ok=True)
        raise
    return target


def diffurec_pickle_to_frames(data: Any, source: str) -> tuple[pl.DataFrame, list[str], list[str]]:
    """Check a DiffuRec-format dict structurally and turn it into (sequences, user_ids, item_ids).

    The format: train/val/test map user index -> item list (val and test one item each),
    umap original user id -> user index, smap original item id -> item id (1..N).
    """
    if not isinstance(data, dict):
        raise DataError(f"{source}: expected a dict with keys train/val/test/umap/smap")
    missing = [key for key in ("train", "val", "test", "umap", "smap") if key not in data]
    if missing:
        raise DataError(f"{source}: missing key(s) {missing}; expected train/val/test/umap/smap")
    for key in ("train", "val", "test", "umap", "smap"):
        if not isinstance(data[key], dict):
            raise DataError(f"{source}: '{key}' must be a dict, found {type(data[key]).__name__}")
    train, val, test, umap, smap = (data[k] for k in ("train", "val", "test", "umap", "smap"))
    num_users = len(umap)
    if sorted(umap.values()) != list(range(num_users)):
        raise DataError(f"{source}: umap values must be the user indices 0..{num_users - 1}")
    num_items = len(smap)
    if sorted(smap.values()) != list(range(1, num_items + 1)):
        raise DataError(f"{source}: smap values must be the item ids 1..{num_items}")
    sequences = []
    for user in range(num_users):
        parts = []
        for key, store in (("train", train), ("val", val), ("test", test)):
            items = store.get(user)
            if items is None:
                raise DataError(f"{source}: user {user} is missing from '{key}'")
            if not isinstance(items, list) or not all(type(i) is int for i in items):
                raise DataError(f"{source}: '{key}'[{user}] must be a list of ints")
            if key != "train" and len(items) != 1:
                raise DataError(f"{source}: '{key}'[{user}] must hold exactly one item")
            parts.extend(items)
        sequences.append(parts)
    extra = set(train) | set(val) | set(test)
    if len(extra) != num_users:
        raise DataError(f"{source}: train/val/test hold users that umap does not list")
    inverse_users = {index: str(original) for original, index in umap.items()}
    inverse_items = {index: str(original) for original, index in smap.items()}
    frame = pl.DataFrame(
        {"user": list(range(num_users)), "items": sequences},
        schema={"user": pl.Int32, "items": pl.List(pl.Int32)},
    )
    return (
        frame,
        [inverse_users[u] for u in range(num_users)],
        [inverse_items[i] for i in range(1, num_items + 1)],
    )


def convert_pickle(
    pickle_path: Path, cache_dir: Path, name: str, sha256: str | None = None
) -> Path:
    """Safely unpickle a DiffuRec-format file and write it as a dataset cache."""
    data = safe_load(pickle_path)
    frame, user_ids, item_ids = diffurec_pickle_to_frames(data, str(pickle_path))
    meta = {
        "name": name,
        "source": str(pickle_path),
        "source_sha256": sha256 or sha256_file(pickle_path),
    }
    return write_cache(cache_dir, frame, user_ids, item_ids, meta)


def prepare_benchmark(
    name: str, cache_root: str | Path, mirror: str | Path | None = None, force: bool = False
) -> Path:
    """Make sure ``<cache_root>/<name>`` holds the prepared benchmark; return that folder."""
    bench = get_benchmark(name)
    cache_dir = Path(cache_root) / name
    if (
        not force
        and is_cached(cache_dir)
        and read_meta(cache_dir).get("source_sha256") == bench.sha256
    ):
        return cache_dir
    raw = fetch_raw(name, Path(cache_root) / "raw", mirror)
    return convert_pickle(raw, cache_dir, name, bench.sha256)
