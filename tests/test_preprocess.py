"""The polars transforms of the importer, on hand-built frames with the expected values written out."""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import polars as pl
import pytest

from diffurec_lightning.data import preprocess as pp
from diffurec_lightning.errors import DataError


def keyed(pairs: list[tuple[str, str]]) -> pl.LazyFrame:
    """(user, item) pairs in file order as a frame with integer keys, like the staged file."""
    users = sorted({u for u, _ in pairs})
    items = sorted({i for _, i in pairs})
    user_keys = [users.index(u) for u, _ in pairs]
    item_keys = [items.index(i) for _, i in pairs]
    return pl.LazyFrame(
        {
            pp.USER_KEY: user_keys,
            pp.ITEM_KEY: item_keys,
            pp.USER_CHECK: user_keys,  # one check value per id: no collision
            pp.ITEM_CHECK: item_keys,
            pp.ROW: list(range(len(pairs))),
        },
        schema={
            pp.USER_KEY: pl.UInt64,
            pp.ITEM_KEY: pl.UInt64,
            pp.USER_CHECK: pl.UInt32,
            pp.ITEM_CHECK: pl.UInt32,
            pp.ROW: pl.UInt32,
        },
    )


# Users A, B, C share items x, y, z: the 3-core. D's item w has one interaction, so w goes in
# round 1 and D (down to 2) in round 2; E has only 2 interactions, so E goes in round 1 and its
# item v (down to 2) in round 2. A single pass would keep D and v.
CASCADE = (
    [(u, i) for u in "ABC" for i in "xyz"]
    + [("A", "v"), ("B", "v"), ("E", "v"), ("E", "x")]
    + [("D", "x"), ("D", "y"), ("D", "w")]
)


def test_iterative_kcore_cascades_until_stable() -> None:
    core = pp.iterative_kcore(keyed(CASCADE), user_min=3, item_min=3)
    assert sorted(core.users[pp.USER_KEY].to_list()) == [0, 1, 2]  # A, B, C
    assert sorted(core.items[pp.ITEM_KEY].to_list()) == [2, 3, 4]  # x, y, z (v=0, w=1)
    assert core.users[pp.COUNT].to_list() == [3, 3, 3]
    assert core.iterations == 3 and not core.key_collision
    assert (core.input_interactions, core.input_users, core.input_items) == (16, 5, 5)


def test_iterative_kcore_off_keeps_everything_but_short_users() -> None:
    core = pp.iterative_kcore(keyed(CASCADE), user_min=3, item_min=1)
    assert sorted(core.users[pp.USER_KEY].to_list()) == [0, 1, 2, 3]  # E (2 interactions) goes
    assert core.items.height == 5


def test_iterative_kcore_can_empty_everything() -> None:
    core = pp.iterative_kcore(keyed(CASCADE), user_min=10, item_min=10)
    assert core.users.height == 0 and core.items.height == 0


def test_per_id_slices_give_the_same_table() -> None:
    frame = keyed(CASCADE)
    aggs = [pl.len().alias(pp.COUNT), pl.col(pp.ROW).min().alias(pp.FIRST_ROW)]
    aggs = {pp.USER_KEY: aggs, pp.ITEM_KEY: aggs[:1]}
    whole = pp.per_id(frame, aggs, {pp.USER_KEY: 1, pp.ITEM_KEY: 1})
    sliced = pp.per_id(frame, aggs, {pp.USER_KEY: 3, pp.ITEM_KEY: 2})
    for key in aggs:
        assert whole[key].sort(key).equals(sliced[key].sort(key))
    assert whole[pp.USER_KEY].sort(pp.USER_KEY)[pp.FIRST_ROW].to_list() == [0, 3, 6, 13, 11]
    assert whole[pp.ITEM_KEY].sort(pp.ITEM_KEY)[pp.COUNT].to_list() == [3, 1, 5, 4, 3]


