"""Time to accuracy: ``python -m diffurec_lightning.bench_tta data=toys model=diffurecsys``.

Trains with the defaults of ``make train`` (every other argument is a config override), validates
on the full validation set every ``tta.every`` epochs, and prints at each validation the wall
time since training started, the epoch, and validation HR@10 / NDCG@10; at the end the time to
reach 90/95/100% of the final best of each, the time to an optional target
(``tta.target=0.093``, on ``tta.target_metric``), and the test metrics of the best checkpoint
(the one the run's selection metric picked, tested with the configured reverse process).

Throughput (``make bench``) says how fast a step is; this says how soon a model is good, which
also depends on validation cost and cadence. The header names the machine (CPU, ISA, whether
bf16 is native), and the CPU share of the whole run flags contention (below 0.95 is no timing).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import OmegaConf, open_dict

from diffurec_lightning.errors import ConfigError
from diffurec_lightning.io import write_json
from diffurec_lightning.utils import task_wrapper

SHARES = (0.90, 0.95, 1.00)
METRICS = ("val/hr@10", "val/ndcg@10")


def set_options(options: Any, prefix: str, args: list[str]) -> list[str]:
    """Set every ``<prefix>.<key>=<value>`` of ``args`` on the dataclass ``options`` (typed as
    its default), with a one-line ConfigError for an unknown key or a bad value; return the
    other arguments (config overrides)."""
    kinds = {field.name: type(field.default) for field in dataclasses.fields(options)}
    overrides = []
    for arg in args:
        if not arg.startswith(f"{prefix}."):
            overrides.append(arg)
            continue
        key, _, value = arg[len(prefix) + 1 :].partition("=")
        if key not in kinds:
            raise ConfigError(f"unknown option {prefix}.{key}; known: {', '.join(kinds)}")
        try:
            setattr(options, key, kinds[key](value))
        except ValueError:
            raise ConfigError(f"{prefix}.{key}={value}: expected a {kinds[key].__name__}") from None
    return overrides


@dataclasses.dataclass
class TTAOptions:
    """``tta.<key>=<value>`` on the command line."""

    every: int = 1  # validate every this many epochs (overrides trainer.check_val_every_n_epoch)
    target: float = 0.0  # > 0: also report the time to reach this value of target_metric
    target_metric: str = "val/hr@10"
    json: str = ""  # also write the results to this file

    @classmethod
    def parse(cls, args: list[str]) -> tuple[TTAOptions, list[str]]:
        options = cls()
        overrides = set_options(options, "tta", args)
        if options.every < 1:
            raise ConfigError(f"tta.every must be >= 1, got {options.every}")
        return options, overrides


class ValidationClock(L.Callback):
    """Records, after every validation, the wall time since training started, the time spent
    in validation so far, and the validation metrics; rewrites ``path`` (JSON) each time."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.history: list[dict[str, Any]] = []
        self._started = 0.0
        self._val_started = 0.0
        self._val_total = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.perf_counter()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._val_started = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After the module's epoch-end hook: the epoch's metrics are in callback_metrics.
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        now = time.perf_counter()
        val_s = now - self._val_started
        self._val_total += val_s
        metrics = {
            key: float(value)
            for key, value in trainer.callback_metrics.items()
            if key.startswith("val/") and not key.endswith("_best")
        }
        record = {
            "epoch": trainer.current_epoch + 1,
            "global_step": trainer.global_step,
            "wall_s": round(now - self._started, 2),
            "val_s": round(val_s, 2),
            "train_s": round(now - self._started - self._val_total, 2),
            **metrics,
        }
        self.history.append(record)
        cells = "  ".join(
            f"{key.split('/')[-1]} {metrics.get(key, float('nan')):.4f}" for key in METRICS
        )
        print(
            f"[tta] epoch {record['epoch']:3d}  wall {record['wall_s']:8.1f} s  "
            f"(validation {val_s:6.1f} s)  {cells}",
            flush=True,
        )
        write_json(self.path, {"history": self.history})


def time_to(history: list[dict[str, Any]], metric: str, value: float) -> dict[str, Any] | None:
    """The first validation at which ``metric`` reached ``value`` (None if never)."""
    for record in history:
        if record.get(metric, float("-inf")) >= value:
            return {"wall_s": record["wall_s"], "epoch": record["epoch"], "value": record[metric]}
    return None


def summarise(history: list[dict[str, Any]], options: TTAOptions) -> dict[str, Any]:
    """Times to 90/95/100% of each metric's final best, and to the optional target."""
    summary: dict[str, Any] = {}
    for metric in METRICS:
        values = [record[metric] for record in history if metric in record]
        if not values:
            continue
        best = max(values)
        summary[metric] = {
            "best": best,
            **{f"{int(share * 100)}%": time_to(history, metric, share * best) for share in SHARES},
        }
    if options.target > 0:
        summary["target"] = {
            "metric": options.target_metric,
            "value": options.target,
            "reached": time_to(history, options.target_metric, options.target),
        }
    return summary


