"""Grouping rules of the case studies (DiffuRecSys RQ3), as pure NumPy functions.

- Head vs long tail: the 20% most frequent items, counted over all interactions, are head items;
  a user belongs to the head group when its test target is a head item.
- Sequence length: users fall into five groups split at the 20/40/60/80th percentiles of the full
  sequence length; group g holds the lengths in (edge[g-1], edge[g]] (the first group is closed
  below, the last open above), so tied lengths always share a group.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from diffurec_lightning.errors import ConfigError

HEAD, TAIL = "head", "tail"


def head_items(item_counts: np.ndarray, head_fraction: float = 0.2) -> np.ndarray:
    """Boolean mask over item ids 0..N (index 0 = padding, never head): True for head items.

    The head is the ceil(head_fraction * N) items with the most interactions; ties at the
    boundary go to the smaller item id, so the head size is exact and deterministic.
    """
    if not 0 < head_fraction < 1:
        raise ConfigError(f"head_fraction must lie in (0, 1), got {head_fraction}")
    counts = np.asarray(item_counts)
    num_items = len(counts) - 1
    if num_items < 1:
        raise ConfigError("item_counts must cover at least one item besides padding (index 0)")
    num_head = math.ceil(head_fraction * num_items)
    # lexsort sorts by the last key first: count descending, then item id ascending.
    ids = np.arange(1, num_items + 1)
    order = np.lexsort((ids, -counts[1:]))
    mask = np.zeros(num_items + 1, dtype=bool)
    mask[ids[order[:num_head]]] = True
    return mask


def popularity_groups(targets: np.ndarray, head_mask: np.ndarray) -> np.ndarray:
    """Per user: 0 = head (target is a head item), 1 = tail."""
    return np.where(head_mask[np.asarray(targets)], 0, 1)


def length_edges(
    lengths: np.ndarray, percentiles: Sequence[float] = (20, 40, 60, 80)
) -> np.ndarray:
    """Split points of the length groups: the given percentiles of all users' lengths."""
    lengths = np.asarray(lengths)
    if lengths.size == 0:
        raise ConfigError("length_edges needs at least one sequence length")
    return np.percentile(lengths, list(percentiles))


def length_groups(lengths: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Group index 0..len(edges) of each length: the number of edges strictly below it."""
    return np.searchsorted(np.asarray(edges), np.asarray(lengths), side="left")


def length_group_labels(lengths: np.ndarray, groups: np.ndarray, num_groups: int) -> list[str]:
    """Readable labels "min-max" of the lengths each group actually holds ("empty" if none)."""
    labels = []
    for g in range(num_groups):
        members = np.asarray(lengths)[np.asarray(groups) == g]
        if members.size == 0:
            labels.append("empty")
        elif members.min() == members.max():
            labels.append(f"{members.min()}")
        else:
            labels.append(f"{members.min()}-{members.max()}")
    return labels


def metrics_from_ranks(ranks: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    """Mean HR@K and NDCG@K over users from 1-based target ranks (NaN for no users)."""
    ranks = np.asarray(ranks, dtype=np.float64)
    out: dict[str, float] = {}
    for k in ks:
        hit = ranks <= k
        out[f"hr@{k}"] = float(hit.mean()) if ranks.size else math.nan
        gain = np.where(hit, 1.0 / np.log2(ranks + 1.0), 0.0)
        out[f"ndcg@{k}"] = float(gain.mean()) if ranks.size else math.nan
    return out


def group_metrics(
    ranks: np.ndarray, groups: np.ndarray, names: Sequence[str], ks: Sequence[int]
) -> dict[str, dict[str, float]]:
    """{group name: {"users": count, "hr@K": ..., "ndcg@K": ...}} for groups 0..len(names)-1."""
    ranks, groups = np.asarray(ranks), np.asarray(groups)
    if ranks.shape != groups.shape:
        raise ConfigError(f"ranks {ranks.shape} and groups {groups.shape} must align per user")
    result = {}
    for g, name in enumerate(names):
        members = ranks[groups == g]
        result[name] = {"users": float(members.size), **metrics_from_ranks(members, ks)}
    return result


def case_studies(
    ranks: np.ndarray,
    targets: np.ndarray,
    user_lengths: np.ndarray,
    all_lengths: np.ndarray,
    item_counts: np.ndarray,
    ks: Sequence[int],
    head_fraction: float = 0.2,
    percentiles: Sequence[float] = (20, 40, 60, 80),
) -> dict:
    """Both case studies for the tested users.

    ``ranks``, ``targets`` and ``user_lengths`` describe the tested users (one entry each);
    ``all_lengths`` and ``item_counts`` describe the whole dataset, which fixes the length
    percentiles and the head items independently of which users were tested.
    Returns {"popularity": {name: metrics}, "length": {name: metrics}, "length_labels": [...],
    "length_edges": [...], "num_head_items": int}; length groups are named len1..len5.
    """
    head_mask = head_items(item_counts, head_fraction)
    popularity = group_metrics(ranks, popularity_groups(targets, head_mask), (HEAD, TAIL), ks)
    edges = length_edges(all_lengths, percentiles)
    groups = length_groups(user_lengths, edges)
    names = [f"len{g + 1}" for g in range(len(edges) + 1)]
    return {
        "popularity": popularity,
        "length": group_metrics(ranks, groups, names, ks),
        "length_labels": length_group_labels(user_lengths, groups, len(names)),
        "length_edges": [float(e) for e in edges],
        "num_head_items": int(head_mask.sum()),
        "head_fraction": head_fraction,
    }
