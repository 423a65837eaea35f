"""``ckpt_path=auto``: resume from the newest checkpoint of the run folder (SLURM requeue)."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import torch
from hydra.utils import instantiate
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from diffurec_lightning.config import compose_config
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
