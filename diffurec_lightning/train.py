"""Train, validate and test a recommender: ``python -m diffurec_lightning.train data=toys``.

``train(cfg)`` is a plain function (tests call it); ``main`` is the thin Hydra shell around it.
Every run writes ``results.json`` into its run folder: the report and sweep tools read runs from
these files, never from a W&B server.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from diffurec_lightning.analysis.test_curve import TestEveryValidation, plot_history
from diffurec_lightning.checkpoints import check_checkpoint
from diffurec_lightning.config import CONF_DIR
from diffurec_lightning.errors import ConfigError, DiffuRecError
from diffurec_lightning.io import write_json
from diffurec_lightning.launch.requeue import cluster_plugins, hpc_checkpoints
from diffurec_lightning.run_clock import RunClock
from diffurec_lightning.utils import (
    instantiate_group,
    log_best_checkpoint,
    print_metrics_table,
    resolve_trainer_precision,
    task_wrapper,
    warn_if_bf16_is_emulated,
)


def _user_error(exc: BaseException) -> DiffuRecError | None:
    """The DiffuRecError that Hydra's InstantiationException wraps, if any."""
    while exc is not None:
        if isinstance(exc, DiffuRecError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def build(cfg: DictConfig) -> tuple[L.LightningDataModule, L.LightningModule, L.Trainer]:
    """Data, model and trainer from a composed config (the model learns num_items from the data)."""
    try:
        datamodule = instantiate(cfg.data)
        datamodule.prepare_data()
        # The item count is a fact of the data: record it in the config that runs log and save.
        with open_dict(cfg):
            cfg.model.num_items = datamodule.num_items
        model = instantiate(cfg.model)
        # A model fitted by counting (models/counting.py) has no epochs to run: it sets its own
        # short budget, recorded in the config like num_items.
        with open_dict(cfg):
            cfg.trainer.update(getattr(model, "trainer_overrides", {}))
        resolve_trainer_precision(cfg)
        check_train_samples(datamodule, model)
        callbacks = instantiate_group(cfg.get("callbacks"))
        # Passed only when there are some: plugins=None would drop trainer.plugins of the config.
        plugins = cluster_plugins(callbacks)
        trainer = instantiate(
            cfg.trainer,
            logger=instantiate_group(cfg.get("logger")) or False,
            callbacks=callbacks,
            **({"plugins": plugins} if plugins else {}),
        )
    except InstantiationException as exc:
        # Report the configuration mistake itself, not Hydra's wrapper around it.
        raise (_user_error(exc) or exc) from None
    warn_if_bf16_is_emulated(trainer)
    return datamodule, model, trainer


def check_train_samples(datamodule: L.LightningDataModule, model: L.LightningModule) -> None:
    """The data must yield the training samples the model's objective needs (ConfigError)."""
    needed = getattr(model, "train_samples", "prefixes")
    given = getattr(datamodule, "train_samples", "prefixes")
    if needed != given:
        raise ConfigError(
            f"model {model.hparams.get('name', type(model).__name__)} trains on "
            f"data.train_samples={needed}, but the data yields {given}: "
            f"set data.train_samples={needed}"
        )


def _checkpoint_callback(trainer: L.Trainer) -> Any:
    from lightning.pytorch.callbacks import ModelCheckpoint

    return next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)), None)


def resume_checkpoint(cfg: DictConfig, trainer: L.Trainer) -> str | None:
    """``ckpt_path=auto``: the newest checkpoint of this run folder, or None for a fresh start.

    Candidates are the SLURM requeue checkpoints (``hpc_ckpt_<n>.ckpt`` in the trainer's root
    dir, written by launch.requeue.SlurmRequeue when the requeue signal arrives) and
    ModelCheckpoint's ``last.ckpt``; a requeued job keeps its run folder (keyed by the job id),
    so it continues where it stopped.
    Any other value is passed to Lightning unchanged.
    """
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path != "auto":
        return ckpt_path
    candidates = list(hpc_checkpoints(trainer.default_root_dir).values())
    checkpoint = _checkpoint_callback(trainer)
    if checkpoint is not None and checkpoint.dirpath:
        candidates.append(Path(checkpoint.dirpath) / f"{checkpoint.CHECKPOINT_NAME_LAST}.ckpt")
    existing = [path for path in candidates if path.is_file()]
    return str(max(existing, key=lambda path: path.stat().st_mtime_ns)) if existing else None


def tested_validation(model: L.LightningModule, best_path: str, tested: bool) -> dict[str, Any]:
    """Validation metrics (and epoch, step) of the weights that were tested: after a test the
    module holds those of the checkpoint it loaded; without one, the best checkpoint's own."""
    if best_path and not tested:
        import torch

        checkpoint = torch.load(best_path, map_location="cpu", weights_only=True)
        return checkpoint.get("validation", {})
    return getattr(model, "validation", {})


