"""Helpers the commands share: building logger/callback groups, the trainer's precision, the
end-of-run table and W&B upload, and the wrapper that turns a task into a command."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from diffurec_lightning.errors import DiffuRecError
from diffurec_lightning.precision import (
    AUTO,
    FP32,
    cpu_has_native_bf16,
    describe_precision,
    resolve_precision,
)

T = TypeVar("T")


def finish_wandb() -> None:
    """Close the W&B run if one is open, so an offline run is complete on disk."""
    wandb = sys.modules.get("wandb")  # never imported: no run can be open
    if wandb is not None and wandb.run is not None:
        wandb.finish()


def task_wrapper(task: Callable[..., T]) -> Callable[..., T]:
    """``task`` as a command's body: a DiffuRecError (a mistake of the user's) becomes one
    ``error:`` line and exit status 2 instead of a traceback, and W&B is closed however the task
    ends, a crash included."""

    @functools.wraps(task)
    def wrapped(*args: Any, **kwargs: Any) -> T:
        try:
            return task(*args, **kwargs)
        except DiffuRecError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        finally:
            finish_wandb()

    return wrapped


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a logger/callback group (null entries skipped)."""
    if not group:
        return []
    return [instantiate(entry) for entry in group.values() if entry and "_target_" in entry]


def resolve_trainer_precision(cfg: DictConfig) -> str:
    """Replace ``trainer.precision: auto`` by what this hardware runs best; log the choice."""
    from lightning.pytorch.utilities import rank_zero_info

    trainer_cfg = cfg.trainer
    chosen = resolve_precision(trainer_cfg.get("precision", FP32), trainer_cfg.get("accelerator"))
    if str(trainer_cfg.get("precision")) == AUTO:
        rank_zero_info(
            f"trainer.precision=auto: {describe_precision(chosen, trainer_cfg.get('accelerator'))}"
        )
    with open_dict(cfg):
        cfg.trainer.precision = chosen
    return chosen


def warn_if_bf16_is_emulated(trainer: L.Trainer) -> None:
    """bf16-mixed on a CPU without bf16 instructions runs about 15x slower than fp32
    (docs/performance.md); say so before an hour is lost, and how to fix it."""
    from lightning.pytorch.utilities import rank_zero_warn

    precision = str(trainer.precision)
    on_cpu = trainer.strategy.root_device.type == "cpu"
    if precision.startswith("bf16") and on_cpu and not cpu_has_native_bf16():
        rank_zero_warn(
            f"trainer.precision={precision} on a CPU without AVX-512 BF16/AMX: bf16 products "
            "are emulated and training is about 15x slower; use trainer.precision=auto or 32-true"
        )


def print_metrics_table(
    title: str, metrics: dict[str, float], validation: dict[str, Any] | None = None
) -> None:
    """Test metrics, under the validation metrics of the same checkpoint when given."""
    from rich.console import Console
    from rich.table import Table

    # Overall metrics only ("test/hr@10"); per-group case-study keys ("test/head/hr@10") stay in
    # results.json and case_studies.json.
    names = [key.split("/")[-1] for key in metrics if key.count("/") == 1]
    table = Table(title=title)
    table.add_column("split")
    for name in names:
        table.add_column(name, justify="right")
    if validation:
        epoch = validation.get("epoch")
        label = "validation" + (f" (epoch {epoch})" if epoch is not None else "")
        table.add_row(label, *(f"{validation.get(f'val/{n}', float('nan')):.4f}" for n in names))
    table.add_row("test", *(f"{metrics[f'test/{n}']:.4f}" for n in names))
    Console().print(table)


def log_best_checkpoint(trainer: L.Trainer, path: str) -> None:
    """Attach the best checkpoint to the W&B run as a model artifact (offline runs keep it for
    `wandb sync`)."""
    from lightning.pytorch.loggers import WandbLogger

    if not path:
        return
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            artifact = wandb.Artifact(f"model-{logger.experiment.id}", type="model")
            artifact.add_file(path, name="best.ckpt")
            logger.experiment.log_artifact(artifact, aliases=["best"])
