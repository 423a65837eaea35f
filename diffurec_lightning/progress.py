"""Progress for every stage: Rich bars on a terminal, periodic plain lines anywhere else.

A SLURM log or a redirected stdout is not a terminal. Live bars there show nothing until they
stop (Rich) or pile up carriage returns on one line (tqdm), so a job that hangs in validation
looks like one that hangs in training. Off a terminal, each stage (training epochs, sanity
check, validation, test, predict, and loops such as ``mode=curves``) therefore prints a line when
it starts, one every ``interval_s`` seconds, and one when it ends.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar

T = TypeVar("T")


def is_terminal() -> bool:
    """Whether stdout shows live bars (a terminal or a notebook; Rich's own test, which honours
    FORCE_COLOR/TTY_COMPATIBLE)."""
    from rich.console import Console

    console = Console()
    return console.is_terminal or console.is_jupyter


def progress_bar(interval_s: float = 30.0) -> ProgressBar:
    """The Hydra target of ``callbacks.progress_bar``: Rich on a terminal, plain lines otherwise."""
    return RichProgressBar() if is_terminal() else PlainProgressBar(interval_s)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class Lines:
    """Plain progress lines of one stage: the first and last always, others every interval_s."""

    def __init__(self, description: str, total: float | None, interval_s: float) -> None:
        self.description = description
        self.total = total
        self.interval_s = interval_s
        self.started = self.last = time.monotonic()

    def line(self, done: int, extra: str = "") -> str:
        elapsed = time.monotonic() - self.started
        counts = f"{done}"
        if self.total and self.total != float("inf"):
            counts = f"{done}/{int(self.total)} ({100 * done / self.total:.0f}%)"
        rate = f", {done / elapsed:.2f} it/s" if elapsed > 0 and done else ""
        return f"{self.description}: {counts} {_duration(elapsed)}{rate}{extra}"

    def update(self, done: int, extra: str = "", final: bool = False) -> None:
        now = time.monotonic()
        if final or now - self.last >= self.interval_s:
            self.last = now
            print(self.line(done, extra), flush=True)


def track(
    items: Iterable[T], total: int | None, description: str, interval_s: float = 30.0
) -> Iterator[T]:
    """Iterate ``items`` with progress: a Rich bar on a terminal, plain lines otherwise."""
    if is_terminal():
        from rich.progress import track as rich_track

        yield from rich_track(items, total=total, description=description)
        return
    lines = Lines(description, total, interval_s)
    print(lines.line(0), flush=True)
    done = 0
    for item in items:
        yield item
        done += 1
        lines.update(done)
    lines.update(done, final=True)


class PlainProgressBar(ProgressBar):
    """Lightning progress as plain lines (rank zero only), for every stage."""

    def __init__(self, interval_s: float = 30.0) -> None:
        super().__init__()
        self.interval_s = interval_s
        self.enabled = True
        self._stage: dict[str, Lines] = {}
        self._done: dict[str, int] = {}

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def _metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> str:
        shown = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
        parts = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()]
        return (", " + ", ".join(parts)) if parts else ""

    def _start(self, trainer: L.Trainer, stage: str, description: str, total: float) -> None:
        if self.enabled and trainer.is_global_zero:
            self._stage[stage] = Lines(description, total, self.interval_s)
            self._done[stage] = 0
            print(self._stage[stage].line(0), flush=True)

    def _advance(self, stage: str, extra: str = "") -> None:
        if stage in self._stage:
            self._done[stage] += 1
            self._stage[stage].update(self._done[stage], extra)

    def _end(self, stage: str, extra: str = "") -> None:
        lines = self._stage.pop(stage, None)
        if lines is not None:
            lines.update(self._done.pop(stage), extra, final=True)

    # -- training ------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        description = f"{self.train_description} epoch {trainer.current_epoch}"
        self._start(trainer, "train", description, self.total_train_batches)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        if "train" in self._stage:
            self._advance("train", self._metrics(trainer, pl_module))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if "train" in self._stage:
            self._end("train", self._metrics(trainer, pl_module))

    # -- validation, test, predict ------------------------------------------------------
    def _eval_start(self, trainer: L.Trainer, stage: str, dataloader_idx: int) -> None:
        if self.has_dataloader_changed(dataloader_idx) or stage not in self._stage:
            self._end(stage)
            if stage == "val":
                description = (
                    self.sanity_check_description
                    if trainer.sanity_checking
                    else self.validation_description
                )
                total = self.total_val_batches_current_dataloader
            elif stage == "test":
                description = self.test_description
                total = self.total_test_batches_current_dataloader
            else:
                description = self.predict_description
                total = self.total_predict_batches_current_dataloader
            self._start(trainer, stage, description, total)

    def _eval_end(self, stage: str) -> None:
        self._end(stage)
        self.reset_dataloader_idx_tracker()

    def on_validation_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        self._eval_start(trainer, "val", dataloader_idx)

    def on_validation_batch_end(self, trainer: L.Trainer, *_: Any, **__: Any) -> None:
        self._advance("val")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_end("val")

    def on_test_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        self._eval_start(trainer, "test", dataloader_idx)

    def on_test_batch_end(self, trainer: L.Trainer, *_: Any, **__: Any) -> None:
        self._advance("test")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_end("test")

    def on_predict_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        self._eval_start(trainer, "predict", dataloader_idx)

    def on_predict_batch_end(self, trainer: L.Trainer, *_: Any, **__: Any) -> None:
        self._advance("predict")

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_end("predict")
