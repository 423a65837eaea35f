"""Finished runs over seeds, from their results.json files: summaries and paired t-tests.

Runs are found from the files every training run writes (never from a W&B server). Per (dataset,
model): mean and sample std (ddof=1) over seeds; every model against a baseline on the same
dataset: a two-sided paired t-test over the seeds both have (paired by seed).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from diffurec_lightning.errors import DiffuRecError

METRICS = ("hr@5", "hr@10", "hr@20", "ndcg@5", "ndcg@10", "ndcg@20")
CASE_METRICS = ("hr@10", "ndcg@10")


class Run(dict):
    """One finished run: results.json plus its folder."""

    @property
    def key(self) -> tuple[str, str]:
        return self["dataset"], self["model"]


def load_runs(roots: Sequence[str | Path]) -> tuple[list[Run], list[str]]:
    """Runs with test metrics under the given folders; plus notes about what was skipped.

    Several runs of one (dataset, model, seed) are ambiguous for pairing: the newest is kept.
    """
    notes: list[str] = []
    found: dict[tuple[str, str, int], Run] = {}
    for root in roots:
        if not Path(root).exists():
            raise DiffuRecError(f"--runs {root}: no such folder")
        for path in sorted(Path(root).rglob("results.json")):
            try:
                run = Run(json.loads(path.read_text()), dir=str(path.parent))
            except (OSError, json.JSONDecodeError) as exc:
                notes.append(f"skipped {path}: unreadable ({exc})")
                continue
            if not all(f"test/{m}" in run.get("test", {}) for m in METRICS):
                notes.append(
                    f"skipped {path.parent}: no test metrics (run unfinished or test=false)"
                )
                continue
            run["mtime"] = path.stat().st_mtime
            if run.get("protocol", "standard") != "standard":
                # Never pooled or paired with standard-protocol runs of the model.
                run["model"] = f"{run['model']} ({run['protocol']})"
            key = (run["dataset"], run["model"], int(run["seed"]))
            if key in found:
                older, newer = sorted((found[key], run), key=lambda r: r["mtime"])
                notes.append(
                    f"seed {key[2]} of {key[1]} on {key[0]} twice: kept {newer['dir']}, ignored {older['dir']}"
                )
                run = newer
            found[key] = run
    return sorted(found.values(), key=lambda r: (r["dataset"], r["model"], r["seed"])), notes


def by_config(runs: Sequence[Run]) -> dict[tuple[str, str], dict[int, Run]]:
    groups: dict[tuple[str, str], dict[int, Run]] = defaultdict(dict)
    for run in runs:
        groups[run.key][int(run["seed"])] = run
    return dict(groups)


def test_values(runs: Sequence[Run], metric: str) -> np.ndarray:
    return np.asarray([run["test"][f"test/{metric}"] for run in runs], dtype=np.float64)


def val_values(runs: Sequence[Run], metric: str) -> np.ndarray:
    """Validation of the tested checkpoint (results.json ``val_best``); NaN where missing."""
    return np.asarray(
        [(run.get("val_best") or {}).get(f"val/{metric}", math.nan) for run in runs],
        dtype=np.float64,
    )


def _mean_std(values: np.ndarray) -> tuple[float, float]:
    if np.isnan(values).any():
        return math.nan, math.nan
    std = float(values.std(ddof=1)) if len(values) > 1 else math.nan
    return float(values.mean()), std


def summary_rows(runs: Sequence[Run], metrics: Sequence[str] = METRICS) -> list[dict[str, Any]]:
    """Per (dataset, model): seeds, the epochs of the tested checkpoints, then mean and sample
    std (ddof=1) of each test metric (``hr@10_mean``) and of the validation metric of the same
    checkpoints (``val_hr@10_mean``; NaN when a run lacks it)."""
    rows = []
    for (dataset, model), seeds in sorted(by_config(runs).items()):
        group = [seeds[s] for s in sorted(seeds)]
        row: dict[str, Any] = {
            "dataset": dataset,
            "model": model,
            "n": len(group),
            "seeds": sorted(seeds),
            "epochs": [run.get("val_best_epoch") for run in group],
        }
        for metric in metrics:
            row[f"{metric}_mean"], row[f"{metric}_std"] = _mean_std(test_values(group, metric))
            row[f"val_{metric}_mean"], row[f"val_{metric}_std"] = _mean_std(
                val_values(group, metric)
            )
        rows.append(row)
    return rows


def paired_ttest(model: np.ndarray, baseline: np.ndarray) -> tuple[float, float]:
    """Two-sided paired t-test of model - baseline: (t, p); NaN with fewer than two pairs, or when
    the differences do not vary (deterministic models: the test is undefined, not significant)."""
    differences = np.asarray(model, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    # float noise of the metric accumulation (1e-9) is not spread
    if len(differences) < 2 or np.allclose(differences, differences[0], rtol=1e-6, atol=1e-9):
        return math.nan, math.nan
    result = stats.ttest_rel(model, baseline)
    return float(result.statistic), float(result.pvalue)


def ttest_rows(
    runs: Sequence[Run], baseline: str, metrics: Sequence[str] = METRICS
) -> list[dict[str, Any]]:
    """Every non-baseline model against the baseline on the same dataset, paired by seed."""
    configs = by_config(runs)
    rows = []
    for (dataset, model), seeds in sorted(configs.items()):
        base = configs.get((dataset, baseline))
        if model == baseline or base is None:
            continue
        shared = sorted(set(seeds) & set(base))
        for metric in metrics:
            ours = test_values([seeds[s] for s in shared], metric)
            theirs = test_values([base[s] for s in shared], metric)
            t, p = paired_ttest(ours, theirs)
            with np.errstate(divide="ignore", invalid="ignore"):
                rel = float(np.mean((ours - theirs) / theirs)) if shared else math.nan
            rows.append(
                {
                    "dataset": dataset,
                    "model": model,
                    "baseline": baseline,
                    "metric": metric,
                    "n": len(shared),
                    "seeds": shared,
                    "model_mean": float(ours.mean()) if shared else math.nan,
                    "baseline_mean": float(theirs.mean()) if shared else math.nan,
                    "rel_diff": rel,
                    "t": t,
                    "p": p,
                }
            )
    return rows


def case_rows(runs: Sequence[Run], metrics: Sequence[str] = CASE_METRICS) -> list[dict[str, Any]]:
    """Per (dataset, model, group): mean and std over seeds of the case-study metrics."""
    rows = []
    for (dataset, model), seeds in sorted(by_config(runs).items()):
        group = [seeds[s] for s in sorted(seeds)]
        names = sorted({k.split("/")[1] for r in group for k in r["test"] if k.count("/") == 2})
        for name in sorted(names, key=_group_order):
            keys = [f"test/{name}/{m}" for m in metrics]
            # a group no test user fell into (a small test budget) has None, not a value
            if not all(r["test"].get(k) is not None for r in group for k in keys):
                continue
            row: dict[str, Any] = {
                "dataset": dataset,
                "model": model,
                "group": name,
                "n": len(group),
            }
            for metric, key in zip(metrics, keys, strict=True):
                values = np.asarray([r["test"][key] for r in group])
                row[f"{metric}_mean"] = float(values.mean())
                row[f"{metric}_std"] = float(values.std(ddof=1)) if len(values) > 1 else math.nan
            rows.append(row)
    return rows


def _group_order(name: str) -> tuple[int, str]:
    return (0 if name in ("head", "tail") else 1, name)
