"""Seed report: ``python -m diffurec_lightning.analysis.report --runs outputs --baseline diffurec``.

Finds finished runs from their results.json files (never from a W&B server), then per (dataset,
model) reports mean +- sample std over seeds of the validation metrics of the tested checkpoint
beside its test metrics, the published test numbers of the same models (analysis/published.py),
and a paired t-test of every model's test metrics against the baseline over the seeds both have
(paired by seed). Writes markdown and logs the tables to W&B (offline unless WANDB_MODE says
otherwise). This module collects (runs, pictures, curves) and writes; report_render.py renders.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from diffurec_lightning.analysis.report_render import case_study_figures, render_markdown
from diffurec_lightning.analysis.seeds import (
    Run,
    by_config,
    case_rows,
    load_runs,
    summary_rows,
    ttest_rows,
)
from diffurec_lightning.errors import DiffuRecError
from diffurec_lightning.io import copy_file, write_text


def representation_section(runs: Sequence[Run], figure_dir: Path, out_dir: Path) -> str | None:
    """The t-SNE picture (tsne.png) of each (dataset, model)'s lowest seed that has one, copied
    next to the report; None when no run has one (callback off, or a classic model)."""
    pictures = []
    for (dataset, model), seeds in sorted(by_config(runs).items()):
        having = [
            seeds[seed]
            for seed in sorted(seeds)
            if (Path(seeds[seed]["dir"]) / "tsne.png").is_file()
        ]
        if having:
            run = having[0]
            source = Path(run["dir"]) / "tsne.png"
            target = figure_dir / f"tsne_{dataset}_{model}.png"
            copy_file(source, target)
            caption = f"t-SNE of x0, {model} on {dataset}, seed {run['seed']}"
            pictures.append(f"![{caption}]({os.path.relpath(target, out_dir)})")
    if not pictures:
        return None
    intro = (
        "Reconstructed target representations x0 of a seeded sample of test users (one reverse "
        "process each), coloured by k-means cluster; crosses mark users whose target is a "
        "long-tail item. From each run folder's tsne.png (the representation callback at test)."
    )
    return "\n\n".join(["## Representations (t-SNE)", intro, *pictures])


def curves_section(curve_dirs: Sequence[str | Path], figure_dir: Path, out_dir: Path) -> str:
    """Tables and plots of ``make curves`` outputs (curves.md, curves.png), with their commands."""
    parts = ["## Inference budget: reverse steps and ensemble size"]
    for index, folder in enumerate(map(Path, curve_dirs)):
        table, picture = folder / "curves.md", folder / "curves.png"
        if not table.is_file() or not picture.is_file():
            raise DiffuRecError(f"--curves {folder}: no curves.md/curves.png (run make curves)")
        target = figure_dir / f"curves_{index}_{folder.name}.png"
        copy_file(picture, target)
        parts.append(table.read_text().rstrip())
        overrides = folder / ".hydra" / "overrides.yaml"
        if overrides.is_file():
            args = [
                line[2:].strip() for line in overrides.read_text().splitlines() if line[:2] == "- "
            ]
            parts.append(f"Command: `python -m diffurec_lightning.eval {' '.join(args)}`")
        parts.append(f"![inference budget]({os.path.relpath(target, out_dir)})")
    return "\n\n".join(parts)


def log_to_wandb(
    runs: Sequence[Run], baseline: str, figures: dict[str, Path], wandb_dir: Path
) -> None:
    """Summary and t-test tables (and figures) as an offline W&B run of job type "report"."""
    import wandb

    wandb_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=os.environ.get("WANDB_PROJECT", "diffurec_lightning"),
        job_type="report",
        name=f"report-vs-{baseline}",
        dir=str(wandb_dir),
        mode=os.environ.get("WANDB_MODE", "offline"),
        config={"baseline": baseline, "runs": len(runs)},
    )
    try:
        payload: dict[str, Any] = {}
        for name, rows in (
            ("summary", summary_rows(runs)),
            ("ttest", ttest_rows(runs, baseline)),
            ("case_studies", case_rows(runs)),
        ):
            if rows:
                columns = list(rows[0])
                data = [
                    [json.dumps(v) if isinstance(v, list) else v for v in r.values()] for r in rows
                ]
                payload[f"report/{name}"] = wandb.Table(columns=columns, data=data)
        payload.update({f"report/{Path(p).stem}": wandb.Image(str(p)) for p in figures.values()})
        run.log(payload)
    finally:
        run.finish()


def build_report(
    runs_dirs: Sequence[str | Path],
    baseline: str,
    out: str | Path,
    figure_dir: str | Path | None = None,
    wandb_dir: str | Path | None = None,
    title: str = "Seed report",
    command: str = "python -m diffurec_lightning.analysis.report",
    curve_dirs: Sequence[str | Path] = (),
) -> dict[str, Any]:
    """Load runs, write the markdown (and figures), log to W&B; return the computed tables."""
    runs, notes = load_runs(runs_dirs)
    if not runs:
        raise DiffuRecError(
            f"no finished runs (results.json with test metrics) under {list(runs_dirs)}"
        )
    if baseline not in {r["model"] for r in runs}:
        notes.append(f"baseline `{baseline}` has no runs: no t-tests")
    out = Path(out)
    figures = case_study_figures(runs, Path(figure_dir)) if figure_dir else {}
    links = {k: os.path.relpath(p, out.parent) for k, p in figures.items()}
    sections = []
    if figure_dir:
        representation = representation_section(runs, Path(figure_dir), out.parent)
        sections += [representation] if representation else []
        if curve_dirs:
            sections.append(curves_section(curve_dirs, Path(figure_dir), out.parent))
    elif curve_dirs:
        raise DiffuRecError("--curves needs --figures: the plots are copied next to the report")
    write_text(out, render_markdown(runs, baseline, notes, links, command, title, sections))
    if wandb_dir is not None:
        log_to_wandb(runs, baseline, figures, Path(wandb_dir))
    return {
        "runs": runs,
        "notes": notes,
        "summary": summary_rows(runs),
        "ttest": ttest_rows(runs, baseline),
        "figures": figures,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--runs", nargs="+", default=["outputs"], help="folders searched for results.json"
    )
    parser.add_argument(
        "--baseline", default="diffurec", help="model name the others are tested against"
    )
    parser.add_argument("--out", default="docs/report.md", help="markdown file to write")
    parser.add_argument(
        "--figures", default=None, help="folder for the case-study comparison chart"
    )
    parser.add_argument("--title", default="Seed report")
    parser.add_argument(
        "--curves", nargs="*", default=[], help="make curves output folders to include"
    )
    parser.add_argument(
        "--wandb-dir", default="outputs/reports", help="where the offline W&B run goes"
    )
    parser.add_argument("--no-wandb", action="store_true", help="skip W&B logging")
    args = parser.parse_args(argv)
    command = "python -m diffurec_lightning.analysis.report " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    try:
        result = build_report(
            args.runs,
            args.baseline,
            args.out,
            args.figures,
            None if args.no_wandb else args.wandb_dir,
            args.title,
            command.strip(),
            args.curves,
        )
    except DiffuRecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} from {len(result['runs'])} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
