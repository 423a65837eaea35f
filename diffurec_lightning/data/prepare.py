"""Turn a data config into a prepared cache folder (benchmark download or user import)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from diffurec_lightning.data.benchmarks import BENCHMARKS, convert_pickle, prepare_benchmark
from diffurec_lightning.data.store import is_cached
from diffurec_lightning.errors import DataError, DiffuRecError

# Options of a user import that change its result; they key the cache folder.
_IMPORT_KEYS = (
    "format", "user_col", "item_col", "time_col", "rating_col", "min_rating", "separator", "k_core",
)  # fmt: skip


def _custom_cache_dir(data_cfg: Mapping[str, Any], data_dir: Path, path: Path) -> Path:
    stat = path.stat()
    key = {k: data_cfg.get(k) for k in _IMPORT_KEYS}
    key.update(path=str(path.resolve()), size=stat.st_size, mtime=stat.st_mtime_ns)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return data_dir / f"custom-{path.stem}-{digest}"


def prepare_dataset(data_cfg: Mapping[str, Any], data_dir: str | Path, force: bool = False) -> Path:
    """Prepare the dataset a ``data`` config describes and return its cache folder."""
    data_dir = Path(data_dir)
    name = data_cfg.get("name")
    if name in BENCHMARKS:
        return prepare_benchmark(name, data_dir, data_cfg.get("mirror"), force=force)
    if name == "synthetic":
        from diffurec_lightning.data.synthetic import prepare_synthetic

        return prepare_synthetic(
            data_dir,
            num_users=int(data_cfg.get("num_users", 400)),
            num_items=int(data_cfg.get("num_items", 60)),
            seed=int(data_cfg.get("synthetic_seed", 0)),
        )
    if name != "custom":
        raise DataError(
            f"unknown dataset '{name}'; choose one of: {', '.join(BENCHMARKS)}, custom "
            "(custom needs data.path=<your file>)"
        )
    raw = data_cfg.get("path")
    if not raw or raw == "???":
        raise DataError("data=custom needs data.path=<file> (CSV/TSV/Parquet/.inter/.dat or .pkl)")
    path = Path(raw).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: file not found; check data.path")
    cache_dir = _custom_cache_dir(data_cfg, data_dir, path)
    if not force and is_cached(cache_dir):
        return cache_dir
    if path.suffix in (".pkl", ".pickle"):
        # A DiffuRec-format pickle of the user's own: no known checksum, so it is checked
        # structurally by the conversion (keys, types, id ranges, users in every split).
        return convert_pickle(path, cache_dir, name=path.stem)
    from diffurec_lightning.data.importers import import_interactions

    options = {k: data_cfg[k] for k in _IMPORT_KEYS if k in data_cfg}
    return import_interactions(path, cache_dir, name=path.stem, **options)


def main(argv: list[str] | None = None) -> int:
    """``python -m diffurec_lightning.data.prepare data=toys`` (any Hydra overrides of train.yaml)."""
    import sys

    from diffurec_lightning.cli import check_overrides

    overrides = sys.argv[1:] if argv is None else argv
    force = "force=true" in overrides
    try:
        cfg = check_overrides([o for o in overrides if o != "force=true"])
        cache_dir = prepare_dataset(cfg.data, cfg.paths.data_dir, force=force)
    except DiffuRecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from diffurec_lightning.data.store import read_meta

    meta = read_meta(cache_dir)
    print(
        f"{meta['name']}: {meta['num_users']:,} users, {meta['num_items']:,} items, "
        f"{meta['num_interactions']:,} interactions, {meta['num_train_prefixes']:,} training "
        f"prefixes -> {cache_dir}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
