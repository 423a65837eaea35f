"""W&B sweep files stay in step with the Hydra config; a sampled trial trains (no W&B server).

The `sweeps` package (W&B's own schema, samplers and hyperband) is installed by `make install`
and .ci/run; without it the schema and sampling tests skip and say so.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest

from diffurec_lightning.config import compose_config
from diffurec_lightning.launch.sweep import (
    ENTRY_MODULE,
    agent_command,
    check_params,
    check_sweep,
    hydra_overrides,
    load_sweep,
)

REPO = Path(__file__).resolve().parents[1]
SWEEP_FILES = sorted((REPO / "sweeps").glob("*.yaml"))
TOYS_SWEEP = REPO / "sweeps" / "diffurecsys_toys.yaml"


@pytest.fixture(scope="module")
def sweeps() -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydantic v1-style config keys inside sweeps
            import sweeps
    except ImportError:
        sweeps = None
    if not hasattr(sweeps, "next_run"):
        pytest.skip("W&B's `sweeps` package is missing: make install (or .ci/run) installs it")
    return sweeps


def sample_trials(sweeps: Any, sweep: dict, count: int) -> list[dict[str, Any]]:
    """Parameter sets as the W&B controller proposes them (its real samplers), JSON round-tripped
    as the server sends them to the agent."""
    runs: list[Any] = []
    for index in range(count):
        run = sweeps.next_run(sweep, runs)
        run.state = sweeps.RunState.finished
        run.summary_metrics = {sweep["metric"]["name"]: 0.01 * index}
        runs.append(run)
    as_json = json.dumps([run.config for run in runs], default=lambda value: value.item())
    return [{k: v["value"] for k, v in config.items()} for config in json.loads(as_json)]


def test_sweeps_cover_diffurecsys_on_toys_and_beauty() -> None:
    swept = set()
    for path in SWEEP_FILES:
        params = load_sweep(path)["parameters"]
        swept.add((params["model"]["value"], params["data"]["value"]))
        assert {
            "model.lambda_scale",
            "model.offset_noise_strength",
            "model.diffusion.num_steps",
            "model.optimizer.lr",
        } <= set(params)
    assert {("diffurecsys", "toys"), ("diffurecsys", "beauty")} <= swept


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda path: path.stem)
def test_sweep_file_passes_the_wandb_schema(path: Path, sweeps: Any) -> None:
    sweep = load_sweep(path)
    assert sweeps.schema_violations_from_proposed_config(sweep) == []
    assert sweep["early_terminate"]["type"] == "hyperband" and sweep["method"] in (
        "bayes",
        "random",
    )


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda path: path.stem)
def test_every_parameter_value_lands_on_an_existing_key(path: Path) -> None:
    assert check_sweep(load_sweep(path)) == []


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda path: path.stem)
def test_sampled_agent_commands_compose_into_the_config(path: Path, sweeps: Any) -> None:
    sweep = load_sweep(path)
    for params in sample_trials(sweeps, sweep, 3):
        argv = agent_command(sweep, params)
        assert argv[:4] == ["/usr/bin/env", "python", "-m", ENTRY_MODULE]
        assert check_params(sweep, params) == []
        cfg = compose_config(hydra_overrides(argv))
        assert cfg.model.lambda_scale == pytest.approx(params["model.lambda_scale"])
        assert (
            isinstance(cfg.model.diffusion.num_steps, int)
            and cfg.model.diffusion.num_steps == params["model.diffusion.num_steps"]
        )
        assert cfg.logger.wandb.offline is False  # trials stream to the sweep


def test_hyperband_stops_a_lagging_trial(sweeps: Any) -> None:
    sweep = load_sweep(TOYS_SWEEP)
    name, bracket = sweep["metric"]["name"], sweep["early_terminate"]["min_iter"]
    runs = []
    for index, value in enumerate([0.05, 0.04, 0.045, 0.001]):
        run = sweeps.SweepRun(
            name=f"r{index}",
            state=sweeps.RunState.running,
            history=[{name: value}] * bracket,
            config={},
        )
        runs.append(run)
    assert [run.name for run in sweeps.stop_runs(sweep, runs)] == ["r3"]


DRIFTS = {
    "renamed key": (
        lambda s: s["parameters"].__setitem__("model.delta", {"values": [0.1]}),
        "model.delta: no such key",
    ),
    "float for an int key": (
        lambda s: s["parameters"].__setitem__(
            "model.diffusion.num_steps", {"distribution": "uniform", "min": 4.0, "max": 64.0}
        ),
        "model.diffusion.num_steps: 4.0 lands as float, but the config key is int",
    ),
    "dict replaced by a string": (
        lambda s: s["parameters"].__setitem__("logger.wandb", {"value": "x"}),
        "logger.wandb: 'x' lands as str, but the config key is dict",
    ),
    "unknown group option": (
        lambda s: s["parameters"].__setitem__("model", {"value": "diffurecsys_v9"}),
        "diffurecsys_v9",
    ),
    "metric not monotone": (
        lambda s: s["metric"].__setitem__("name", "val/ndcg@10"),
        "is not a monotone key the model logs",
    ),
    "metric never logged": (
        lambda s: s["metric"].__setitem__("name", "val/ndcg@50_best"),
        "is not a monotone key the model logs",
    ),
    "argparse-style args": (
        lambda s: s["command"].__setitem__(-1, "${args}"),
        "command must end with ${args_no_hyphens}",
    ),
    "offline trials": (
        lambda s: s["command"].remove("logger.wandb.offline=false"),
        "add logger.wandb.offline=false",
    ),
}


@pytest.mark.parametrize("drift", DRIFTS)
def test_a_drifted_sweep_file_fails(drift: str) -> None:
    sweep = load_sweep(TOYS_SWEEP)
    edit, message = DRIFTS[drift]
    edit(sweep)
    problems = check_sweep(sweep)
    assert any(message in problem for problem in problems), problems


def test_check_cli_exit_codes(tmp_path: Path) -> None:
    from diffurec_lightning.launch.sweep import main

    drifted = load_sweep(TOYS_SWEEP)
    drifted["parameters"]["model.delta"] = {"values": [0.1]}
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps(drifted))  # JSON is YAML
    assert main([str(TOYS_SWEEP)]) == 0
    assert main([str(bad)]) == 1
    assert main([str(tmp_path / "missing.yaml")]) == 1


# Only what the sweep leaves open is shrunk; the run length is a test budget.
QUICK = {
    "model.hidden_size": "16",
    "model.net.num_blocks": "1",
    "model.net.num_heads": "1",
    "trainer.max_epochs": "1",
    "trainer.check_val_every_n_epoch": "1",
    "trainer.limit_train_batches": "2",
    "trainer.limit_val_batches": "1",
    "trainer.limit_test_batches": "1",
    "callbacks.progress_bar": "null",
}


@pytest.mark.slow  # make test-all: a real run, long on 2 cores
def test_a_sampled_trial_trains_offline_on_toys(sweeps: Any, run_env: Path) -> None:
    sweep = load_sweep(TOYS_SWEEP)
    (params,) = sample_trials(sweeps, sweep, 1)
    argv = agent_command(sweep, params)
    quick = {k: v for k, v in QUICK.items() if k not in params or k.startswith("trainer.")}
    if "representation" in compose_config().callbacks:
        quick["callbacks.representation"] = "null"  # a t-SNE picture is no part of this check
    argv = [arg for arg in argv if arg.split("=", 1)[0] not in quick]
    argv += [f"++{key}={value}" for key, value in quick.items()]  # limit_* are not in conf/
    # The agent's `python` must be the venv's: as `make agent` does, put its bin/ first on PATH.
    env = dict(os.environ, WANDB_MODE="offline", OMP_NUM_THREADS="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    done = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    (results_file,) = (run_env / "outputs" / "runs").glob("*/*/results.json")
    results = json.loads(results_file.read_text())
    model = results["config"]["model"]
    assert model["lambda_scale"] == pytest.approx(params["model.lambda_scale"])
    assert model["diffusion"]["num_steps"] == params["model.diffusion.num_steps"]
    assert sweep["metric"]["name"] in {f"{key}_best" for key in results["val_best"]}
    assert {"test/hr@10", "test/ndcg@10"} <= set(results["test"])
    (run_file,) = (results_file.parent / "wandb").glob("offline-run-*/run-*.wandb")
    assert sweep["metric"]["name"] in logged_history_keys(run_file)  # what the sweep optimises


def logged_history_keys(run_file: Path) -> set[str]:
    """Keys of every wandb.log call in an offline run file (wandb's leveldb-style record log:
    a 7-byte file header, 32 KiB blocks, records split into FULL/FIRST/MIDDLE/LAST fragments)."""
    from wandb.proto import wandb_internal_pb2

    data, block = run_file.read_bytes(), 32768
    assert data[:4] == b":W&B"
    position, pending, records = 7, b"", []
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            records.append(pending)
    keys = set()
    for payload in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "history":
            keys |= {item.key or "/".join(item.nested_key) for item in record.history.item}
    return keys
