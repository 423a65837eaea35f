"""The refit protocol (``data.protocol=refit``): choose the epoch count on validation, then train
from scratch on training + validation items for that many epochs and test.

Phase 1 (skipped when ``refit.epochs`` is given) is a standard run in ``<run>/selection``: it
trains with validation and early stopping, and its best checkpoint's epoch count is the choice.
Phase 2 trains a fresh model (same seed) on the refit training set, where each user's validation
item is appended to its training sequence so that its prefixes become training samples, with no
validation, no early stopping and no checkpoint selection, and tests the final weights. Test
inputs are the same as in the standard protocol.

Refit results are never mixed with standard ones: results.json carries ``protocol: refit`` and a
``refit`` record (epochs and where they came from), the W&B run name and tags say refit, and the
report labels the model "<name> (refit)".
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from diffurec_lightning.errors import ConfigError
from diffurec_lightning.io import write_json
from diffurec_lightning.train import train


def checkpoint_epochs(path: str) -> int:
    """Training epochs completed when a checkpoint was written at the end of a validation.

    Lightning stores the 0-based epoch it was saved in; validation runs at the end of it.
    """
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    return int(checkpoint["epoch"]) + 1


def _phase_config(cfg: DictConfig, **values: Any) -> DictConfig:
    """A copy of ``cfg`` with dotted keys set (``None`` removes a callback or logger)."""
    phase = copy.deepcopy(cfg)  # DictConfig.copy() would share the nested nodes
    with open_dict(phase):
        for dotted, value in values.items():
            OmegaConf.update(phase, dotted.replace("__", "."), value, merge=False)
    return phase


def _label(cfg: DictConfig, phase: str, values: dict[str, Any]) -> None:
    """Name the W&B run after its protocol phase and tag it."""
    values["tags"] = [*cfg.get("tags", []), "refit", phase]
    if cfg.get("logger") and cfg.logger.get("wandb"):
        values["logger__wandb__name"] = f"{cfg.data.name}-{cfg.model.name}-{phase}-s{cfg.seed}"


def select_epochs(cfg: DictConfig) -> tuple[int, dict[str, Any]]:
    """Phase 1: a standard run with validation; the epoch count of its best checkpoint."""
    out = Path(cfg.paths.output_dir) / "selection"
    values: dict[str, Any] = {"data__protocol": "standard", "paths__output_dir": str(out)}
    values["test"] = False
    _label(cfg, "refit-selection", values)
    results = train(_phase_config(cfg, **values))
    if not results["best_checkpoint"]:
        raise ConfigError(
            "refit: the selection run kept no best checkpoint (it never validated); "
            "let it validate (trainer.check_val_every_n_epoch <= trainer.max_epochs) "
            "or give refit.epochs"
        )
    epochs = checkpoint_epochs(results["best_checkpoint"])
    return epochs, {
        "epochs_from": "selection run",
        "selection_dir": str(out),
        "selection_val_best": results["val_best"],
    }


def refit(cfg: DictConfig) -> dict[str, Any]:
    """Run the refit protocol; write and return phase 2's results.json (``protocol: refit``)."""
    given = cfg.get("refit", {}).get("epochs")
    if given is not None and (not isinstance(given, int) or given < 1):
        raise ConfigError(f"refit.epochs must be an integer >= 1 or null, got {given!r}")
    if given is None:
        epochs, record = select_epochs(cfg)
    else:
        epochs, record = given, {"epochs_from": "refit.epochs"}
    values: dict[str, Any] = {
        "data__protocol": "refit",
        "train": True,
        "test": True,
        "trainer__max_epochs": epochs,
        # No validation split exists: no validation, early stopping or best-checkpoint choice.
        "trainer__limit_val_batches": 0,
        "callbacks__early_stopping": None,
        "callbacks__model_checkpoint__monitor": None,
        "callbacks__model_checkpoint__save_on_train_epoch_end": True,
    }
    _label(cfg, "refit", values)
    results = train(_phase_config(cfg, **values))
    results["refit"] = {"epochs": epochs, **record}
    if rank_zero_only.rank == 0:
        write_json(Path(cfg.paths.output_dir) / "results.json", results)
    return results
