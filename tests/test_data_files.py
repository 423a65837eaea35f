"""Data files: verified fetching from a mirror, the restricted unpickler, user-supplied
DiffuRec-format pickles."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from diffurec_lightning.data.benchmarks import convert_pickle, fetch_raw, get_benchmark
from diffurec_lightning.data.safe_pickle import safe_load
from diffurec_lightning.data.sources import BenchmarkSource, FileSource
from diffurec_lightning.data.store import load_id_maps, load_store
from diffurec_lightning.errors import DataError


# -- fetching and verification -------------------------------------------------------------
def test_mirror_with_wrong_checksum_is_refused(tmp_path: Path, mirror: Path) -> None:
    bad_mirror = tmp_path / "mirror"
    (bad_mirror / "toys").mkdir(parents=True)
    data = bytearray((mirror / "toys" / "dataset.pkl").read_bytes())
    data[100] ^= 0xFF
    (bad_mirror / "toys" / "dataset.pkl").write_bytes(bytes(data))
    with pytest.raises(DataError, match="wrong SHA-256"):
        fetch_raw("toys", tmp_path / "raw", bad_mirror)
    assert not (tmp_path / "raw" / "toys" / "dataset.pkl").exists()


def test_missing_file_in_mirror(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found in the data mirror"):
        fetch_raw("beauty", tmp_path / "raw", tmp_path)


def test_unknown_dataset_name(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown dataset 'amazon'.*toys, beauty, ml-1m"):
        get_benchmark("amazon")
    with pytest.raises(DataError, match="unknown dataset 'amazon'"):
        BenchmarkSource("amazon").prepare(tmp_path)


def test_damaged_cached_raw_file_is_fetched_again(tmp_path: Path, mirror: Path) -> None:
    first = fetch_raw("toys", tmp_path / "raw", mirror)
    first.write_bytes(b"garbage")
    again = fetch_raw("toys", tmp_path / "raw", mirror)
    assert again.read_bytes() == (mirror / "toys" / "dataset.pkl").read_bytes()


# -- restricted unpickler ------------------------------------------------------------------
class _Payload:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize(
    "obj, opcode",
    [
        (_Payload(), "GLOBAL"),
        ({"train": {0: [1.5]}}, "BINFLOAT"),
        ({"train": (1, 2)}, "TUPLE"),
        ({"x": {1, 2}}, "SET"),
    ],
)
def test_restricted_unpickler_refuses_other_objects(
    tmp_path: Path, obj: object, opcode: str
) -> None:
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(obj, protocol=4))
    with pytest.raises(DataError, match=f"refused to unpickle: opcode \\w*{opcode[:4]}"):
        safe_load(path)


def test_restricted_unpickler_admits_plain_data(tmp_path: Path) -> None:
    data = {"a": [1, 2, -3, 2**70], "b": {"c": "text"}}
    path = tmp_path / "ok.pkl"
    path.write_bytes(pickle.dumps(data, protocol=2))
    assert safe_load(path) == data


@pytest.mark.parametrize(
    "content, message",
    [(b"", "empty"), (b"hello, not a pickle", "not a valid pickle"), (None, "truncated")],
)
def test_broken_pickles(tmp_path: Path, mirror: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "broken.pkl"
    if content is None:
        content = (mirror / "toys" / "dataset.pkl").read_bytes()[:5000]
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        safe_load(path)


def test_missing_pickle_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="file not found"):
        safe_load(tmp_path / "nope.pkl")


# -- user-supplied DiffuRec-format pickles --------------------------------------------------
def _diffurec_dict() -> dict:
    return {
        "train": {0: [1, 2, 3], 1: [2, 3]},
        "val": {0: [4], 1: [1]},
        "test": {0: [2], 1: [4]},
        "umap": {"alice": 0, "bob": 1},
        "smap": {"a": 1, "b": 2, "c": 3, "d": 4},
    }


def test_custom_pickle_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "steam.pkl"
    path.write_bytes(pickle.dumps(_diffurec_dict()))
    cache = FileSource(str(path)).prepare(tmp_path / "cache")
    store = load_store(cache)
    assert store.sequence(1).tolist() == [2, 3, 1, 4]
    assert load_id_maps(cache)[0]["original_id"].to_list() == ["alice", "bob"]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.pop("smap"), "missing key"),
        (lambda d: d["test"].pop(1), "user 1 is missing from 'test'"),
        (lambda d: d["train"][0].append(9), "out of range 1..4"),
        (lambda d: d["val"].__setitem__(0, [1, 2]), "exactly one item"),
        (lambda d: d["umap"].__setitem__("carol", 5), "umap values"),
    ],
)
def test_custom_pickle_structure_errors(tmp_path: Path, mutate, message: str) -> None:
    data = _diffurec_dict()
    mutate(data)
    path = tmp_path / "bad.pkl"
    path.write_bytes(pickle.dumps(data))
    with pytest.raises(DataError, match=message):
        convert_pickle(path, tmp_path / "cache" / "bad", "bad")
    assert not (tmp_path / "cache" / "bad").exists()
    leftovers = list((tmp_path / "cache").glob("*")) if (tmp_path / "cache").exists() else []
    assert leftovers == []  # no partial cache or temp folder left behind


def test_custom_needs_a_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data.source.path"):
        FileSource(None).prepare(tmp_path)
    with pytest.raises(DataError, match="file not found"):
        FileSource(str(tmp_path / "x.csv")).prepare(tmp_path)
