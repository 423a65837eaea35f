"""Why test is harder than validation: the targets' transition groups, and each model's hits in them.

``python -m diffurec_lightning.analysis.transitions --data toys --runs RUN [RUN ...]``

Every validation or test target falls into one group, judged from the training part of the
sequences only (every item but the last two of each user, as the models and the Markov baseline
see them):

- ``seen``: the step from the last history item to the target occurs in some training sequence;
  a count model can recall it directly;
- ``unseen``: the target is a training item, but never follows that last item in training;
- ``cold``: the target never occurs in any training sequence.

The command prints the share of each group among validation and test targets, then, for every
run folder given (each with the ``test_ranks.parquet`` its test wrote), test HR@10 and NDCG@10
within each group. A shift of the group shares from validation to test explains a test drop that
every model shares; the per-group rows show where one model wins over another.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl

from diffurec_lightning.analysis.groups import metrics_from_ranks
from diffurec_lightning.data.store import SequenceStore, load_store
from diffurec_lightning.errors import DataError, DiffuRecError

GROUPS = ("seen", "unseen", "cold")
_SPLIT_OFFSET = {"valid": 2, "test": 1}  # the target's distance from the sequence end


def _pair_keys(previous: np.ndarray, following: np.ndarray, num_items: int) -> np.ndarray:
    return previous.astype(np.int64) * (num_items + 1) + following.astype(np.int64)


def training_pairs(store: SequenceStore) -> tuple[np.ndarray, np.ndarray]:
    """(sorted unique transition keys, per-item occurrence counts) of the training parts."""
    starts, ends = store.offsets[:-1], store.offsets[1:] - 2  # drop validation and test items
    keep = np.zeros(len(store.items), dtype=bool)
    for start, end in zip(starts, ends, strict=True):
        keep[start:end] = True
    items = store.items
    # a consecutive pair (i, i + 1) is a training transition when both ends are training items
    # of the same user: keep[i] and keep[i + 1] (users never share a kept run)
    both = keep[:-1] & keep[1:]
    keys = np.unique(_pair_keys(items[:-1][both], items[1:][both], store.num_items))
    counts = np.bincount(items[keep], minlength=store.num_items + 1)
    return keys, counts


def target_groups(store: SequenceStore, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(users, group index into GROUPS) of every user's ``split`` target."""
    if split not in _SPLIT_OFFSET:
        raise DataError(f"split must be one of {sorted(_SPLIT_OFFSET)}, got {split!r}")
    keys, counts = training_pairs(store)
    target_at = store.offsets[1:] - _SPLIT_OFFSET[split]
    targets, previous = store.items[target_at], store.items[target_at - 1]
    seen = np.isin(_pair_keys(previous, targets, store.num_items), keys)
    groups = np.where(seen, 0, np.where(counts[targets] > 0, 1, 2))
    return np.arange(store.num_users), groups


def group_shares(store: SequenceStore) -> dict[str, dict[str, float]]:
    """Share of validation and test targets in each group."""
    shares = {}
    for split in _SPLIT_OFFSET:
        _, groups = target_groups(store, split)
        counts = np.bincount(groups, minlength=len(GROUPS)) / len(groups)
        shares[split] = dict(zip(GROUPS, counts.tolist(), strict=True))
    return shares


def run_group_metrics(run: Path, groups: np.ndarray) -> dict[str, dict[str, float]]:
    """Test HR@10 and NDCG@10 of one run within each group (from its test_ranks.parquet)."""
    path = run / "test_ranks.parquet"
    if not path.is_file():
        raise DataError(f"{path} is missing: test the run with the case studies on (the default)")
    frame = pl.read_parquet(path).sort("user")
    ranks = np.zeros(len(groups), dtype=np.int64)
    ranks[frame["user"].to_numpy()] = frame["rank"].to_numpy()
    table = {"all": metrics_from_ranks(ranks, [10])}
    for index, name in enumerate(GROUPS):
        table[name] = metrics_from_ranks(ranks[groups == index], [10])
    return table


def render(shares: dict, runs: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = [
        "| targets | " + " | ".join(GROUPS) + " |",
        "|---|" + "---:|" * len(GROUPS),
    ]
    for split, row in shares.items():
        lines.append(f"| {split} share | " + " | ".join(f"{row[g]:.3f}" for g in GROUPS) + " |")
    lines += ["", "| run (test) | all HR@10 / NDCG@10 | " + " | ".join(GROUPS) + " |"]
    lines.append("|---|---:|" + "---:|" * len(GROUPS))
    for name, table in runs.items():
        cells = [f"{table[g]['hr@10']:.4f} / {table[g]['ndcg@10']:.4f}" for g in ("all", *GROUPS)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cache", required=True, help="prepared dataset folder, e.g. outputs/data/toys"
    )
    parser.add_argument("--runs", nargs="*", default=[], help="run folders with test_ranks.parquet")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    try:
        store = load_store(Path(args.cache))
        shares = group_shares(store)
        _, test_groups = target_groups(store, "test")
        runs = {str(run): run_group_metrics(Path(run), test_groups) for run in args.runs}
    except DiffuRecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(render(shares, runs))
    if args.json:
        Path(args.json).write_text(json.dumps({"shares": shares, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
