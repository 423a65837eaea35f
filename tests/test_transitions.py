"""The transition groups of analysis/transitions.py on a hand-made store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from diffurec_lightning.analysis.transitions import group_shares, run_group_metrics, target_groups
from diffurec_lightning.data.store import SequenceStore


def _store(sequences: list[list[int]], num_items: int) -> SequenceStore:
    lengths = [len(s) for s in sequences]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    items = np.concatenate([np.asarray(s, dtype=np.int32) for s in sequences])
    return SequenceStore(items=items, offsets=offsets, num_items=num_items)


# training parts: user0 [1, 2], user1 [2, 3], user2 [1]; the last two items are valid, test
STORE = _store([[1, 2, 3, 4], [2, 3, 1, 2], [1, 5, 2]], num_items=5)


def test_groups_follow_the_training_transitions_only() -> None:
    # valid targets: user0 3 after 2 (2->3 is user1's training step: seen), user1 1 after 3
    # (unseen), user2 5 after 1 (5 occurs in no training part: cold)
    assert target_groups(STORE, "valid")[1].tolist() == [0, 1, 2]
    # test targets: user0 4 after 3 (cold), user1 2 after 1 (1->2 is user0's: seen),
    # user2 2 after 5 (unseen: 5 is never a training item, 2 is)
    assert target_groups(STORE, "test")[1].tolist() == [2, 0, 1]
    shares = group_shares(STORE)
    assert shares["valid"] == {"seen": 1 / 3, "unseen": 1 / 3, "cold": 1 / 3}


def test_run_metrics_are_split_by_group(tmp_path: Path) -> None:
    pl.DataFrame({"user": [2, 0, 1], "rank": [1, 50, 3]}).write_parquet(
        tmp_path / "test_ranks.parquet"
    )
    table = run_group_metrics(tmp_path, target_groups(STORE, "test")[1])
    assert table["cold"]["hr@10"] == 0.0  # user0, rank 50
    assert table["seen"]["hr@10"] == 1.0 and table["seen"]["ndcg@10"] == 0.5  # user1, rank 3
    assert table["unseen"]["ndcg@10"] == 1.0  # user2, rank 1
    assert abs(table["all"]["hr@10"] - 2 / 3) < 1e-12
