"""model.transition_prior: a neural model ranked by log p(j) + w log(1 + Markov counts).

The counts are the Markov baseline's (training sequences only, fitted when fitting starts and
carried by the checkpoint); w = 0 leaves the model exactly as it was; the weight is chosen on
validation by analysis/prior_weight.py.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from diffurec_lightning.analysis import checkpoints, prior_weight
from diffurec_lightning.config import compose_config
from diffurec_lightning.errors import ConfigError
from diffurec_lightning.models.counting import MarkovRecommender
from diffurec_lightning.models.diffusion_module import DiffusionRecModule
from diffurec_lightning.train import build, train

QUIET = ["logger=csv", "callbacks.progress_bar=null", "callbacks.case_studies.enabled=false"]
LIMITS = [
    "data=toys",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=20",
    "trainer.limit_val_batches=4",
    "trainer.limit_test_batches=4",
    *QUIET,
]
SHORT = [
    *LIMITS,
    "model=diffurec",
    "model.hidden_size=32",
    "model.net.num_heads=2",
    "model.diffusion.num_steps=4",
]


@pytest.fixture(scope="module")
def hybrid_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path, mirror: Path) -> dict:
    """A short real Toys run with the prior (w = 2)."""
    home = tmp_path_factory.mktemp("hybrid")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("DIFFUREC_HOME", str(home))
        env.setenv("DIFFUREC_DATA_DIR", str(data_dir))
        env.setenv("DIFFUREC_DATA_MIRROR", str(mirror))
        cfg = compose_config(
            [f"paths.output_dir={home / 'run'}", *SHORT, "model.transition_prior=2"]
        )
        return train(cfg)


def test_the_prior_adds_the_markov_counts_to_the_log_softmax(
    hybrid_run: dict, run_env: Path
) -> None:
    model = DiffusionRecModule.load_from_checkpoint(
        hybrid_run["best_checkpoint"], map_location="cpu", weights_only=True
    ).eval()
    assert model.hparams.transition_prior == 2 and model.prior.fitted()
    cfg = compose_config([f"paths.output_dir={run_env / 'x'}", *SHORT])
    datamodule, _, _ = build(cfg)
    datamodule.setup()
    markov = MarkovRecommender(num_items=datamodule.num_items, backoff=0.0)
    markov.fit_counts(datamodule.dataset("train"))  # the checkpoint's counts are these
    for name in ("crow", "col", "val"):
        assert torch.equal(getattr(model.prior, name), getattr(markov, name))
    batch = next(iter(datamodule.test_dataloader()))
    with torch.inference_mode():
        neural = torch.log_softmax(model.eval_scores(batch), dim=-1)
        expected = neural + 2 * torch.log1p(markov.eval_scores(batch)).float()
        assert torch.allclose(model.ranking_scores(batch), expected, atol=1e-5)
        assert (markov.eval_scores(batch) > 0).any()  # the prior is not vacuous here
        # Without the prior the module ranks by its own scores, as before.
        model.prior = None
        assert torch.equal(model.ranking_scores(batch), model.eval_scores(batch))


def test_a_heavy_prior_ranks_the_counted_transitions_first(run_env: Path) -> None:
    """w large: every item with transition counts from the last items comes before every item
    without, and the validation metrics approach the Markov model's."""
    common = ["trainer.limit_val_batches=8", "test=false"]
    heavy = train(compose_config([f"paths.output_dir={run_env / 'h'}", *SHORT, *common,
                                  "model.transition_prior=1000"]))  # fmt: skip
    markov = train(compose_config([f"paths.output_dir={run_env / 'm'}", *LIMITS, *common,
                                   "model=markov"]))  # fmt: skip
    plain = train(compose_config([f"paths.output_dir={run_env / 'p'}", *SHORT, *common]))
    hr = "val/hr@10"
    assert heavy["val_best"][hr] == pytest.approx(markov["val_best"][hr], abs=0.02)
    assert heavy["val_best"][hr] > plain["val_best"][hr]  # one epoch of 20 batches: far below


def test_prior_weight_analysis_chooses_on_validation(
    hybrid_run: dict, run_env: Path, tmp_path: Path
) -> None:
    run = Path(hybrid_run["best_checkpoint"]).parent.parent
    result = prior_weight.main(["--run", str(run), "--weights", "0,1000", "--out", str(tmp_path)])
    rows = {row["weight"]: row for row in result["rows"]}
    ndcg = "val/ndcg@10"
    assert result["chosen_weight"] == max(rows, key=lambda w: rows[w]["val"][ndcg])
    assert rows[0]["val"] != rows[1000]["val"]  # the weight changes the ranking
    assert json.loads((tmp_path / "prior_weight.json").read_text())["rows"] == result["rows"]
    text = (tmp_path / "prior_weight.md").read_text()
    assert "Chosen on validation ndcg@10" in text
    assert ("The largest weight tried" in text) == (result["chosen_weight"] == 1000)


def test_bad_weights_fail_in_one_line(run_env: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="transition_prior must be >= 0"):
        train(compose_config([f"paths.output_dir={tmp_path}", *SHORT, "model.transition_prior=-1"]))
    with pytest.raises(ConfigError, match="--weights"):
        prior_weight.parse_weights("1,x")
    with pytest.raises(ConfigError, match="no results.json"):
        prior_weight.main(["--run", str(tmp_path)])


def test_one_pass_over_the_weights_equals_the_model_with_each_weight(
    hybrid_run: dict, run_env: Path
) -> None:
    """prior_weight scores every batch once and re-ranks it per weight; that must give what the
    model itself ranks with model.transition_prior set to each weight (w = 0: no prior)."""
    datamodule, model = checkpoints.load(Path(hybrid_run["best_checkpoint"]))
    batches = list(itertools.islice(datamodule.val_dataloader(), 3))
    prior = model.prior
    weights = [0.0, 0.5, 4.0]
    one_pass = prior_weight.evaluate(model, batches, prior, weights, "val/", None)
    for weight, values in zip(weights, one_pass, strict=True):
        model.prior = prior if weight > 0 else None
        model.hparams.transition_prior = weight
        model.val_metrics.reset()
        with torch.inference_mode():
            for batch in batches:
                model.val_metrics.update(model.rank_batch(batch))
        assert values == {k: float(v) for k, v in model.val_metrics.compute().items()}
    assert one_pass[0] != one_pass[2]  # the weight changes the ranking
