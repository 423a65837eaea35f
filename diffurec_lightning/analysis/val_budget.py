"""Can training validate with a cheaper reverse process? Validation metrics of every checkpoint
of a run under several (sampler, steps) settings, all validation users each time.

``python -m diffurec_lightning.analysis.val_budget --run outputs/runs/<run>`` reads the run's
``checkpoints/epoch*.ckpt`` (train with ``callbacks.model_checkpoint.save_top_k=-1`` to keep one
per validation) and writes ``val_budget.{json,md,png}`` into ``--out`` (default: the run folder).
For each setting it reports the metrics per checkpoint, the seconds per pass, the Spearman
correlation of its checkpoint ranking with the reference setting's (the first one, normally the
configured process: ancestral over all T steps), and whether it selects the same checkpoint.
A cheap setting that ranks checkpoints as the reference does can drive model selection
(``model.val_sampler.name`` / ``model.val_sampler.steps``), while test keeps the reference process.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from diffurec_lightning.analysis import plots
from diffurec_lightning.analysis.checkpoints import autocast_dtype, evaluating, load, write_outputs
from diffurec_lightning.analysis.checkpoints import parser as checkpoint_parser
from diffurec_lightning.errors import ConfigError
from diffurec_lightning.utils import task_wrapper

METRICS = ("val/hr@10", "val/ndcg@10")
DEFAULT_SETTINGS = "ancestral:32,ancestral:1,ancestral:2,ancestral:4,ddim:1,ddim:2,ddim:4"


def parse_settings(text: str) -> list[tuple[str, int]]:
    """``name:steps,...`` -> [(name, steps), ...]."""
    settings = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, steps = item.partition(":")
        if not steps.isdigit():
            raise ConfigError(f"--settings: '{item}' is not <sampler>:<steps>, e.g. ddim:2")
        settings.append((name, int(steps)))
    if not settings:
        raise ConfigError("--settings is empty; e.g. --settings ancestral:32,ddim:2")
    return settings


def checkpoints(run: Path) -> list[tuple[int, Path]]:
    """(epoch, path) of the run's per-epoch checkpoints, by epoch (1-based)."""
    found = []
    for path in (run / "checkpoints").glob("epoch*.ckpt"):
        match = re.fullmatch(r"epoch(\d+)", path.stem)
        if match:
            found.append((int(match.group(1)) + 1, path))
    if not found:
        raise ConfigError(f"{run}/checkpoints holds no epoch*.ckpt; train with save_top_k=-1")
    return sorted(found)


def spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation of two equally long lists (average ranks for ties)."""
    from scipy.stats import spearmanr

    if len(a) < 2:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def validate(model: Any, datamodule: Any, sampler: str, steps: int, dtype: Any) -> dict:
    """All validation users through the shared ranking path under one (sampler, steps)."""
    model.val_metrics.reset()
    with evaluating(dtype):
        for batch in datamodule.val_dataloader():
            model.val_metrics.update(model.rank_batch(batch, steps=steps, sampler=sampler))
    values = {key: float(value) for key, value in model.val_metrics.compute().items()}
    model.val_metrics.reset()
    return values


def measure(
    run: Path, settings: list[tuple[str, int]], precision: str, every: int = 1
) -> dict[str, Any]:
    chosen, dtype = autocast_dtype(precision)
    rows = []
    for epoch, path in checkpoints(run):
        if epoch % every:
            continue
        datamodule, model = load(path)
        row: dict[str, Any] = {"epoch": epoch, "checkpoint": str(path)}
        for sampler, steps in settings:
            started = time.perf_counter()
            values = validate(model, datamodule, sampler, steps, dtype)
            key = f"{sampler}:{steps}"
            row[key] = {**values, "seconds": round(time.perf_counter() - started, 2)}
            print(
                f"epoch {epoch:3d}  {key:>12}  "
                + "  ".join(f"{m.split('/')[1]} {values[m]:.4f}" for m in METRICS)
                + f"  {row[key]['seconds']:.1f} s",
                flush=True,
            )
        rows.append(row)
    return {"precision": chosen, "settings": [f"{n}:{s}" for n, s in settings], "rows": rows}


def agreement(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per setting and metric: Spearman with the reference, the epoch it would select."""
    rows, reference = result["rows"], result["settings"][0]
    out = []
    for key in result["settings"]:
        entry: dict[str, Any] = {"setting": key}
        for metric in METRICS:
            values = [row[key][metric] for row in rows]
            ref = [row[reference][metric] for row in rows]
            chosen = rows[int(np.argmax(values))]["epoch"]
            entry[metric] = {
                "spearman": spearman(values, ref),
                "selects_epoch": chosen,
                "reference_at_that_epoch": ref[int(np.argmax(values))],
                "reference_best": max(ref),
            }
        entry["seconds"] = float(np.mean([row[key]["seconds"] for row in rows]))
        out.append(entry)
    return out


def markdown(result: dict[str, Any], title: str) -> str:
    settings, rows = result["settings"], result["rows"]
    lines = [f"### {title}", "", f"Precision {result['precision']}; all validation users.", ""]
    header = ["epoch", *[f"{s} HR@10 / NDCG@10" for s in settings]]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [str(row["epoch"])]
        cells += [f"{row[s]['val/hr@10']:.4f} / {row[s]['val/ndcg@10']:.4f}" for s in settings]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Against the reference `{settings[0]}`:", ""]
    header = ["setting", "s per pass", "Spearman HR@10", "Spearman NDCG@10"]
    header += ["selects (NDCG@10)", "reference NDCG@10 there / best"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in result["agreement"]:
        ndcg = entry["val/ndcg@10"]
        cells = [entry["setting"], f"{entry['seconds']:.1f}"]
        cells += [f"{entry[m]['spearman']:.3f}" for m in METRICS]
        cells += [f"epoch {ndcg['selects_epoch']}"]
        cells += [f"{ndcg['reference_at_that_epoch']:.4f} / {ndcg['reference_best']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def figure(result: dict[str, Any], path: Path, title: str) -> Path:
    epochs = [row["epoch"] for row in result["rows"]]
    panels = []
    for metric in METRICS:
        series = {s: [row[s][metric] for row in result["rows"]] for s in result["settings"]}
        panels.append((f"{metric} per checkpoint", "epoch", epochs, series))
    return plots.line_chart(panels, path, title=title, log_x=False)


def main(argv: list[str]) -> dict[str, Any]:
    parser = checkpoint_parser(__doc__, "run folder with checkpoints/epoch*.ckpt")
    parser.add_argument("--settings", default=DEFAULT_SETTINGS, help="sampler:steps,... ")
    parser.add_argument("--every", type=int, default=1, help="only epochs divisible by this")
    args = parser.parse_args(argv)
    run = Path(args.run)
    result = measure(run, parse_settings(args.settings), args.precision, args.every)
    result["agreement"] = agreement(result)
    out = Path(args.out or run)
    title = f"validation budget: {run.name}"
    figure(result, out / "val_budget.png", title)
    write_outputs(out, "val_budget", result, markdown(result, title))
    return result


def cli() -> None:
    """The ``diffurec-val-budget`` command (also ``python -m ...analysis.val_budget``)."""
    task_wrapper(main)(sys.argv[1:])


if __name__ == "__main__":
    cli()
