"""Metrics checked on hand-built score matrices; every expected value is worked out by hand."""

import math

import pytest
import torch

from diffurec_lightning.metrics import TopKMetrics, per_user, target_ranks, top_k_items

# Column 0 is padding and carries the highest score in row 0 on purpose; items are 1..5 (N = 5).
SCORES = torch.tensor(
    [
        [9.0, 0.5, 0.1, 0.3, 0.9, 0.2],  # item 3 (0.3): items 4 (0.9) and 1 (0.5) ahead -> rank 3
        [0.0, 0.4, 0.4, 0.4, 0.1, 0.2],  # item 2 ties items 1 and 3 -> pessimistic rank 3, not 1
        [1.0, 1.0, 1.0, 1.0, 1.0, 1.0],  # constant scorer -> rank N = 5 for any target
        [5.0, 0.1, 0.2, 0.3, 0.9, 0.8],  # item 4 is the best real item -> rank 1
    ]
)
TARGETS = torch.tensor([3, 2, 1, 4])
EXPECTED_RANKS = [3, 3, 5, 1]


def test_target_ranks_pessimistic_ties_and_padding_ignored():
    ranks = target_ranks(SCORES, TARGETS)
    assert ranks.dtype == torch.long
    assert ranks.tolist() == EXPECTED_RANKS


def test_constant_scorer_gets_rank_n_for_every_target():
    scores = torch.zeros(5, 6)
    assert target_ranks(scores, torch.tensor([1, 2, 3, 4, 5])).tolist() == [5, 5, 5, 5, 5]


def test_padding_score_never_matters():
    # Padding at +inf or NaN must not push any real item down.
    for pad in (float("inf"), float("nan"), float("-inf")):
        scores = SCORES.clone()
        scores[:, 0] = pad
        assert target_ranks(scores, TARGETS).tolist() == EXPECTED_RANKS


def test_nan_target_ranks_last_and_nan_items_rank_behind():
    nan = float("nan")
    scores = torch.tensor(
        [
            [0.0, nan, 0.5, 0.2],  # NaN target -> -inf -> rank 3 = N, never a lucky 1
            [0.0, nan, 0.5, 0.2],  # target item 3 (0.2): only item 2 ahead -> rank 2
            [0.0, nan, nan, nan],  # all NaN: everything ties -> rank 3
        ]
    )
    assert target_ranks(scores, torch.tensor([1, 3, 2])).tolist() == [3, 2, 3]


@pytest.mark.parametrize("bad", [0, 6, -1])
def test_out_of_range_target_raises(bad):
    targets = TARGETS.clone()
    targets[1] = bad
    with pytest.raises(ValueError, match=rf"target item id {bad} out of range 1\.\.5"):
        target_ranks(SCORES, targets)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="shape"):
        target_ranks(SCORES, TARGETS[:2])
    with pytest.raises(ValueError, match="N >= 1"):
        target_ranks(torch.zeros(2, 1), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="integer"):
        target_ranks(SCORES, TARGETS.float())


def test_bfloat16_scores():
    assert target_ranks(SCORES.bfloat16(), TARGETS).tolist() == EXPECTED_RANKS
    # 1.0 and 1.001 differ in float32 but are the same bfloat16 value (spacing 2**-7 near 1), so
    # item 2 is alone at the top in float32 and ties with item 1 in bfloat16: rank 1 -> 2.
    scores = torch.tensor([[0.0, 1.0, 1.001, 0.5]])
    assert target_ranks(scores, torch.tensor([2])).tolist() == [1]
    assert target_ranks(scores.bfloat16(), torch.tensor([2])).tolist() == [2]


