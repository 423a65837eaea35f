"""Checkpoint-and-requeue on SLURM's warning signal, safe under multi-process DDP.

Lightning's own SLURM handler saves the checkpoint *inside* the signal handler. ``save_checkpoint``
ends in a barrier, and a Python signal handler runs wherever the main thread happens to be: when
one rank takes the signal between two steps while another is blocked in the gradient all-reduce,
the first waits in the barrier for a rank that waits for its gradients, and the job hangs until
the time limit kills it (no requeue, work lost). Observed on CI with two gloo ranks.

Here the handler only raises a flag. At the end of every training batch the ranks agree, with one
all-reduce of a single number, whether any of them was signalled; if so, all of them save
``hpc_ckpt_<n>.ckpt`` together (the name ``ckpt_path=auto`` resumes from), rank 0 runs
``scontrol requeue``, and every rank waits for SLURM to end this attempt. A signal during an
epoch's last batch or its validation is acted on at the epoch's end, after the validation and
the epoch-end callbacks, so that the resumed run does not skip them. The signal lead
(``--signal-lead``) must therefore cover one training step, a validation pass if the signal can
arrive before one, and writing the checkpoint. During the test after fit the signal is only
noted.

Resuming mid-epoch follows Lightning: the epoch restarts its (deterministic) batch order and
runs only the remaining number of steps, so that epoch repeats its first batches and skips as
many of its last; the step count stays exact.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from diffurec_lightning.errors import ConfigError

HPC_CHECKPOINT = re.compile(r"hpc_ckpt_(\d+)\.ckpt")


def hpc_checkpoints(folder: str | Path) -> dict[int, Path]:
    """The requeue checkpoints ``hpc_ckpt_<n>.ckpt`` in ``folder``, by ``n``."""
    folder = Path(folder)
    paths = folder.glob("hpc_ckpt_*.ckpt") if folder.is_dir() else []
    return {
        int(match.group(1)): path
        for path in paths
        if (match := HPC_CHECKPOINT.fullmatch(path.name))
    }


def next_hpc_checkpoint(folder: str | Path) -> Path:
    """``hpc_ckpt_<n+1>.ckpt`` after the highest ``n`` already in ``folder`` (1 when none)."""
    return Path(folder) / f"hpc_ckpt_{max(hpc_checkpoints(folder), default=0) + 1}.ckpt"


def slurm_job_id() -> str:
    """The id ``scontrol requeue`` takes: ``<array job>_<task>`` for array jobs."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job is not None:
        return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ["SLURM_JOB_ID"]


def under_slurm_batch() -> bool:
    """True in a task of a SLURM job that Lightning treats as SLURM-managed (srun, not an
    interactive ``bash`` allocation)."""
    return SLURMEnvironment.detect()


def cluster_plugins(callbacks: list[Any]) -> list[Any]:
    """Trainer plugins for these callbacks: with a SlurmRequeue under SLURM, Lightning's own
    requeue handler is switched off so that only one of the two acts on the signal."""
    if under_slurm_batch() and any(isinstance(c, SlurmRequeue) for c in callbacks):
        return [SLURMEnvironment(auto_requeue=False)]
    return []


class SlurmRequeue(Callback):
    """On ``signal_name`` (SLURM's ``--signal``), checkpoint at the next step all ranks share,
    requeue the job and wait to be stopped. Does nothing outside a SLURM batch job."""

    def __init__(self, signal_name: str = "SIGUSR1", stop_timeout_s: float = 900.0) -> None:
        try:
            self.signum = signal.Signals[signal_name]
        except KeyError:
            raise ConfigError(
                f"callbacks.slurm_requeue.signal_name={signal_name!r} is not a signal name; "
                "use e.g. SIGUSR1 (as in sbatch --signal=SIGUSR1@90)"
            ) from None
        if stop_timeout_s <= 0:
            raise ConfigError(
                f"callbacks.slurm_requeue.stop_timeout_s must be > 0, got {stop_timeout_s}"
            )
        self.stop_timeout_s = stop_timeout_s
        self.signalled = False
        self._previous: Any = None
        self._installed = False

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Nothing else may happen here: the main thread can be anywhere, a collective included.
        self.signalled = True

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Installed for every stage: a signal during the final test is only noted, so the test
        # may still finish within the lead instead of SIGUSR1's default action ending it.
        if self._installed or not under_slurm_batch():
            return
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers belong to the main thread
        self.signalled = False
        self._previous = signal.signal(self.signum, self._on_signal)
        self._installed = True

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._installed:
            # None: the old handler was not set from Python; the default is the closest.
            signal.signal(self.signum, self._previous or signal.SIG_DFL)
            self._installed = False

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        # After an epoch's last batch come its validation and its epoch-end callbacks
        # (ModelCheckpoint, EarlyStopping); a checkpoint taken before them would resume past
        # them. on_train_epoch_end acts for that batch instead. Every rank has the same number
        # of batches, so all take the same branch.
        if batch_idx + 1 < trainer.num_training_batches:
            self._act_if_signalled(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._act_if_signalled(trainer)

    def _act_if_signalled(self, trainer: L.Trainer) -> None:
        if not self._installed:
            return
        # Every rank reaches this point at the same step, so the all-reduce always pairs up.
        if not trainer.strategy.reduce_boolean_decision(self.signalled, all=False):
            return
        self.signalled = False
        path = next_hpc_checkpoint(trainer.default_root_dir)
        trainer.save_checkpoint(path, weights_only=False)  # collective: every rank takes part
        for logger in trainer.loggers:
            logger.save()
        # From here SLURM's SIGTERM may come at any moment; let it end the process at once
        # (Lightning's own SIGTERM handler would start a collective inside the handler).
        previous_term = signal.signal(signal.SIGTERM, signal.SIG_DFL)
        requeued = self._requeue() if trainer.is_global_zero else False
        if not trainer.strategy.broadcast(requeued, src=0):
            signal.signal(signal.SIGTERM, previous_term)
            rank_zero_warn(f"saved {path} but could not requeue; training goes on until stopped")
            return
        rank_zero_info(f"saved {path} and requeued; waiting for SLURM to stop this attempt")
        self._wait_to_be_stopped()

    @staticmethod
    def _requeue() -> bool:
        """``scontrol requeue`` this job; False (with a warning) when that fails in any way, so
        that the other ranks, waiting for the outcome, are never left hanging."""
        try:
            job_id = slurm_job_id()
            done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
        except (OSError, KeyError) as exc:
            rank_zero_warn(f"could not run scontrol requeue: {exc!r}")
            return False
        if done.returncode != 0:
            rank_zero_warn(f"scontrol requeue {job_id} failed: {done.stderr.strip()}")
        return done.returncode == 0

    def _wait_to_be_stopped(self) -> None:
        # SLURM now sends SIGTERM and, KillWait seconds later, SIGKILL. Training on would only
        # produce steps that the next attempt redoes from the checkpoint.
        deadline = time.monotonic() + self.stop_timeout_s
        while time.monotonic() < deadline:
            time.sleep(1.0)
        raise RuntimeError(
            f"job {slurm_job_id()} was requeued but not stopped within {self.stop_timeout_s:.0f} s"
        )
