"""Polars transforms that turn raw interactions into chronological, k-core-filtered sequences.

The transforms take and return LazyFrames with the fixed column names below, so the importer can
run them over files larger than memory. What gets collected is small: per-id tables (one row per
user or item, built a slice of ids at a time) and one partition of the users per sort.

Ids are handled as 64-bit hashes of their text (`USER_KEY`, `ITEM_KEY`): grouping and joining
integers takes a fraction of the memory strings take. A second, independent 32-bit hash
(`USER_CHECK`, `ITEM_CHECK`) detects the rare case of two ids sharing a key (checked in the
first k-core round); the importer then starts again with other seeds.

The rules, in order (docs/data-import.md states them for users):

1. Implicit feedback: with a rating threshold, keep rating >= threshold; every kept row counts
   as one interaction. Repeated (user, item) pairs stay, as in RecBole and ICLRec.
2. Iterative k-core: drop users with fewer than ``user_min`` and items with fewer than
   ``item_min`` interactions, recount, repeat until nothing changes.
3. Users are numbered 0..U-1 in order of their first kept interaction in the file.
4. Each user's interactions are sorted by time; equal times keep file order (row index).
5. Items are numbered 1..N in order of first appearance when the users' sorted sequences are read
   one after another (user 0 first); 0 stays free for padding.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa

from diffurec_lightning.errors import DataError

USER, ITEM, TIME, RATING, ROW = "user", "item", "time", "rating", "_row"
USER_KEY, ITEM_KEY, USER_CHECK, ITEM_CHECK = "_user_key", "_item_key", "_user_check", "_item_check"
BAD_TIME, BAD_RATING = "_bad_time", "_bad_rating"  # the raw text where parsing failed, else null
USER_INDEX, ITEM_CODE, PART = "user_index", "item_code", "part"
COUNT, FIRST_ROW = "count", "first_row"
ID_COLUMNS = (COUNT, FIRST_ROW)

TIME_KINDS = ("native", "integer", "float", "datetime")


def infer_time_kind(sample: pl.Series, column: str, source: str) -> str:
    """Decide from the first rows how a time column is read: as it is, or parsed from text.

    Text columns holding only integers (epoch seconds or ms) stay exact as Int64; other numbers
    become Float64; anything else must parse as a datetime (ISO 8601 and the common variants).
    """
    if sample.dtype.is_numeric() or sample.dtype.is_temporal():
        return "native"
    if sample.dtype != pl.String:
        raise DataError(
            f"{source}: column {column!r} has type {sample.dtype}; a time column must hold numbers, "
            "datetimes or text (or set data.source.time_col=null to keep file order)"
        )
    values = sample.drop_nulls().str.strip_chars()
    for kind in ("integer", "float", "datetime"):
        parsed = values.to_frame("raw").select(parse_time(pl.col("raw"), kind)).to_series()
        if parsed.null_count() == 0:
            return kind
    bad = values.filter(parsed.is_null())[0]
    raise DataError(
        f"{source}: cannot parse {bad!r} in column {column!r} as a timestamp; use epoch numbers or "
        "datetimes such as 2020-01-31 12:00:00 (or set data.source.time_col=null to keep file order)"
    )


def parse_time(raw: pl.Expr, kind: str) -> pl.Expr:
    """The time expression for a kind from `infer_time_kind`; unparseable values become null."""
    if kind == "native":
        return raw
    text = raw.str.strip_chars()
    if kind == "integer":
        return text.str.to_integer(strict=False)
    if kind == "float":
        return text.cast(pl.Float64, strict=False)
    if kind == "datetime":
        # A fixed zone keeps the output type known before the data is read; naive values are
        # taken as UTC, values with an offset are converted to it.
        return text.str.to_datetime(strict=False, time_zone="UTC", time_unit="us")
    raise ValueError(f"unknown time kind {kind!r}; expected one of {TIME_KINDS}")


def parse_rating(raw: pl.Expr, dtype: pl.DataType) -> pl.Expr:
    """Ratings as Float64; text that is not a number becomes null."""
    text = raw.str.strip_chars() if dtype == pl.String else raw
    return text.cast(pl.Float64, strict=False)


def _failure(raw: pl.Expr, parsed: pl.Expr) -> pl.Expr:
    """The raw text where parsing gave null, kept so the error can quote the offending value."""
    return pl.when(parsed.is_null()).then(raw.cast(pl.String).fill_null("<empty>"))


def _id_columns(raw: pl.Expr, name: str, key: str, check: str, seed: int) -> list[pl.Expr]:
    # Ids are compared as text: "7" in a CSV and 7 in a parquet file are the same id, and
    # stray spaces after a separator do not create new ids.
    text = raw.cast(pl.String).str.strip_chars()
    return [
        text.alias(name),
        text.hash(seed).alias(key),
        (text.hash(seed + 1) % (1 << 32)).cast(pl.UInt32).alias(check),
    ]


def select_interactions(
    raw: pl.LazyFrame,
    *,
    user_col: str,
    item_col: str,
    time_col: str | None,
    rating_col: str | None,
    time_kind: str = "native",
    seed: int = 0,
) -> pl.LazyFrame:
    """Rename the raw columns to the internal ones, hash the ids, parse time and rating."""
    schema = raw.collect_schema()
    columns = [
        *_id_columns(pl.col(user_col), USER, USER_KEY, USER_CHECK, seed),
        *_id_columns(pl.col(item_col), ITEM, ITEM_KEY, ITEM_CHECK, seed + 2),
        pl.col(ROW),
    ]
    if time_col is not None:
        time = parse_time(pl.col(time_col), time_kind)
        columns += [time.alias(TIME), _failure(pl.col(time_col), time).alias(BAD_TIME)]
    if rating_col is not None:
        rating = parse_rating(pl.col(rating_col), schema[rating_col])
        columns += [rating.alias(RATING), _failure(pl.col(rating_col), rating).alias(BAD_RATING)]
    return raw.select(columns)


def first_problem(interactions: pl.LazyFrame) -> pl.LazyFrame:
    """At most one row that has an empty id or an unparseable time or rating."""
    columns = interactions.collect_schema().names()
    checks = [pl.col(USER).is_null(), pl.col(ITEM).is_null()]
    checks += [pl.col(name).is_not_null() for name in (BAD_TIME, BAD_RATING) if name in columns]
    return interactions.filter(pl.any_horizontal(checks)).head(1)


def implicit_feedback(interactions: pl.LazyFrame, min_rating: float | None) -> pl.LazyFrame:
    """Keep the rows rated at least `min_rating` (all rows when None)."""
    if min_rating is None:
        return interactions
    return interactions.filter(pl.col(RATING) >= min_rating)


def num_slices(interactions: pl.LazyFrame, key: str, ids_per_slice: int) -> int:
    """How many key slices keep each per-id table near `ids_per_slice` rows (estimated count)."""
    estimate = interactions.select(pl.col(key).approx_n_unique()).collect(engine="streaming").item()
    return max(1, -(-int(estimate) // ids_per_slice))


def _key_slice(interactions: pl.LazyFrame, key: str, slices: int, part: int) -> pl.LazyFrame:
    return interactions if slices == 1 else interactions.filter(pl.col(key) % slices == part)


def per_id(
    interactions: pl.LazyFrame, aggs: dict[str, list[pl.Expr]], slices: dict[str, int]
) -> dict[str, pl.DataFrame]:
    """For each key of `aggs`, a table grouped by that key, built one slice of keys at a time.

    A streaming group-by over randomly ordered keys keeps every key in memory; slicing by key
    bounds that at the cost of one more pass per slice. The queries run one by one on purpose:
    collected together, polars caches their shared (filtered) input in memory.
    """
    return {
        key: pl.concat(
            [
                _key_slice(interactions, key, slices[key], part)
                .group_by(key)
                .agg(key_aggs)
                .collect(engine="streaming")
                for part in range(slices[key])
            ]
        )
        for key, key_aggs in aggs.items()
    }


def keep_ids(key: str, kept: pl.Series, dropped: pl.Series) -> pl.Expr:
    """Rows whose `key` is kept, tested against the smaller of the kept and dropped sets.

    The set becomes an in-memory hash set: dense data drops few ids, sparse data keeps few.
    """
    if len(dropped) <= len(kept):
        return ~pl.col(key).is_in(dropped.implode())
    return pl.col(key).is_in(kept.implode())


@dataclass(frozen=True)
class KCore:
    """The surviving ids and how the filtering went (for meta.json and error messages)."""

    users: pl.DataFrame  # USER_KEY, COUNT, FIRST_ROW
    items: pl.DataFrame  # ITEM_KEY, COUNT, FIRST_ROW
    iterations: int
    input_interactions: int
    input_users: int
    input_items: int
    key_collision: bool  # two different ids share a key: the result is void, hash again


def _collided(table: pl.DataFrame) -> bool:
    # Rows of one key carry one check hash unless two ids share the key (then they differ
    # with probability 1 - 2^-32).
    return bool((table["check_low"] != table["check_high"]).any())


def iterative_kcore(
    interactions: pl.LazyFrame,
    *,
    user_min: int,
    item_min: int,
    user_slices: int = 1,
    item_slices: int = 1,
) -> KCore:
    """Drop users with < user_min and items with < item_min interactions until none is left to drop.

    Dropping a user lowers the counts of its items and vice versa, so one pass is not enough. The
    result (the largest subset where every count meets its threshold) does not depend on the
    order of removal, which lets each round drop offending users and items at once. The first
    round, which sees every row, also checks the keys for collisions.
    """
    counts = [pl.len().alias(COUNT), pl.col(ROW).min().alias(FIRST_ROW)]
    checked = {
        key: [
            *counts,
            pl.col(check).min().alias("check_low"),
            pl.col(check).max().alias("check_high"),
        ]
        for key, check in ((USER_KEY, USER_CHECK), (ITEM_KEY, ITEM_CHECK))
    }
    slices = {USER_KEY: user_slices, ITEM_KEY: item_slices}
    minimum = {USER_KEY: user_min, ITEM_KEY: item_min}
    dropped = {key: pl.Series(key, [], dtype=pl.UInt64) for key in slices}
    current = interactions
    first: tuple[int, int, int, bool] | None = None
    for iteration in itertools.count(1):
        aggs = checked if first is None else {USER_KEY: counts, ITEM_KEY: counts}
        tables = per_id(current, aggs, slices)
        if first is None:
            collided = _collided(tables[USER_KEY]) or _collided(tables[ITEM_KEY])
            sizes = (tables[USER_KEY].height, tables[ITEM_KEY].height)
            first = (int(tables[USER_KEY][COUNT].sum()), *sizes, collided)
            if collided:
                return KCore(tables[USER_KEY], tables[ITEM_KEY], iteration, *first)
        kept = {key: table.filter(pl.col(COUNT) >= minimum[key]) for key, table in tables.items()}
        if all(kept[key].height == tables[key].height for key in tables):
            users, items = (kept[key].select(key, *ID_COLUMNS) for key in (USER_KEY, ITEM_KEY))
            return KCore(users, items, iteration, *first)
        # Strictly fewer ids each round, so the loop ends.
        for key, table in tables.items():
            newly = table.filter(pl.col(COUNT) < minimum[key])[key]
            dropped[key] = pl.concat([dropped[key], newly])
        current = interactions.filter(
            keep_ids(USER_KEY, kept[USER_KEY][USER_KEY], dropped[USER_KEY]),
            keep_ids(ITEM_KEY, kept[ITEM_KEY][ITEM_KEY], dropped[ITEM_KEY]),
        )
    raise AssertionError("unreachable")


def user_index(users: pl.DataFrame) -> pl.DataFrame:
    """USER_KEY, USER_INDEX (Int32), COUNT, FIRST_ROW; numbered by first kept interaction."""
    return users.sort(FIRST_ROW).with_columns(
        pl.int_range(pl.len(), dtype=pl.Int32).alias(USER_INDEX)
    )


def item_codes(items: pl.DataFrame) -> pl.DataFrame:
    """ITEM_KEY, ITEM_CODE (Int32), FIRST_ROW: provisional codes, so sorts carry small integers."""
    return items.sort(FIRST_ROW).with_columns(
        pl.int_range(pl.len(), dtype=pl.Int32).alias(ITEM_CODE)
    )


def num_parts(num_rows: int, rows_per_part: int, max_parts: int) -> int:
    """How many user partitions give about `rows_per_part` rows each (at most `max_parts`)."""
    return min(max(1, -(-num_rows // rows_per_part)), max_parts)


def user_part(parts: int) -> pl.Expr:
    """The partition of a row: its user key modulo `parts`, so a user's rows stay together."""
    return (pl.col(USER_KEY) % parts).alias(PART)


