"""Evaluation, prediction and inference curves on a checkpoint from a short real training run."""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch
from omegaconf import open_dict

from diffurec_lightning import checkpoints
from diffurec_lightning.checkpoints import MODEL_CLASS, load_checkpoint
from diffurec_lightning.config import compose_config
from diffurec_lightning.data.store import load_sequences, load_store, write_cache
from diffurec_lightning.errors import ConfigError, DataError
from diffurec_lightning.eval import complete_config, evaluate, setup
from diffurec_lightning.predict import history_batch, predict_to_parquet
from diffurec_lightning.train import train

REPO = Path(__file__).resolve().parents[1]


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, after checking the PNG signature."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


TINY = [
    "data=synthetic",
    "logger=csv",
    "model.hidden_size=16",
    "model.net.num_blocks=1",
    "model.net.num_heads=2",
    "model.diffusion.num_steps=4",
    "model.optimizer.lr=0.005",
    "trainer=cpu",
    "trainer.max_epochs=2",
    "trainer.check_val_every_n_epoch=2",
    "++trainer.enable_progress_bar=false",
    "callbacks.progress_bar=null",
    "callbacks.representation.num_users=60",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One short synthetic training run (with the case studies); its results.json."""
    torch.set_num_threads(1)
    home = tmp_path_factory.mktemp("home")
    # With the progress bar on, every batch reported: stdout is captured, so not a terminal.
    quiet = {"++trainer.enable_progress_bar=false", "callbacks.progress_bar=null"}
    overrides = [o for o in TINY if o not in quiet] + ["callbacks.progress_bar.interval_s=0"]
    log = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(log):
        mp.setenv("DIFFUREC_HOME", str(home))
        mp.setenv("DIFFUREC_DATA_DIR", str(home / "data"))
        results = train(compose_config([f"paths.output_dir={home / 'run'}", *overrides]))
    return {**results, "home": home, "run_dir": home / "run", "stdout": log.getvalue()}


def eval_config(trained: dict, out: Path, *overrides: str):
    return compose_config(
        [
            f"ckpt_path={trained['best_checkpoint']}",
            f"paths.output_dir={out}",
            "logger=csv",
            "trainer=cpu",
            "callbacks.representation.num_users=60",
            *overrides,
        ],
        config_name="eval",
    )


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
    env = {**os.environ, "DIFFUREC_HOME": str(trained["home"]), "OMP_NUM_THREADS": "1"}
    env["DIFFUREC_DATA_DIR"] = str(trained["home"] / "data")
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


def renamed_copy(cache_dir: Path, target: Path) -> tuple[Path, list[str], list[str]]:
    """The same sequences under non-trivial original ids (items named in reverse order)."""
    sequences = load_sequences(cache_dir)
    users = [f"user-{u:04d}" for u in range(sequences.height)]
    num_items = len(pl.read_parquet(cache_dir / "item_ids.parquet"))
    items = [f"sku-{num_items - i}" for i in range(num_items)]  # dense item i+1 -> "sku-(N-i)"
    return write_cache(target, sequences, users, items, {"name": "renamed"}), users, items


def cpu_trainer(*callbacks: L.Callback) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=1, logger=False, callbacks=list(callbacks),
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip


def test_predict_writes_original_ids(trained: dict, tmp_path: Path) -> None:
    cfg, datamodule, model = setup(eval_config(trained, tmp_path / "p", "mode=predict"))
    cache, user_names, item_names = renamed_copy(datamodule.cache_dir, tmp_path / "renamed")
    store = load_store(cache)
    fake_dm = SimpleNamespace(cache_dir=cache, store=store, max_len=datamodule.max_len)
    (tmp_path / "users.txt").write_text("user-0007\nuser-0002\n")
    out = tmp_path / "recs.parquet"
    summary = predict_to_parquet(
        cpu_trainer(),
        model,
        fake_dm,
        out=str(out),
        k=5,
        users_file=str(tmp_path / "users.txt"),
        exclude_history=False,
    )
    assert summary == {"out": str(out), "users": 2, "rows": 10, "k": 5}
    frame = pl.read_parquet(out)
    assert frame.columns == ["user", "rank", "item", "score"]
    assert frame["user"].to_list() == ["user-0007"] * 5 + ["user-0002"] * 5
    assert frame["rank"].to_list() == [1, 2, 3, 4, 5] * 2
    # The same recommendations straight from the model, in dense ids, then named by hand.
    batch = history_batch(store, np.array([7]), store.offsets[1:][[7]], datamodule.max_len)
    dense = model.predict_step(batch, 0, k=5)["items"][0].tolist()
    assert frame["item"].to_list()[:5] == [item_names[i - 1] for i in dense]
    scores = frame["score"].to_list()[:5]
    assert scores == sorted(scores, reverse=True)
    # history=full ends with the test item; history=test stops just before it.
    assert batch["seq"][0, -1] == int(store.sequence(7)[-1])
    held_out = history_batch(store, np.array([7]), store.offsets[1:][[7]] - 1, datamodule.max_len)
    assert held_out["seq"][0, -1] == int(store.sequence(7)[-2])
    with pytest.raises(DataError, match="not in the dataset"):
        (tmp_path / "bad.txt").write_text("nobody\n")
        predict_to_parquet(
            cpu_trainer(), model, fake_dm, out=str(out), users_file=str(tmp_path / "bad.txt")
        )


@torch.no_grad()
def direct_predictions(model: L.LightningModule, store, max_len: int, k: int) -> pl.DataFrame:
    """What `make predict` wrote before it ran through the Trainer: the model's predict_step on
    every user's full history, 512 users at a time, named like the synthetic ids."""
    model.hparams.predict_k = k
    users = np.arange(store.num_users)
    items, scores = [], []
    for start in range(0, len(users), 512):
        chunk = users[start : start + 512]
        out = model.predict_step(history_batch(store, chunk, store.offsets[1:][chunk], max_len), 0)
        items.append(out["items"].numpy())
        scores.append(out["scores"].float().numpy())
    items, scores = np.concatenate(items), np.concatenate(scores)
    return pl.DataFrame(
        {
            "user": np.repeat(users.astype(str), k).tolist(),
            "rank": np.tile(np.arange(1, k + 1, dtype=np.int32), len(users)),
            "item": items.reshape(-1).astype(str).tolist(),  # synthetic item i is named "i"
            "score": scores.reshape(-1).astype(np.float32),
        },
        schema={"user": pl.String, "rank": pl.Int32, "item": pl.String, "score": pl.Float32},
    )


def test_predict_mode_equals_the_direct_output_and_reports_progress(
    trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "same.parquet"
    cfg = eval_config(
        trained, tmp_path / "e", "mode=predict", f"predict.out={out}", "predict.batch_size=128",
        "predict.exclude_history=false", "callbacks.progress_bar.interval_s=0",
    )  # fmt: skip
    result = evaluate(cfg)
    _, datamodule, model = setup(eval_config(trained, tmp_path / "s"))
    expected = direct_predictions(model, datamodule.store, datamodule.max_len, k=20)
    assert pl.read_parquet(out).equals(expected)  # batch size and Trainer change nothing
    assert result["rows"] == 400 * 20 and pq.ParquetFile(out).num_row_groups == 4  # one per batch
    # stdout is not a terminal here: plain lines, one per batch with interval_s=0.
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" ")[1] for line in lines if line.startswith("Predicting:")] == [
        "0/4", "1/4", "2/4", "3/4", "4/4", "4/4"
    ]  # fmt: skip


