"""``trainer.precision: auto``: bf16-mixed where the hardware computes in bf16, 32-bit elsewhere.

bf16-mixed only pays where bf16 matrix products run natively: CUDA devices with bf16 support, and
CPUs with AVX-512 BF16 or AMX. On a CPU without them the products are emulated and bf16-mixed is
about 15x slower than fp32 (docs/performance.md), so ``auto`` picks 32-true there, and an explicit
bf16 request on such a CPU gets a warning.
"""

from __future__ import annotations

import torch

AUTO = "auto"
BF16 = "bf16-mixed"
FP32 = "32-true"


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX: without either, bf16 matrix products are emulated on the CPU."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def device_type(accelerator: str) -> str:
    """'cuda' or 'cpu': where a Trainer with this ``accelerator`` setting computes."""
    name = str(accelerator).lower()
    if name in ("gpu", "cuda"):
        return "cuda"
    if name == AUTO:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cpu"


def has_native_bf16(device: str) -> bool:
    """Whether bf16 products run natively on ``device`` ('cpu' or 'cuda')."""
    if device == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return cpu_has_native_bf16()


def resolve_precision(precision: str | int, accelerator: str) -> str:
    """The Lightning precision to run: ``auto`` becomes bf16-mixed or 32-true; others pass through."""
    if str(precision) != AUTO:
        return str(precision)
    return BF16 if has_native_bf16(device_type(accelerator)) else FP32


def describe_precision(precision: str, accelerator: str) -> str:
    """One line for the log: the precision chosen and why."""
    device = device_type(accelerator)
    native = "native" if has_native_bf16(device) else "not native (emulated)"
    return f"precision {precision} on {device} (bf16 {native})"
