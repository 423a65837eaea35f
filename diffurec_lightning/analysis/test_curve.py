"""Test metrics at every validation, for learning curves only (``callbacks.test_every_validation``).

After each validation the module ranks the test users too, through the same ``rank_batch`` as the
final test; the metrics are logged as ``curve_test/hr@10`` etc. and, with the validation metrics
of the same epoch, kept in ``history`` (written to results.json). They are never monitored: the
checkpoint is still chosen on validation alone, and the validation metrics are the same with and
without this callback (the random state the training uses is restored after the test pass).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch

from diffurec_lightning.analysis import plots
from diffurec_lightning.metrics import TopKMetrics

PREFIX = "curve_test/"
CURVE_METRICS = ("hr@10", "ndcg@10")


class TestEveryValidation(L.Callback):
    """Rank the test split after every validation; record val and test metrics per validation."""

    def __init__(self, enabled: bool = False) -> None:
        self.enabled = enabled
        self.history: list[dict[str, Any]] = []
        self._fitting = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Lightning calls setup before it restores a checkpoint's callback state.
        self._fitting = stage == "fit"

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled or trainer.sanity_checking:
            return
        metrics = TopKMetrics(ks=pl_module.val_metrics.ks, prefix=PREFIX).to(pl_module.device)
        # As many batches as validation ran (limit_val_batches, fast_dev_run): both splits hold
        # one sample per user, so the batch counts match.
        limit = trainer.num_val_batches[0] if trainer.num_val_batches else float("inf")
        # Iterating a DataLoader draws its base seed from the global generator: without the
        # fork, every later dropout mask and diffusion step would change.
        cuda = [pl_module.device.index or 0] if pl_module.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda), torch.no_grad():
            for index, batch in enumerate(trainer.datamodule.test_dataloader()):
                if index >= limit:
                    break
                batch = trainer.strategy.batch_to_device(batch)
                metrics.update(pl_module.rank_batch(batch))
        # compute() has already summed over ranks: log without a second reduction.
        for key, value in metrics.compute().items():
            pl_module.log(key, float(value), sync_dist=False)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled or trainer.sanity_checking:
            return
        logged = {
            key: float(value)
            for key, value in trainer.callback_metrics.items()
            if (key.startswith("val/") and not key.endswith("_best")) or key.startswith(PREFIX)
        }
        self.history.append({"epoch": trainer.current_epoch, "step": trainer.global_step, **logged})

    def state_dict(self) -> dict[str, Any]:
        # A resumed run continues the same curve.
        return {"history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Only a resumed fit continues the curve: testing the best checkpoint restores callback
        # state too, and must not cut the curve back to that checkpoint's epoch.
        if self._fitting:
            self.history = list(state_dict.get("history", []))


def plot_history(history: list[dict[str, Any]], path: Path, title: str) -> Path:
    """``path`` (PNG): validation and test HR@10 and NDCG@10 against the epoch (1-based), one
    panel per metric, from ``TestEveryValidation.history``."""
    epochs = [row["epoch"] + 1 for row in history]
    panels = [
        (
            metric.upper(),
            "epoch",
            epochs,
            {
                split: [row.get(f"{prefix}{metric}", float("nan")) for row in history]
                for split, prefix in (("validation", "val/"), ("test", PREFIX))
            },
        )
        for metric in CURVE_METRICS
    ]
    return plots.line_chart(panels, path, title=title, log_x=False)
