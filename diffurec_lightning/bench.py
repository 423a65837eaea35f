"""Throughput benchmark: ``python -m diffurec_lightning.bench data=toys model=diffurecsys``.

At the reference configuration (max_len 50, batch 512, hidden 128, 4 blocks, T 32; config
overrides may change it) it measures, for fp32 and bf16-mixed:

* training throughput (samples/s) and useful FLOP/s (diffurec_lightning.flops) as a share of the
  matrix-multiply peak measured here, on this machine, in the same process setup;
* evaluation throughput (users/s for the full reverse process plus ranking);
* the padding fraction of the batches and the peak resident memory.

Every measurement runs in a fresh child process, so peak memory belongs to that measurement alone
and the allocator environment (MALLOC_*) can differ between runs. Batches are picked at evenly
spaced quantiles of their padded width, so a few steps represent a whole epoch. Options are
``bench.<key>=<value>`` arguments (the ``bench`` node of conf/bench.yaml, typed by
schemas.BenchSchema); everything else is a config override.
The printed tables are bench_report.py's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
import warnings
from typing import Any

import numpy as np
import torch

from diffurec_lightning.bench_report import machine, print_report
from diffurec_lightning.errors import ConfigError, DiffuRecError
from diffurec_lightning.io import write_text
from diffurec_lightning.schemas import BenchSchema
from diffurec_lightning.utils import task_wrapper

REFERENCE = [
    "data.max_len=50",
    "data.batch_size=512",
    "data.eval_batch_size=512",
    "model.hidden_size=128",
    "model.net.num_blocks=4",
    "model.diffusion.num_steps=32",
]
ALLOCATOR_KEYS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
PRECISIONS = {"fp32": None, "bf16-mixed": torch.bfloat16}
PEAK_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
KERNELS = ("custom", "plain", "compile")


def _is_option(arg: str) -> bool:
    """``bench.<key>=...`` (also ``+``/``~``-prefixed): a bench option, not a run override."""
    key = arg.split("=", 1)[0].lstrip("+~")
    return key == "bench" or key.startswith("bench.")


def parse_options(args: list[str]) -> tuple[BenchSchema, list[str]]:
    """The ``bench`` node of conf/bench.yaml with ``args`` applied, and the other arguments (the
    config overrides of the measured runs). All of them are composed first, so a misspelt or
    mistyped option (``bench.steps=3``, ``bench.train_steps=x``) or override is one ConfigError
    line before anything is measured."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    from diffurec_lightning.cli import check_overrides

    try:
        parsed = OverridesParser.create().parse_overrides(args)
    except HydraException as exc:
        raise ConfigError(f"cannot read the arguments: {str(exc).splitlines()[0]}") from None
    for override in parsed:
        if override.is_sweep_override():  # bench.precisions=fp32,bf16-mixed reads as a sweep
            key, _, value = override.input_line.partition("=")
            raise ConfigError(
                f"{override.input_line}: one value per setting; quote a list: {key}='{value}'"
            )
    cfg = check_overrides(args, "bench")
    options = OmegaConf.to_object(cfg.bench)
    for name in precision_list(options):
        if name not in PRECISIONS:
            raise ConfigError(f"bench.precisions: unknown '{name}'; use {list(PRECISIONS)}")
    if options.kernels not in KERNELS:
        raise ConfigError(f"bench.kernels: unknown '{options.kernels}'; use one of {list(KERNELS)}")
    if options.allocator not in ("env", "both"):
        raise ConfigError(f"bench.allocator must be env or both, got '{options.allocator}'")
    return options, [arg for arg in args if not _is_option(arg)]


def precision_list(options: BenchSchema) -> list[str]:
    return [name.strip() for name in options.precisions.split(",") if name.strip()]


# -- measurements (each runs in its own child process) -------------------------------------------
def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(dtype: torch.dtype, device: torch.device, budget_s: float = 1.0) -> float:
    """Best FLOP/s of square matrix products, growing the size while one product stays cheap."""
    best = 0.0
    generator = torch.Generator(device=device).manual_seed(0)
    for size in (256, 512, 1024, 2048, 4096):
        a = torch.randn(size, size, device=device, generator=generator).to(dtype)
        b = torch.randn(size, size, device=device, generator=generator).to(dtype)
        a @ b  # warm-up: kernel selection and allocation
        _sync(device)
        calls, started = 0, time.perf_counter()
        while calls < 3 or time.perf_counter() - started < budget_s:
            a @ b
            calls += 1
            _sync(device)
        elapsed = time.perf_counter() - started
        best = max(best, 2.0 * size**3 * calls / elapsed)
        if elapsed / calls > budget_s / 4:  # bigger products would only cost time
            break
    return best