def test_per_user_literal_values():
    out = per_user(torch.tensor([1, 3, 7, 15]), ks=(1, 5, 10))
    assert list(out) == ["hr@1", "hr@5", "hr@10", "ndcg@1", "ndcg@5", "ndcg@10"]
    assert out["hr@1"].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert out["hr@5"].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert out["hr@10"].tolist() == [1.0, 1.0, 1.0, 0.0]
    # 1/log2(rank+1): rank 1 -> 1, rank 3 -> 1/2, rank 7 -> 1/3, rank 15 -> 1/4.
    assert out["ndcg@1"].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert out["ndcg@5"].tolist() == [1.0, 0.5, 0.0, 0.0]
    assert out["ndcg@10"].tolist() == pytest.approx([1.0, 0.5, 1 / 3, 0.0], abs=1e-15)
    assert per_user(torch.tensor([15]), ks=(15,))["ndcg@15"].item() == 0.25


def test_topk_metrics_means_and_keys():
    metric = TopKMetrics(ks=(1, 5, 10), prefix="val/")
    metric.update(torch.tensor([1, 3]))
    metric.update(torch.tensor([7, 15]))
    out = metric.compute()
    assert set(out) == {
        "val/hr@1",
        "val/hr@5",
        "val/hr@10",
        "val/ndcg@1",
        "val/ndcg@5",
        "val/ndcg@10",
    }
    assert all(v.dim() == 0 and v.is_floating_point() for v in out.values())
    assert out["val/hr@1"].item() == 0.25
    assert out["val/hr@5"].item() == 0.5
    assert out["val/hr@10"].item() == 0.75
    assert out["val/ndcg@1"].item() == 0.25
    assert out["val/ndcg@5"].item() == (1 + 0.5) / 4
    assert out["val/ndcg@10"].item() == pytest.approx((1 + 0.5 + 1 / 3) / 4, abs=1e-15)


def test_default_ks_and_k_larger_than_item_count():
    # N = 5 items, so every rank is <= 5 and HR@10 = HR@20 = 1 whatever the model does.
    metric = TopKMetrics()
    metric.update(target_ranks(SCORES, TARGETS))  # ranks 3, 3, 5, 1
    out = metric.compute()
    assert set(out) == {f"{m}@{k}" for m in ("hr", "ndcg") for k in (5, 10, 20)}
    assert out["hr@5"].item() == 1.0
    assert out["hr@10"].item() == 1.0
    assert out["hr@20"].item() == 1.0
    expected_ndcg = (0.5 + 0.5 + 1 / math.log2(6) + 1.0) / 4
    assert out["ndcg@20"].item() == pytest.approx(expected_ndcg, abs=1e-15)


def test_sum_states_are_float64_and_exact_over_many_updates():
    metric = TopKMetrics(ks=(10,))
    assert metric.ndcg_sum.dtype == torch.float64
    # Survives a module-wide cast, as under a bf16/fp16 Lightning precision plugin.
    metric = metric.bfloat16()
    assert metric.ndcg_sum.dtype == torch.float64
    ranks = torch.full((1000,), 7)  # NDCG@10 = 1/3 each, not representable exactly
    for _ in range(1000):
        metric.update(ranks)
    assert metric.count.item() == 1_000_000
    assert metric.hr_sum.item() == 1_000_000.0
    assert metric.ndcg_sum.item() == pytest.approx(1_000_000 / 3, rel=1e-13)
    assert metric.compute()["ndcg@10"].item() == pytest.approx(1 / 3, rel=1e-13)


def test_merged_states_equal_single_pass_not_mean_of_means():
    ks = (5, 10)
    first, second, single = (TopKMetrics(ks=ks) for _ in range(3))
    first.update(torch.tensor([1]))
    second.update(torch.tensor([3, 7, 15]))
    single.update(torch.tensor([1, 3, 7, 15]))
    first.merge_state(second)
    merged, expected = first.compute(), single.compute()
    assert merged.keys() == expected.keys()
    for key in expected:
        assert merged[key].item() == expected[key].item()
    # Users weigh equally: HR@5 = 2/4, whereas averaging the halves would give (1 + 1/3)/2.
    assert merged["hr@5"].item() == 0.5


