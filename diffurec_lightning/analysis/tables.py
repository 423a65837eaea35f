"""Markdown tables of the seed report that put validation, test and published numbers together.

Validation is that of the checkpoint that was tested (results.json ``val_best``), so the two
columns of a metric describe the same weights; on these datasets test is 15-25% harder than
validation for every method (docs/method.md), so a number means little without its partner.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from diffurec_lightning.analysis import published


def fmt(value: float | None, digits: int = 4) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _epochs(row: dict[str, Any]) -> str:
    return ",".join("—" if e is None else str(e) for e in row.get("epochs", []))


def validation_test_lines(summary: Sequence[dict[str, Any]], metrics: Sequence[str]) -> list[str]:
    """One row per (dataset, model): mean ± std of validation and test, metric by metric."""
    out = ["## Validation and test of the same checkpoints (mean ± sample std over seeds)", ""]
    out += [
        "val: validation metrics of the checkpoint that was tested (selected on the `monitor` "
        "metric), epoch: its epoch per seed; test: the test metrics of that checkpoint.",
        "",
    ]
    header = ["dataset", "model", "seeds", "epoch"]
    header += [f"{split} {m}" for m in metrics for split in ("val", "test")]
    rows = []
    for r in summary:
        cells = [r["dataset"], r["model"], ",".join(map(str, r["seeds"])), _epochs(r)]
        for m in metrics:
            for prefix in ("val_", ""):
                cells.append(f"{fmt(r[f'{prefix}{m}_mean'])} ± {fmt(r[f'{prefix}{m}_std'])}")
        rows.append(cells)
    return out + table(header, rows)


def published_lines(summary: Sequence[dict[str, Any]], metrics: Sequence[str]) -> list[str]:
    """Per dataset of the report: every published row, under our test mean of the same model."""
    ours = {(r["dataset"], r["model"]): r for r in summary}
    rows = []
    for dataset in sorted({r["dataset"] for r in summary}):
        for model, entry in published.for_dataset(dataset):
            mine = ours.get((dataset, model))
            if mine is not None:
                label = f"this project, test (mean of {mine['n']})"
                rows.append([dataset, model, label, *(fmt(mine[f"{m}_mean"]) for m in metrics)])
            values = entry["test"]
            rows.append(
                [dataset, model, f"published: {entry['source']}"]
                + [fmt(values.get(m)) for m in metrics]
            )
    if not rows:
        return []
    out = ["## Published test numbers beside ours", ""]
    out += [
        "From docs/method.md (diffurec_lightning/analysis/published.py). Published figures are "
        "test-split numbers; every public test measurement on these files sits well below the "
        "best-validation figures, so read them next to our test column.",
        "",
    ]
    return out + table(["dataset", "model", "numbers", *metrics], rows)