def _reached(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "not reached"
    return f"{entry['wall_s']:,.0f} s (epoch {entry['epoch']}, {entry['value']:.4f})"


def print_report(result: dict[str, Any]) -> None:
    from diffurec_lightning.bench_report import machine_line

    print("\n" + machine_line(result["machine"]))
    print(f"config:  {' '.join(result['overrides'])}")
    print(
        f"precision {result['precision']}, validation every {result['every']} epoch(s) on all "
        f"validation users, selection on {result['monitor']}; CPU share {result['cpu_share']:.2f}"
    )
    header = f"{'epoch':>5} {'wall s':>8} {'train s':>8} {'val s':>6} " + " ".join(
        f"{metric:>12}" for metric in METRICS
    )
    print("\n" + header)
    for record in result["history"]:
        cells = " ".join(f"{record.get(metric, float('nan')):>12.4f}" for metric in METRICS)
        print(
            f"{record['epoch']:>5} {record['wall_s']:>8.1f} {record['train_s']:>8.1f} "
            f"{record['val_s']:>6.1f} {cells}"
        )
    print()
    for metric in METRICS:
        entry = result["summary"].get(metric)
        if entry:
            shares = " | ".join(f"{key}: {_reached(entry[key])}" for key in ("90%", "95%", "100%"))
            print(f"time to the final best {metric} ({entry['best']:.4f}): {shares}")
    if "target" in result["summary"]:
        target = result["summary"]["target"]
        print(f"time to {target['metric']} >= {target['value']}: {_reached(target['reached'])}")
    test = result["test"]
    if test:
        cells = "  ".join(f"{key.split('/')[-1]} {value:.4f}" for key, value in test.items())
        print(f"test of the best checkpoint ({Path(result['best_checkpoint']).name}): {cells}")
    print(f"total wall time (data, training, validations, test): {result['wall_time_s']:,.0f} s")


def main(argv: list[str]) -> dict[str, Any]:
    from diffurec_lightning.bench_report import machine
    from diffurec_lightning.config import compose_config
    from diffurec_lightning.train import train

    options, overrides = TTAOptions.parse(argv)
    forced = [f"trainer.check_val_every_n_epoch={options.every}", "trainer.limit_val_batches=null"]
    cfg = compose_config([*overrides, *forced])
    if not any(arg.startswith("paths.output_dir=") for arg in overrides):
        # Outside a Hydra app there is no run folder: give the bench its own under outputs/tta/.
        stamp = time.strftime("%Y-%m-%d/%H-%M-%S")
        with open_dict(cfg):
            cfg.paths.output_dir = (
                f"{cfg.paths.root_dir}/outputs/tta/{stamp}_{cfg.data.name}_{cfg.model.name}"
            )
    clock_path = Path(cfg.paths.output_dir) / "tta_history.json"
    with open_dict(cfg):
        cfg.callbacks.validation_clock = {
            "_target_": f"{__name__}.ValidationClock",
            "path": str(clock_path),
        }
    cpu_before, wall_before = os.times(), time.perf_counter()
    results = train(cfg)
    cpu_after, wall = os.times(), time.perf_counter() - wall_before
    cpu_s = (cpu_after.user - cpu_before.user) + (cpu_after.system - cpu_before.system)
    history = json.loads(clock_path.read_text())["history"] if clock_path.exists() else []
    result = {
        "machine": machine(),
        "overrides": [*overrides, *forced],
        "precision": results.get("precision", str(cfg.trainer.precision)),
        "every": options.every,
        "monitor": str(cfg.callbacks.model_checkpoint.monitor),
        "cpu_share": cpu_s / max(wall * torch.get_num_threads(), 1e-9),
        "history": history,
        "summary": summarise(history, options),
        "test": {k: v for k, v in results["test"].items() if k.count("/") == 1},
        "best_checkpoint": results["best_checkpoint"],
        "wall_time_s": results["wall_time_s"],
        "run_dir": str(cfg.paths.output_dir),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    print_report(result)
    write_json(Path(cfg.paths.output_dir) / "tta.json", result)
    if options.json:
        write_json(Path(options.json), result)
    return result


def cli() -> None:
    """The ``diffurec-bench-tta`` command (also ``python -m diffurec_lightning.bench_tta``)."""
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(__doc__)
        print(
            "tta.<key>=<value> options:", ", ".join(f.name for f in dataclasses.fields(TTAOptions))
        )
    else:
        task_wrapper(main)(sys.argv[1:])


if __name__ == "__main__":
    cli()
