"""Where a dataset comes from, as config objects (``data.source``): a published benchmark, the
user's own interaction file, or generated sequences.

Each source turns into a prepared cache folder with ``prepare(data_dir, force) -> Path``; its
fields are exactly the settings that change the prepared data, so a misspelt key is an error
at instantiation instead of being ignored. The cache folders are the ones the data layer has
always used (``<data_dir>/<benchmark>``, ``custom-<stem>-<digest>``,
``synthetic-u<U>-i<N>-s<seed>``), so existing caches stay valid.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from diffurec_lightning.data.benchmarks import convert_pickle, get_benchmark, prepare_benchmark
from diffurec_lightning.data.store import is_cached
from diffurec_lightning.errors import DataError


class DataSource(Protocol):
    def prepare(self, data_dir: str | Path, force: bool = False) -> Path:
        """The prepared cache folder under ``data_dir`` (built unless cached, or when forced)."""
        ...


@dataclass(frozen=True)
class BenchmarkSource:
    """One of DiffuRec's preprocessed benchmark files (checksum-verified before unpickling)."""

    name: str
    mirror: str | None = None  # a folder with <name>/dataset.pkl, used instead of downloading

    def __post_init__(self) -> None:
        get_benchmark(self.name)  # one line listing the benchmarks for an unknown name

    def prepare(self, data_dir: str | Path, force: bool = False) -> Path:
        return prepare_benchmark(self.name, data_dir, self.mirror, force=force)


@dataclass(frozen=True)
class FileSource:
    """The user's own interaction file (docs/data-import.md), imported once into the cache.

    Every field but ``path`` is an import option; together with the file's path, size and
    modification time they key the cache folder.
    """

    path: str
    format: str = "auto"
    user_col: str = "user_id"
    item_col: str = "item_id"
    time_col: str | None = "timestamp"
    rating_col: str | None = None
    min_rating: float | None = None
    separator: str | None = None
    k_core: int = 5

    def options(self) -> dict[str, Any]:
        """The import options (every field but ``path``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "path"}

    def file(self) -> Path:
        if not self.path or self.path == "???":
            raise DataError(
                "data=custom needs data.source.path=<file> (CSV/TSV/Parquet/.inter/.dat or .pkl)"
            )
        path = Path(self.path).expanduser()
        if not path.is_file():
            raise DataError(f"{path}: file not found; check data.source.path")
        return path

    def cache_dir(self, data_dir: str | Path) -> Path:
        path = self.file()
        stat = path.stat()
        key = {**self.options(), "path": str(path.resolve())}
        key.update(size=stat.st_size, mtime=stat.st_mtime_ns)
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
        return Path(data_dir) / f"custom-{path.stem}-{digest}"

    def prepare(self, data_dir: str | Path, force: bool = False) -> Path:
        path, cache_dir = self.file(), self.cache_dir(data_dir)
        if not force and is_cached(cache_dir):
            return cache_dir
        if path.suffix in (".pkl", ".pickle"):
            # A DiffuRec-format pickle of the user's own: no known checksum, so it is checked
            # structurally by the conversion (keys, types, id ranges, users in every split).
            return convert_pickle(path, cache_dir, name=path.stem)
        from diffurec_lightning.data.importers import import_interactions

        return import_interactions(path, cache_dir, name=path.stem, **self.options())


@dataclass(frozen=True)
class SyntheticSource:
    """Generated sequences with a deterministic next-item rule (data/synthetic.py)."""

    num_users: int = 400
    num_items: int = 60
    seed: int = 0

    def prepare(self, data_dir: str | Path, force: bool = False) -> Path:
        from diffurec_lightning.data.synthetic import prepare_synthetic

        return prepare_synthetic(
            Path(data_dir), self.num_users, self.num_items, self.seed, force=force
        )


def legacy_data_config(data: dict[str, Any]) -> dict[str, Any]:
    """A ``data`` config saved before ``data.source`` existed (flat ``name``, ``mirror``,
    ``path``, import options, ``num_users``...), rewritten with its source; others unchanged.
    Runs saved then can still be evaluated."""
    if "source" in data or "name" not in data:
        return data
    data = dict(data)
    name = data["name"]
    if name == "synthetic":
        keys = {"num_users": "num_users", "num_items": "num_items", "synthetic_seed": "seed"}
        source = {new: data.pop(old) for old, new in keys.items() if old in data}
        target = SyntheticSource
    elif name == "custom":
        fields = [f.name for f in dataclasses.fields(FileSource)]
        source = {key: data.pop(key) for key in fields if key in data}
        target = FileSource
    else:
        source = {"name": name, "mirror": data.pop("mirror", None)}
        target = BenchmarkSource
    data.pop("mirror", None)
    data["source"] = {"_target_": f"{target.__module__}.{target.__qualname__}", **source}
    return data