def test_merge_matches_single_pass_on_random_ranks():
    gen = torch.Generator().manual_seed(0)
    ranks = torch.randint(1, 40, (257,), generator=gen)
    parts = [TopKMetrics(ks=(5, 10, 20)) for _ in range(3)]
    for part, chunk in zip(parts, ranks.split([1, 100, 156]), strict=True):
        part.update(chunk)
    parts[0].merge_state(parts[1])
    parts[0].merge_state(parts[2])
    single = TopKMetrics(ks=(5, 10, 20))
    single.update(ranks)
    manual = {k: v.mean().item() for k, v in per_user(ranks, ks=(5, 10, 20)).items()}
    for key, value in single.compute().items():
        assert parts[0].compute()[key].item() == pytest.approx(value.item(), abs=1e-15)
        assert value.item() == pytest.approx(manual[key], abs=1e-15)


def test_reset_clears_states():
    metric = TopKMetrics(ks=(5,))
    metric.update(torch.tensor([1, 2]))
    metric.reset()
    metric.update(torch.tensor([6]))
    assert metric.compute()["hr@5"].item() == 0.0


@pytest.mark.parametrize("ks", [(), (0,), (5, 5), (2.5,)])
def test_bad_ks_raise(ks):
    with pytest.raises(ValueError, match="ks"):
        TopKMetrics(ks=ks)


def test_bad_ranks_raise():
    metric = TopKMetrics()
    with pytest.raises(ValueError, match="1-based"):
        metric.update(torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="integer"):
        metric.update(torch.tensor([1.0]))


def test_top_k_items_order_and_padding_excluded():
    values, items = top_k_items(SCORES, 3)
    assert items.dtype == torch.long
    assert items[0].tolist() == [4, 1, 3]  # padding (9.0) excluded
    assert values[0].tolist() == pytest.approx([0.9, 0.5, 0.3])
    assert items[3].tolist() == [4, 5, 3]  # padding (5.0) excluded
    assert (items >= 1).all()


def test_top_k_items_ties_lower_id_first():
    _, items = top_k_items(SCORES, 4)
    assert items[1].tolist() == [1, 2, 3, 5]  # three-way tie at 0.4, then 0.2
    assert items[2].tolist() == [1, 2, 3, 4]  # constant row
    # Same answer in bfloat16, where the sort runs on rounded values.
    _, items_bf16 = top_k_items(SCORES.bfloat16(), 4)
    assert items_bf16[1:3].tolist() == [[1, 2, 3, 5], [1, 2, 3, 4]]


def test_top_k_items_caps_k_and_never_returns_padding_or_nan():
    scores = SCORES.clone()
    scores[:, 0] = float("inf")
    scores[3, 4] = float("nan")
    values, items = top_k_items(scores, 10)
    assert values.shape == items.shape == (4, 5)  # k capped at N = 5
    assert sorted(items[0].tolist()) == [1, 2, 3, 4, 5]
    assert items[3].tolist() == [5, 3, 2, 1, 4]  # NaN item 4 counts as -inf, so it comes last
    with pytest.raises(ValueError, match="positive"):
        top_k_items(SCORES, 0)


def test_ranks_and_top_k_match_a_python_sort_with_many_ties():
    # Integer scores in 0..4 over 30 items force many ties; the reference sorts each row in plain
    # Python, the target placed after its equals (pessimistic) and otherwise lower id first.
    gen = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 5, (8, 31), generator=gen).float()
    targets = torch.randint(1, 31, (8,), generator=gen)
    _, items = top_k_items(scores, 30)
    for row, target, got_rank, got_items in zip(
        scores.tolist(), targets.tolist(), target_ranks(scores, targets), items, strict=True
    ):
        ranked = sorted(range(1, 31), key=lambda j, row=row, t=target: (-row[j], j == t, j))
        assert got_rank.item() == ranked.index(target) + 1
        by_id = sorted(range(1, 31), key=lambda j, row=row: (-row[j], j))
        assert got_items.tolist() == by_id