def test_predict_excludes_the_history(trained: dict, tmp_path: Path) -> None:
    full = tmp_path / "full.parquet"
    kept = tmp_path / "kept.parquet"
    evaluate(eval_config(trained, tmp_path / "a", "mode=predict", f"predict.out={full}",
                         "predict.k=60", "predict.exclude_history=false"))  # fmt: skip
    result = evaluate(eval_config(trained, tmp_path / "b", "mode=predict", f"predict.out={kept}"))
    assert result["rows"] == 400 * 20  # histories hold at most 16 of the 60 items
    _, datamodule, _ = setup(eval_config(trained, tmp_path / "s"))
    store = datamodule.store
    ranking = dict(pl.read_parquet(full).group_by("user").agg("item").iter_rows())
    filtered = dict(pl.read_parquet(kept).group_by("user").agg("item").iter_rows())
    for user in range(400):
        history = {str(item) for item in store.sequence(user)}
        # The full ranking with the history taken out: nothing else moves.
        assert filtered[str(user)] == [i for i in ranking[str(user)] if i not in history][:20]


def test_predict_on_two_processes_writes_the_same_file(trained: dict, tmp_path: Path) -> None:
    """DDP on two CPU processes: each rank streams its share, rank zero joins them in order."""
    env = {**os.environ, "DIFFUREC_HOME": str(trained["home"]), "OMP_NUM_THREADS": "1"}
    env["DIFFUREC_DATA_DIR"] = str(trained["home"] / "data")
    out = tmp_path / "ddp.parquet"
    command = [
        sys.executable, "-m", "diffurec_lightning.eval", f"ckpt_path={trained['best_checkpoint']}",
        "mode=predict", f"predict.out={out}", "predict.batch_size=64",
        "predict.exclude_history=false", "trainer=ddp", "trainer.accelerator=cpu",
        "trainer.devices=2", "logger=csv", f"hydra.run.dir={tmp_path / 'run'}",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    _, datamodule, model = setup(eval_config(trained, tmp_path / "s"))
    expected = direct_predictions(model, datamodule.store, datamodule.max_len, k=20)
    assert pl.read_parquet(out).equals(expected)
    assert pq.ParquetFile(out).num_row_groups == 7  # 400 users in batches of 64
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no parts left
    assert "Predicting: 4/4 (100%)" in done.stdout  # rank zero's share, as plain lines


class FailAt(L.Callback):
    """A crash after some batches were already streamed into the file."""

    def on_predict_batch_end(self, trainer: L.Trainer, *args: object, **kwargs: object) -> None:
        if trainer.predict_loop.batch_progress.current.completed >= 1:
            raise RuntimeError("disk full")


def test_failed_predict_leaves_nothing_half_written(trained: dict, tmp_path: Path) -> None:
    _, datamodule, model = setup(eval_config(trained, tmp_path / "s"))
    out = tmp_path / "recs" / "recs.parquet"
    out.parent.mkdir()
    out.write_bytes(b"the previous, complete file")
    with pytest.raises(RuntimeError, match="disk full"):
        predict_to_parquet(cpu_trainer(FailAt()), model, datamodule, out=str(out), batch_size=64)
    assert out.read_bytes() == b"the previous, complete file"
    assert [p.name for p in out.parent.iterdir()] == ["recs.parquet"]  # no temp file is left


def test_predict_mode_for_every_user(trained: dict, tmp_path: Path) -> None:
    out = tmp_path / "all.parquet"
    result = evaluate(eval_config(trained, tmp_path / "q", "mode=predict", f"predict.out={out}"))
    frame = pl.read_parquet(out)
    assert result["users"] == 400 and frame.height == 400 * 20
    # Synthetic ids are "0".."399" and "1".."60"; the rule: item i is followed by i % 60 + 1.
    _, datamodule, _ = setup(eval_config(trained, tmp_path / "s"))
    store = datamodule.store
    expected = {str(u): str(int(store.sequence(u)[-1]) % 60 + 1) for u in range(400)}
    top5 = frame.filter(pl.col("rank") <= 5).group_by("user").agg(pl.col("item"))
    found = [expected[u] in items for u, items in top5.iter_rows()]
    assert np.mean(found) > 0.8  # the trained model continues the full history
    with pytest.raises(ConfigError, match="predict.out"):
        evaluate(eval_config(trained, tmp_path / "r", "mode=predict"))


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