def chronological(
    interactions: pl.LazyFrame, users: pl.DataFrame, items: pl.DataFrame
) -> pl.LazyFrame:
    """(USER_INDEX, ITEM_CODE) of the kept interactions, sorted by user, time, then file order.

    `users` is (part of) `user_index` and `items` is `item_codes`; the inner joins drop the
    rows of users and items the k-core removed. The row index as last sort key makes the order
    total, so equal times keep file order whatever the sort algorithm.
    """
    has_time = TIME in interactions.collect_schema().names()
    keys = [USER_INDEX, TIME, ROW] if has_time else [USER_INDEX, ROW]
    return (
        interactions.join(users.lazy().select(USER_KEY, USER_INDEX), on=USER_KEY, how="inner")
        .join(items.lazy().select(ITEM_KEY, ITEM_CODE), on=ITEM_KEY, how="inner")
        .sort(keys)
        .select(USER_INDEX, ITEM_CODE)
    )


def flat_positions(user_index: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Where rows sorted by user go in the flat sequence array (user u owns offsets[u]:[u+1])."""
    first_of_user = np.searchsorted(user_index, user_index, side="left")
    positions = offsets[user_index] + (np.arange(len(user_index)) - first_of_user)
    if len(positions) and (positions >= offsets[user_index + 1]).any():
        raise ValueError("more interactions for a user than its count")
    return positions


def renumber_items(codes: np.ndarray, num_items: int, block: int = 1 << 20) -> np.ndarray:
    """Turn provisional codes, in place, into ids 1..N by first appearance in the sorted stream.

    Returns, for each new id - 1, its provisional code. Works block by block so the only large
    array is `codes` itself.
    """
    order = pl.Series(codes).unique(maintain_order=True).to_numpy()
    if len(order) != num_items:
        raise ValueError(f"{num_items - len(order)} kept item(s) do not appear in the stream")
    new_id = np.empty(num_items, dtype=np.int32)
    new_id[order] = np.arange(1, num_items + 1, dtype=np.int32)
    for start in range(0, len(codes), block):
        codes[start : start + block] = new_id[codes[start : start + block]]
    return order


def to_sequences(items: np.ndarray, counts: np.ndarray) -> pl.DataFrame:
    """(user, items) with one list per user from the flat sorted items and per-user counts."""
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    lists = pl.from_arrow(pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(items)))
    return pl.DataFrame({"user": np.arange(len(counts), dtype=np.int32), "items": lists})
