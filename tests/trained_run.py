"""The short real training run that the eval and predict tests share (the session fixture
``trained`` in conftest.py), and the eval config built on its checkpoint."""

from __future__ import annotations

import os
import struct
from pathlib import Path

from diffurec_lightning.config import compose_config

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


def cli_env(trained: dict) -> dict[str, str]:
    """Environment for a CLI subprocess that must find the trained run's home and data cache."""
    home = trained["home"]
    return {
        **os.environ,
        "DIFFUREC_HOME": str(home),
        "DIFFUREC_DATA_DIR": str(home / "data"),
        "OMP_NUM_THREADS": "1",
    }
