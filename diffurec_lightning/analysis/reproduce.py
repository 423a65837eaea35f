"""One command per table: every model's recipe over N seeds into one folder, then the report.

``make reproduce DATA=toys MODELS="pop markov diffurec diffurecsys" SEEDS=3`` runs

    python -m diffurec_lightning.analysis.reproduce --data toys \
        --models pop markov diffurec diffurecsys --seeds 3 --baseline markov [overrides...]

Each (model, seed) is its own training run, one after the other, in
``<out-dir>/<model>/seed<k>/`` (results.json, checkpoints, case studies). A model's recipe is
``experiment=<model>_<data>`` when conf/experiment has one (the published settings), otherwise
``data=<data> model=<model>`` (the ``make train`` defaults); ``--train-defaults diffurec`` picks
the latter for a model that has a preset (the published DiffuRec(Sys) settings validate every 5-20
epochs for 41-200 epochs, hours on a CPU; the defaults validate every epoch and stop early).
A (model, seed) whose folder already holds results.json is kept, not trained again, and one
stopped during training continues from its ``checkpoints/last.ckpt`` (written every epoch; the
resumed run ends as the uninterrupted one would): a reproduce that was stopped resumes with the
same command, and the runs can be spread over several calls into the same ``--out-dir``.
``--rerun`` trains every run again from scratch. Trailing Hydra overrides apply to every run; a ``model.<key>``
override is skipped (and said so) for a model that has no such setting, so that e.g.
``model.hidden_size=16`` shrinks the neural models and leaves pop and markov alone. Then
``report.md`` in the same folder: validation and test of the same checkpoints (mean +- std over
seeds), the published numbers beside them, and paired t-tests against ``--baseline``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.errors import HydraException
from omegaconf import DictConfig

from diffurec_lightning.config import CONF_DIR, compose_config
from diffurec_lightning.errors import ConfigError, DiffuRecError
from diffurec_lightning.utils import finish_wandb


def recipe(data: str, model: str, preset: bool = True) -> list[str]:
    """The overrides that select a model's settings for a dataset (its preset, if any and wanted)."""
    experiment = f"{model}_{data}"
    chosen = [f"data={data}", f"model={model}"]
    if preset and (CONF_DIR / "experiment" / f"{experiment}.yaml").is_file():
        chosen.append(f"experiment={experiment}")
    return chosen


def applicable(cfg: DictConfig, overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """(kept, skipped): ``model.<key>=...`` overrides of keys this model lacks are skipped."""
    kept, skipped = [], []
    for override in overrides:
        key = override.split("=", 1)[0]
        if key.startswith("model.") and key.split(".")[1] not in cfg.model:
            skipped.append(override)
        else:
            kept.append(override)
    return kept, skipped


def run_config(
    data: str,
    model: str,
    seed: int,
    folder: Path,
    overrides: Sequence[str],
    preset: bool = True,
) -> tuple[DictConfig, list[str]]:
    """The composed config of one run, and the overrides that did not apply to this model."""
    base = recipe(data, model, preset)
    if any(o.startswith("experiment=") for o in overrides):
        base = base[:2]  # the caller's experiment replaces the recipe's
    probe = compose_config(base)
    kept, skipped = applicable(probe, overrides)
    cfg = compose_config([*base, f"seed={seed}", f"paths.output_dir={folder}", *kept])
    return cfg, skipped


def reproduce(
    data: str,
    models: Sequence[str],
    seeds: int,
    out_dir: Path,
    overrides: Sequence[str] = (),
    baseline: str = "markov",
    wandb: bool = True,
    command: str = "python -m diffurec_lightning.analysis.reproduce",
    train_defaults: Sequence[str] = (),
    rerun: bool = False,
) -> dict[str, Any]:
    """Run every (model, seed) one at a time, then write ``out_dir/report.md``."""
    from diffurec_lightning.analysis.report import build_report
    from diffurec_lightning.train import fit_by_protocol

    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    if not models:
        raise ConfigError("--models: name at least one model (e.g. pop markov diffurecsys)")
    missing = [
        m for m in [*models, *train_defaults] if not (CONF_DIR / "model" / f"{m}.yaml").is_file()
    ]
    if missing:
        raise ConfigError(f"--models: no conf/model/{missing[0]}.yaml")
    for model in models:
        for seed in range(seeds):
            folder = out_dir / model / f"seed{seed}"
            if (folder / "results.json").is_file() and not rerun:
                # a finished run is kept: an interrupted reproduce resumes where it stopped
                print(f"== {model} on {data}, seed {seed}: finished before, kept ({folder})")
                continue
            preset = model not in train_defaults
            resume = (
                []
                if rerun or not (folder / "checkpoints" / "last.ckpt").is_file()
                else ["ckpt_path=auto"]
            )
            cfg, skipped = run_config(data, model, seed, folder, [*overrides, *resume], preset)
            if resume:
                print(f"== {model} on {data}, seed {seed}: resuming from its last.ckpt")
            if skipped:
                print(f"{model}: not its settings, skipped: {' '.join(skipped)}")
            print(f"== {model} on {data}, seed {seed} -> {folder}", flush=True)
            try:
                fit_by_protocol(cfg)  # data.protocol=refit runs the refit protocol
            finally:
                finish_wandb()
    return build_report(
        [out_dir],
        baseline,
        out_dir / "report.md",
        out_dir / "figures",
        out_dir / "wandb" if wandb else None,
        title=f"Reproduction on {data}",
        command=command,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="toys", help="dataset config name")
    parser.add_argument("--models", nargs="+", default=["pop", "markov", "diffurec", "diffurecsys"])
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per model")
    parser.add_argument("--baseline", default="markov", help="model the t-tests compare against")
    parser.add_argument("--out-dir", default=None, help="default outputs/reproduce/<data>/<time>")
    parser.add_argument(
        "--train-defaults",
        type=lambda names: [n for n in names.split(",") if n],
        default=[],
        metavar="MODEL[,MODEL...]",
        help="models that run with the make train defaults instead of their experiment preset",
    )
    parser.add_argument("--no-wandb", action="store_true", help="skip the report's W&B run")
    parser.add_argument(
        "--rerun", action="store_true", help="train again runs whose results.json exists"
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    args = parser.parse_args(argv)
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    home = Path(os.environ.get("DIFFUREC_HOME", "."))  # as conf/paths: outputs/ under it
    out_dir = (
        Path(args.out_dir) if args.out_dir else home / "outputs" / "reproduce" / args.data / stamp
    )
    command = "python -m diffurec_lightning.analysis.reproduce " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    try:
        reproduce(
            args.data,
            args.models,
            args.seeds,
            out_dir,
            args.overrides,
            args.baseline,
            wandb=not args.no_wandb,
            command=command.strip(),
            train_defaults=args.train_defaults,
            rerun=args.rerun,
        )
    except (DiffuRecError, HydraException) as exc:
        # One line: a wrong override or dataset name is a usage error, not a crash.
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
    print(f"wrote {out_dir / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
