"""The validation-budget study on a real (tiny) toys run: per-checkpoint metrics under several
reverse processes, their agreement with the reference, and the files it writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffurec_lightning.analysis.val_budget import main, parse_settings
from diffurec_lightning.config import compose_config
from diffurec_lightning.errors import ConfigError
from diffurec_lightning.train import train

TINY = [
    "model.hidden_size=16",
    "model.net.num_blocks=1",
    "model.net.num_heads=1",
    "model.diffusion.num_steps=2",
]


@pytest.mark.slow  # make test-all: a real run, long on 2 cores
def test_val_budget_reads_every_checkpoint_of_a_run(run_env: Path) -> None:
    run = run_env / "run"
    cfg = compose_config(
        [
            f"paths.output_dir={run}",
            "logger=csv",
            "data=toys",
            "model=diffurec",
            *TINY,
            "trainer.max_epochs=2",
            "trainer.check_val_every_n_epoch=1",
            "trainer.limit_train_batches=3",
            "callbacks.model_checkpoint.save_top_k=-1",
            "callbacks.progress_bar=null",
            "test=false",
        ]
    )
    results = train(cfg)
    result = main(["--run", str(run), "--settings", "ancestral:1,ancestral:2,ddim:2"])
    assert [row["epoch"] for row in result["rows"]] == [1, 2]
    last = result["rows"][-1]["ancestral:1"]
    # model.val_sampler.steps=1 (the default): the run validated with one reverse step, so the
    # reference setting reproduces the figures training logged.
    assert last["val/ndcg@10"] == pytest.approx(results["val"]["val/ndcg@10"], abs=1e-6)
    assert last["val/hr@10"] == pytest.approx(results["val"]["val/hr@10"], abs=1e-6)
    reference = result["agreement"][0]
    assert reference["setting"] == "ancestral:1"
    assert reference["val/ndcg@10"]["spearman"] == pytest.approx(1.0)
    saved = json.loads((run / "val_budget.json").read_text())
    assert saved["settings"] == ["ancestral:1", "ancestral:2", "ddim:2"]
    assert (run / "val_budget.png").stat().st_size > 1000
    assert "Spearman" in (run / "val_budget.md").read_text()


def test_val_budget_settings_are_checked() -> None:
    assert parse_settings("ancestral:32, ddim:2") == [("ancestral", 32), ("ddim", 2)]
    with pytest.raises(ConfigError, match="is not <sampler>:<steps>"):
        parse_settings("ddim")
