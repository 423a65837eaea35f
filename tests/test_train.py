"""End-to-end training runs through the real configs: learning, invariance, resume, W&B, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from diffurec_lightning.config import compose_config
from diffurec_lightning.errors import ConfigError
from diffurec_lightning.train import build, train

VARIANTS = ["diffurec", "diffurecsys_v1", "diffurecsys"]
# A small network keeps CPU runs short; the architecture is the real one.
SMALL = [
    "model.hidden_size=32",
    "model.net.num_blocks=2",
    "model.net.num_heads=2",
    "model.diffusion.num_steps=8",
]


def run(tmp_path: Path, *overrides: str, name: str = "run") -> dict:
    cfg = compose_config([f"paths.output_dir={tmp_path / name}", "logger=csv", *overrides])
    return train(cfg)


def synthetic(epochs: int, *extra: str) -> list[str]:
    return [
        "data=synthetic",
        f"trainer.max_epochs={epochs}",
        f"trainer.check_val_every_n_epoch={epochs}",
        "callbacks.progress_bar=null",
        *SMALL,
        *extra,
    ]


@pytest.mark.parametrize("model", VARIANTS)
def test_fast_dev_run_on_real_toys(model: str, run_env: Path) -> None:
    results = run(run_env, "data=toys", f"model={model}", "debug=fast")
    expected = {f"test/{m}@{k}" for m in ("hr", "ndcg") for k in (5, 10, 20)}
    assert expected <= set(results["test"])
    saved = json.loads((run_env / "run" / "results.json").read_text())
    assert saved["dataset"] == "toys" and saved["model"] == model
    assert saved["config"]["model"]["num_items"] == 11_924


@pytest.mark.parametrize("model", VARIANTS)
def test_every_variant_learns_the_synthetic_rule(model: str, run_env: Path) -> None:
    results = run(run_env, f"model={model}", *synthetic(6, "model.optimizer.lr=0.005"))
    assert results["test"]["test/hr@10"] > 0.9
    assert results["val_best"]["val/hr@10"] > 0.9


def test_same_seed_gives_same_metrics(run_env: Path) -> None:
    first = run(run_env, *synthetic(1), name="a")
    second = run(run_env, *synthetic(1), name="b")
    assert first["test"] == second["test"] and first["val"] == second["val"]
    other = run(run_env, *synthetic(1), "seed=7", name="c")
    assert other["test"] != first["test"]


def test_main_returns_the_optimized_metric(run_env: Path) -> None:
    """What a Hydra sweeper optimises: optimized_metric (default: the root monitor), as its best
    validation value, or a test metric; a name the run does not report stops before training."""
    from diffurec_lightning.train import check_optimized_metric, main, optimized_value

    cfg = compose_config([f"paths.output_dir={run_env / 'm'}", "logger=csv", *synthetic(1)])
    assert cfg.optimized_metric == cfg.monitor == "val/ndcg@10"
    value = main(cfg)
    saved = json.loads((run_env / "m" / "results.json").read_text())
    assert isinstance(value, float) and value == saved["val_max"]["val/ndcg@10"] > 0
    assert optimized_value(saved, "val/ndcg@10_best") == value  # the name W&B logs it under
    assert optimized_value(saved, "test/hr@10") == saved["test"]["test/hr@10"]
    assert optimized_value(saved, None) is None
    for name in ("val/auc", "test/hr@10_best", "val/hr@7"):
        with pytest.raises(ConfigError, match=f"optimized_metric={name} is not a metric"):
            check_optimized_metric(compose_config([f"optimized_metric={name}"]))


def _validate(cfg_overrides: list[str], tmp_path: Path, ckpt: str) -> dict[str, float]:
    cfg = compose_config([f"paths.output_dir={tmp_path}", "logger=csv", *cfg_overrides])
    datamodule, model, trainer = build(cfg)
    (metrics,) = trainer.validate(model, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)
    return metrics


def test_every_epoch_trains_on_its_own_batch_order(run_env: Path) -> None:
    """Lightning hands the epoch to the batch sampler: each epoch draws a new order, the one the
    sampler computes for that epoch number (so a resumed epoch replays the same order)."""
    import lightning as L

    class FirstBatches(L.Callback):
        def __init__(self) -> None:
            self.targets: list[list[int]] = []

        def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self.targets.append([])

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
            self.targets[-1].append(batch["target"].tolist())

    epochs = 3
    cfg = compose_config([f"paths.output_dir={run_env / 'run'}", "logger=csv", *synthetic(epochs)])
    datamodule, model, trainer = build(cfg)
    recorder = FirstBatches()
    trainer.callbacks.append(recorder)
    trainer.fit(model, datamodule=datamodule)

    sampler, dataset = datamodule.train_batch_sampler(), datamodule.dataset("train")
    expected = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        expected.append([dataset.__getitems__(b)["target"].tolist() for b in sampler])
    assert recorder.targets == expected
    assert expected[0] != expected[1] != expected[2]


def test_metrics_do_not_depend_on_eval_batch_size(run_env: Path) -> None:
    results = run(run_env, *synthetic(1))
    ckpt = results["best_checkpoint"]
    small = _validate(synthetic(1, "data.eval_batch_size=7"), run_env / "v1", ckpt)
    large = _validate(
        synthetic(1, "data.eval_batch_size=400", "data.bucketing=false"), run_env / "v2", ckpt
    )
    assert small == large
    assert small["val/ndcg@10"] == pytest.approx(results["val"]["val/ndcg@10"])


def test_ddp_on_two_processes_gives_single_process_metrics(run_env: Path) -> None:
    results = run(run_env, *synthetic(1))
    ckpt = results["best_checkpoint"]
    overrides = [
        *synthetic(1),
        "train=false",
        f"ckpt_path={ckpt}",
        "logger=csv",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        f"hydra.run.dir={run_env / 'ddp'}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "diffurec_lightning.train", *overrides],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    ddp = json.loads((run_env / "ddp" / "results.json").read_text())
    single = run(run_env, *synthetic(1), "train=false", f"ckpt_path={ckpt}", name="single")
    assert ddp["test"] == single["test"]
    assert single["test"] == results["test"]


def test_bf16_mixed_fit_runs(run_env: Path) -> None:
    from diffurec_lightning.precision import cpu_has_native_bf16

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = run(run_env, *synthetic(2, "trainer.precision=bf16-mixed"))
    emulated = [w for w in caught if "bf16 products are emulated" in str(w.message)]
    assert len(emulated) == (0 if cpu_has_native_bf16() else 1)
    assert 0.0 <= results["test"]["test/ndcg@10"] <= 1.0
    assert results["val_best"]["val/hr@10"] > 0.2  # it learns in bf16 too


def test_precision_auto_follows_the_hardware(run_env: Path) -> None:
    from diffurec_lightning.precision import cpu_has_native_bf16, resolve_precision

    native = cpu_has_native_bf16()
    assert resolve_precision("auto", "cpu") == ("bf16-mixed" if native else "32-true")
    assert resolve_precision("32-true", "cpu") == "32-true"  # explicit choices pass through
    assert resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"
    cfg = compose_config(["trainer=cpu"])
    assert cfg.trainer.precision == "auto"  # the default
    results = run(run_env, *synthetic(1))
    assert results["precision"] == ("bf16-mixed" if native else "32-true")
    assert results["config"]["trainer"]["precision"] == results["precision"]


def test_resume_continues_the_same_run(run_env: Path) -> None:
    first = run(run_env, *synthetic(2, "trainer.check_val_every_n_epoch=1"), name="first")
    steps_per_epoch = first["global_step"] // 2
    last = Path(first["best_checkpoint"]).parent / "last.ckpt"
    resumed = run(
        run_env,
        *synthetic(3, "trainer.check_val_every_n_epoch=1"),
        f"ckpt_path={last}",
        name="resumed",
    )
    assert resumed["global_step"] == 3 * steps_per_epoch
    assert resumed["epochs"] == 3


def test_wandb_offline_run_logs_metrics_and_best_checkpoint(
    run_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_config([f"paths.output_dir={run_env / 'w'}", *synthetic(1)])
    results = train(cfg)
    import wandb

    wandb.finish()
    runs = list((run_env / "w" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    record = next(runs[0].glob("run-*.wandb")).read_bytes()
    assert b"val/ndcg@10" in record and b"test/hr@10" in record
    assert b"model-" in record and results["best_checkpoint"].endswith(".ckpt")


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.diffusion.num_steps=0", "num_steps"),
        ("model.lambda_scale=-0.1", "lambda_scale must be >= 0"),
        ("model.diffusion.schedule=zigzag", "unknown noise schedule 'zigzag'"),
        ("model.diffusion.variance=huge", "fixed_large"),
        ("model.net.num_heads=3", "divisible"),
        ("model.net._target_=rnn", "model.net: .*'rnn'"),
        ("data.batch_size=0", "batch_size must be an integer >= 1"),
    ],
)
def test_invalid_settings_fail_with_a_clear_message(
    override: str, message: str, run_env: Path
) -> None:
    cfg = compose_config([f"paths.output_dir={run_env}", "logger=csv", "data=synthetic", override])
    with pytest.raises(ConfigError, match=message):
        build(cfg)


def test_unknown_model_name_is_reported(run_env: Path) -> None:
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="model"):
        compose_config(["model=diffusionator"])


def test_cli_reports_bad_input_in_one_line(run_env: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "diffurec_lightning.train", "data=synthetic", "model.lambda_scale=-1",
         "logger=csv", f"hydra.run.dir={run_env / 'cli'}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert (
        done.stderr.strip().splitlines()[-1] == "error: model.lambda_scale must be >= 0, got -1.0"
    )


def test_loss_aware_sampler_is_updated_during_training(run_env: Path) -> None:
    cfg = compose_config(
        [
            f"paths.output_dir={run_env}",
            "logger=csv",
            *synthetic(1, "model.timestep_sampler=loss_aware"),
        ]
    )
    datamodule, model, trainer = build(cfg)
    trainer.fit(model, datamodule=datamodule)
    assert model.timesteps.warmed_up()
    assert not torch.allclose(
        model.timesteps.probabilities(), torch.full((8,), 1 / 8, dtype=torch.float64)
    )


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["toys", "beauty", "ml-1m"])
@pytest.mark.parametrize("model", VARIANTS)
def test_smoke_every_variant_on_every_benchmark(dataset: str, model: str, run_env: Path) -> None:
    results = run(
        run_env,
        f"data={dataset}",
        f"model={model}",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "trainer.check_val_every_n_epoch=1",
        "callbacks.progress_bar=null",
    )
    assert results["global_step"] == 3
    assert 0.0 <= results["test"]["test/hr@20"] <= 1.0
