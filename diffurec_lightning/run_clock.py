"""Wall time of a run across the segments it was trained in.

A run stopped (time limit, SLURM requeue, Ctrl-C) and resumed from ``last.ckpt`` is one run:
its cost is the time of every segment, not only of the last. ``RunClock`` writes the seconds
spent up to each checkpoint into it and reads them back on resume; train.py adds the current
segment to them for results.json's ``wall_time_s``. Testing a checkpoint restores callback
state as well; only a resumed fit continues the clock, so the test of the best checkpoint does not
add that checkpoint's time a second time.
"""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback


class RunClock(Callback):
    """Seconds of earlier segments (``previous_s``) plus the time since this one started."""

    def __init__(self) -> None:
        self.previous_s = 0.0
        self.started = time.time()
        self._fitting = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Lightning calls setup before it restores a checkpoint's callback state.
        self._fitting = stage == "fit"

    def elapsed_s(self) -> float:
        """The run's wall time so far, earlier segments included."""
        return self.previous_s + (time.time() - self.started)

    def state_dict(self) -> dict[str, Any]:
        return {"elapsed_s": self.elapsed_s()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # The time between this checkpoint and the stop is lost with the work done in it.
        if self._fitting:
            self.previous_s = float(state_dict.get("elapsed_s", 0.0))
