"""Every YAML of every config group composes, and its objects can be built from it."""

from __future__ import annotations

import re
from pathlib import Path

import lightning
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf, open_dict

from diffurec_lightning.checkpoints import MODEL_CLASS
from diffurec_lightning.cli import check_overrides
from diffurec_lightning.config import CONF_DIR, compose_config
from diffurec_lightning.errors import ConfigError
from diffurec_lightning.utils import resolve_trainer_precision


def names(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("model", names("model"))
def test_every_model_config_instantiates(model: str) -> None:
    cfg = compose_config([f"model={model}"])
    with open_dict(cfg):
        cfg.model.num_items = 50
    module = instantiate(cfg.model)
    assert module.hparams.name == cfg.model.name == model


@pytest.mark.parametrize("model", names("model"))
def test_every_model_rebuilds_from_its_checkpoint_alone(model: str, tmp_path: Path) -> None:
    """The stock load_from_checkpoint, weights-only, on what on_save_checkpoint writes."""
    cfg = compose_config([f"model={model}"])
    with open_dict(cfg):
        cfg.model.num_items = 50
    torch.manual_seed(0)
    module = instantiate(cfg.model).eval()
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    checkpoint["pytorch-lightning_version"] = lightning.__version__  # as Lightning writes it
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "m.ckpt")
    cls = get_class(torch.load(tmp_path / "m.ckpt", weights_only=True)[MODEL_CLASS])
    assert cls is type(module)
    loaded = cls.load_from_checkpoint(tmp_path / "m.ckpt", weights_only=True).eval()
    assert dict(loaded.hparams) == dict(module.hparams)
    for key, value in module.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, msg=key)
    if model not in ("pop", "markov"):  # unfitted counts score nothing
        batch = {"seq": torch.tensor([[0, 3, 4], [5, 6, 7]]), "user": torch.tensor([0, 1])}
        with torch.no_grad():
            torch.testing.assert_close(loaded.eval_scores(batch), module.eval_scores(batch))


@pytest.mark.parametrize("data", names("data"))
def test_every_data_config_instantiates(data: str, tmp_path: Path) -> None:
    extra = {"custom": [f"data.source.path={tmp_path / 'x.csv'}"], "benchmark": ["data.name=toys"]}
    cfg = compose_config([f"data={data}", *extra.get(data, [])])
    datamodule = instantiate(cfg.data)
    assert datamodule.max_len == cfg.data.max_len
    assert datamodule.name == cfg.data.name


def test_benchmarks_extend_one_file() -> None:
    """toys/beauty/ml-1m differ from benchmark.yaml in their name only."""

    def resolved(*overrides: str) -> dict:
        return OmegaConf.to_container(compose_config(list(overrides)).data, resolve=True)

    base = resolved("data=benchmark", "data.name=toys")
    for name in ("toys", "beauty", "ml-1m"):
        data = resolved(f"data={name}")
        assert data["source"]["name"] == data["name"] == name
        data["name"] = data["source"]["name"] = "toys"
        assert data == base


