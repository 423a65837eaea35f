"""The CUDA path, run at all: a fast_dev_run with trainer=gpu in bf16-mixed (skipped without a
GPU). On CUDA the models use PyTorch's own kernels (models/functional.py::custom_kernels) and
the fused attention, none of which the CPU suite reaches."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from runif import RunIf

from diffurec_lightning.config import compose_config
from diffurec_lightning.train import train

DIFFUSION = ["model.hidden_size=32", "model.num_blocks=2", "model.num_heads=2", "model.num_steps=8"]
SMALL = {"diffurec": DIFFUSION, "diffurecsys": DIFFUSION, "sasrec": ["model.hidden_size=32"]}


@RunIf(min_gpus=1, bf16=True)
@pytest.mark.parametrize("model", sorted(SMALL))
def test_fast_dev_run_on_gpu_in_bf16(
    model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DIFFUREC_HOME", str(tmp_path))  # the synthetic data cache goes here
    cfg = compose_config(
        [
            f"paths.output_dir={tmp_path / 'run'}",
            "logger=csv",
            "data=synthetic",
            f"model={model}",
            "trainer=gpu",
            "trainer.precision=bf16-mixed",
            "debug=fast",
            *SMALL[model],
        ]
    )
    torch.cuda.reset_peak_memory_stats()
    results = train(cfg)
    assert torch.cuda.max_memory_allocated() > 0  # the model really ran on the GPU
    assert results["precision"] == "bf16-mixed"
    metrics = {f"test/{m}@{k}" for m in ("hr", "ndcg") for k in (5, 10, 20)}
    assert metrics <= set(results["test"])
    assert all(math.isfinite(results["test"][key]) for key in metrics)