def test_key_collision_is_detected_by_the_check_hash() -> None:
    frame = keyed(CASCADE)
    # Give one of user A's rows another check hash: two ids share A's key.
    collided = frame.with_columns(
        pl.when(pl.col(pp.ROW) == 9).then(99).otherwise(pl.col(pp.USER_CHECK)).alias(pp.USER_CHECK)
    )
    assert pp.iterative_kcore(collided, user_min=3, item_min=3).key_collision
    assert not pp.iterative_kcore(frame, user_min=3, item_min=3).key_collision


@pytest.mark.parametrize("dropped", [[3], [0, 1, 2]])
def test_keep_ids_uses_either_set(dropped: list[int]) -> None:
    keys = pl.Series(pp.USER_KEY, [0, 1, 2, 3], dtype=pl.UInt64)
    kept = keys.filter(~keys.is_in(pl.Series(dropped, dtype=pl.UInt64).implode()))
    dropped_keys = pl.Series(pp.USER_KEY, dropped, dtype=pl.UInt64)
    frame = pl.DataFrame({pp.USER_KEY: [3, 0, 1, 3, 2]}, schema={pp.USER_KEY: pl.UInt64})
    rows = frame.filter(pp.keep_ids(pp.USER_KEY, kept, dropped_keys))[pp.USER_KEY].to_list()
    assert rows == [k for k in [3, 0, 1, 3, 2] if k not in dropped]


def test_num_slices_from_the_id_estimate() -> None:
    frame = pl.LazyFrame({pp.USER_KEY: list(range(1000)) * 2})
    assert pp.num_slices(frame, pp.USER_KEY, 300) == 4  # about 1000 ids (an estimate)
    assert pp.num_slices(frame, pp.USER_KEY, 10_000) == 1
    assert pp.num_slices(frame.head(0), pp.USER_KEY, 10) == 1


def test_same_text_gets_the_same_key_whatever_its_type() -> None:
    raw = pl.LazyFrame({"u": [" 7", "7", "8"], "i": [1, 1, 2], pp.ROW: [0, 1, 2]})
    staged = pp.select_interactions(
        raw, user_col="u", item_col="i", time_col=None, rating_col=None
    ).collect()
    assert staged[pp.USER].to_list() == ["7", "7", "8"]
    keys = staged[pp.USER_KEY].to_list()
    assert keys[0] == keys[1] != keys[2]
    assert staged[pp.ITEM].to_list() == ["1", "1", "2"]


@pytest.mark.parametrize(
    ("values", "kind"),
    [
        (["1600000000", " 1600000001", None], "integer"),
        (["1.5", "2"], "float"),
        (["2020-01-31 12:00:00", "2020-02-01T08:30:00"], "datetime"),
        (["2020-01-31", "2021-12-01"], "datetime"),
    ],
)
def test_infer_time_kind_from_text(values: list[str | None], kind: str) -> None:
    assert pp.infer_time_kind(pl.Series(values, dtype=pl.String), "ts", "f.csv") == kind


def test_infer_time_kind_keeps_native_types() -> None:
    assert pp.infer_time_kind(pl.Series([1.5, 2.0]), "ts", "f") == "native"
    assert pp.infer_time_kind(pl.Series([datetime(2020, 1, 1)]), "ts", "f") == "native"


def test_infer_time_kind_names_the_bad_value() -> None:
    with pytest.raises(DataError, match=r"f\.csv: cannot parse 'yesterday' in column 'ts'"):
        pp.infer_time_kind(pl.Series(["2020-01-01", "yesterday"]), "ts", "f.csv")


def test_parse_time_converts_offsets_to_utc_and_nulls_bad_values() -> None:
    frame = pl.DataFrame({"t": ["2020-01-01T10:00:00+01:00", "nonsense"]})
    parsed = frame.select(pp.parse_time(pl.col("t"), "datetime")).to_series().to_list()
    assert parsed == [datetime(2020, 1, 1, 9, tzinfo=timezone.utc), None]


def test_first_problem_reports_unparseable_rows() -> None:
    raw = pl.LazyFrame({"u": ["a", "b", None], "i": ["x", "y", "z"], "t": ["1", "x", "3"]})
    raw = raw.with_row_index(pp.ROW)
    staged = pp.select_interactions(
        raw, user_col="u", item_col="i", time_col="t", rating_col=None, time_kind="integer"
    )
    problem = pp.first_problem(staged).collect()
    assert problem[pp.ROW].to_list() == [1]
    assert problem[pp.BAD_TIME].to_list() == ["x"]


