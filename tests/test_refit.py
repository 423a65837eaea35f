"""The refit protocol: epochs chosen on validation, refit on training + validation, labelled apart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffurec_lightning.analysis.seeds import load_runs
from diffurec_lightning.config import compose_config
from diffurec_lightning.errors import ConfigError
from diffurec_lightning.refit import checkpoint_epochs, refit

torch.set_num_threads(1)

TINY_SASREC = [
    "model=sasrec",
    "model.hidden_size=16",
    "model.net.num_blocks=1",
    "logger=csv",
    "callbacks.progress_bar=null",
    "data.protocol=refit",
]


def config(out: Path, *overrides: str):
    return compose_config([f"paths.output_dir={out}", *TINY_SASREC, *overrides])


def test_refit_selects_the_epochs_on_validation_then_refits(run_env: Path) -> None:
    out = run_env / "run"
    results = refit(
        config(out, "data=synthetic", "trainer.max_epochs=3", "trainer.check_val_every_n_epoch=1")
    )
    selection = json.loads((out / "selection" / "results.json").read_text())
    assert selection["protocol"] == "standard" and not selection["test"]
    epochs = checkpoint_epochs(selection["best_checkpoint"])
    assert 1 <= epochs <= 3
    assert checkpoint_epochs(str(out / "selection" / "checkpoints" / "last.ckpt")) == 3
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["protocol"] == results["protocol"] == "refit"
    assert on_disk["refit"]["epochs"] == epochs and on_disk["epochs"] == epochs
    assert on_disk["refit"]["epochs_from"] == "selection run"
    assert on_disk["val"] == {} and "test/hr@10" in on_disk["test"]  # no validation in phase 2
    assert "refit" in on_disk["config"]["tags"]


def test_refit_with_given_epochs_on_real_toys_is_labelled_apart(run_env: Path) -> None:
    out = run_env / "run"
    results = refit(
        config(
            out,
            "data=toys",
            "refit.epochs=1",
            "trainer.limit_train_batches=2",
            "trainer.limit_test_batches=2",
        )
    )
    assert results["refit"] == {"epochs": 1, "epochs_from": "refit.epochs"}
    assert not (out / "selection").exists()
    assert results["global_step"] == 2
    runs, _ = load_runs([run_env])
    assert [run["model"] for run in runs] == ["sasrec (refit)"]  # never pooled with standard


def test_bad_refit_epochs(run_env: Path) -> None:
    with pytest.raises(ConfigError, match="refit.epochs must be an integer >= 1"):
        refit(config(run_env / "run", "data=synthetic", "refit.epochs=0"))