def test_a_misspelt_data_key_is_an_error(tmp_path: Path) -> None:
    """In a config file: composition stops (the typed schema); added by hand: the constructor
    takes no such argument (no **kwargs swallowing it)."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mine.yaml").write_text("defaults:\n  - toys\n  - _self_\nmax_lenn: 5\n")
    with (
        initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"),
        pytest.raises(ConfigCompositionException, match="max_lenn"),
    ):
        compose("train", overrides=["data=mine", f"hydra.searchpath=[file://{tmp_path}]"])
    cfg = compose_config(["data=toys", "+data.source.mirorr=/data"])
    with pytest.raises(InstantiationException, match="mirorr"):
        instantiate(cfg.data)
    cfg = compose_config(["data=toys", "+data.max_lenn=5"])
    with pytest.raises(InstantiationException, match="max_lenn"):
        instantiate(cfg.data)


@pytest.mark.parametrize(
    "override", ["data.batch_size=abc", "trainer.max_epochs=abc", "data.bucketing=maybe"]
)
def test_wrong_types_fail_at_composition(override: str) -> None:
    with pytest.raises(ConfigCompositionException, match="Error merging override"):
        compose_config([override])
    with pytest.raises(ConfigError, match=rf"^{re.escape(override)}: expected "):
        check_overrides([override])


@pytest.mark.parametrize(
    "model, override",
    [
        ("diffurec", "model.diffusion.num_steps=abc"),
        ("diffurec", "model.optimizer.lr=abc"),
        ("diffurecsys", "model.hidden_size=abc"),
        ("diffurecsys", "model.net.block_output_dropout=maybe"),
        ("dcrec", "model.lambda_epochs=abc"),
        ("sasrec", "model.net.num_blocks=abc"),
        ("gru4rec", "model.scheduler.step_size=abc"),
        ("markov", "model.normalize=maybe"),
    ],
)
def test_wrong_model_types_fail_at_composition(model: str, override: str) -> None:
    """The model schemas (diffurec_lightning/model_schemas.py) type the nested nodes too."""
    with pytest.raises(ConfigCompositionException, match="Error merging override"):
        compose_config([f"model={model}", override])
    with pytest.raises(ConfigError, match=rf"^{re.escape(override)}: expected "):
        check_overrides([f"model={model}", override])


def test_a_misspelt_model_key_is_an_error(tmp_path: Path) -> None:
    """In a model YAML (one that extends another inherits its schema) and on the command line;
    a node may still be dropped (``model.scheduler=null``) or a key added with ``+``."""
    (tmp_path / "model").mkdir()
    text = "defaults:\n  - diffurecsys\n  - _self_\nnet:\n  num_block: 2\n"
    (tmp_path / "model" / "mine.yaml").write_text(text)
    with (
        initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"),
        pytest.raises(ConfigCompositionException, match="num_block"),
    ):
        compose("train", overrides=["model=mine", f"hydra.searchpath=[file://{tmp_path}]"])
    with pytest.raises(ConfigError, match=r"^model.net.num_block: no such setting \(did you mean"):
        check_overrides(["model.net.num_block=2"])
    assert compose_config(["model.scheduler=null"]).model.scheduler is None
    assert compose_config(["+model.optimizer.amsgrad=true"]).model.optimizer.amsgrad is True


@pytest.mark.parametrize("model", names("model"))
def test_model_schemas_add_no_key_of_their_own(model: str) -> None:
    """The schemas carry types only: every key of a composed model is set by its YAML (a schema
    key no YAML sets would stay ???), and only num_items is left for the data to fill in."""
    container = OmegaConf.to_container(compose_config([f"model={model}"]).model, resolve=False)
    assert _missing(container) == ["num_items"]


def _missing(node: dict, prefix: str = "") -> list[str]:
    found = []
    for key, value in node.items():
        if isinstance(value, dict):
            found += _missing(value, f"{prefix}{key}.")
        elif value == "???":
            found.append(f"{prefix}{key}")
    return found


@pytest.mark.parametrize("experiment", names("experiment"))
def test_every_experiment_composes_and_builds(experiment: str) -> None:
    model_name, _, data_name = experiment.partition("_")
    if model_name in names("model"):  # a paper preset: <model>_<data> picks both
        cfg = compose_config([f"experiment={experiment}"])
        assert (cfg.model.name, cfg.data.name) == (model_name, data_name)
    else:  # a budget preset: applies to whatever model and data are chosen
        cfg = compose_config(["data=beauty", "model=gru4rec", f"experiment={experiment}"])
        assert (cfg.model.name, cfg.data.name) == ("gru4rec", "beauty")
        assert cfg.trainer != compose_config(["data=beauty", "model=gru4rec"]).trainer
    with open_dict(cfg):
        cfg.model.num_items = 50
    instantiate(cfg.model)
    instantiate(cfg.data)


@pytest.mark.parametrize("trainer", ["default", "cpu", "ddp"])
def test_trainer_configs_instantiate(trainer: str, tmp_path: Path) -> None:
    cfg = compose_config([f"trainer={trainer}", f"paths.output_dir={tmp_path}"])
    with open_dict(cfg):
        cfg.trainer.accelerator = "cpu"
    resolve_trainer_precision(cfg)  # precision: auto is resolved before the Trainer is built
    built = instantiate(cfg.trainer, accelerator="cpu", logger=False, enable_progress_bar=False)
    assert built.max_epochs == cfg.trainer.max_epochs