def test_implicit_feedback_keeps_ratings_at_threshold() -> None:
    frame = pl.LazyFrame({pp.RATING: [1.0, 3.5, 4.0, 5.0]})
    kept = pp.implicit_feedback(frame, 4.0).collect()[pp.RATING].to_list()
    assert kept == [4.0, 5.0]
    assert pp.implicit_feedback(frame, None).collect().height == 4


def test_num_parts_is_bounded() -> None:
    assert pp.num_parts(10, 4, 64) == 3
    assert pp.num_parts(0, 4, 64) == 1
    assert pp.num_parts(10**9, 4, 64) == 64


def test_flat_positions_place_rows_at_their_users_offsets() -> None:
    offsets = np.array([0, 3, 5, 6])  # users 0, 1, 2 own 3, 2 and 1 items
    assert pp.flat_positions(np.array([0, 0, 0, 2]), offsets).tolist() == [0, 1, 2, 5]
    assert pp.flat_positions(np.array([1, 1]), offsets).tolist() == [3, 4]
    with pytest.raises(ValueError, match="more interactions"):
        pp.flat_positions(np.array([2, 2]), offsets)


def test_chronological_sorts_by_time_then_file_order() -> None:
    interactions = pl.LazyFrame(
        {
            pp.USER_KEY: [20, 10, 10, 10, 20, 30, 10],
            pp.ITEM_KEY: [9, 5, 6, 7, 8, 5, 4],  # item 4 was removed by the k-core
            pp.TIME: [5, 2, 1, 2, 5, 0, 0],
            pp.ROW: [0, 1, 2, 3, 4, 5, 6],
        },
        schema_overrides={pp.USER_KEY: pl.UInt64, pp.ITEM_KEY: pl.UInt64},
    )
    users = pl.DataFrame(
        {pp.USER_KEY: [10, 20, 30], pp.USER_INDEX: [0, 1, 2]},
        schema_overrides={pp.USER_KEY: pl.UInt64, pp.USER_INDEX: pl.Int32},
    )
    items = pl.DataFrame(
        {pp.ITEM_KEY: [5, 6, 7, 8, 9], pp.ITEM_CODE: [50, 60, 70, 80, 90]},
        schema_overrides={pp.ITEM_KEY: pl.UInt64, pp.ITEM_CODE: pl.Int32},
    )

    def rows(frame: pl.LazyFrame, part: pl.DataFrame) -> list[tuple[int, int]]:
        return pp.chronological(frame, part, items).collect().rows()

    # User 0: 6@1, then 5@2 and 7@2 in file order; user 1: 9@5 then 8@5 in file order.
    expected = [(0, 60), (0, 50), (0, 70), (1, 90), (1, 80), (2, 50)]
    assert rows(interactions, users) == expected
    assert rows(interactions, users.slice(1, 1)) == [(1, 90), (1, 80)]
    assert rows(interactions.drop(pp.TIME), users.head(1)) == [(0, 50), (0, 60), (0, 70)]


@pytest.mark.parametrize("block", [1, 3, 1 << 20])
def test_renumber_items_by_first_appearance(block: int) -> None:
    codes = np.array([2, 0, 2, 1], dtype=np.int32)
    order = pp.renumber_items(codes, 3, block=block)
    assert codes.tolist() == [1, 2, 1, 3]
    assert order.tolist() == [2, 0, 1]
    with pytest.raises(ValueError, match="do not appear"):
        pp.renumber_items(np.array([0, 0], dtype=np.int32), 2)


def test_to_sequences_cuts_the_flat_stream_per_user() -> None:
    sequences = pp.to_sequences(np.array([1, 2, 3, 3, 2], dtype=np.int32), np.array([3, 2]))
    assert sequences["user"].to_list() == [0, 1]
    assert sequences["items"].to_list() == [[1, 2, 3], [3, 2]]
