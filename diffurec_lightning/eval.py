"""Use a trained checkpoint without training: ``python -m diffurec_lightning.eval ckpt_path=...``.

Modes (``mode=``): ``test`` runs the test set with the case studies and writes ``eval.json``;
``predict`` writes every user's top-K recommendations (original ids) to parquet; ``curves``
measures test metrics against the number of reverse steps and the ensemble size. The model is
rebuilt by the stock ``Module.load_from_checkpoint`` of the class the checkpoint records (the
README's snippet does the same); the dataset comes from the run's saved config.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from diffurec_lightning.checkpoints import MODEL_CLASS, load_checkpoint
from diffurec_lightning.config import CONF_DIR
from diffurec_lightning.data.sources import legacy_data_config
from diffurec_lightning.errors import ConfigError
from diffurec_lightning.io import write_json
from diffurec_lightning.utils import (
    instantiate_group,
    print_metrics_table,
    resolve_trainer_precision,
    task_wrapper,
)


def find_run_dir(ckpt_path: Path) -> Path | None:
    """The run folder of a checkpoint: the nearest parent holding a saved config."""
    for folder in (ckpt_path.parent.parent, ckpt_path.parent):
        if (folder / ".hydra" / "config.yaml").is_file() or (folder / "results.json").is_file():
            return folder
    return None


def saved_run_config(run_dir: Path) -> DictConfig:
    """The run's config; .hydra/config.yaml first, since its interpolations (data paths, mirror)
    resolve again in this session, while results.json holds the old session's resolved values."""
    hydra_cfg = run_dir / ".hydra" / "config.yaml"
    results = run_dir / "results.json"
    if hydra_cfg.is_file():
        saved = OmegaConf.load(hydra_cfg)
    elif results.is_file():
        saved = OmegaConf.create(json.loads(results.read_text())["config"])
    else:
        raise ConfigError(
            f"{run_dir}: no .hydra/config.yaml or results.json; pass data=<name> instead"
        )
    if "data" in saved and "source" not in saved.data:  # saved before data.source existed
        saved.data = legacy_data_config(OmegaConf.to_container(saved.data))
    return saved


def complete_config(cfg: DictConfig) -> DictConfig:
    """Fill the dataset, model class and seed in from the checkpoint (and its run) unless given."""
    ckpt = Path(cfg.ckpt_path)
    checkpoint = load_checkpoint(ckpt)  # refuses foreign files and old layouts, in one line
    hparams = checkpoint.get("hyper_parameters", {})
    run_dir = Path(cfg.run_dir) if cfg.get("run_dir") else find_run_dir(ckpt)
    saved = saved_run_config(run_dir) if run_dir is not None else None
    if saved is None and (cfg.get("data") is None or "_target_" not in cfg.data):
        raise ConfigError(f"{ckpt}: no run folder with a saved config found; pass data=<name>")
    with open_dict(cfg):
        cfg.run_dir = str(run_dir) if run_dir is not None else None
        if cfg.get("data") is None:
            cfg.data = saved.data
        elif "_target_" not in cfg.data and saved is not None:
            # +data.eval_batch_size=64 and the like change the run's own dataset config.
            cfg.data = OmegaConf.merge(saved.data, cfg.data)
        # The class is recorded in the checkpoint (else in the run's config): never guessed.
        target = checkpoint.get(MODEL_CLASS)
        if target is None and saved is not None and "model" in saved:
            target = saved.model.get("_target_")
        if target is None:
            raise ConfigError(
                f"{ckpt}: records no model class and has no run config; pass run_dir="
            )
        cfg.model = {"_target_": target, "name": hparams.get("name", "model")}
        if cfg.get("seed") is None:
            cfg.seed = saved.get("seed", 0) if saved is not None else 0
        # Evaluation trains nothing: there is no new model to upload (and offline W&B refuses it).
        if cfg.get("logger") and "wandb" in cfg.logger:
            cfg.logger.wandb.log_model = False
    return cfg


