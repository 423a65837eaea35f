"""Choose the transition prior's weight on validation: one run's checkpoint ranked with
``log p(j) + w log(1 + Markov counts)`` for several weights w (``model.transition_prior``).

``python -m diffurec_lightning.analysis.prior_weight --run outputs/runs/<run> --weights 0,1,2,4``
loads the run's selected checkpoint (results.json ``best_checkpoint``), counts the transitions of
the training sequences once (as ``model=markov`` does), and evaluates all validation users (with
the validation process training used) and all test users (with the configured process) once,
ranking each batch's scores under every weight. It prints and writes ``prior_weight.{json,md}``
into ``--out`` (default: the run folder) and names the weight with the best validation metric
(``--metric``); its test row is the one to report, never the best test row. The prior changes
ranking only, so one trained checkpoint serves every weight (its checkpoint was selected without
the prior unless the run trained with one).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from diffurec_lightning.analysis.checkpoints import autocast_dtype, evaluating, load, write_outputs
from diffurec_lightning.analysis.checkpoints import parser as checkpoint_parser
from diffurec_lightning.errors import ConfigError
from diffurec_lightning.metrics import TopKMetrics
from diffurec_lightning.models.base import item_ranks, with_prior
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


def evaluate(
    model: Any,
    loader: Any,
    prior: TransitionPrior,
    weights: list[float],
    prefix: str,
    dtype: torch.dtype | None,
    **scoring: Any,
) -> list[dict[str, float]]:
    """Metrics of every weight from one pass over ``loader``: the model scores each batch once
    (the reverse process is what costs) and each weight only re-ranks those scores; w = 0 ranks
    the model's own scores, exactly as it evaluates without a prior."""
    metrics = [TopKMetrics(ks=model.hparams.ks, prefix=prefix) for _ in weights]
    with evaluating(dtype):
        for batch in loader:
            scores = model.eval_scores(batch, **scoring)
            counts = prior(batch["seq"])
            for weight, metric in zip(weights, metrics, strict=True):
                ranked = scores if weight == 0 else with_prior(scores, counts, weight)
                metric.update(item_ranks(ranked, batch["target"]))
    return [{key: float(value) for key, value in m.compute().items()} for m in metrics]


def measure(run: Path, weights: list[float], precision: str) -> dict[str, Any]:
    chosen, dtype = autocast_dtype(precision)
    checkpoint = selected_checkpoint(run)
    datamodule, model = load(checkpoint)
    if "transition_prior" not in model.hparams:
        raise ConfigError(f"model={model.hparams.get('name')} takes no transition prior")
    prior = TransitionPrior(model.hparams.num_items)
    prior.fit(datamodule.dataset("train"))  # training sequences only
    model.prior = None  # eval_scores is the model alone; the weights are added here
    val = evaluate(
        model,
        datamodule.val_dataloader(),
        prior,
        weights,
        "val/",
        dtype,
        **model.validation_sampling(),
    )
    test = evaluate(model, datamodule.test_dataloader(), prior, weights, "test/", dtype)
    rows = [{"weight": w, "val": v, "test": t} for w, v, t in zip(weights, val, test, strict=True)]
    for row in rows:
        print(
            f"w={row['weight']:g}  val "
            + " ".join(f"{k} {row['val']['val/' + k]:.4f}" for k in REPORTED[:2])
            + "  test "
            + " ".join(f"{k} {row['test']['test/' + k]:.4f}" for k in REPORTED[:2]),
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
    parser = checkpoint_parser(__doc__, "finished run folder (with results.json)")
    parser.add_argument("--weights", default="0,0.5,1,2,4,8", help="comma-separated w >= 0")
    parser.add_argument("--metric", default="ndcg@10", help="validation metric that chooses w")
    args = parser.parse_args(argv)
    run = Path(args.run)
    result = measure(run, parse_weights(args.weights), args.precision)
    result["chosen_weight"] = choose(result, args.metric)["weight"]
    write_outputs(Path(args.out or run), "prior_weight", result, markdown(result, args.metric))
    return result


def cli() -> None:
    """``python -m diffurec_lightning.analysis.prior_weight``."""
    task_wrapper(main)(sys.argv[1:])


if __name__ == "__main__":
    cli()
