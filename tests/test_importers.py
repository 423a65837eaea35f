"""import_interactions end to end: every format, the splits it produces, and every bad input."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import polars as pl
import pytest

from diffurec_lightning.data import generate
from diffurec_lightning.data import importers as im
from diffurec_lightning.data import preprocess as pp
from diffurec_lightning.data.store import load_id_maps, load_sequences, load_store, read_meta
from diffurec_lightning.errors import DataError

HEADER = "user_id,item_id,timestamp\n"
# u1 and u2 share items a, b, c; u2 has two interactions at t=5 that must keep file order;
# u3 has two interactions only, too few for a leave-one-out split.
SMALL = HEADER + "u2,b,4\nu1,a,3\nu1,b,1\nu1,c,2\nu2,c,5\nu2,a,5\nu3,z,1\nu3,a,2\n"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def imported(path: Path, tmp_path: Path, **options) -> tuple[list, list, list, dict]:
    """(sequences, user original ids, item original ids, meta) of a fresh import."""
    cache = im.import_interactions(path, tmp_path / "cache", **options)
    users, items = load_id_maps(cache)
    sequences = load_sequences(cache)["items"].to_list()
    return (
        sequences,
        users["original_id"].to_list(),
        items["original_id"].to_list(),
        read_meta(cache),
    )


def by_original_ids(sequences: list, users: list, items: list) -> dict[str, list[str]]:
    return {user: [items[i - 1] for i in seq] for user, seq in zip(users, sequences, strict=True)}


def test_csv_gives_chronological_sequences_and_dense_ids(tmp_path: Path) -> None:
    sequences, users, items, meta = imported(write(tmp_path / "log.csv", SMALL), tmp_path, k_core=0)
    # Users by first appearance in the file (u2 first); u3 dropped (2 interactions).
    assert users == ["u2", "u1"]
    # u2: b@4, c@5 (row 4), a@5 (row 5); items numbered by first appearance in that stream.
    assert items == ["b", "c", "a"]
    # u1: b@1, c@2, a@3.
    assert sequences == [[1, 2, 3], [1, 2, 3]]
    assert meta["num_users"] == 2 and meta["num_items"] == 3 and meta["num_interactions"] == 6
    assert meta["num_raw_rows"] == 8 and meta["name"] == "log" and meta["k_core"] == 0
    assert meta["source_sha256"] == hashlib.sha256(SMALL.encode()).hexdigest()
    assert meta["source_format"] == "csv"


def test_leave_one_out_targets_are_the_last_two_items(tmp_path: Path) -> None:
    text = HEADER + "".join(f"u,{item},{t}\n" for t, item in enumerate("pqrst"))
    cache = im.import_interactions(write(tmp_path / "one.csv", text), tmp_path / "c", k_core=0)
    store = load_store(cache)
    seq = store.sequence(0).tolist()
    assert seq == [1, 2, 3, 4, 5]  # train p q r, validation s, test t
    assert store.num_train_prefixes == 2


def test_repeated_interactions_are_kept(tmp_path: Path) -> None:
    text = HEADER + "u,a,1\nu,a,1\nu,b,2\nu,a,3\n"
    sequences, _, items, _ = imported(write(tmp_path / "rep.csv", text), tmp_path, k_core=0)
    assert [[items[i - 1] for i in seq] for seq in sequences] == [["a", "a", "b", "a"]]


def test_kcore_iterates_until_stable(tmp_path: Path) -> None:
    # Removing E drops item v below 3; removing item w drops D below 3 (see test_preprocess).
    rows = [(u, i) for u in "ABC" for i in "xyz"] + [("A", "v"), ("B", "v"), ("E", "v")]
    rows += [("E", "x"), ("D", "x"), ("D", "y"), ("D", "w")]
    text = HEADER + "".join(f"{u},{i},{t}\n" for t, (u, i) in enumerate(rows))
    sequences, users, items, meta = imported(write(tmp_path / "k.csv", text), tmp_path, k_core=3)
    assert users == ["A", "B", "C"] and items == ["x", "y", "z"]
    assert sequences == [[1, 2, 3]] * 3
    assert meta["k_core_iterations"] == 3


def test_tsv_parquet_and_csv_agree(tmp_path: Path) -> None:
    frame = pl.read_csv(write(tmp_path / "log.csv", SMALL))
    frame.write_csv(tmp_path / "log.tsv", separator="\t")
    frame.write_parquet(tmp_path / "log.parquet")  # timestamp stays an integer column
    results = [
        imported(tmp_path / name, tmp_path / name.replace(".", "_"), k_core=0)[:3]
        for name in ("log.csv", "log.tsv", "log.parquet")
    ]
    assert results[0] == results[1] == results[2]


def test_recbole_typed_headers_and_rating_filter(tmp_path: Path) -> None:
    text = (
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        "1\t10\t5\t100.0\n1\t11\t2\t101.0\n1\t12\t4\t102.5\n1\t13\t4.5\t102.0\n2\t10\t5\t1.0\n"
    )
    sequences, users, items, _ = imported(
        write(tmp_path / "x.inter", text), tmp_path, rating_col="rating", min_rating=4, k_core=0
    )
    # Item 11 (rated 2) is dropped; 13 (t=102.0) comes before 12 (t=102.5); user 2 is too short.
    assert users == ["1"]
    assert by_original_ids(sequences, users, items) == {"1": ["10", "13", "12"]}


def test_movielens_double_colon_format(tmp_path: Path) -> None:
    text = (
        "1::1193::5::978300760\n1::661::3::978302109\n1::914::3::978301968\n1::3408::4::978300275\n"
    )
    sequences, users, items, _ = imported(write(tmp_path / "ratings.dat", text), tmp_path, k_core=0)
    assert by_original_ids(sequences, users, items) == {"1": ["3408", "1193", "914", "661"]}


def test_movielens_rating_threshold(tmp_path: Path) -> None:
    text = "".join(
        f"7::{item}::{rating}::{t}\n"
        for t, (item, rating) in enumerate([("a", 5), ("b", 1), ("c", 4), ("d", 3), ("e", 4)])
    )
    sequences, users, items, _ = imported(
        write(tmp_path / "ratings.dat", text), tmp_path, rating_col="rating", min_rating=4, k_core=0
    )
    assert by_original_ids(sequences, users, items) == {"7": ["a", "c", "e"]}


def test_datetime_strings_and_custom_column_names(tmp_path: Path) -> None:
    text = (
        "who;what;when\nx;a;2021-03-01 10:00:00\nx;b;2021-01-01 09:00:00\nx;c;2021-02-01T00:00:00\n"
    )
    sequences, users, items, _ = imported(
        write(tmp_path / "events.csv", text),
        tmp_path,
        user_col="who",
        item_col="what",
        time_col="when",
        separator=";",
        k_core=0,
    )
    assert by_original_ids(sequences, users, items) == {"x": ["b", "c", "a"]}


def test_no_time_column_keeps_file_order(tmp_path: Path) -> None:
    text = "user_id,item_id\nx,c\nx,a\nx,b\n"
    sequences, users, items, _ = imported(
        write(tmp_path / "plain.csv", text), tmp_path, time_col=None, k_core=0
    )
    assert by_original_ids(sequences, users, items) == {"x": ["c", "a", "b"]}


def test_chunked_sort_and_sliced_counts_give_the_same_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = generate.write_interactions(tmp_path / "gen.csv", rows=3000, users=120, items=60)
    expected = imported(path, tmp_path / "a", k_core=3)[:3]
    monkeypatch.setattr(im, "SORT_CHUNK_ROWS", 50)
    monkeypatch.setattr(im, "MAX_PARTS", 7)
    monkeypatch.setattr(im, "IDS_PER_SLICE", 20)
    assert imported(path, tmp_path / "b", k_core=3)[:3] == expected


def test_hash_collision_restages_with_other_seeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_kcore = pp.iterative_kcore
    calls = []

    def collide_once(*args: object, **kwargs: object) -> pp.KCore:
        calls.append(kwargs)
        return dataclasses.replace(real_kcore(*args, **kwargs), key_collision=len(calls) == 1)

    monkeypatch.setattr(pp, "iterative_kcore", collide_once)
    sequences, users, _, _ = imported(write(tmp_path / "log.csv", SMALL), tmp_path, k_core=0)
    assert users == ["u2", "u1"] and len(sequences) == 2 and len(calls) == 2

    def always(*args: object, **kwargs: object) -> pp.KCore:
        return dataclasses.replace(real_kcore(*args, **kwargs), key_collision=True)

    monkeypatch.setattr(pp, "iterative_kcore", always)
    with pytest.raises(DataError, match="colliding"):
        im.import_interactions(tmp_path / "log.csv", tmp_path / "again", k_core=0)


def test_generated_file_imports(tmp_path: Path) -> None:
    path = generate.write_interactions(
        tmp_path / "gen.csv", rows=2500, users=100, items=50, chunk_rows=1000
    )
    assert pl.read_csv(path).height == 2500
    report = generate.measure(path, k_core=5, cache_dir=tmp_path / "cache")
    assert report["raw_rows"] == 2500 and report["users"] > 0 and report["peak_rss_mib"] > 0


# ----------------------------------------------------------------------------- bad input


def assert_one_line(error: pytest.ExceptionInfo[DataError], *fragments: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError) as error:
        im.import_interactions(tmp_path / "nope.csv", tmp_path / "cache")
    assert_one_line(error, "nope.csv", "file not found", "data.source.path")


def test_missing_columns_lists_what_exists(tmp_path: Path) -> None:
    path = write(tmp_path / "log.csv", "uid,iid,ts\n1,2,3\n")
    with pytest.raises(DataError) as error:
        im.import_interactions(path, tmp_path / "cache", user_col="uid")
    assert_one_line(error, "log.csv", "['item_id', 'timestamp'] not found", "['uid', 'iid', 'ts']")
    assert "data.source.item_col='item_id'" in str(error.value)


def test_unparseable_timestamp_names_column_and_value(tmp_path: Path) -> None:
    rows = "".join(f"u,{i},{1000 + i}\n" for i in range(1500)) + "u,late,soon\n"
    path = write(tmp_path / "log.csv", HEADER + rows)
    with pytest.raises(DataError) as error:
        im.import_interactions(path, tmp_path / "cache", k_core=0)
    assert_one_line(error, "log.csv", "'soon'", "'timestamp'", "data row 1501")


def test_unparseable_timestamp_in_first_rows(tmp_path: Path) -> None:
    path = write(tmp_path / "log.csv", HEADER + "u,a,monday\nu,b,tuesday\n")
    with pytest.raises(DataError) as error:
        im.import_interactions(path, tmp_path / "cache")
    assert_one_line(error, "log.csv", "'monday'", "'timestamp'")


def test_unparseable_rating(tmp_path: Path) -> None:
    path = write(tmp_path / "log.csv", "user_id,item_id,timestamp,stars\nu,a,1,five\n")
    with pytest.raises(DataError) as error:
        im.import_interactions(path, tmp_path / "cache", rating_col="stars", min_rating=4)
    assert_one_line(error, "log.csv", "'five'", "'stars'")


def test_empty_user_id(tmp_path: Path) -> None:
    path = write(tmp_path / "log.csv", HEADER + "u,a,1\n,b,2\n")
    with pytest.raises(DataError) as error:
        im.import_interactions(path, tmp_path / "cache")
    assert_one_line(error, "log.csv", "empty 'user_id'", "data row 2")


def test_empty_after_kcore(tmp_path: Path) -> None:
    path = write(tmp_path / "log.csv", SMALL)
    with pytest.raises(DataError) as error:
        im.import_interactions(path, tmp_path / "cache")
    assert_one_line(
        error, "log.csv", "no users left after 5-core filtering; lower data.source.k_core"
    )


def test_empty_file(tmp_path: Path) -> None:
    path = write(tmp_path / "log.csv", HEADER)
    with pytest.raises(DataError) as error:
        im.import_interactions(path, tmp_path / "cache")
    assert_one_line(error, "log.csv", "no interactions")


@pytest.mark.parametrize(("name", "format"), [("log.xlsx", "auto"), ("log.csv", "excel")])
def test_unknown_format(tmp_path: Path, name: str, format: str) -> None:
    path = write(tmp_path / name, SMALL)
    with pytest.raises(DataError) as error:
        im.import_interactions(path, tmp_path / "cache", format=format)
    assert_one_line(error, name, "'csv', 'tsv', 'parquet', 'recbole', 'movielens'")


def test_bad_options(tmp_path: Path) -> None:
    path = write(tmp_path / "log.csv", SMALL)
    with pytest.raises(DataError, match="min_rating=4 needs data.source.rating_col"):
        im.import_interactions(path, tmp_path / "cache", min_rating=4)
    with pytest.raises(DataError, match="single character"):
        im.import_interactions(path, tmp_path / "cache", separator="::")
    with pytest.raises(DataError, match="k_core=-1"):
        im.import_interactions(path, tmp_path / "cache", k_core=-1)


def test_not_a_parquet_file(tmp_path: Path) -> None:
    path = write(tmp_path / "log.parquet", SMALL)
    with pytest.raises(DataError) as error:
        im.import_interactions(path, tmp_path / "cache")
    assert_one_line(error, "log.parquet", "cannot read it as a parquet file")


def test_failure_leaves_no_partial_cache(tmp_path: Path) -> None:
    good = write(tmp_path / "good.csv", SMALL)
    cache = im.import_interactions(good, tmp_path / "out" / "cache", k_core=0)
    before = {p.name: p.read_bytes() for p in cache.iterdir()}
    bad = write(tmp_path / "bad.csv", HEADER + "u,a,1\nu,b,never\n")
    with pytest.raises(DataError):
        im.import_interactions(bad, cache, k_core=0)
    assert {p.name: p.read_bytes() for p in cache.iterdir()} == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["cache"]  # no temp left


# ----------------------------------------------------------------------------- round trip


def test_toys_round_trip(tmp_path: Path, data_dir: Path, mirror: Path) -> None:
    """The benchmark written out as raw interactions and re-imported gives the same sequences."""
    from diffurec_lightning.data.benchmarks import prepare_benchmark
    from diffurec_lightning.data.store import load_id_maps, load_sequences

    cache = prepare_benchmark("toys", data_dir, mirror)
    user_ids, item_ids = load_id_maps(cache)
    user_of = dict(zip(user_ids["user"].to_list(), user_ids["original_id"].to_list(), strict=True))
    item_of = dict(zip(item_ids["item"].to_list(), item_ids["original_id"].to_list(), strict=True))
    expected = {
        user_of[user]: [item_of[i] for i in seq] for user, seq in load_sequences(cache).iter_rows()
    }
    raw = pl.DataFrame(
        [
            (user, item, position)
            for user, seq in expected.items()
            for position, item in enumerate(seq)
        ],
        schema={"user_id": pl.String, "item_id": pl.String, "timestamp": pl.Int64},
        orient="row",
    ).sample(fraction=1.0, shuffle=True, seed=0)  # the importer must restore the order
    raw.write_csv(tmp_path / "toys.csv")

    sequences, users, items, meta = imported(tmp_path / "toys.csv", tmp_path, k_core=0)
    assert by_original_ids(sequences, users, items) == expected
    assert (meta["num_users"], meta["num_items"], meta["num_interactions"]) == (
        19412,
        11924,
        167597,
    )
    assert meta["num_train_prefixes"] == 109361