def _setup(job: dict[str, Any], device: torch.device) -> tuple[Any, Any, Any]:
    """Config, data module and model of a measurement, the model's kernels as ``job`` asks."""
    from hydra.utils import instantiate

    from diffurec_lightning.config import compose_config
    from diffurec_lightning.models.functional import set_custom_kernels

    cfg = compose_config([*REFERENCE, *job["overrides"], "logger=csv"])
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    torch.manual_seed(cfg.seed)
    model = instantiate(cfg.model, num_items=datamodule.num_items).to(device)
    set_custom_kernels(job["kernels"] == "custom")
    if job["kernels"] == "compile" and hasattr(model, "net"):
        # In place, so model.net keeps its class (and its FLOP count); one graph for all
        # padded widths instead of one per width.
        model.net.compile(dynamic=True)
    return cfg, datamodule, model


def _warmup_batches(
    job: dict[str, Any], batches: list[np.ndarray], lengths: np.ndarray, picked: list
) -> list:
    """The widest batches (so the peak memory is the epoch's peak); when compiling, the timed
    batches too, so that no compilation falls inside the timing."""
    by_width = sorted(batches, key=lambda b: -int(lengths[b].max()))
    chosen = by_width[: job["warmup_steps"]]
    return chosen + list(picked) if job["kernels"] == "compile" else chosen


def quantile_batches(batches: list[np.ndarray], lengths: np.ndarray, count: int) -> list:
    """`count` batches at evenly spaced quantiles of padded width (all of them if count <= 0)."""
    if count <= 0 or count >= len(batches):
        return list(batches)
    widths = np.array([lengths[batch].max() for batch in batches])
    order = np.argsort(widths, kind="stable")
    picks = ((np.arange(count) + 0.5) * len(batches) / count).astype(int)
    return [batches[order[i]] for i in picks]


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in batch.items()}


def _useful(kind: str, model: Any, lengths: torch.Tensor) -> float | None:
    from diffurec_lightning import flops

    net = getattr(model, "net", None)
    if not hasattr(net, "flops"):
        return None  # this network counts no FLOPs: the FLOP columns stay empty
    if kind == "train":
        return flops.training_flops(net, lengths, model.hparams.num_items)
    return flops.evaluation_flops(net, lengths, model.hparams.num_items, model.diffusion.num_steps)


def _profiler(job: dict[str, Any]) -> Any:
    if not job["profile"]:
        return contextlib.nullcontext()
    return torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])


def _top_ops(prof: Any, job: dict[str, Any]) -> str:
    if prof is None:
        return ""
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=job["profile"])
    return table


def _timed(
    job: dict[str, Any], device: torch.device, step: Any, picked: list[np.ndarray]
) -> dict[str, Any]:
    """Run ``step`` over the picked batches under the optional profiler: counts and rates."""
    with _profiler(job) as prof:
        count, useful, started, cpu = 0, 0.0, time.perf_counter(), time.process_time()
        for batch in picked:
            size, work = step(batch.tolist())
            count += size
            useful = useful + work if work is not None else None
        _sync(device)
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu
    return {
        "count": count,
        "per_s": count / elapsed,
        "useful_flops_per_s": useful / elapsed if useful is not None else None,
        "cpu_share": cpu / (elapsed * torch.get_num_threads()),
        "profile": _top_ops(prof, job),
    }


