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

SIGTERM alone (clusters or preemption without ``--signal``) is handled the same way: the flag,
a checkpoint at the next shared step, a requeue attempt, and then this attempt ends at once
(SLURM's SIGKILL follows SIGTERM after KillWait, typically 30 s). The callback measures how long
a validation pass and a training step take; when SLURM tells the job's end time
(``SLURM_JOB_END_TIME``) it acts by itself once the time left falls under the measured need, so
a validation longer than the signal lead (on CPU it can take minutes) never runs into the kill;
otherwise it warns that ``--signal-lead`` is too short and by how much.

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


def _is_ours(handler: Any) -> bool:
    return getattr(handler, "__func__", None) is SlurmRequeue._on_signal


class SlurmRequeue(Callback):
    """On ``signal_name`` (SLURM's ``--signal``), checkpoint at the next step all ranks share,
    requeue the job and wait to be stopped. Does nothing outside a SLURM batch job."""

    def __init__(
        self,
        signal_name: str = "SIGUSR1",
        stop_timeout_s: float = 900.0,
        signal_lead_s: float = 90.0,
        checkpoint_margin_s: float = 30.0,
    ) -> None:
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
        self.signal_lead_s = signal_lead_s
        self.checkpoint_margin_s = checkpoint_margin_s
        self.signalled = False
        self.terminated = False  # the flag came from SIGTERM: end this attempt after saving
        self._previous: Any = None
        self._previous_term: Any = None
        self._installed = False
        # Measured durations (s): the longest validation pass and training step so far.
        self.validation_s = 0.0
        self.step_s = 0.0
        self._started: dict[str, float] = {}
        self._warned = False

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Nothing else may happen here: the main thread can be anywhere, a collective included.
        self.signalled = True
        if signum == signal.SIGTERM:
            self.terminated = True

    @property
    def needed_lead_s(self) -> float:
        """What acting on the signal can take: a training step, a validation pass (a signal
        during the epoch's last batch waits for it) and writing the checkpoint."""
        return self.step_s + self.validation_s + self.checkpoint_margin_s

    @staticmethod
    def job_end_time() -> float | None:
        """The job's end time (Unix seconds) when SLURM provides it."""
        try:
            return float(os.environ["SLURM_JOB_END_TIME"])
        except (KeyError, ValueError):
            return None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Installed for every stage: a signal during the final test is only noted, so the test
        # may still finish within the lead instead of SIGUSR1's default action ending it.
        if self._installed or not under_slurm_batch():
            return
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers belong to the main thread
        self.signalled = self.terminated = False
        self._previous = signal.signal(self.signum, self._on_signal)
        self._installed = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning has registered its SIGTERM handler by now (after on_fit_start); replace it
        # with the flag, since Lightning's starts a collective inside the handler (docstring).
        if self._installed and self.signum != signal.SIGTERM:
            self._previous_term = signal.signal(signal.SIGTERM, self._on_signal)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._installed:
            # None: the old handler was not set from Python; the default is the closest.
            signal.signal(self.signum, self._previous or signal.SIG_DFL)
            if self._previous_term is not None and _is_ours(signal.getsignal(signal.SIGTERM)):
                signal.signal(signal.SIGTERM, self._previous_term)
            self._previous_term = None
            self._installed = False

    # -- measuring what the signal lead must cover ---------------------------------------------
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started["validation"] = time.monotonic()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if "validation" in self._started:
            took = time.monotonic() - self._started.pop("validation")
            self.validation_s = max(self.validation_s, took)
            self._warn_if_lead_is_short()

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._started["step"] = time.monotonic()

    def _measure_step(self) -> None:
        if "step" in self._started:
            self.step_s = max(self.step_s, time.monotonic() - self._started.pop("step"))

    def _time_is_short(self) -> bool:
        """True once the job's end is nearer than what acting on the signal needs."""
        end = self.job_end_time()
        return end is not None and end - time.time() < max(self.signal_lead_s, self.needed_lead_s)

    def _warn_if_lead_is_short(self) -> None:
        if self._installed and not self._warned and self.needed_lead_s > self.signal_lead_s:
            self._warned = True
            hint = "" if self.job_end_time() is not None else "; resubmit with a longer lead"
            rank_zero_warn(
                f"a validation pass took {self.validation_s:.0f} s: acting on the requeue signal "
                f"can take {self.needed_lead_s:.0f} s, more than the {self.signal_lead_s:.0f} s "
                f"signal lead (--signal-lead {int(self.needed_lead_s) + 1}){hint}"
            )

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
        self._measure_step()
        if batch_idx + 1 < trainer.num_training_batches:
            self._act_if_signalled(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._act_if_signalled(trainer)

    def _act_if_signalled(self, trainer: L.Trainer) -> None:
        if not self._installed:
            return
        # Every rank reaches this point at the same step, so the all-reduce always pairs up.
        act = self.signalled or self._time_is_short()
        if not trainer.strategy.reduce_boolean_decision(act, all=False):
            return
        terminated = trainer.strategy.reduce_boolean_decision(self.terminated, all=False)
        self.signalled = False
        path = next_hpc_checkpoint(trainer.default_root_dir)
        trainer.save_checkpoint(path, weights_only=False)  # collective: every rank takes part
        for logger in trainer.loggers:
            logger.save()
        # From here SLURM's SIGTERM may come at any moment; let it end the process at once
        # (Lightning's own SIGTERM handler would start a collective inside the handler).
        previous_term = signal.signal(signal.SIGTERM, signal.SIG_DFL)
        requeued = self._requeue() if trainer.is_global_zero else False
        requeued = trainer.strategy.broadcast(requeued, src=0)
        if terminated:
            # SIGTERM came already and SIGKILL follows: end now, with the checkpoint complete.
            rank_zero_info(f"saved {path} after SIGTERM (requeued: {requeued}); stopping")
            raise SystemExit(128 + signal.SIGTERM)
        if not requeued:
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
