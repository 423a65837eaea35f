"""``RunIf``: skip a test unless this machine has what it needs (after Lightning's tests/helpers).

    @RunIf(min_gpus=1, bf16=True)
    def test_...(): ...

A test that needs a GPU is also marked ``gpu``, so ``pytest -m gpu`` runs exactly those on a GPU
machine; on the CPU-only CI they skip and say why (``-rs``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import pytest
import torch

F = TypeVar("F", bound=Callable[..., object])


def RunIf(*, min_gpus: int = 0, bf16: bool = False) -> Callable[[F], F]:
    """Skip unless at least ``min_gpus`` CUDA devices are visible and, with ``bf16``, the first
    one computes in bfloat16 natively."""
    reasons = []
    found = torch.cuda.device_count()
    if found < min_gpus:
        reasons.append(f"needs {min_gpus} CUDA GPU(s), found {found}")
    if bf16 and not (found and torch.cuda.is_bf16_supported()):
        reasons.append("needs a GPU with bf16")

    def decorate(test: F) -> F:
        test = pytest.mark.skipif(bool(reasons), reason="; ".join(reasons))(test)
        return pytest.mark.gpu(test) if min_gpus else test

    return decorate
