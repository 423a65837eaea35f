"""Count baselines (pop, markov): counts by hand, training data only, the shared evaluation path,
checkpoints that carry the counts, and the Toys floor the issue quotes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from diffurec_lightning.config import compose_config
from diffurec_lightning.data.datasets import eval_samples, train_prefixes
from diffurec_lightning.data.store import SequenceStore
from diffurec_lightning.errors import ConfigError
from diffurec_lightning.metrics import target_ranks
from diffurec_lightning.models.counting import MarkovRecommender, PopularityRecommender, csr_rows
from diffurec_lightning.train import build, train

QUIET = ["logger=csv", "callbacks.progress_bar=null", "callbacks.case_studies.enabled=false"]


def store_of(sequences: list[list[int]], num_items: int) -> SequenceStore:
    offsets = np.cumsum([0, *map(len, sequences)])
    items = np.concatenate([np.asarray(s, dtype=np.int32) for s in sequences])
    return SequenceStore(items=items, offsets=offsets, num_items=num_items)


# Training parts (all but the last two items): [1, 2, 3], [2, 3], [3]. Validation and test
# transitions (3->4, 4->5, 3->5, 5->1) must never be counted.
SEQUENCES = [[1, 2, 3, 4, 5], [2, 3, 5, 1], [3, 4, 5]]


def fitted(model: PopularityRecommender) -> PopularityRecommender:
    model.fit_counts(train_prefixes(store_of(SEQUENCES, 5), max_len=10))
    return model


def scores_of(model: PopularityRecommender, seq: list[list[int]]) -> torch.Tensor:
    return model.eval_scores({"seq": torch.tensor(seq)})


def test_counts_come_from_training_transitions_only() -> None:
    model = fitted(MarkovRecommender(num_items=5, order=1, backoff=0.0))
    # Training transitions: 1->2, 2->3 (user 0) and 2->3 (user 1); targets 2, 3, 3.
    dense = csr_rows(model.crow, model.col, model.val, torch.arange(6), 6)
    expected = torch.zeros(6, 6, dtype=torch.float64)
    expected[1, 2], expected[2, 3] = 1.0, 2.0
    assert torch.equal(dense, expected)
    assert model.popularity.tolist() == [0, 0, 1, 2, 0, 0]
    # Row 3 is empty: the 3->4 and 3->5 transitions are validation/test ones.
    assert scores_of(model, [[0, 3]]).tolist() == [[0.0] * 5]


def test_second_order_adds_what_followed_the_second_to_last_item() -> None:
    model = fitted(MarkovRecommender(num_items=5, last_weight=1.0, second_last_weight=0.5))
    scores = scores_of(model, [[1, 2], [0, 1]])  # items 1..5 in the columns
    popularity = torch.tensor([0.0, 1, 2, 0, 0], dtype=torch.float64) / 2 * 1e-6
    assert torch.allclose(scores[0], torch.tensor([0, 0.5, 2, 0, 0.0]).double() + popularity)
    # A one-item history: its padding (0) contributes nothing.
    assert torch.allclose(scores[1], torch.tensor([0, 1, 0, 0, 0.0]).double() + popularity)


def test_backoff_orders_ties_and_ranks_use_the_pessimistic_rule() -> None:
    model = fitted(MarkovRecommender(num_items=5, order=1))
    scores = torch.nn.functional.pad(scores_of(model, [[0, 4], [0, 4]]), (1, 0), value=-1e9)
    # No transitions from 4: popularity decides (3 before 2), items 1, 4, 5 tie at the bottom.
    assert target_ranks(scores, torch.tensor([3, 2])).tolist() == [1, 2]
    assert target_ranks(scores, torch.tensor([1, 5])).tolist() == [5, 5]
    pop = fitted(PopularityRecommender(num_items=5))
    assert scores_of(pop, [[1], [2]]).tolist() == [[0, 1, 2, 0, 0]] * 2


def test_unfitted_and_bad_settings_fail_clearly() -> None:
    with pytest.raises(ConfigError, match="has no counts"):
        scores_of(MarkovRecommender(num_items=5), [[1]])
    with pytest.raises(ConfigError, match="order must be 1 or 2"):
        MarkovRecommender(num_items=5, order=3)
    with pytest.raises(ConfigError, match="backoff"):
        MarkovRecommender(num_items=5, backoff=0.5)


def test_markov_learns_the_synthetic_rule_without_gradient_steps(run_env: Path) -> None:
    overrides = [f"paths.output_dir={run_env / 'm'}", "data=synthetic", "model=markov"]
    cfg = compose_config(overrides)
    results = train(compose_config([*overrides, "model.order=1", *QUIET]))
    assert results["test"]["test/hr@5"] == 1.0 and results["val_best"]["val/hr@5"] == 1.0
    assert results["val_best_epoch"] == 0 and results["epochs"] == 1
    # The model's budget replaced the trainer's, and the saved config says so.
    assert cfg.trainer.max_epochs != 1 and results["config"]["trainer"]["max_epochs"] == 1


def test_checkpoint_carries_the_counts(run_env: Path) -> None:
    overrides = ["data=toys", "model=markov", *QUIET, "trainer.limit_val_batches=2"]
    results = train(compose_config([f"paths.output_dir={run_env / 'fit'}", *overrides,
                                    "trainer.limit_test_batches=2"]))  # fmt: skip
    ckpt = results["best_checkpoint"]
    loaded = MarkovRecommender.load_from_checkpoint(ckpt, weights_only=False)
    cfg = compose_config([f"paths.output_dir={run_env / 'x'}", *overrides])
    datamodule, fresh, _ = build(cfg)
    datamodule.setup()
    fresh.fit_counts(datamodule.dataset("train"))
    assert loaded.val.numel() > 10_000 and loaded.popularity.numel() == 11_925
    for name in ("popularity", "crow", "col", "val"):
        assert torch.equal(getattr(loaded, name), getattr(fresh, name))
    # train=false with the checkpoint: the same test, and the checkpoint's own validation.
    again = train(compose_config([f"paths.output_dir={run_env / 'test'}", *overrides,
                                  "trainer.limit_test_batches=2", "train=false",
                                  f"ckpt_path={ckpt}"]))  # fmt: skip
    assert again["test"] == results["test"]
    assert again["val_best"] == pytest.approx(results["val_best"])


def test_popularity_on_toys_is_far_below_markov(run_env: Path) -> None:
    limits = [*QUIET, "data=toys", "trainer.limit_val_batches=4", "trainer.limit_test_batches=4"]
    pop = train(compose_config([f"paths.output_dir={run_env / 'p'}", "model=pop", *limits]))
    markov = train(compose_config([f"paths.output_dir={run_env / 'm'}", "model=markov", *limits]))
    assert pop["test"]["test/hr@10"] < 0.03 < markov["test"]["test/hr@10"]


@pytest.mark.slow
def test_markov_reaches_the_toys_floor(run_env: Path) -> None:
    """The floor quoted in method.md (val HR@10 0.095, test 0.079 / NDCG@10 0.051), full splits."""
    results = train(compose_config([f"paths.output_dir={run_env}", "data=toys", "model=markov",
                                    *QUIET]))  # fmt: skip
    assert results["val_best"]["val/hr@10"] == pytest.approx(0.095, abs=0.003)
    assert results["test"]["test/hr@10"] == pytest.approx(0.079, abs=0.003)
    assert results["test"]["test/ndcg@10"] == pytest.approx(0.051, abs=0.002)


def test_eval_samples_feed_the_validation_item_to_test() -> None:
    store = store_of(SEQUENCES, 5)
    test = eval_samples(store, "test", max_len=10).__getitems__([0])
    model = fitted(MarkovRecommender(num_items=5, order=1, backoff=0.0))
    # Test input of user 0 ends with its validation item 4, whose row (4->5) is not counted.
    assert test["seq"].tolist() == [[1, 2, 3, 4]]
    assert scores_of(model, test["seq"].tolist()).sum() == 0