def load_model(cfg: DictConfig, num_items: int) -> L.LightningModule:
    """The checkpoint's model through the stock ``load_from_checkpoint`` of its class, with
    ``cfg.hparams`` merged into the stored hyperparameters (nested keys too, e.g.
    ``+hparams.sampler.steps=5``)."""
    cls = get_class(cfg.model._target_)
    overrides: dict[str, Any] = {}
    if cfg.get("hparams"):
        stored = load_checkpoint(cfg.ckpt_path).get("hyper_parameters", {})
        merged = OmegaConf.to_container(OmegaConf.merge(stored, cfg.hparams), resolve=True)
        overrides = {key: merged[key] for key in cfg.hparams}
    # complete_config checked the file: plain data, which the weights-only unpickler reads.
    model = cls.load_from_checkpoint(
        cfg.ckpt_path, map_location="cpu", weights_only=True, **overrides
    )
    trained = int(model.hparams.get("num_items", num_items))
    if trained != num_items:
        raise ConfigError(
            f"{cfg.ckpt_path} was trained on {trained} items but data={cfg.data.name} has "
            f"{num_items}; pass the dataset the model was trained on"
        )
    return model.eval()


def setup(cfg: DictConfig) -> tuple[DictConfig, L.LightningDataModule, L.LightningModule]:
    cfg = complete_config(cfg)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("test")
    return cfg, datamodule, load_model(cfg, datamodule.num_items)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def describe(cfg: DictConfig, model: L.LightningModule) -> dict[str, Any]:
    """What every eval output records about where it came from."""
    return {
        "mode": cfg.mode,
        "ckpt_path": str(cfg.ckpt_path),
        "run_dir": cfg.run_dir,
        "dataset": cfg.data.name,
        "model": cfg.model.name,
        "seed": cfg.seed,
        "hparams": plain_hparams(model),
    }


def plain_hparams(model: L.LightningModule) -> dict[str, Any]:
    """The model's hyperparameters as JSON-ready values (OmegaConf lists become lists)."""
    return {
        key: OmegaConf.to_container(value) if isinstance(value, DictConfig | ListConfig) else value
        for key, value in model.hparams.items()
    }


def run_test(cfg: DictConfig) -> dict[str, Any]:
    """Test with the case-study callbacks; writes eval.json into the eval folder."""
    started = time.time()
    cfg, datamodule, model = setup(cfg)
    resolve_trainer_precision(cfg)
    trainer = instantiate(
        cfg.trainer,
        logger=instantiate_group(cfg.get("logger")) or False,
        callbacks=instantiate_group(cfg.get("callbacks")),
    )
    for logger in trainer.loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    trainer.test(model, datamodule=datamodule)
    test = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
    result = {**describe(cfg, model), "test": test, "wall_time_s": round(time.time() - started, 2)}
    if trainer.is_global_zero:
        write_json(Path(cfg.paths.output_dir) / "eval.json", result)
        print_metrics_table(f"test: {cfg.model.name} on {cfg.data.name}", test)
    return result


def run_predict(cfg: DictConfig) -> dict[str, Any]:
    """Top-K recommendations to parquet through ``trainer.predict`` (trainer.* sets devices and
    precision; callbacks.progress_bar shows progress)."""
    from diffurec_lightning.predict import predict_to_parquet

    if not cfg.predict.get("out"):
        raise ConfigError("mode=predict needs predict.out=<file.parquet>")
    cfg, datamodule, model = setup(cfg)
    resolve_trainer_precision(cfg)
    # No logger: a prediction has no metrics, and the W&B run would hold nothing.
    trainer = instantiate(
        cfg.trainer, logger=False, callbacks=instantiate_group(cfg.get("callbacks"))
    )
    summary = predict_to_parquet(trainer, model, datamodule, **cfg.predict)
    if trainer.is_global_zero:
        print(
            f"wrote {summary['rows']} recommendations of {summary['users']} users "
            f"to {summary['out']}"
        )
    return {**describe(cfg, model), **summary}


def run_curves(cfg: DictConfig) -> dict[str, Any]:
    from diffurec_lightning.analysis.curves import curves_report

    cfg, datamodule, model = setup(cfg)
    return {
        **describe(cfg, model),
        **curves_report(cfg, datamodule, model, pick_device(cfg.device)),
    }


MODES: dict[str, Callable[[DictConfig], dict[str, Any]]] = {
    "test": run_test,
    "predict": run_predict,
    "curves": run_curves,
}


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run the configured mode (a plain function: tests call it with a composed config)."""
    if cfg.mode not in MODES:
        raise ConfigError(f"mode={cfg.mode} is unknown; choose one of {sorted(MODES)}")
    return MODES[cfg.mode](cfg)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="eval")
def main(cfg: DictConfig) -> None:
    task_wrapper(evaluate)(cfg)


def cli() -> None:
    """The ``diffurec-eval`` command (also ``python -m diffurec_lightning.eval``)."""
    from diffurec_lightning.cli import run

    run(main, "eval")  # overrides checked first: one error line instead of Hydra's trace


if __name__ == "__main__":
    cli()
