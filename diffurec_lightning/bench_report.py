"""What ``python -m diffurec_lightning.bench`` prints: the machine it ran on, then one table per
allocator setting (throughput, useful FLOP/s as a share of the measured matmul peaks, epoch and
validation-pass times, peak memory, CPU share), from the results that bench.py measured."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch


def machine() -> dict[str, Any]:
    from diffurec_lightning.precision import cpu_has_native_bf16

    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        text = cpuinfo.read_text()
        names = [
            line.split(":", 1)[1].strip() for line in text.splitlines() if "model name" in line
        ]
        cpu = names[0] if names else cpu
        flags = next((line for line in text.splitlines() if line.startswith("flags")), "")
        cpu += " (AVX-512)" if "avx512f" in flags else " (no AVX-512)"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "isa": torch.backends.cpu.get_cpu_capability(),
        "bf16": "native" if cpu_has_native_bf16() else "emulated (no AVX-512 BF16/AMX)",
        "load_avg": os.getloadavg(),
    }


def machine_line(info: dict[str, Any]) -> str:
    """The machine as one line: CPU, cores, torch, ISA, whether bf16 is native."""
    return (
        f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, ISA {info['isa']}, "
        f"CPU bf16 {info.get('bf16', '?')}"
    )


def _fmt(value: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if value is None else f"{value / scale:,.{digits}f}"


COLUMNS = (
    ("precision", 11),
    ("train samples/s", 15),
    ("useful GFLOP/s", 14),
    ("% fp32 peak", 11),
    ("% bf16 peak", 11),
    ("epoch s", 8),
    ("peak RSS MB", 11),
    ("CPU share", 9),
    ("eval users/s", 12),
    ("useful GFLOP/s", 14),
    ("val pass s", 10),
    ("peak RSS MB", 11),
    ("CPU share", 9),
)


def _row(precision: str, row: dict[str, Any], peaks: dict[str, float]) -> list[str]:
    train, evaluation = row["train"], row["eval"]
    useful = train["useful_flops_per_s"]
    share = {k: None if useful is None else 100 * useful / peaks[k] for k in ("fp32", "bf16")}
    return [
        precision,
        _fmt(train["samples_per_s"]),
        _fmt(useful, 1e9),
        _fmt(share["fp32"]),
        _fmt(share["bf16"]) if precision != "fp32" else "",
        _fmt(train["epoch_s"], digits=0),
        _fmt(train["peak_mb"], digits=0),
        _fmt(train["cpu_share"], digits=2),
        _fmt(evaluation["users_per_s"]),
        _fmt(evaluation["useful_flops_per_s"], 1e9),
        _fmt(evaluation["full_val_s"], digits=0),
        _fmt(evaluation["peak_mb"], digits=0),
        _fmt(evaluation["cpu_share"], digits=2),
    ]


def print_report(results: dict[str, Any]) -> None:
    print("\n" + machine_line(results["machine"]))
    print(f"config:  {' '.join(results['overrides'])}")
    options = results["options"]
    print(
        f"steps:   {options['warmup_steps']} warm-up + {options['train_steps']} timed training "
        f"steps, {options['eval_batches'] or 'all'} timed validation batches (quantiles of width)"
    )
    print(f"kernels: {options.get('kernels', 'custom')}")
    print(
        "useful FLOP: matmul work of real items only, training = 3x forward (docs/performance.md)"
    )
    for alloc, block in results["runs"].items():
        peaks = block["peaks"]
        load = " / ".join(f"{value:.2f}" for value in block["load_before"])
        print(f"\nallocator: {alloc}   load average before: {load}")
        print(
            f"matmul peak: fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, "
            f"bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s ({peaks['threads']} threads)"
        )
        print("  ".join(f"{name:>{width}}" for name, width in COLUMNS))
        for precision, row in block["precisions"].items():
            cells = _row(precision, row, peaks)
            print("  ".join(f"{c:>{w}}" for c, (_, w) in zip(cells, COLUMNS, strict=True)))
        first = next(iter(block["precisions"].values()))
        print(
            f"padding fraction: train {first['train']['padding_fraction']:.3f}, "
            f"validation {first['eval']['padding_fraction']:.3f}; "
            f"epoch = {first['train']['num_samples']:,} samples, "
            f"val pass = {first['eval']['num_users']:,} users"
        )
        for precision, row in block["precisions"].items():
            for kind in ("train", "eval"):
                if row[kind]["profile"]:
                    print(f"\ntop ops, {kind}, {precision} (timed steps; profiling slows them):")
                    print(row[kind]["profile"])
