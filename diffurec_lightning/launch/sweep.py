"""W&B sweep files for the Hydra app: the command the agent runs, an offline check, creation.

``wandb agent`` starts every trial as ``/usr/bin/env python -m diffurec_lightning.train k=v ...``:
the sweep's ``command`` with ``${args_no_hyphens}`` expanded into Hydra overrides. A sweep file
drifts silently when a config key is renamed or retyped (Hydra then rejects every trial, or a
value lands as the wrong type, long after the sweep was created), so ``check_sweep`` composes the
real config with exactly the overrides the agent would pass and checks that every parameter lands
on an existing key with the type of its default, and that the metric is one the model logs.

    python -m diffurec_lightning.launch.sweep sweeps/diffurecsys_toys.yaml           # check only
    python -m diffurec_lightning.launch.sweep --create sweeps/diffurecsys_toys.yaml  # then create
"""

from __future__ import annotations

import argparse
import copy
import functools
import math
import subprocess
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

from diffurec_lightning.config import CONF_DIR, compose_config
from diffurec_lightning.errors import ConfigError

ENTRY_MODULE = "diffurec_lightning.train"
ARGS_MACRO = "${args_no_hyphens}"
# What `wandb agent` substitutes for the other macros (wandb/wandb_agent.py, _command_run):
# ${interpreter} is the bare word `python`, so the agent must run inside the activated venv.
AGENT_MACROS = {"env": ["/usr/bin/env"], "interpreter": ["python"]}
_MISSING = object()


def load_sweep(path: str | Path) -> dict[str, Any]:
    """Read a sweep YAML file; it must be a mapping with a ``parameters`` mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: sweep file not found")
    sweep = yaml.safe_load(path.read_text())
    if not isinstance(sweep, dict) or not isinstance(sweep.get("parameters"), dict):
        raise ConfigError(f"{path}: not a W&B sweep file (needs a `parameters:` mapping)")
    return sweep


def config_groups() -> set[str]:
    """Hydra config groups selectable by name (``data=toys``): the folders of conf/."""
    return {entry.name for entry in CONF_DIR.iterdir() if entry.is_dir()}


def representative_values(name: str, spec: Mapping[str, Any]) -> list[Any]:
    """Values a parameter can take that cover its type and range: every listed value, or both
    bounds (real values, not exponents) of a distribution."""
    if "value" in spec:
        return [spec["value"]]
    if "values" in spec:
        return list(spec["values"])
    if "min" in spec and "max" in spec:
        low, high = spec["min"], spec["max"]
        distribution = spec.get("distribution", "")
        if distribution in ("log_uniform", "q_log_uniform"):
            return [math.exp(low), math.exp(high)]
        if distribution == "inv_log_uniform":
            return [math.exp(-high), math.exp(-low)]
        return [low, high]
    raise ConfigError(f"parameter {name}: cannot check {dict(spec)}; use value, values or min/max")


def agent_command(sweep: Mapping[str, Any], params: Mapping[str, Any]) -> list[str]:
    """The argv ``wandb agent`` starts for a trial with these parameter values (its own code)."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

    macros = create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})
    macros.update(AGENT_MACROS, program=[str(sweep.get("program", ""))])
    argv: list[str] = []
    for item in create_sweep_command(list(sweep.get("command") or [])):
        item = str(item)
        if item.startswith("${") and item.endswith("}"):
            argv += macros.get(item[2:-1]) or []  # the agent drops unknown macros, so do we
        else:
            argv.append(item)
    return argv


def hydra_overrides(argv: Sequence[str]) -> list[str]:
    """The Hydra overrides of an agent command: everything after the entry module."""
    if ENTRY_MODULE not in argv:
        raise ConfigError(f"command must run `python -m {ENTRY_MODULE}`; got {list(argv)}")
    return list(argv[list(argv).index(ENTRY_MODULE) + 1 :])


