"""Every YAML of every config group composes, and its objects can be built from it."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import open_dict

from diffurec_lightning.config import CONF_DIR, compose_config
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


@pytest.mark.parametrize("data", names("data"))
def test_every_data_config_instantiates(data: str, tmp_path: Path) -> None:
    extra = [f"data.path={tmp_path / 'x.csv'}"] if data == "custom" else []
    cfg = compose_config([f"data={data}", *extra])
    datamodule = instantiate(cfg.data)
    assert datamodule.max_len == cfg.data.max_len


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
