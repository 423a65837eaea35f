"""Prediction (``mode=predict``, top-K parquet with original ids) on a checkpoint from a
short real training run (the ``trained`` fixture)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch
from trained_run import REPO, cli_env, eval_config

from diffurec_lightning.data.store import load_sequences, load_store, write_cache
from diffurec_lightning.errors import ConfigError, DataError
from diffurec_lightning.eval import evaluate, setup
from diffurec_lightning.predict import history_batch, predict_to_parquet


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
    env = cli_env(trained)
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