def log_selected_validation(trainer: L.Trainer, validation: dict[str, Any]) -> None:
    """Put the tested checkpoint's validation metrics in the W&B summary next to test/*
    (``val_best/hr@10``, ``val_best/epoch``)."""
    from lightning.pytorch.loggers import WandbLogger

    summary = {f"val_best/{k.split('/', 1)[-1]}": v for k, v in validation.items()}
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and summary:
            logger.experiment.summary.update(summary)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit (optionally), test the best checkpoint (optionally), write results.json; return it."""
    started = time.time()
    L.seed_everything(cfg.seed, workers=True)
    datamodule, model, trainer = build(cfg)
    for logger in trainer.loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    ckpt_path = resume_checkpoint(cfg, trainer)
    check_checkpoint(ckpt_path)  # one clear line for a missing, damaged or foreign file
    if cfg.get("train", True):
        # Checkpoints are plain data (diffurec_lightning/checkpoints.py): nothing in one can run.
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    val_metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}

    checkpoint = _checkpoint_callback(trainer)
    best_path = checkpoint.best_model_path if checkpoint else ""
    test_metrics: dict[str, float] = {}
    if cfg.get("test", True):
        # Without any validation (e.g. fast_dev_run) there is no best checkpoint: test the weights.
        ckpt = (best_path or None) if cfg.get("train", True) else ckpt_path
        trainer.test(model, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)
        test_metrics = {
            k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")
        }

    tested = dict(tested_validation(model, best_path, tested=bool(test_metrics)))
    clock = next((c for c in trainer.callbacks if isinstance(c, RunClock)), None)
    results = {
        "config": OmegaConf.to_container(cfg, resolve=True),
        "dataset": cfg.data.name,
        "protocol": cfg.data.get("protocol", "standard"),
        "model": cfg.model.name,
        "seed": cfg.seed,
        # The last validation; then the validation of the checkpoint that is (or would be)
        # tested, with its epoch; and each metric's maximum over validations (epochs can differ).
        "val": {k: v for k, v in val_metrics.items() if not k.endswith("_best")},
        "val_best": {k: v for k, v in tested.items() if k.startswith("val/")},
        "val_best_epoch": tested.get("epoch"),
        "val_max": {k[: -len("_best")]: v for k, v in val_metrics.items() if k.endswith("_best")},
        "test": test_metrics,
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        # All segments of a resumed run (RunClock), and this process alone.
        "wall_time_s": round((clock.previous_s if clock else 0.0) + time.time() - started, 2),
        "segment_wall_time_s": round(time.time() - started, 2),
        "best_checkpoint": best_path,
        "resumed_from": ckpt_path,
        "padding_fraction": datamodule.padding_fraction("train"),
        "precision": str(cfg.trainer.precision),
    }
    curve = next((c for c in trainer.callbacks if isinstance(c, TestEveryValidation)), None)
    if curve is not None and curve.enabled:
        results["history"] = curve.history
    if trainer.is_global_zero:
        # results.json first: it is the run's record, the artifact upload only a copy.
        write_json(Path(cfg.paths.output_dir) / "results.json", results)
        if results.get("history"):
            title = f"{cfg.model.name} on {cfg.data.name}: learning curve"
            plot_history(
                results["history"], Path(cfg.paths.output_dir) / "learning_curve.png", title
            )
        log_best_checkpoint(trainer, best_path)
        log_selected_validation(trainer, tested)
        if test_metrics:
            title = f"{cfg.model.name} on {cfg.data.name}"
            print_metrics_table(title, test_metrics, tested)
    return results


def check_optimized_metric(cfg: DictConfig) -> None:
    """``optimized_metric`` must name a metric this run reports (ConfigError), checked before
    any data work: ``val/<m>@K`` (or the logged ``val/<m>@K_best``) or ``test/<m>@K``."""
    name = cfg.get("optimized_metric")
    if name is None:
        return
    ks = list(cfg.model.get("ks", []))
    val = [f"val/{metric}@{k}" for metric in ("hr", "ndcg") for k in ks]
    known = [*val, *(f"{key}_best" for key in val), *(key.replace("val/", "test/") for key in val)]
    if name not in known:
        raise ConfigError(
            f"optimized_metric={name} is not a metric of this run; use val/hr@K, val/ndcg@K "
            f"(the best validation value) or test/hr@K, test/ndcg@K, K in {ks}, or null"
        )


def optimized_value(results: dict[str, Any], name: str | None) -> float | None:
    """The value a Hydra sweeper optimises (``optimized_metric``): a validation metric's best
    over the run's validations, or a test metric; None without a name or without the metric
    (e.g. train=false, or the refit protocol, which has no validation)."""
    if name is None:
        return None
    if name.startswith("test/"):
        value = results["test"].get(name)
    else:
        value = results["val_max"].get(name.removesuffix("_best"))
    return None if value is None else float(value)


def fit_by_protocol(cfg: DictConfig) -> dict[str, Any]:
    """``train``, or ``refit`` for ``data.protocol=refit`` (which runs train() itself)."""
    check_optimized_metric(cfg)
    if cfg.data.get("protocol", "standard") == "refit":
        from diffurec_lightning.refit import refit

        return refit(cfg)
    return train(cfg)


# as a command: a user's mistake is one ``error:`` line
train_or_refit = task_wrapper(fit_by_protocol)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    results = train_or_refit(cfg)
    # What a Hydra sweeper (Optuna, Nevergrad, ...) optimises.
    return optimized_value(results, cfg.get("optimized_metric"))


def cli() -> None:
    """The ``diffurec-train`` command (also ``python -m diffurec_lightning.train``)."""
    from diffurec_lightning.cli import run

    run(main, "train")  # overrides checked first: one error line instead of Hydra's trace


if __name__ == "__main__":
    cli()