def measure_train(job: dict[str, Any]) -> dict[str, Any]:
    device = torch.device(job["device"])
    cfg, datamodule, model = _setup(job, device)
    dataset = datamodule.dataset("train")
    sampler = datamodule.train_batch_sampler()
    picked = quantile_batches(sampler.global_batches(), dataset.lengths, job["train_steps"])
    optimizer = model.configure_optimizers()["optimizer"]
    dtype = PRECISIONS[job["precision"]]
    model.train()

    def step(index: list[int]) -> tuple[int, float | None]:
        batch = _to(dataset.__getitems__(index), device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = model.training_step(batch, 0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return len(index), _useful("train", model, (batch["seq"] > 0).sum(1).cpu())

    for batch in _warmup_batches(job, sampler.global_batches(), dataset.lengths, picked):
        step(batch.tolist())
    _sync(device)
    timed = _timed(job, device, step, picked)
    return {
        "cpu_share": timed["cpu_share"],
        "profile": timed["profile"],
        "samples_per_s": timed["per_s"],
        "useful_flops_per_s": timed["useful_flops_per_s"],
        "epoch_s": len(dataset) / timed["per_s"],
        "num_samples": len(dataset),
        "padding_fraction": datamodule.padding_fraction("train"),
        "peak_mb": peak_memory_mb(device),
    }


def measure_eval(job: dict[str, Any]) -> dict[str, Any]:
    device = torch.device(job["device"])
    cfg, datamodule, model = _setup(job, device)
    dataset = datamodule.dataset("val")
    batches = datamodule.eval_batch_sampler("val").global_batches()
    picked = quantile_batches(batches, dataset.lengths, job["eval_batches"])
    dtype = PRECISIONS[job["precision"]]
    model.eval()

    def step(index: list[int]) -> tuple[int, float | None]:
        batch = _to(dataset.__getitems__(index), device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            # The configured (test) process over all T steps, not training's cheaper validation
            # (model.val_sampler): the pass a test, a predict or an uncut validation costs.
            model.val_metrics.update(model.rank_batch(batch))
        return len(index), _useful("eval", model, (batch["seq"] > 0).sum(1).cpu())

    with torch.inference_mode():
        for batch in _warmup_batches({**job, "warmup_steps": 1}, batches, dataset.lengths, picked):
            step(batch.tolist())
        _sync(device)
        timed = _timed(job, device, step, picked)
    return {
        "cpu_share": timed["cpu_share"],
        "profile": timed["profile"],
        "users_per_s": timed["per_s"],
        "useful_flops_per_s": timed["useful_flops_per_s"],
        "full_val_s": len(dataset) / timed["per_s"],
        "num_users": len(dataset),
        "timed_users": timed["count"],
        "padding_fraction": datamodule.padding_fraction("val"),
        "peak_mb": peak_memory_mb(device),
    }


def measure_peaks(job: dict[str, Any]) -> dict[str, Any]:
    device = torch.device(job["device"])
    peaks: dict[str, Any] = {
        name: matmul_peak(dtype, device) for name, dtype in PEAK_DTYPES.items()
    }
    return {**peaks, "threads": torch.get_num_threads()}


JOBS = {"train": measure_train, "eval": measure_eval, "peaks": measure_peaks}


def run_worker(payload: str) -> None:
    job = json.loads(payload)
    warnings.filterwarnings("ignore", message=".*self.log.*")
    if job["threads"] > 0:
        torch.set_num_threads(job["threads"])
    torch.manual_seed(0)
    print(json.dumps(JOBS[job["kind"]](job)))


# -- orchestration --------------------------------------------------------------------------------
def _child(job: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    command = [sys.executable, "-m", "diffurec_lightning.bench", "--worker", json.dumps(job)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise DiffuRecError(f"bench {job['kind']} run failed:\n{done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def allocator_envs(mode: str) -> dict[str, dict[str, str]]:
    inherited = dict(os.environ)
    settings = " ".join(f"{k}={inherited[k]}" for k in ALLOCATOR_KEYS if k in inherited)
    envs = {settings or "glibc default": inherited}
    if mode == "both":
        envs["glibc default"] = {k: v for k, v in inherited.items() if k not in ALLOCATOR_KEYS}
    return envs


def main(argv: list[str]) -> dict[str, Any]:
    options, overrides = parse_options(argv)
    results: dict[str, Any] = {
        "machine": machine(),
        "options": dataclasses.asdict(options),
        "overrides": [*REFERENCE, *overrides],
        "runs": {},
    }
    base = {"device": options.device, "overrides": overrides, **dataclasses.asdict(options)}
    for alloc, env in allocator_envs(options.allocator).items():
        block = {"load_before": os.getloadavg(), "precisions": {}}
        block["peaks"] = _child({**base, "kind": "peaks"}, env)
        for precision in precision_list(options):
            job = {**base, "precision": precision}
            block["precisions"][precision] = {
                kind: _child({**job, "kind": kind}, env) for kind in ("train", "eval")
            }
            print(f"[{alloc}] {precision}: done", file=sys.stderr, flush=True)
        block["load_after"] = os.getloadavg()
        results["runs"][alloc] = block
    print_report(results)
    if options.json:
        write_text(options.json, json.dumps(results, indent=2))
    return results


def cli() -> None:
    """The ``diffurec-bench`` command (also ``python -m diffurec_lightning.bench``)."""
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        run_worker(sys.argv[2])
    elif {"-h", "--help"} & set(sys.argv[1:]):
        print(__doc__)
        print(
            "bench.<key>=<value> options (conf/bench.yaml):",
            ", ".join(f.name for f in dataclasses.fields(BenchSchema)),
        )
    else:
        task_wrapper(main)(sys.argv[1:])


if __name__ == "__main__":
    cli()
