"""The requeue callback's pieces that need no cluster (tests/test_slurm.py runs it on SLURM)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from hydra.utils import instantiate

from diffurec_lightning.config import compose_config
from diffurec_lightning.errors import ConfigError
from diffurec_lightning.launch.requeue import (
    SlurmRequeue,
    cluster_plugins,
    next_hpc_checkpoint,
    slurm_job_id,
)


def test_checkpoint_numbers_continue_after_the_highest(tmp_path: Path) -> None:
    assert next_hpc_checkpoint(tmp_path / "missing") == tmp_path / "missing" / "hpc_ckpt_1.ckpt"
    for name in ("hpc_ckpt_1.ckpt", "hpc_ckpt_3.ckpt", "hpc_ckpt_x.ckpt", "last.ckpt"):
        (tmp_path / name).touch()
    assert next_hpc_checkpoint(tmp_path) == tmp_path / "hpc_ckpt_4.ckpt"


def test_array_jobs_are_requeued_by_their_task_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "1207")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    assert slurm_job_id() == "1207"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "1200")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    assert slurm_job_id() == "1200_7"


def test_outside_slurm_lightning_keeps_its_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("SLURM_NTASKS", "SLURM_JOB_NAME"):
        monkeypatch.delenv(key, raising=False)
    callback = instantiate(compose_config().callbacks.slurm_requeue)  # on by default
    assert isinstance(callback, SlurmRequeue)
    assert cluster_plugins([callback]) == []


def test_under_slurm_lightnings_own_requeue_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "2")
    monkeypatch.setenv("SLURM_JOB_NAME", "diffurec-toys")
    (plugin,) = cluster_plugins([SlurmRequeue()])
    assert plugin.auto_requeue is False
    assert cluster_plugins([]) == []  # without the callback, Lightning's handler stays


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"signal_name": "SIGUSR9"}, "not a signal name"), ({"stop_timeout_s": 0}, "must be > 0")],
)
def test_bad_settings_are_config_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SlurmRequeue(**kwargs)


def test_the_signal_only_raises_a_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under SLURM the handler is installed for every stage and does nothing but note the signal
    (a real SIGUSR1 to this process, which would otherwise end it); teardown restores the old one."""
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "diffurec-toys")
    previous = signal.getsignal(signal.SIGUSR1)
    callback = SlurmRequeue()
    callback.setup(None, None, stage="test")  # the hooks read nothing from these outside fit
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert callback.signalled
    finally:
        callback.teardown(None, None, stage="test")
    assert signal.getsignal(signal.SIGUSR1) == previous


def test_outside_slurm_no_handler_is_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    previous = signal.getsignal(signal.SIGUSR1)
    SlurmRequeue().setup(None, None, stage="fit")
    assert signal.getsignal(signal.SIGUSR1) == previous
