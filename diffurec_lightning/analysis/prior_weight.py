"""Choose the transition prior's weight on validation: one run's checkpoint ranked with
``log p(j) + w log(1 + Markov counts)`` for several weights w (``model.transition_prior``).

``python -m diffurec_lightning.analysis.prior_weight --run outputs/runs/<run> --weights 0,1,2,4``
loads the run's selected checkpoint (results.json ``best_checkpoint``), counts the transitions of
the training sequences once (as ``model=markov`` does), and for every weight evaluates all
validation users (with the validation process training used) and all test users (with the
configured process). It prints and writes ``prior_weight.{json,md}`` into ``--out`` (default:
the run folder) and names the weight with the best validation metric (``--metric``); its test
row is the one to report, never the best test row. The prior changes ranking only, so one
trained checkpoint serves every weight (its checkpoint was selected without the prior unless
the run trained with one).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from diffurec_lightning.errors import ConfigError
from diffurec_lightning.io import write_json, write_text
from diffurec_lightning.models.transitions import TransitionPrior
from diffurec_lightning.utils import task_wrapper

REPORTED = ("hr@10", "ndcg@10", "hr@20", "ndcg@20")


def parse_weights(text: str) -> list[float]:
    """``0,1,2.5`` -> [0.0, 1.0, 2.5]; each >= 0."""
    try:
        weights = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--weights: '{text}' is not a comma-separated list of numbers") from None
    if not weights or min(weights) < 0:
        raise ConfigError(f"--weights: give one or more weights >= 0, got '{text}'")
    return weights


def selected_checkpoint(run: Path) -> Path:
    results = run / "results.json"
    if not results.is_file():
        raise ConfigError(f"{run}: no results.json; pass a finished run folder")
    path = json.loads(results.read_text()).get("best_checkpoint")
    if not path or not Path(path).is_file():
        raise ConfigError(f"{run}/results.json names no existing best_checkpoint ({path})")
    return Path(path)


@torch.inference_mode()
def evaluate(model: Any, loader: Any, metrics: Any, dtype: Any, **scoring: Any) -> dict:
    metrics.reset()
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        for batch in loader:
            metrics.update(model.rank_batch(batch, **scoring))
    values = {key: float(value) for key, value in metrics.compute().items()}
    metrics.reset()
    return values


def measure(run: Path, weights: list[float], precision: str) -> dict[str, Any]:
    from diffurec_lightning.config import compose_config
    from diffurec_lightning.eval import setup
    from diffurec_lightning.precision import resolve_precision

    chosen = resolve_precision(precision, "cpu")
    dtype = torch.bfloat16 if chosen.startswith("bf16") else None
    checkpoint = selected_checkpoint(run)
    cfg = compose_config([f"ckpt_path={checkpoint}", "logger=csv"], config_name="eval")
    _, datamodule, model = setup(cfg)
    datamodule.setup("fit")
    if "transition_prior" not in model.hparams:
        raise ConfigError(f"model={model.hparams.get('name')} takes no transition prior")
    prior = TransitionPrior(model.hparams.num_items)
    prior.fit(datamodule.dataset("train"))  # training sequences only
    rows = []
    for weight in weights:
        model.hparams.transition_prior = weight
        model.prior = prior if weight > 0 else None
        val = evaluate(
            model,
            datamodule.val_dataloader(),
            model.val_metrics,
            dtype,
            **model.validation_sampling(),
        )
        test = evaluate(model, datamodule.test_dataloader(), model.test_metrics, dtype)
        rows.append({"weight": weight, "val": val, "test": test})
        print(
            f"w={weight:g}  val "
            + " ".join(f"{k} {val['val/' + k]:.4f}" for k in REPORTED[:2])
            + "  test "
            + " ".join(f"{k} {test['test/' + k]:.4f}" for k in REPORTED[:2]),
            flush=True,
        )
    return {"run": str(run), "checkpoint": str(checkpoint), "precision": chosen, "rows": rows}


def choose(result: dict[str, Any], metric: str) -> dict[str, Any]:
    """The row with the best validation ``metric`` (the first such weight on ties)."""
    key = f"val/{metric}"
    if key not in result["rows"][0]["val"]:
        raise ConfigError(f"--metric {metric}: not a validation metric (e.g. ndcg@10, hr@10)")
    return max(result["rows"], key=lambda row: row["val"][key])


def markdown(result: dict[str, Any], metric: str) -> str:
    best = result["chosen_weight"]
    lines = [
        f"### Transition prior weight: {Path(result['run']).name}",
        "",
        f"Checkpoint `{Path(result['checkpoint']).name}`, precision {result['precision']}; all "
        f"validation and test users. Chosen on validation {metric}: **w = {best:g}**.",
        "",
    ]
    weights = [row["weight"] for row in result["rows"]]
    if len(weights) > 1 and best == max(weights):
        lines[-1:] = [
            "",
            "(The largest weight tried: a larger one may score higher; add some.)",
            "",
        ]
    header = ["w", *(f"val {k}" for k in REPORTED), *(f"test {k}" for k in REPORTED)]
    lines += ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    for row in result["rows"]:
        mark = "**" if row["weight"] == best else ""
        cells = [f"{mark}{row['weight']:g}{mark}"]
        cells += [f"{row['val']['val/' + k]:.4f}" for k in REPORTED]
        cells += [f"{row['test']['test/' + k]:.4f}" for k in REPORTED]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="finished run folder (with results.json)")
    parser.add_argument("--weights", default="0,0.5,1,2,4,8", help="comma-separated w >= 0")
    parser.add_argument("--metric", default="ndcg@10", help="validation metric that chooses w")
    parser.add_argument("--precision", default="auto", help="auto | 32-true | bf16-mixed")
    parser.add_argument("--out", default=None, help="output folder (default: the run folder)")
    args = parser.parse_args(argv)
    run = Path(args.run)
    result = measure(run, parse_weights(args.weights), args.precision)
    result["chosen_weight"] = choose(result, args.metric)["weight"]
    out = Path(args.out) if args.out else run
    write_json(out / "prior_weight.json", result)
    text = markdown(result, args.metric)
    write_text(out / "prior_weight.md", text)
    print(text)
    return result


def cli() -> None:
    """``python -m diffurec_lightning.analysis.prior_weight``."""
    task_wrapper(main)(sys.argv[1:])


if __name__ == "__main__":
    cli()
