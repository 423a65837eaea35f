"""The all-item loss alone: forward and backward of ``x @ E^T`` then the cross-entropy over all
items, with PyTorch's F.cross_entropy and with the lean CPU one (models/functional.py).

``python -m diffurec_lightning.bench_loss`` times both at the Toys training shape (batch 512,
11,924 items, d 128), interleaved round by round in one process so that a machine whose speed
drifts (shared hosts do) slows both alike, and prints the median milliseconds per step, the CPU
share, and the machine line and fp32 matmul peak as ``make bench`` does. A whole training step
(``make bench``) is where the loss's share shows; this isolates it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from diffurec_lightning.bench import matmul_peak
from diffurec_lightning.bench_report import machine, machine_line
from diffurec_lightning.models.functional import cross_entropy


def losses(target: torch.Tensor) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    return {
        "F.cross_entropy": lambda scores: F.cross_entropy(scores, target, reduction="none"),
        "lean cross_entropy": lambda scores: cross_entropy(scores, target),
    }


def measure(batch: int, items: int, dim: int, rounds: int, steps: int) -> dict[str, Any]:
    """Median ms per forward+backward step of each loss, and the CPU share of the timed work."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, dim, generator=generator).requires_grad_(True)
    table = (0.1 * torch.randn(items, dim, generator=generator)).requires_grad_(True)
    target = torch.randint(0, items, (batch,), generator=generator)
    times: dict[str, list[float]] = {name: [] for name in losses(target)}
    cpu = wall = 0.0
    for round_ in range(rounds + 1):  # round 0 warms up
        for name, loss in losses(target).items():
            cpu0, wall0 = time.process_time(), time.perf_counter()
            for _ in range(steps):
                loss(x @ table.t()).mean().backward()
            elapsed = time.perf_counter() - wall0
            if round_:
                times[name].append(1000 * elapsed / steps)
                cpu, wall = cpu + time.process_time() - cpu0, wall + elapsed
    return {
        "ms_per_step": {name: statistics.median(values) for name, values in times.items()},
        "cpu_share": cpu / (wall * torch.get_num_threads()),
    }


def main(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--items", type=int, default=11_924)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (median)")
    parser.add_argument("--steps", type=int, default=10, help="steps per loss per round")
    args = parser.parse_args(argv)
    info = machine()
    peak = matmul_peak(torch.float32, torch.device("cpu"))
    result = measure(args.batch, args.items, args.dim, args.rounds, args.steps)
    print(machine_line(info))
    print(
        f"shape: batch {args.batch}, {args.items:,} items, d {args.dim}; {args.rounds} rounds x "
        f"{args.steps} steps, interleaved; fp32 matmul peak {peak / 1e9:.1f} GFLOP/s"
    )
    for name, ms in result["ms_per_step"].items():
        print(f"  {name:20s} {ms:8.2f} ms per forward+backward (median)")
    print(f"  CPU share {result['cpu_share']:.2f}")
    return {"machine": info, "peak_fp32": peak, **result}


if __name__ == "__main__":
    main(sys.argv[1:])