def schema_problems(sweep: Mapping[str, Any]) -> list[str] | None:
    """Violations of W&B's sweep schema; None when the ``sweeps`` package is not installed."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydantic v1-style config keys inside sweeps
            import sweeps
    except ImportError:
        return None
    if not hasattr(sweeps, "schema_violations_from_proposed_config"):
        return None  # our own sweeps/ folder, seen as a namespace package from the repo root
    violations = sweeps.schema_violations_from_proposed_config(copy.deepcopy(dict(sweep)))
    return [f"schema: {violation}" for violation in violations]


def command_problems(sweep: Mapping[str, Any]) -> list[str]:
    command = [str(item) for item in sweep.get("command") or []]
    problems = []
    if not command or command[-1] != ARGS_MACRO:
        problems.append(f"command must end with {ARGS_MACRO} (Hydra key=value overrides)")
    entry = ["${interpreter}", "-m", ENTRY_MODULE]
    if not any(command[i : i + 3] == entry for i in range(len(command))):
        problems.append(f"command must run `${{interpreter}} -m {ENTRY_MODULE}`")
    return problems


def logged_val_metrics(cfg: DictConfig) -> set[str]:
    """Validation keys the model logs (from the metric object itself), ``_best`` forms included."""
    import torch

    from diffurec_lightning.metrics import TopKMetrics

    metrics = TopKMetrics(ks=list(cfg.model.ks), prefix="val/")
    metrics.update(torch.ones(1, dtype=torch.long))
    keys = set(metrics.compute())
    return keys | {f"{key}_best" for key in keys}


def metric_problems(sweep: Mapping[str, Any], cfg: DictConfig) -> list[str]:
    metric = sweep.get("metric") or {}
    name, goal = metric.get("name"), metric.get("goal")
    monotone = sorted(key for key in logged_val_metrics(cfg) if key.endswith("_best"))
    problems = []
    if name not in monotone:
        problems.append(
            f"metric.name {name!r} is not a monotone key the model logs; use one of {monotone}"
        )
    if goal != "maximize":
        problems.append(f"metric.goal must be maximize for HR/NDCG, got {goal!r}")
    if cfg.get("logger") and cfg.logger.get("wandb") and cfg.logger.wandb.get("offline"):
        problems.append(
            "trials would log offline, so the sweep would never see its metric: "
            "add logger.wandb.offline=false to command"
        )
    return problems


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, (list, tuple, ListConfig)):
        return "list"
    if isinstance(value, (dict, DictConfig)):
        return "dict"
    return "str"


def _compose(overrides: list[str]) -> tuple[DictConfig | None, str]:
    return _compose_cached(tuple(overrides))


@functools.lru_cache(maxsize=64)
def _compose_cached(overrides: tuple[str, ...]) -> tuple[DictConfig | None, str]:
    try:
        return compose_config(list(overrides)), ""
    except Exception as exc:  # Hydra's own message names the bad override
        return None, f"{' '.join(overrides)}: {str(exc).splitlines()[0]}"


def check_params(sweep: Mapping[str, Any], params: Mapping[str, Any]) -> list[str]:
    """Compose the config a trial with ``params`` gets; check every value landed as sent."""
    groups = config_groups()
    selection = {k: v for k, v in params.items() if k in groups}
    base, error = _compose(hydra_overrides(agent_command(sweep, selection)))
    if base is None:
        return [error]
    problems = []
    for key in params:
        if key not in groups and _select(base, key) is _MISSING:
            problems.append(f"{key}: no such key in the config; parameters must name keys in conf/")
    if problems:
        return problems
    cfg, error = _compose(hydra_overrides(agent_command(sweep, params)))
    if cfg is None:
        # A typed schema (schemas.py, model_schemas.py) refused a value while composing: name
        # the parameter as below, from the kind of the value sent.
        named = [
            problem
            for key, sent in params.items()
            if key not in groups
            for problem in _kind_problem(key, sent, _kind(sent), _select(base, key))
        ]
        return named or [error]
    for key, sent in params.items():
        if key in groups:
            continue
        landed = _select(cfg, key)
        wrong_kind = _kind_problem(key, sent, _kind(landed), _select(base, key))
        problems += wrong_kind
        if not wrong_kind and not _same_value(sent, landed):
            problems.append(f"{key}: sent {sent!r}, the config got {landed!r}")
    return problems


def _kind_problem(key: str, sent: Any, got: str, default: Any) -> list[str]:
    """A value of kind ``got`` for a key whose default is ``default``: [] if it fits."""
    expected = _kind(default)
    if expected not in ("null", got) and (expected, got) != ("float", "int"):
        return [f"{key}: {sent!r} lands as {got}, but the config key is {expected}"]
    return []


def _select(cfg: DictConfig, key: str) -> Any:
    try:
        return OmegaConf.select(cfg, key, default=_MISSING, throw_on_missing=False)
    except Exception:
        return _MISSING


def _same_value(sent: Any, landed: Any) -> bool:
    if isinstance(landed, (DictConfig, ListConfig)):
        landed = OmegaConf.to_container(landed)
    if isinstance(sent, float) or isinstance(landed, float):
        return isinstance(landed, (int, float)) and math.isclose(sent, landed, rel_tol=1e-12)
    return sent == landed


def check_sweep(sweep: Mapping[str, Any]) -> list[str]:
    """Every problem of a sweep file (schema, command, metric, each parameter value); [] if none.

    Parameters are checked one at a time at each of their representative values, the others at
    their first, so a bad value names its own parameter.
    """
    problems = list(schema_problems(sweep) or []) + command_problems(sweep)
    try:
        values = {k: representative_values(k, spec) for k, spec in sweep["parameters"].items()}
    except ConfigError as exc:
        return [*problems, str(exc)]
    first = {key: options[0] for key, options in values.items()}
    problems += check_params(sweep, first)
    if problems:
        return problems
    for key, options in values.items():
        for value in options[1:]:
            problems += check_params(sweep, {**first, key: value})
    cfg, _ = _compose(hydra_overrides(agent_command(sweep, first)))
    return problems + (metric_problems(sweep, cfg) if cfg is not None else [])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m diffurec_lightning.launch.sweep",
        description="Check W&B sweep files against the Hydra config; optionally create them.",
    )
    parser.add_argument("files", nargs="+", type=Path, help="sweep YAML files (sweeps/*.yaml)")
    parser.add_argument(
        "--create",
        action="store_true",
        help="after a clean check, create each sweep on the W&B server (needs `wandb login`)",
    )
    args = parser.parse_args(argv)
    failed = False
    for path in args.files:
        try:
            sweep = load_sweep(path)
            problems = check_sweep(sweep)
        except ConfigError as exc:
            sweep, problems = {}, [str(exc)]
        for problem in problems:
            print(f"error: {path}: {problem}", file=sys.stderr)
        failed = failed or bool(problems)
        if not problems:
            schema = (
                "" if schema_problems(sweep) is not None else " (schema not checked: no `sweeps`)"
            )
            print(f"{path}: ok{schema}")
    if failed:
        return 1
    for path in args.files if args.create else []:
        code = subprocess.call([sys.executable, "-m", "wandb", "sweep", str(path)])
        if code:
            return code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
