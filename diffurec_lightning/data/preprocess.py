"""Polars transforms that turn raw interactions into chronological, k-core-filtered sequences.

Everything here works on LazyFrames with a fixed set of column names (below), so the importer can
run it over files larger than memory. Only small per-id tables (one row per user or item) are ever
collected; the one full collect, the final user-by-time sort, holds four integer columns.

The rules, in order (docs/data-import.md explains them for users):

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

from diffurec_lightning.errors import DataError

USER, ITEM, TIME, RATING, ROW = "user", "item", "time", "rating", "_row"
BAD_TIME, BAD_RATING = "_bad_time", "_bad_rating"  # the raw text where parsing failed, else null
USER_INDEX, ITEM_CODE = "user_index", "item_code"

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
            "datetimes or text (or set data.time_col=null to keep file order)"
        )
    values = sample.drop_nulls().str.strip_chars()
    for kind in ("integer", "float", "datetime"):
        parsed = values.to_frame("raw").select(parse_time(pl.col("raw"), kind)).to_series()
        if parsed.null_count() == 0:
            return kind
    bad = values.filter(parsed.is_null())[0]
    raise DataError(
        f"{source}: cannot parse {bad!r} in column {column!r} as a timestamp; use epoch numbers or "
        "datetimes such as 2020-01-31 12:00:00 (or set data.time_col=null to keep file order)"
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


def _ids(raw: pl.Expr) -> pl.Expr:
    # Ids are compared as text: "7" in a CSV and 7 in a parquet file are the same id, and
    # stray spaces after a separator do not create new ids.
    return raw.cast(pl.String).str.strip_chars()


def select_interactions(
    raw: pl.LazyFrame,
    *,
    user_col: str,
    item_col: str,
    time_col: str | None,
    rating_col: str | None,
    time_kind: str = "native",
) -> pl.LazyFrame:
    """Rename the raw columns to the internal ones, parse time and rating, keep the row index."""
    schema = raw.collect_schema()
    columns = [_ids(pl.col(user_col)).alias(USER), _ids(pl.col(item_col)).alias(ITEM), pl.col(ROW)]
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


def restrict(
    interactions: pl.LazyFrame, users: pl.DataFrame | None, items: pl.DataFrame | None
) -> pl.LazyFrame:
    """Keep the rows whose user and item are in the given id tables (None keeps all)."""
    if users is not None:
        interactions = interactions.join(users.lazy().select(USER), on=USER, how="semi")
    if items is not None:
        interactions = interactions.join(items.lazy().select(ITEM), on=ITEM, how="semi")
    return interactions


def count_per_id(interactions: pl.LazyFrame) -> tuple[pl.LazyFrame, pl.LazyFrame]:
    """(user, count, first_row) and (item, count) tables of a set of interactions."""
    users = interactions.group_by(USER).agg(
        pl.len().alias("count"), pl.col(ROW).min().alias("first_row")
    )
    items = interactions.group_by(ITEM).agg(pl.len().alias("count"))
    return users, items


@dataclass(frozen=True)
class KCore:
    """The surviving ids and how the filtering went (for meta.json and error messages)."""

    users: pl.DataFrame  # user, count, first_row
    items: pl.DataFrame  # item, count
    iterations: int
    input_interactions: int
    input_users: int
    input_items: int


def iterative_kcore(interactions: pl.LazyFrame, *, user_min: int, item_min: int) -> KCore:
    """Drop users with < user_min and items with < item_min interactions until none is left to drop.

    Dropping a user lowers the counts of its items and vice versa, so one pass is not enough. The
    result (the largest subset where every count meets its threshold) does not depend on the
    order of removal, which lets each round drop offending users and items at once. Each round
    streams the interactions once and collects only the two count tables.
    """
    users = items = None
    first: tuple[int, int, int] | None = None
    for iteration in itertools.count(1):
        current = restrict(interactions, users, items)
        user_counts, item_counts = pl.collect_all(count_per_id(current), engine="streaming")
        if first is None:
            first = (int(user_counts["count"].sum()), user_counts.height, item_counts.height)
        kept_users = user_counts.filter(pl.col("count") >= user_min)
        kept_items = item_counts.filter(pl.col("count") >= item_min)
        if kept_users.height == user_counts.height and kept_items.height == item_counts.height:
            return KCore(kept_users, kept_items, iteration, *first)
        users, items = kept_users, kept_items  # strictly smaller, so the loop ends
    raise AssertionError("unreachable")


def user_index(users: pl.DataFrame) -> pl.DataFrame:
    """user -> user_index (Int32), numbered by first kept interaction in the file."""
    return users.sort("first_row").select(
        USER, pl.int_range(pl.len(), dtype=pl.Int32).alias(USER_INDEX)
    )


def item_codes(items: pl.DataFrame) -> pl.DataFrame:
    """item -> a provisional Int32 code, so the big sort carries integers instead of strings."""
    return items.select(ITEM, pl.int_range(pl.len(), dtype=pl.Int32).alias(ITEM_CODE))


def chronological(
    interactions: pl.LazyFrame, users: pl.DataFrame, items: pl.DataFrame, *, has_time: bool
) -> pl.LazyFrame:
    """(user_index, item_code) rows sorted by user, then time, then file order.

    `users` and `items` come from `user_index` and `item_codes`; the inner joins also drop every
    row the k-core removed. The row index as last key makes the order total, so ties in time
    keep file order whatever the sort algorithm.
    """
    keys = [USER_INDEX, TIME, ROW] if has_time else [USER_INDEX, ROW]
    return (
        interactions.join(users.lazy(), on=USER, how="inner")
        .join(items.lazy(), on=ITEM, how="inner")
        .select(*keys, ITEM_CODE)
        .sort(keys)
        .select(USER_INDEX, ITEM_CODE)
    )


def renumber_items(codes: pl.Series, num_items: int) -> tuple[pl.Series, np.ndarray]:
    """Map provisional codes to ids 1..N in order of first appearance in the sorted stream.

    Returns the new ids (same length as `codes`) and, for each new id - 1, its provisional code.
    """
    order = codes.unique(maintain_order=True).to_numpy()
    if len(order) != num_items:
        raise ValueError(f"{num_items - len(order)} kept item(s) do not appear in the stream")
    new_id = np.empty(num_items, dtype=np.int32)
    new_id[order] = np.arange(1, num_items + 1, dtype=np.int32)
    return pl.Series("items", new_id).gather(codes), order


def to_sequences(user_indices: pl.Series, items: pl.Series) -> pl.DataFrame:
    """(user, items) with one list per user, from rows already sorted by user and time."""
    return (
        pl.DataFrame({"user": user_indices, "items": items})
        .group_by("user", maintain_order=True)
        .agg(pl.col("items"))
    )
