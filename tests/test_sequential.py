"""SASRec and GRU4Rec: masks, padding invariance, registry, one evaluation path, learning, toys;
and the model config group every model shares."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from builders import sequential
from hydra.utils import instantiate

from diffurec_lightning.config import CONF_DIR, compose_config
from diffurec_lightning.errors import ConfigError
from diffurec_lightning.models.base import RecommenderModule
from diffurec_lightning.models.sequential import GRU4Rec, causal_mask
from diffurec_lightning.models.sequential_module import SequentialRecModule
from diffurec_lightning.train import train

torch.set_num_threads(1)

MODELS = ["sasrec", "gru4rec"]
NETWORKS = {
    "sasrec": {"name": "sasrec", "num_blocks": 2, "num_heads": 2, "dropout": 0.0},
    "gru4rec": {"name": "gru4rec", "state_size": 24, "dropout": 0.0},
}


def tiny_model(model: str) -> SequentialRecModule:
    torch.manual_seed(0)
    return sequential(
        num_items=12,
        network=NETWORKS[model],
        name=model,
        hidden_size=16,
        emb_dropout=0.0,
        position_embedding=model == "sasrec",
        max_len=8,
    ).eval()


def batch_of(seq: list[list[int]]) -> dict[str, torch.Tensor]:
    return {
        "seq": torch.tensor(seq),
        "target": torch.ones(len(seq), dtype=torch.long),
        "user": torch.arange(len(seq)),
    }


def test_causal_mask_sees_real_past_items_and_itself() -> None:
    mask = causal_mask(torch.tensor([[False, True, True]]))
    assert mask.shape == (1, 1, 3, 3)
    assert mask[0, 0].tolist() == [
        [True, False, False],  # a padded row sees only itself: never all-masked (no NaN)
        [False, True, False],
        [False, True, True],
    ]


@pytest.mark.parametrize("model", MODELS)
def test_shapes_and_one_evaluation_path(model: str) -> None:
    module = tiny_model(model)
    batch = batch_of([[0, 0, 3, 4], [1, 2, 3, 4]])
    with torch.no_grad():
        assert module.represent(batch["seq"]).shape == (2, 16)
        scores = module.eval_scores(batch)
    assert scores.shape == (2, 12) and scores.dtype == torch.float32
    for hook in ("validation_step", "test_step", "predict_step", "rank_batch"):
        assert getattr(SequentialRecModule, hook) is getattr(RecommenderModule, hook)


@pytest.mark.parametrize("model", MODELS)
def test_padding_never_changes_predictions(model: str) -> None:
    module = tiny_model(model)
    base = batch_of([[0, 0, 3, 4], [5, 6, 7, 8]])
    wider = batch_of([[0, 0, 0, 0, 0, 3, 4], [0, 0, 0, 5, 6, 7, 8]])  # extra left padding
    with torch.no_grad():
        expected = module.eval_scores(base)
        torch.testing.assert_close(module.eval_scores(wider), expected)
        module.items.table.weight[0] += 1.0  # what padded positions hold changes
        torch.testing.assert_close(module.eval_scores(base), expected)
        assert torch.isfinite(expected).all()


def test_gru4rec_matches_a_plain_gru_over_the_real_items() -> None:
    torch.manual_seed(0)
    network = GRU4Rec(hidden_size=8, state_size=6, dropout=0.0).eval()
    emb = torch.randn(2, 4, 8)
    mask = torch.tensor([[False, False, True, True], [True, True, True, True]])
    out = network(emb, mask)
    with torch.no_grad():
        _, first = network.gru(emb[:1, 2:])
        _, second = network.gru(emb[1:])
    torch.testing.assert_close(out[0], network.project(first[-1, 0]))
    torch.testing.assert_close(out[1], network.project(second[-1, 0]))


def test_sasrec_is_causal_inside_the_stack() -> None:
    """Changing the most recent item must not change earlier positions of the first block."""
    module = tiny_model("sasrec")
    block = module.net.blocks[0]
    seq = torch.tensor([[0, 2, 3, 4]])
    other = torch.tensor([[0, 2, 3, 9]])
    with torch.no_grad():
        first = block(module.items(seq), causal_mask(seq > 0))
        second = block(module.items(other), causal_mask(other > 0))
    torch.testing.assert_close(first[:, 1:3], second[:, 1:3])
    assert not torch.allclose(first[:, 3], second[:, 3])


def test_unknown_network_or_option_is_named() -> None:
    gru = "diffurec_lightning.models.sequential.GRU4Rec"
    with pytest.raises(ConfigError, match="model.net: .*BERT4Rec"):
        SequentialRecModule(num_items=5, net={"_target_": "diffurec_lightning.models.BERT4Rec"})
    with pytest.raises(ConfigError, match="model.net: .*num_layer"):
        SequentialRecModule(
            num_items=5, hidden_size=8, net={"_target_": gru, "hidden_size": 8, "num_layer": 2}
        )
    with pytest.raises(
        ConfigError, match=r"model.net.hidden_size \(8\) must equal model.hidden_size"
    ):
        SequentialRecModule(num_items=5, net={"_target_": gru, "hidden_size": 8})
    with pytest.raises(ConfigError, match="model.net must be a config node with a _target_"):
        SequentialRecModule(num_items=5, net={"num_blocks": 2})


# -- the model config group ------------------------------------------------------------------
MODEL_CONFIGS = sorted(path.stem for path in (CONF_DIR / "model").glob("*.yaml"))


@pytest.mark.parametrize("model", MODEL_CONFIGS)
def test_every_model_config_builds_from_the_group(model: str) -> None:
    cfg = compose_config([f"model={model}", "data=synthetic", "paths.output_dir=unused"])
    assert cfg.model.name == model
    assert cfg.model._get_node("num_items")._is_missing()  # train.py fills it in
    module = instantiate(cfg.model, num_items=7)
    assert isinstance(module, RecommenderModule)
    assert module.hparams.num_items == 7


# -- training runs ---------------------------------------------------------------------------
def run(out: Path, model: str, *overrides: str) -> dict:
    cfg = compose_config(
        [
            f"paths.output_dir={out}",
            "logger=csv",
            f"model={model}",
            "callbacks.progress_bar=null",
            *overrides,
        ]
    )
    return train(cfg)


@pytest.mark.parametrize("model", MODELS)
def test_learns_the_synthetic_rule(model: str, run_env: Path) -> None:
    results = run(
        run_env / "run",
        model,
        "data=synthetic",
        "trainer.max_epochs=3",
        "trainer.check_val_every_n_epoch=3",
        "model.emb_dropout=0.1",
        "model.net.dropout=0.1",
        "model.optimizer.lr=0.005",
    )
    assert results["test"]["test/hr@10"] > 0.9
    assert results["val_best"]["val/hr@10"] > 0.9


@pytest.mark.parametrize("model", MODELS)
def test_fast_dev_run_on_real_toys(model: str, run_env: Path) -> None:
    results = run(run_env / "run", model, "data=toys", "debug=fast")
    assert set(results["test"]) >= {f"test/{m}@{k}" for m in ("hr", "ndcg") for k in (5, 10, 20)}
    assert results["dataset"] == "toys" and results["model"] == model


# -- the per-position objective ----------------------------------------------------------------
def test_every_position_is_causal_and_the_last_one_is_the_representation() -> None:
    for model in MODELS:
        module = tiny_model(model)
        seq = torch.tensor([[0, 0, 3, 4, 5], [1, 2, 3, 4, 6]])
        with torch.no_grad():
            states = module.net(module.items(seq), seq > 0, all_positions=True)
            assert states.shape == (2, 5, 16)
            torch.testing.assert_close(states[:, -1], module.represent(seq))
            other = seq.clone()
            other[:, -1] = 9  # the most recent item never reaches earlier positions
            changed = module.net(module.items(other), other > 0, all_positions=True)
        torch.testing.assert_close(changed[:, 2:4], states[:, 2:4])
        assert not torch.allclose(changed[:, -1], states[:, -1])


def test_gru4rec_position_j_is_the_representation_of_the_prefix_up_to_j() -> None:
    module = tiny_model("gru4rec")
    seq = torch.tensor([[0, 0, 3, 4, 5], [1, 2, 3, 4, 6]])
    with torch.no_grad():
        states = module.net(module.items(seq), seq > 0, all_positions=True)
        for j in range(2, 5):
            torch.testing.assert_close(states[:, j], module.represent(seq[:, : j + 1]))


def test_per_position_loss_is_the_mean_over_real_positions() -> None:
    torch.manual_seed(0)
    module = sequential(
        num_items=12, network=NETWORKS["sasrec"], hidden_size=16, emb_dropout=0.0, max_len=8,
        objective="per_position",
    )  # fmt: skip
    assert module.train_samples == "sequences"
    seq = torch.tensor([[0, 0, 3, 4], [1, 2, 3, 4]])
    target = torch.tensor([[0, 0, 4, 7], [2, 3, 4, 9]])
    batch = {"seq": seq, "target": target, "user": torch.arange(2)}
    logged: dict[str, float] = {}
    module.log = lambda key, value, **kw: logged.__setitem__(key, (float(value), kw))
    loss = module.training_step(batch, 0)
    with torch.no_grad():
        states = module.net(module.items(seq), seq > 0, all_positions=True)
        logits = states @ module.items.table.weight[1:].t()  # (B, L, N)
        terms = [
            -torch.log_softmax(logits[b, j], -1)[target[b, j] - 1]
            for b in range(2)
            for j in range(4)
            if target[b, j] > 0
        ]
    assert len(terms) == 6
    assert loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)
    assert logged["train/loss"][1]["batch_size"] == 6
    with pytest.raises(ConfigError, match="data.train_samples=sequences"):
        module.training_step({**batch, "target": target[:, -1]}, 0)
    with pytest.raises(ConfigError, match="model.objective must be one of"):
        sequential(num_items=5, network=NETWORKS["sasrec"], objective="cloze")


def test_objective_and_data_must_agree(run_env: Path) -> None:
    with pytest.raises(ConfigError, match="set data.train_samples=sequences"):
        run(run_env / "run", "sasrec", "data=synthetic", "model.objective=per_position")
    with pytest.raises(ConfigError, match="set data.train_samples=prefixes"):
        run(run_env / "run", "diffurec", "data=synthetic", "data.train_samples=sequences")


@pytest.mark.parametrize("model", MODELS)
def test_per_position_preset_composes_and_learns_the_synthetic_rule(
    model: str, run_env: Path
) -> None:
    preset = compose_config([f"experiment={model}_toys", "paths.output_dir=unused"])
    assert preset.model.objective == "per_position" and preset.data.train_samples == "sequences"
    assert preset.data.batch_size == 128 and preset.trainer.check_val_every_n_epoch == 1
    if model == "sasrec":
        assert (
            list(preset.model.optimizer.betas) == [0.9, 0.98] and preset.model.net.num_blocks == 2
        )
    results = run(
        run_env / "run",
        model,
        "data=synthetic",
        "data.train_samples=sequences",
        "model.objective=per_position",
        "data.batch_size=32",  # one sample per user: 13 steps an epoch
        "trainer.max_epochs=8",
        "trainer.check_val_every_n_epoch=8",
        "model.emb_dropout=0.1",
        "model.net.dropout=0.1",
        "model.optimizer.lr=0.01",
    )
    assert results["test"]["test/hr@10"] > 0.9
