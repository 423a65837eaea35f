"""Preemption by SIGTERM alone, and a signal lead shorter than a validation pass."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from diffurec_lightning.checkpoints import load_checkpoint
from diffurec_lightning.launch.requeue import SlurmRequeue


@pytest.fixture()
def under_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "diffurec-toys")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SLURM_JOB_END_TIME", raising=False)


def test_sigterm_raises_the_flag_once_training_runs(under_slurm: None) -> None:
    previous = signal.getsignal(signal.SIGTERM)
    callback = SlurmRequeue()
    callback.setup(None, None, stage="fit")
    callback.on_train_start(None, None)  # after Lightning registered its own SIGTERM handler
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert callback.signalled and callback.terminated
    finally:
        callback.teardown(None, None, stage="fit")
    assert signal.getsignal(signal.SIGTERM) == previous


def test_the_measured_validation_time_moves_the_lead(
    under_slurm: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    callback = SlurmRequeue(signal_lead_s=90, checkpoint_margin_s=30)
    callback.validation_s, callback.step_s = 200.0, 2.0  # a CPU validation pass
    assert callback.needed_lead_s == 232.0
    assert not callback._time_is_short()  # no end time known: only the warning can help
    monkeypatch.setenv("SLURM_JOB_END_TIME", str(time.time() + 150))
    assert callback._time_is_short()  # 150 s left > 90 s lead, but < 232 s needed
    monkeypatch.setenv("SLURM_JOB_END_TIME", str(time.time() + 600))
    assert not callback._time_is_short()
    callback.validation_s = 10.0
    monkeypatch.setenv("SLURM_JOB_END_TIME", str(time.time() + 60))
    assert callback._time_is_short()  # inside the plain lead


def test_sigterm_alone_checkpoints_a_real_run(under_slurm: None, run_env: Path) -> None:
    """SIGTERM to a training run under SLURM (no --signal): hpc_ckpt_1.ckpt is written at the
    next step, the attempt ends with 143, and ckpt_path=auto resumes from that checkpoint."""
    folder = run_env / "run"
    argv = [
        sys.executable, "-m", "diffurec_lightning.train", "data=synthetic", "data.batch_size=64",
        "logger=csv", "trainer.max_epochs=3", "trainer.check_val_every_n_epoch=1", "callbacks.progress_bar=null", "model.hidden_size=16",
        "model.net.num_blocks=1", "model.net.num_heads=1", "model.diffusion.num_steps=4", "ckpt_path=auto",
        "test=false", f"hydra.run.dir={folder}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}  # no scontrol here
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    last = folder / "checkpoints" / "last.ckpt"
    while not last.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # the second epoch under way (its handlers are installed)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr.decode()[-3000:]
    checkpoint = load_checkpoint(folder / "hpc_ckpt_1.ckpt")
    assert checkpoint["global_step"] > 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("SLURM_NTASKS", "SLURM_JOB_NAME"):
        env.pop(key)
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "hpc_ckpt_1.ckpt" in (folder / "results.json").read_text()


def test_teardown_leaves_a_foreign_sigterm_handler_alone(under_slurm: None) -> None:
    callback = SlurmRequeue()
    callback.setup(None, None, stage="fit")
    callback.on_train_start(SimpleNamespace(), None)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # Lightning restored its own meanwhile
    try:
        callback.teardown(None, None, stage="fit")
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
