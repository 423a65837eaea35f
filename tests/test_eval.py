"""Evaluation and inference curves on a checkpoint from a short real training run (the
``trained`` fixture; prediction: test_predict.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import polars as pl
import pytest
import torch
from omegaconf import open_dict
from trained_run import REPO, cli_env, eval_config, png_size

from diffurec_lightning import checkpoints
from diffurec_lightning.checkpoints import MODEL_CLASS, load_checkpoint
from diffurec_lightning.config import compose_config
from diffurec_lightning.errors import ConfigError
from diffurec_lightning.eval import complete_config, evaluate, setup


def test_training_run_writes_case_studies(trained: dict) -> None:
    run = trained["run_dir"]
    assert {"test/head/hr@10", "test/tail/ndcg@10", "test/len5/hr@20"} <= set(trained["test"])
    study = json.loads((run / "case_studies.json").read_text())
    assert study["popularity"]["head"]["users"] + study["popularity"]["tail"]["users"] == 400
    assert sum(study["length"][f"len{g}"]["users"] for g in range(1, 6)) == 400
    assert png_size(run / "case_studies.png") == (1000, 400)
    assert png_size(run / "tsne.png") == (600, 600)
    ranks = pl.read_parquet(run / "test_ranks.parquet")
    assert ranks.height == 400 and ranks["user"].to_list() == list(range(400))


def test_eval_command_reproduces_the_test_metrics(trained: dict, tmp_path: Path) -> None:
    """The real CLI: load the checkpoint, find the dataset from the run, test, write eval.json."""
    env = cli_env(trained)
    out = tmp_path / "eval"
    command = [
        sys.executable, "-m", "diffurec_lightning.eval", f"ckpt_path={trained['best_checkpoint']}",
        "logger=csv", "trainer=cpu", "callbacks.progress_bar=null",
        "callbacks.representation.num_users=60", f"hydra.run.dir={out}",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((out / "eval.json").read_text())
    assert result["dataset"] == "synthetic" and result["model"] == "diffurecsys"
    assert result["test"] == pytest.approx(trained["test"])  # per-user noise: exactly reproducible
    assert png_size(out / "case_studies.png") == (1000, 400)
    assert png_size(out / "tsne.png") == (600, 600)


def test_eval_changes_hyperparameters_and_reports_bad_input(trained: dict, tmp_path: Path) -> None:
    cfg = eval_config(
        trained, tmp_path / "a", "+hparams.ensemble_size=2", "callbacks.case_studies.enabled=false"
    )
    result = evaluate(cfg)
    assert result["hparams"]["ensemble_size"] == 2
    assert set(result["test"]) == {f"test/{m}@{k}" for m in ("hr", "ndcg") for k in (5, 10, 20)}
    with pytest.raises(ConfigError, match="no such checkpoint"):
        complete_config(eval_config(trained, tmp_path / "b", "ckpt_path=/nope.ckpt"))
    with pytest.raises(ConfigError, match="trained on 60 items"):
        setup(eval_config(trained, tmp_path / "c", "data=synthetic", "data.source.num_items=70"))
    with pytest.raises(ConfigError, match="mode=bogus"):
        evaluate(eval_config(trained, tmp_path / "d", "mode=bogus"))


def test_readme_snippet_loads_a_checkpoint_and_scores_histories(
    trained: dict, capsys: pytest.CaptureFixture
) -> None:
    """README.md's five lines, run as written on this run's checkpoint (the stock call)."""
    readme = (REPO / "README.md").read_text()
    snippet = readme.split("<!-- snippet: load-checkpoint -->\n```python\n")[1].split("```")[0]
    assert len([line for line in snippet.splitlines() if line.strip()]) == 5  # five lines
    code = snippet.replace("outputs/runs/<run>/checkpoints/last.ckpt", trained["best_checkpoint"])
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert "tensor([[" in capsys.readouterr().out
    model, histories = namespace["model"], namespace["histories"]
    stored = torch.load(trained["best_checkpoint"], weights_only=True)
    assert dict(model.hparams) == stored["hyper_parameters"]
    with torch.no_grad():
        items = model.predict_step(histories, k=10)["items"]
    assert items.shape == (2, 10) and int(items.min()) >= 1 and int(items.max()) <= 60


def test_old_layout_checkpoints_are_refused_then_upgraded(trained: dict, tmp_path: Path) -> None:
    """A checkpoint of the flat layout (before the config objects) gets one line, and the
    converter CLI turns it back into exactly the current checkpoint."""
    current = torch.load(trained["best_checkpoint"], weights_only=True)
    old = {**current, "hyper_parameters": dict(current["hyper_parameters"])}
    del old[MODEL_CLASS]
    hp = old["hyper_parameters"]
    net, diffusion = hp.pop("net"), hp.pop("diffusion")
    optimizer, scheduler = hp.pop("optimizer"), hp.pop("scheduler")
    hp.update(
        approximator="cross_attention",
        **{key: net[key] for key in ("num_blocks", "num_heads", "dropout", "block_output_dropout")},
        **{key: diffusion[key] for key in ("num_steps", "schedule", "variance")},
        eval_sampler=hp["sampler"]["name"],
        eval_steps=hp.pop("sampler")["steps"],
        val_sampler=hp["val_sampler"]["name"],
        val_steps=hp.pop("val_sampler")["steps"],
        delta=hp.pop("lambda_scale"),
        offset=hp.pop("offset_noise_strength"),
        optimizer="adam",
        lr=optimizer["lr"],
        weight_decay=optimizer["weight_decay"],
        betas=tuple(optimizer["betas"]),
        lr_step_size=scheduler["step_size"],
        lr_gamma=scheduler["gamma"],
    )
    old["state_dict"] = OrderedDict(
        (f"approximator.{key[4:]}" if key.startswith("net.") else key, value)
        for key, value in current["state_dict"].items()
    )
    path = tmp_path / "old.ckpt"
    torch.save(old, path)
    with pytest.raises(ConfigError, match=r"older version .* diffurec_lightning.checkpoints FILE"):
        load_checkpoint(path)
    assert checkpoints.main([str(path)]) == 0
    upgraded = load_checkpoint(path)
    assert upgraded["hyper_parameters"] == current["hyper_parameters"]
    assert upgraded[MODEL_CLASS] == current[MODEL_CLASS]
    assert list(upgraded["state_dict"]) == list(current["state_dict"])
    for key, value in current["state_dict"].items():
        assert torch.equal(upgraded["state_dict"][key], value), key


def test_training_progress_is_plain_lines_off_a_terminal(trained: dict) -> None:
    """Every stage of the training run reports, each with a start and a final line."""
    lines = trained["stdout"].splitlines()
    for stage in ("Training epoch 0", "Training epoch 1", "Validation", "Testing"):
        mine = [line for line in lines if line.startswith(f"{stage}: ")]
        assert mine and " 0/" in mine[0] and "(100%)" in mine[-1], (stage, mine[:2], mine[-1:])
    final = [line for line in lines if line.startswith("Training epoch 1: ")][-1]
    assert "train/loss=" in final


def test_curves_over_steps_and_ensembles(
    trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "curves"
    cfg = eval_config(
        trained, out, "mode=curves", "curves.steps=[1,2,4]", "curves.ensemble_sizes=[1,2]",
        "curves.max_users=100",
    )  # fmt: skip
    result = evaluate(cfg)
    rows = result["rows"]
    assert [(r["curve"], r["x"]) for r in rows] == [
        ("steps", 1), ("steps", 2), ("steps", 4), ("ensemble", 1), ("ensemble", 2)
    ]  # fmt: skip
    # The full schedule with one member is the ordinary test setting: same numbers on this sample.
    assert rows[2]["hr@10"] == rows[3]["hr@10"]
    assert all(0 <= r["hr@10"] <= 1 and r["seconds"] >= 0 for r in rows)
    assert rows[2]["same_rank"] == rows[3]["same_rank"] == 1.0  # the reference itself
    assert png_size(out / "curves.png") == (1000, 400)
    assert "| ensemble | 4 | 2 |" in (out / "curves.md").read_text()
    # Off a terminal, every measured setting reports its batches as plain lines.
    printed = capsys.readouterr().out
    for label in ("1 steps, ensemble 1", "4 steps, ensemble 1", "4 steps, ensemble 2"):
        assert f"curves: {label}: 1/1 (100%)" in printed
    with pytest.raises(ConfigError, match="outside 1..4"):
        evaluate(eval_config(trained, tmp_path / "x", "mode=curves", "curves.steps=[8]"))


def test_case_study_images_reach_the_offline_wandb_run(
    trained: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = eval_config(trained, tmp_path / "w")
    with open_dict(cfg):
        cfg.logger = compose_config(["logger=wandb"]).logger  # eval_config picks csv
    try:
        evaluate(cfg)
    finally:
        wandb.finish()
    (run,) = (tmp_path / "w" / "wandb").glob("offline-run-*")
    images = {
        p.name.split("_")[0] for p in (run / "files" / "media" / "images" / "test").glob("*.png")
    }
    assert images == {"case", "tsne"}  # case_studies_<step>_<hash>.png and tsne_<step>_<hash>.png
