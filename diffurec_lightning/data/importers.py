"""Import a user's raw interaction file into the dataset cache (see docs/data-import.md).

Readers turn each supported format into a LazyFrame with the file's own column names plus a row
index taken at scan time; `import_interactions` then runs the polars pipeline of `preprocess`
and writes the result with `store.write_cache`. Nothing reads the whole file into memory: the raw
file is streamed once into a typed temporary parquet file, which later passes re-scan.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl

from diffurec_lightning.data import preprocess as pp
from diffurec_lightning.data.scratch import scratch_dir
from diffurec_lightning.data.store import MIN_SEQUENCE_LENGTH, write_cache
from diffurec_lightning.errors import DataError
from diffurec_lightning.io import sha256_file

FORMATS = ("csv", "tsv", "parquet", "recbole", "movielens")
SUFFIX_FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".txt": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".inter": "recbole",
    ".dat": "movielens",
}
DEFAULT_SEPARATORS = {"csv": ",", "tsv": "\t", "recbole": "\t", "movielens": "::"}
MOVIELENS_COLUMNS = ("user_id", "item_id", "rating", "timestamp")
TIME_SAMPLE_ROWS = 1000  # rows read up front to decide how the time column is parsed
IDS_PER_SLICE = 250_000  # ids per group-by pass: bounds the per-id hash tables (~100 MB)
SORT_CHUNK_ROWS = 1_000_000  # interactions sorted at once (~50 MB of keys)
MAX_PARTS = 64  # each open partition buffers a few MB while the rows are split by user
HASH_ATTEMPTS = 3
TEMP_COMPRESSION = "lz4"  # intermediate files: written once, read often; zstd costs more CPU
_LINE_SEPARATOR = "\x1f"  # ASCII unit separator: absent from text files, so a line is one field


def resolve_format(path: Path, format: str) -> str:
    """The explicit format, or the one the file suffix implies when format is "auto"."""
    if format == "auto":
        if path.suffix.lower() in SUFFIX_FORMATS:
            return SUFFIX_FORMATS[path.suffix.lower()]
        raise DataError(
            f"{path}: cannot tell the format from the suffix {path.suffix!r}; set data.source.format to "
            f"one of {list(FORMATS)} (known suffixes: {', '.join(SUFFIX_FORMATS)})"
        )
    if format not in FORMATS:
        raise DataError(
            f"{path}: unknown data.source.format {format!r}; use 'auto' or one of {list(FORMATS)}"
        )
    return format


def resolve_separator(path: Path, format: str, separator: str | None) -> str | None:
    """The field separator for a text format; None for parquet."""
    if format == "parquet":
        if separator is not None:
            raise DataError(
                f"{path}: data.source.separator does not apply to parquet files; set it to null"
            )
        return None
    # "\t" typed on a command line arrives as backslash + t.
    separator = DEFAULT_SEPARATORS[format] if separator is None else separator.replace("\\t", "\t")
    if not separator:
        raise DataError(
            f"{path}: data.source.separator is empty; give the character between fields"
        )
    if format != "movielens" and len(separator.encode()) != 1:
        raise DataError(
            f"{path}: data.source.separator {separator!r} must be a single character for {format} files; "
            "use data.source.format=movielens for '::'-style multi-character separators"
        )
    return separator


def _strip_types(names: list[str]) -> list[str]:
    # RecBole atomic headers are "name:type" (user_id:token, rating:float).
    return [name.split(":", 1)[0] for name in names]


def _scan_delimited(
    path: Path, separator: str, rename: Callable[[list[str]], list[str]] | None = None
) -> pl.LazyFrame:
    # Every column is read as text: types are decided per column afterwards, which keeps ids
    # exact (no "007" -> 7) and lets a bad timestamp produce our message, not a parser error.
    return pl.scan_csv(
        path,
        separator=separator,
        infer_schema=False,
        with_column_names=rename,
        row_index_name=pp.ROW,
    )


def _scan_movielens(path: Path, separator: str) -> pl.LazyFrame:
    # polars splits on one byte only, so each line is read as a single field and split on the
    # (possibly multi-character) separator inside the lazy plan.
    lines = pl.scan_csv(
        path,
        has_header=False,
        separator=_LINE_SEPARATOR,
        quote_char=None,
        new_columns=["line"],
        infer_schema=False,
        row_index_name=pp.ROW,
    )
    fields = (
        pl.col("line")
        .str.split_exact(separator, len(MOVIELENS_COLUMNS) - 1)
        .struct.rename_fields(list(MOVIELENS_COLUMNS))
    )
    return lines.select(pl.col(pp.ROW), fields).unnest("line")


def scan_raw(path: Path, format: str, separator: str | None) -> pl.LazyFrame:
    """A lazy scan of a raw file: its own column names (RecBole types stripped) plus the row index."""
    if format == "parquet":
        return pl.scan_parquet(path, row_index_name=pp.ROW)
    if format == "movielens":
        return _scan_movielens(path, separator)
    rename = _strip_types if format == "recbole" else None
    return _scan_delimited(path, separator, rename)


def _read_error(path: Path, format: str, error: Exception) -> DataError:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return DataError(
        f"{path}: cannot read it as a {format} file ({first_line}); check data.source.format and "
        "data.source.separator (text files must be UTF-8)"
    )


def check_columns(
    path: Path, raw: pl.LazyFrame, format: str, wanted: dict[str, str | None]
) -> None:
    """Raise one line naming the missing columns, the ones the file has, and the key to set."""
    try:
        present = [name for name in raw.collect_schema().names() if name != pp.ROW]
    except pl.exceptions.PolarsError as error:
        raise _read_error(path, format, error) from error
    missing = {key: col for key, col in wanted.items() if col is not None and col not in present}
    if missing:
        keys = ", ".join(f"data.source.{key}={col!r}" for key, col in missing.items())
        hint = " (or data.source.time_col=null to keep file order)" if "time_col" in missing else ""
        if len(present) == 1:
            hint += "; only one column was found, so data.source.separator may be wrong"
        raise DataError(
            f"{path}: column(s) {sorted(set(missing.values()))} not found; the file has {present}; "
            f"fix {keys}{hint}"
        )


def _describe_problem(path: Path, row: dict, columns: dict[str, str | None]) -> str:
    where = f"data row {row[pp.ROW] + 1}"
    for key, name in (("user_col", pp.USER), ("item_col", pp.ITEM)):
        if row[name] is None:
            return (
                f"{path}: empty {columns[key]!r} in {where}; every row needs one "
                "(check data.source.separator)"
            )
    if row.get(pp.BAD_TIME) is not None:
        return (
            f"{path}: cannot parse {row[pp.BAD_TIME]!r} in column {columns['time_col']!r} ({where}) "
            "as a timestamp like the first rows; fix the file or set data.source.time_col=null"
        )
    return (
        f"{path}: cannot parse {row[pp.BAD_RATING]!r} in column {columns['rating_col']!r} ({where}) "
        "as a number; fix the file or set data.source.rating_col=null"
    )


def _stage_interactions(
    path: Path, format: str, raw: pl.LazyFrame, columns: dict[str, str | None], out: Path, seed: int
) -> pl.LazyFrame:
    """Stream the raw file once into a typed parquet file and check every value on the way."""
    time_col = columns["time_col"]
    try:
        time_kind = "native"
        if time_col is not None:
            sample = raw.select(time_col).head(TIME_SAMPLE_ROWS).collect().to_series()
            time_kind = pp.infer_time_kind(sample, time_col, str(path))
        staging = pp.select_interactions(raw, **columns, time_kind=time_kind, seed=seed)
        staging.sink_parquet(out, compression=TEMP_COMPRESSION)
        staged = pl.scan_parquet(out)
        problem = pp.first_problem(staged).collect(engine="streaming")
    except pl.exceptions.PolarsError as error:
        raise _read_error(path, format, error) from error
    if problem.height:
        raise DataError(_describe_problem(path, problem.row(0, named=True), columns))
    return staged


def _check_core(path: Path, core: pp.KCore, k_core: int) -> None:
    if core.input_interactions == 0:
        raise DataError(
            f"{path}: no interactions to import; check the file and data.source.min_rating"
        )
    if core.users.height == 0:
        if k_core >= MIN_SEQUENCE_LENGTH:
            reason = f"after {k_core}-core filtering; lower data.source.k_core"
        else:
            reason = f"with the {MIN_SEQUENCE_LENGTH} interactions a leave-one-out split needs"
        raise DataError(
            f"{path}: no users left {reason} (the input had {core.input_interactions} "
            f"interactions of {core.input_users} users and {core.input_items} items)"
        )


def _stage_and_filter(
    path: Path,
    format: str,
    raw: pl.LazyFrame,
    columns: dict[str, str | None],
    work: Path,
    *,
    min_rating: float | None,
    k_core: int,
) -> tuple[pl.LazyFrame, pl.LazyFrame, pp.KCore]:
    """(all staged rows, the rows kept by the rating filter, the k-core of the latter).

    Two different ids sharing a 64-bit key is very unlikely (about 3 in 10^8 with a million
    ids); when it happens, staging again with other hash seeds gives distinct keys.
    """
    for seed in range(0, 4 * HASH_ATTEMPTS, 4):  # each attempt uses seeds seed..seed+3
        out = work / f"staged-{seed}.parquet"
        staged = _stage_interactions(path, format, raw, columns, out, seed)
        interactions = pp.implicit_feedback(staged, min_rating)
        # Leave-one-out needs 3 items per user, so users are held to that even when k-core is
        # off; doing it inside the loop keeps item counts consistent with the remaining users.
        core = pp.iterative_kcore(
            interactions,
            user_min=max(k_core, MIN_SEQUENCE_LENGTH),
            item_min=max(k_core, 1),
            user_slices=pp.num_slices(interactions, pp.USER_KEY, IDS_PER_SLICE),
            item_slices=pp.num_slices(interactions, pp.ITEM_KEY, IDS_PER_SLICE),
        )
        if not core.key_collision:
            _check_core(path, core, k_core)
            return staged, interactions, core
    raise DataError(
        f"{path}: ids kept colliding in {HASH_ATTEMPTS} hash attempts; please report this"
    )


def _original_ids(staged: pl.LazyFrame, table: pl.DataFrame, column: str) -> pl.Series:
    """The id text of each row of `table` (users or items), read at its first kept row."""
    first_rows = table[pp.FIRST_ROW].implode()
    found = staged.select(pp.ROW, column).filter(pl.col(pp.ROW).is_in(first_rows))
    found = found.collect(engine="streaming").sort(pp.ROW)
    return found[column]  # `table` is sorted by FIRST_ROW too, so the rows line up


def _sorted_item_codes(
    interactions: pl.LazyFrame, users: pl.DataFrame, items: pl.DataFrame, work: Path
) -> np.ndarray:
    """All kept item codes in final order, sorting one partition of the users at a time.

    One streaming pass splits the rows by user into partitions of about SORT_CHUNK_ROWS rows;
    each partition is then sorted in memory and its rows are placed at their users' offsets.
    """
    offsets = np.zeros(users.height + 1, dtype=np.int64)
    np.cumsum(users[pp.COUNT].to_numpy(), out=offsets[1:])
    parts = pp.num_parts(int(offsets[-1]), SORT_CHUNK_ROWS, MAX_PARTS)
    has_time = pp.TIME in interactions.collect_schema().names()
    columns = [pp.USER_KEY, pp.ITEM_KEY, *([pp.TIME] if has_time else []), pp.ROW]
    target = pl.PartitionBy(work / "by_user", key=pp.user_part(parts))
    interactions.select(columns).sink_parquet(target, compression=TEMP_COMPRESSION, mkdir=True)
    by_user = pl.scan_parquet(work / "by_user", hive_partitioning=True)

    codes = np.empty(int(offsets[-1]), dtype=np.int32)
    placed = 0
    for part in range(parts):
        part_users = users.filter(pp.user_part(parts) == part)
        # The in-memory engine sorts a partition with about half the memory of the streaming one.
        rows = pp.chronological(
            by_user.filter(pl.col(pp.PART) == part), part_users, items
        ).collect()
        positions = pp.flat_positions(rows[pp.USER_INDEX].to_numpy(), offsets)
        codes[positions] = rows[pp.ITEM_CODE].to_numpy()
        placed += rows.height
    if placed != len(codes):  # the k-core counts and the rows found must agree
        raise RuntimeError(f"sorted {placed} interactions, expected {len(codes)}")
    return codes


def _build_sequences(
    staged: pl.LazyFrame, interactions: pl.LazyFrame, core: pp.KCore, work: Path
) -> tuple[pl.DataFrame, pl.Series, pl.Series]:
    """Sequences plus the original user and item ids in index order."""
    users, items = pp.user_index(core.users), pp.item_codes(core.items)
    item_ids = _sorted_item_codes(interactions, users, items, work)
    order = pp.renumber_items(item_ids, items.height)  # in place: codes become ids
    user_names = _original_ids(staged, users, pp.USER)
    item_names = _original_ids(staged, items, pp.ITEM).gather(order)
    return pp.to_sequences(item_ids, users[pp.COUNT].to_numpy()), user_names, item_names


def _check_arguments(
    path: Path, rating_col: str | None, min_rating: float | None, k_core: int
) -> None:
    if not path.is_file():
        raise DataError(
            f"{path}: file not found; set data.source.path to an existing interaction file"
        )
    if min_rating is not None and rating_col is None:
        raise DataError(
            f"{path}: data.source.min_rating={min_rating} needs data.source.rating_col (the column to compare)"
        )
    if k_core < 0:
        raise DataError(
            f"{path}: data.source.k_core={k_core} must be >= 0 (0 or 1 turns k-core filtering off)"
        )


def import_interactions(
    path: str | Path,
    cache_dir: str | Path,
    *,
    format: str = "auto",
    user_col: str = "user_id",
    item_col: str = "item_id",
    time_col: str | None = "timestamp",
    rating_col: str | None = None,
    min_rating: float | None = None,
    separator: str | None = None,
    k_core: int = 5,
    name: str | None = None,
) -> Path:
    """Turn a raw interaction file into a prepared dataset in `cache_dir`; return `cache_dir`.

    Raises DataError, with one line naming the file, the field and the fix, for any bad input;
    the cache is then left as it was (nothing half-written).
    """
    path, cache_dir = Path(path), Path(cache_dir)
    _check_arguments(path, rating_col, min_rating, k_core)
    format = resolve_format(path, format)
    separator = resolve_separator(path, format, separator)
    columns = {
        "user_col": user_col,
        "item_col": item_col,
        "time_col": time_col,
        "rating_col": rating_col,
    }
    raw = scan_raw(path, format, separator)
    check_columns(path, raw, format, columns)

    # Intermediate files sit next to the cache (same disk, which the user chose to be large),
    # in a folder that SIGTERM removes and the next import removes after a SIGKILL.
    with scratch_dir(cache_dir.parent, cache_dir.name, "import") as work:
        staged, interactions, core = _stage_and_filter(
            path, format, raw, columns, work, min_rating=min_rating, k_core=k_core
        )
        sequences, user_ids, item_ids = _build_sequences(staged, interactions, core, work)
        num_raw_rows = staged.select(pl.len()).collect().item()
    meta = {
        "name": name or path.stem,
        "source": str(path),
        "source_sha256": sha256_file(path),
        "source_format": format,
        "columns": columns,
        "min_rating": min_rating,
        "k_core": k_core,
        "k_core_iterations": core.iterations,
        "num_raw_rows": num_raw_rows,
    }
    return write_cache(cache_dir, sequences, user_ids, item_ids, meta)
