"""``ckpt_path=auto``: resume from the newest checkpoint of the run folder (SLURM requeue)."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from builders import diffurec
from hydra.utils import instantiate
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from diffurec_lightning.config import compose_config
from diffurec_lightning.data.datamodule import SequenceDataModule
from diffurec_lightning.data.sources import SyntheticSource
from diffurec_lightning.models.base import TIMESTEP_STATE
from diffurec_lightning.models.diffusion_module import DiffusionRecModule
from diffurec_lightning.train import resume_checkpoint, train

QUICK = [
    "data=synthetic",
    "logger=csv",
    "trainer.check_val_every_n_epoch=1",
    "callbacks.progress_bar=null",
    "model.hidden_size=16",
    "model.net.num_blocks=1",
    "model.net.num_heads=1",
    "model.diffusion.num_steps=4",
    "ckpt_path=auto",
    "test=false",  # resuming is about fit; the test stage and its case studies add nothing
]


def test_auto_starts_fresh_then_continues_the_same_folder(run_env: Path) -> None:
    folder = run_env / "run"
    first = train(compose_config([f"paths.output_dir={folder}", "trainer.max_epochs=1", *QUICK]))
    assert first["resumed_from"] is None
    second = train(compose_config([f"paths.output_dir={folder}", "trainer.max_epochs=2", *QUICK]))
    assert second["resumed_from"] == str(folder / "checkpoints" / "last.ckpt")
    assert second["global_step"] == 2 * first["global_step"] and second["epochs"] == 2


def test_auto_prefers_the_newest_of_hpc_and_last_checkpoints(tmp_path: Path) -> None:
    trainer = SimpleNamespace(
        default_root_dir=str(tmp_path),
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)],
    )
    cfg = OmegaConf.create({"ckpt_path": "auto"})
    assert resume_checkpoint(cfg, trainer) is None
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    last.write_bytes(b"")
    assert resume_checkpoint(cfg, trainer) == str(last)
    hpc = tmp_path / "hpc_ckpt_1.ckpt"  # written when the requeue signal arrived, mid-epoch
    hpc.write_bytes(b"")
    os.utime(last, ns=(1, 1))
    assert resume_checkpoint(cfg, trainer) == str(hpc)
    os.utime(hpc, ns=(0, 0))  # a later epoch end makes last.ckpt the newest again
    assert resume_checkpoint(cfg, trainer) == str(last)
    given = OmegaConf.create({"ckpt_path": "/some/file.ckpt"})
    assert resume_checkpoint(given, trainer) == "/some/file.ckpt"


class _Worsening(LightningModule):
    """One weight, one batch per epoch; val/ndcg@10 falls every epoch, so epoch 0 stays the best."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return (self.weight - batch).pow(2).mean()

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("val/ndcg@10", 1.0 / (1 + self.current_epoch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_last_checkpoint_is_written_every_epoch_not_only_at_a_new_best(tmp_path: Path) -> None:
    cfg = compose_config([f"paths.output_dir={tmp_path}"])
    callbacks = [
        instantiate(cfg.callbacks[name]) for name in ("model_checkpoint", "last_checkpoint")
    ]
    data = DataLoader(torch.ones(1, 1), batch_size=1)
    Trainer(
        max_epochs=3, callbacks=callbacks, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    ).fit(_Worsening(), data, data)  # fmt: skip
    files = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert files == ["epoch000.ckpt", "last.ckpt"]  # the best stays epoch 0
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 2  # the latest epoch, for resuming


def _quiet_trainer(tmp_path: Path, max_steps: int) -> Trainer:
    return Trainer(
        max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        num_sanity_val_steps=0, default_root_dir=tmp_path,
    )  # fmt: skip


def _loss_aware_model() -> DiffusionRecModule:
    return diffurec(
        num_items=30, hidden_size=16, num_blocks=1, num_heads=1, num_steps=4, max_len=8,
        timestep_sampler="loss_aware",
    )  # fmt: skip


@pytest.fixture(scope="module")
def loss_aware_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """A loss-aware model trained until its sampler is warm, saved; its sampler state; the data."""
    tmp_path = tmp_path_factory.mktemp("loss_aware")
    data = SequenceDataModule(
        name="synthetic", data_dir=str(tmp_path / "data"), max_len=8, batch_size=32,
        eval_batch_size=32, source=SyntheticSource(num_users=64, num_items=30, seed=1),
    )  # fmt: skip
    data.setup()
    torch.manual_seed(0)
    model = _loss_aware_model()
    trainer = _quiet_trainer(tmp_path, max_steps=6)
    trainer.fit(model, train_dataloaders=data.train_dataloader())
    assert model.timesteps.warmed_up()  # 6 x 32 losses over 4 steps, 10 kept per step
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    return path, model.timesteps.state_dict(), data


def _assert_same_sampler(model: DiffusionRecModule, state: dict) -> None:
    for key, value in state.items():
        assert torch.equal(model.timesteps.state_dict()[key], value), key
    expected = _loss_aware_model()
    expected.timesteps.load_state_dict(state)
    draws = [
        m.timesteps.sample(256, "cpu", torch.Generator().manual_seed(7)) for m in (model, expected)
    ]
    assert torch.equal(draws[0][0], draws[1][0]) and torch.equal(draws[0][1], draws[1][1])


def test_loss_aware_sampler_state_is_saved_and_restored(loss_aware_checkpoint: tuple) -> None:
    path, state, _ = loss_aware_checkpoint
    loaded = DiffusionRecModule.load_from_checkpoint(path, weights_only=True)
    assert loaded.timesteps.warmed_up()
    _assert_same_sampler(loaded, state)


def test_resumed_fit_continues_with_the_saved_sampler_state(
    loss_aware_checkpoint: tuple, tmp_path: Path
) -> None:
    path, state, data = loss_aware_checkpoint
    model = _loss_aware_model()  # fresh: a uniform, empty history
    assert not model.timesteps.warmed_up()
    # Resume at the step the checkpoint was written: restored, and no step taken after it.
    _quiet_trainer(tmp_path, max_steps=6).fit(model, data.train_dataloader(), ckpt_path=path)
    _assert_same_sampler(model, state)


def test_checkpoint_without_sampler_state_loads_with_a_fresh_sampler(
    loss_aware_checkpoint: tuple, tmp_path: Path
) -> None:
    path, _, _ = loss_aware_checkpoint
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint[TIMESTEP_STATE]  # as written before the sampler state was saved
    torch.save(checkpoint, tmp_path / "old.ckpt")
    loaded = DiffusionRecModule.load_from_checkpoint(tmp_path / "old.ckpt", weights_only=True)
    assert not loaded.timesteps.warmed_up()
    assert int(loaded.timesteps.state_dict()["seen"].sum()) == 0
