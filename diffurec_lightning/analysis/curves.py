"""How much inference can be saved: test metrics of one checkpoint against the number of reverse
steps actually run (evenly spaced over the T trained steps: a respaced process for DiffuRec(Sys),
Nichol & Dhariwal; DCRec's configured sampler over those T' levels, so with ``sampler.name=skip``
its step skipping) and against the ensemble size (DiffuRecSys Algorithm 3), with the seconds each
setting took.

Users are a seeded random sample of the test set (``curves.max_users``); per-user evaluation
noise makes every setting see the same users with the same noise streams.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig

from diffurec_lightning.analysis import plots
from diffurec_lightning.analysis.groups import metrics_from_ranks
from diffurec_lightning.errors import ConfigError
from diffurec_lightning.io import write_json, write_text
from diffurec_lightning.models.base import DiffusionRecommender
from diffurec_lightning.progress import track

CURVE_METRICS = ("hr@10", "ndcg@10", "hr@20", "ndcg@20")


def sample_users(num_users: int, max_users: int | None, seed: int) -> np.ndarray:
    """Sorted test-set indices: all of them, or a seeded sample of ``max_users``."""
    if max_users is None or max_users >= num_users:
        return np.arange(num_users)
    return np.sort(np.random.default_rng(seed).choice(num_users, size=max_users, replace=False))


@torch.no_grad()
def test_ranks(
    model: L.LightningModule,
    dataset: Any,
    indices: np.ndarray,
    batch_size: int,
    device: torch.device,
    steps: int | None = None,
    ensemble_size: int | None = None,
    description: str = "test users",
) -> np.ndarray:
    """1-based target ranks of the selected test samples (in the order given), running ``steps``
    reverse steps with ``ensemble_size`` members (None: the model's). Users are batched by history
    length, as validation is: a random sample padded to its longest history would be mostly
    padding. Progress is shown as ``description``."""
    order = np.argsort(dataset.lengths[indices], kind="stable")
    ranks = []
    starts = range(0, len(indices), batch_size)
    for start in track(starts, len(starts), description):
        batch = dataset.__getitems__(indices[order[start : start + batch_size]].tolist())
        batch = {key: value.to(device) for key, value in batch.items()}
        ranks.append(model.rank_batch(batch, steps=steps, ensemble_size=ensemble_size).cpu())
    out = np.empty(len(indices), dtype=np.int64)
    out[order] = torch.cat(ranks).numpy()
    return out


def inference_curves(
    model: L.LightningModule,
    dataset: Any,
    indices: np.ndarray,
    *,
    steps: Sequence[int],
    ensemble_sizes: Sequence[int],
    batch_size: int,
    device: torch.device,
) -> list[dict[str, Any]]:
    """One row per setting: curve ("steps" | "ensemble"), x, steps, ensemble, the metrics,
    same_rank (share of users ranked as under the full setting) and seconds."""
    if not isinstance(model, DiffusionRecommender):
        raise ConfigError("mode=curves needs a diffusion model (reverse steps and ensembles)")
    num_steps = model.diffusion.num_steps
    bad = [s for s in steps if not 1 <= s <= num_steps]
    if bad:
        raise ConfigError(f"curves.steps {bad} outside 1..{num_steps} (the model's T)")
    if any(m < 1 for m in ensemble_sizes):
        raise ConfigError(f"curves.ensemble_sizes must be >= 1, got {list(ensemble_sizes)}")
    model.to(device).eval()
    ks = sorted({int(m.split("@")[1]) for m in CURVE_METRICS})
    cache: dict[tuple[int, int], tuple[np.ndarray, float]] = {}

    def measure(num: int, members: int) -> tuple[np.ndarray, float]:
        if (num, members) not in cache:
            started = time.perf_counter()
            label = f"curves: {num} steps, ensemble {members}"
            ranks = test_ranks(model, dataset, indices, batch_size, device, num, members, label)
            cache[num, members] = (ranks, time.perf_counter() - started)
        return cache[num, members]

    rows = []
    # The trained setting (all T steps, one member) is the reference every row is compared to.
    reference, _ = measure(num_steps, 1)
    for curve, settings in (
        ("steps", [(s, 1) for s in steps]),
        ("ensemble", [(num_steps, m) for m in ensemble_sizes]),
    ):
        for num, members in settings:
            ranks, seconds = measure(num, members)
            x = num if curve == "steps" else members
            row = {"curve": curve, "x": x, "steps": num, "ensemble": members}
            row.update(metrics_from_ranks(ranks, ks))
            row["same_rank"] = float(np.mean(ranks == reference))
            rows.append({**row, "seconds": round(seconds, 3)})
    return rows


def curves_markdown(rows: list[dict[str, Any]], num_users: int, title: str) -> str:
    lines = [
        f"### {title}",
        "",
        f"Test users: {num_users} (seeded sample). Same rank: share of",
        "users whose target rank equals the one under all T steps with one member.",
        "",
    ]
    header = ["curve", "reverse steps", "ensemble", *CURVE_METRICS, "same rank", "seconds"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["curve"], str(r["steps"]), str(r["ensemble"])]
        cells += [f"{r[m]:.4f}" for m in CURVE_METRICS]
        cells += [f"{100 * r['same_rank']:.1f}%", f"{r['seconds']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def curves_figure(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    panels = []
    for curve, xlabel in (("steps", "reverse steps run"), ("ensemble", "ensemble size")):
        sel = [r for r in rows if r["curve"] == curve]
        series = {m: [r[m] for r in sel] for m in CURVE_METRICS}
        panels.append((f"test metrics vs {xlabel}", xlabel, [r["x"] for r in sel], series))
    return plots.line_chart(panels, path, title=title)


def curves_report(
    cfg: DictConfig, datamodule: Any, model: L.LightningModule, device: torch.device
) -> dict[str, Any]:
    """Measure, then write curves.{json,md,png} into the eval folder and log them to W&B."""
    from diffurec_lightning.utils import instantiate_group

    c = cfg.curves
    dataset = datamodule.dataset("test")
    indices = sample_users(len(dataset), c.get("max_users"), c.seed)
    rows = inference_curves(
        model,
        dataset,
        indices,
        steps=list(c.steps),
        ensemble_sizes=list(c.ensemble_sizes),
        batch_size=c.batch_size,
        device=device,
    )
    out = Path(cfg.paths.output_dir)
    title = f"{cfg.model.name} on {cfg.data.name}: inference budget"
    write_json(out / "curves.json", {"users": len(indices), "rows": rows})
    write_text(out / "curves.md", curves_markdown(rows, len(indices), title))
    figure = curves_figure(rows, out / "curves.png", title)
    print(curves_markdown(rows, len(indices), title))
    for logger in instantiate_group(cfg.get("logger")):
        if hasattr(logger, "log_table"):
            columns = list(rows[0])
            logger.log_table("curves/table", columns=columns, data=[list(r.values()) for r in rows])
            logger.log_image("curves/plot", images=[str(figure)])
    return {"users": len(indices), "rows": rows, "figure": str(figure)}
