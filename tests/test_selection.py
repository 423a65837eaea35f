"""Checkpoint selection: one `monitor` key, validation and test of the same checkpoint in
results.json, and the analysis-only test curve (`callbacks.test_every_validation`)."""

from __future__ import annotations

from pathlib import Path

import pytest
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from diffurec_lightning.config import compose_config
from diffurec_lightning.errors import ConfigError
from diffurec_lightning.train import build, train

SMALL = [
    "model.hidden_size=16",
    "model.net.num_blocks=1",
    "model.net.num_heads=1",
    "model.diffusion.num_steps=4",
]
QUICK = [
    "data=synthetic",
    "logger=csv",
    "callbacks.progress_bar=null",
    "callbacks.case_studies.enabled=false",
    "trainer.max_epochs=3",
    "trainer.check_val_every_n_epoch=1",
    "model.optimizer.lr=0.005",
    *SMALL,
]


def run(folder: Path, *overrides: str) -> dict:
    return train(compose_config([f"paths.output_dir={folder}", *QUICK, *overrides]))


def test_one_monitor_key_reaches_checkpoint_early_stopping_and_module(run_env: Path) -> None:
    cfg = compose_config([f"paths.output_dir={run_env}", *QUICK, "monitor=val/hr@20"])
    _, model, trainer = build(cfg)
    picked = [
        c.monitor
        for c in trainer.callbacks
        if isinstance(c, ModelCheckpoint | EarlyStopping) and c.monitor is not None  # not last.ckpt
    ]
    assert picked == ["val/hr@20", "val/hr@20"] and model.hparams.monitor == "val/hr@20"


def test_unknown_monitor_is_one_clear_error(run_env: Path) -> None:
    cfg = compose_config([f"paths.output_dir={run_env}", *QUICK, "monitor=val/mrr@10"])
    with pytest.raises(ConfigError, match="monitor='val/mrr@10' is not a validation metric"):
        build(cfg)


def test_results_hold_validation_and_test_of_the_tested_checkpoint(run_env: Path) -> None:
    plain = run(run_env / "plain")
    curve = run(run_env / "curve", "callbacks.test_every_validation.enabled=true")
    # The curve is analysis only: the same validations, the same checkpoint, the same test.
    assert "history" not in plain
    assert curve["val"] == plain["val"] and curve["val_best"] == plain["val_best"]
    assert curve["test"] == plain["test"]
    history = curve["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2]
    # val_best is the validation of one epoch (the one checkpointed), not per-metric maxima.
    best = max(history, key=lambda h: h["val/ndcg@10"])
    assert curve["val_best_epoch"] == best["epoch"]
    assert curve["val_best"] == pytest.approx({k: v for k, v in best.items() if k[:4] == "val/"})
    assert curve["val_max"]["val/hr@10"] == pytest.approx(max(h["val/hr@10"] for h in history))
    # The test pass at that epoch is the final test of its checkpoint.
    assert best["curve_test/hr@10"] == pytest.approx(curve["test"]["test/hr@10"])
    assert best["curve_test/ndcg@10"] == pytest.approx(curve["test"]["test/ndcg@10"])
    # ... and comes as a picture too (validation and test against the epoch).
    assert (run_env / "curve" / "learning_curve.png").stat().st_size > 10_000
    assert not (run_env / "plain" / "learning_curve.png").exists()


def test_the_curve_keeps_every_validation_when_an_early_checkpoint_is_tested(
    run_env: Path,
) -> None:
    """Testing the best checkpoint restores its callback state; the curve must still hold the
    validations after it (lr 0: every validation ties, so the first checkpoint is tested)."""
    curve = run(
        run_env / "flat", "callbacks.test_every_validation.enabled=true", "model.optimizer.lr=0"
    )
    assert curve["val_best_epoch"] == 0
    assert [h["epoch"] for h in curve["history"]] == [0, 1, 2]
