"""Killed and resumed training ends bit-identical to the run that was never stopped.

The run is real (synthetic data through the whole CLI, a small network); the kill is SIGKILL,
sent during the second epoch once the first epoch's last.ckpt exists; ``ckpt_path=auto`` then
resumes from that epoch-end checkpoint. Weights, optimizer state and test metrics must match the
uninterrupted run of the same seed exactly (the generators' state travels in the checkpoint,
diffurec_lightning/rng.py).
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from diffurec_lightning.checkpoints import load_checkpoint

RUN = [
    "data=synthetic",
    "data.batch_size=64",  # about 200 steps an epoch: a wide window for the kill
    "logger=csv",
    "trainer.max_epochs=3",
    "trainer.check_val_every_n_epoch=1",
    "callbacks.progress_bar=null",
    "callbacks.representation=null",
    "model.hidden_size=16",
    "model.net.num_blocks=1",
    "model.net.num_heads=1",
    "model.diffusion.num_steps=4",
    "ckpt_path=auto",
]


def command(folder: Path) -> list[str]:
    return [sys.executable, "-m", "diffurec_lightning.train", *RUN, f"hydra.run.dir={folder}"]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def train_to_the_end(folder: Path) -> dict:
    done = subprocess.run(command(folder), env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((folder / "results.json").read_text())


def kill_during_second_epoch(folder: Path) -> float:
    """Kill the run once its first epoch is checkpointed; the seconds that checkpoint records."""
    last = folder / "checkpoints" / "last.ckpt"
    process = subprocess.Popen(
        command(folder), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 240
    while not last.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # the checkpoint is complete and the second epoch under way
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (folder / "results.json").exists()
    checkpoint = load_checkpoint(last)
    assert checkpoint["epoch"] == 0, "the kill came after the second epoch ended"
    return checkpoint["callbacks"]["RunClock"]["elapsed_s"]


def test_resume_after_sigkill_is_bit_identical(run_env: Path) -> None:
    straight = train_to_the_end(run_env / "straight")
    first_segment_s = kill_during_second_epoch(run_env / "killed")
    resumed = train_to_the_end(run_env / "killed")
    assert resumed["resumed_from"] == str(run_env / "killed" / "checkpoints" / "last.ckpt")
    assert resumed["test"] == straight["test"] and resumed["val"] == straight["val"]
    assert resumed["global_step"] == straight["global_step"]
    assert stat.S_IMODE((run_env / "killed" / "results.json").stat().st_mode) == 0o644
    # The wall time is the run's, first segment included; an unbroken run has one segment.
    assert first_segment_s > 0
    # Exactly: testing the best checkpoint must not add that checkpoint's clock a second time.
    assert resumed["wall_time_s"] == pytest.approx(
        resumed["segment_wall_time_s"] + first_segment_s, abs=0.02
    )
    assert straight["wall_time_s"] == pytest.approx(straight["segment_wall_time_s"], abs=0.02)
    a = load_checkpoint(run_env / "straight" / "checkpoints" / "last.ckpt")
    b = load_checkpoint(run_env / "killed" / "checkpoints" / "last.ckpt")
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    states = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert states[0].keys() == states[1].keys()
    for index, moments in states[0].items():
        assert all(torch.equal(value, states[1][index][k]) for k, value in moments.items())
