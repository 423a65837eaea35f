"""Exact full-ranking top-k metrics: HR@K and NDCG@K with one relevant item per user.

Shape legend: B users in a batch, N real items, `scores` is (B, N+1) with column 0 the padding
id, which is never ranked nor recommended. Ranks are 1-based among the N real items.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["TopKMetrics", "per_user", "target_ranks", "top_k_items"]


def _real_item_scores(scores: Tensor) -> Tensor:
    """Scores of the real items 1..N, (B, N), with NaN mapped to -inf.

    A diverged model can emit NaN, and NaN compares False with everything, so left alone a NaN
    target would count nobody ahead of it and get rank 1. As -inf it ties with the worst item
    instead, and the pessimistic tie rule sends it to the bottom.
    """
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise ValueError(
            f"scores must have shape (B, N+1) with N >= 1 (column 0 = padding), got {tuple(scores.shape)}"
        )
    if not scores.is_floating_point():
        raise ValueError(f"scores must be a floating-point tensor, got {scores.dtype}")
    real = scores[:, 1:]  # (B, N)
    return real.masked_fill(real.isnan(), float("-inf"))


def target_ranks(scores: Tensor, targets: Tensor) -> Tensor:
    """1-based rank, (B,) long, of each target among the real items 1..N.

    Ties are broken pessimistically: every other real item scoring the same as the target counts
    as ranked ahead of it, i.e. rank = #{j in 1..N : s_j >= s_target}. Two reasons:
    a degenerate model (constant or collapsed scores) gets rank N rather than a lucky 1, so it
    cannot look good; and the result does not depend on how item ids happen to be ordered, which
    an index-based tie rule (like the order a sort returns) would.

    Counting comparisons is O(N) per user and needs no top-k sort. The comparison runs in the
    dtype the scores come in: with bfloat16 scores, values that rounding made equal are ties and
    count against the target. Upcasting first would not help, since the information is already
    lost; the rank is that of the scores the model actually produced. NaN scores count as -inf.
    The range check on `targets` reads one value back from the device (one sync per call).
    """
    real = _real_item_scores(scores)  # (B, N)
    num_items = real.shape[1]
    if targets.dim() != 1 or targets.shape[0] != real.shape[0]:
        raise ValueError(
            f"targets must have shape ({real.shape[0]},) to match scores, got {tuple(targets.shape)}"
        )
    if targets.is_floating_point() or targets.dtype == torch.bool:
        raise ValueError(f"targets must be integer item ids, got {targets.dtype}")
    targets = targets.long()
    bad = (targets < 1) | (targets > num_items)
    if bad.any():
        bad_id = int(targets[bad][0])
        raise ValueError(f"target item id {bad_id} out of range 1..{num_items}")
    target_score = real.gather(1, (targets - 1).unsqueeze(1))  # (B, 1)
    # The target itself satisfies >=, which supplies the "1 +" of a 1-based rank.
    return (real >= target_score).sum(dim=1)


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of positive ints, got {ks}")
    if len(set(ks)) != len(ks):
        raise ValueError(f"ks must not repeat a cut-off, got {ks}")
    return ks


def _check_ranks(ranks: Tensor) -> None:
    if ranks.dim() != 1 or ranks.is_floating_point() or ranks.dtype == torch.bool:
        raise ValueError(
            f"ranks must be a 1-D integer tensor, got {ranks.dtype} {tuple(ranks.shape)}"
        )
    if ranks.numel() and int(ranks.min()) < 1:
        raise ValueError(f"ranks are 1-based, got a minimum of {int(ranks.min())}")


def _hits_and_gains(ranks: Tensor, ks: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Per-user HR@K and NDCG@K as float64, each (B, len(ks))."""
    ranks = ranks.to(torch.float64).unsqueeze(1)  # (B, 1)
    cutoffs = torch.tensor(ks, dtype=torch.float64, device=ranks.device)  # (K,)
    hits = (ranks <= cutoffs).to(torch.float64)  # (B, K)
    # One relevant item, so the ideal DCG is 1 and NDCG is the discount at the target's rank.
    gains = hits / torch.log2(ranks + 1.0)  # (B, K)
    return hits, gains


def per_user(ranks: Tensor, ks: Sequence[int]) -> dict[str, Tensor]:
    """Per-user HR@K and NDCG@K, float64 (B,) each, keyed "hr@K" and "ndcg@K".

    Kept per user (not averaged) for case studies and paired significance tests.
    """
    ks = _check_ks(ks)
    _check_ranks(ranks)
    hits, gains = _hits_and_gains(ranks, ks)
    out = {f"hr@{k}": hits[:, i] for i, k in enumerate(ks)}
    out.update({f"ndcg@{k}": gains[:, i] for i, k in enumerate(ks)})
    return out


class TopKMetrics(Metric):
    """HR@K and NDCG@K averaged over users, exact under DDP.

    States are float64 sums over users plus a user count, reduced by summing, so the result is the
    mean over every user of every process: no average of per-batch or per-rank averages, which
    would weight small last batches too much. float64 keeps sums over a large test set exact to
    far below the digits we report. (Metric states keep their dtype under `.half()`/`.bfloat16()`;
    torchmetrics only converts them through `set_dtype`.)
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, *, ks: Sequence[int] = (5, 10, 20), prefix: str = "") -> None:
        super().__init__()
        self.ks = _check_ks(ks)
        self.prefix = prefix
        num_ks = len(self.ks)
        self.add_state("hr_sum", torch.zeros(num_ks, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("ndcg_sum", torch.zeros(num_ks, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, ranks: Tensor) -> None:
        """Add users with the given 1-based target ranks, (B,) integer (see `target_ranks`)."""
        _check_ranks(ranks)
        hits, gains = _hits_and_gains(ranks, self.ks)
        self.hr_sum += hits.sum(dim=0)
        self.ndcg_sum += gains.sum(dim=0)
        self.count += ranks.numel()

    def compute(self) -> dict[str, Tensor]:
        """Mean HR@K and NDCG@K, keyed f"{prefix}hr@K" and f"{prefix}ndcg@K" (0-dim float64)."""
        hr = self.hr_sum / self.count
        ndcg = self.ndcg_sum / self.count
        out = {f"{self.prefix}hr@{k}": hr[i] for i, k in enumerate(self.ks)}
        out.update({f"{self.prefix}ndcg@{k}": ndcg[i] for i, k in enumerate(self.ks)})
        return out


def top_k_items(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k best real items per row: (values, item ids), each (B, min(k, N)), best first.

    Padding (column 0) is never returned; ids are 1..N. Equal scores are ordered by lower item id
    first, so the output is deterministic across runs and devices (`torch.topk` does not promise
    an order among ties). That needs a stable full sort, O(N log N) per row, which is acceptable
    in predict_step; ranking metrics use `target_ranks`, which needs no sort. NaN scores count as
    -inf, so they come last.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    real = _real_item_scores(scores)  # (B, N)
    k = min(k, real.shape[1])
    values, order = torch.sort(real, dim=1, descending=True, stable=True)  # (B, N)
    return values[:, :k], order[:, :k] + 1
