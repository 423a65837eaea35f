"""Every random generator a training step draws from, saved in and restored from checkpoints.

Training noise (timesteps, Gaussian noise, lambda) and the dropout masks come from torch's global
generator (models/functional.py seeds its NumPy generator for each mask from one torch draw, so
it keeps no state of its own); the batch order comes from (seed, epoch), which the fit loop's
epoch counter restores. Without the generators' state a resumed run trains on different noise
than the uninterrupted one. With it, a run resumed from an epoch-end checkpoint (``last.ckpt``)
ends bit-identical to the run that was never stopped (tests/test_hardening_resume.py).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback


def capture() -> dict[str, Any]:
    """The state of torch (CPU and every initialised CUDA device), NumPy and ``random``, as
    plain data (tensors, numbers, tuples): checkpoints stay loadable with weights_only=True."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": random.getstate(),
    }


def restore(state: dict[str, Any]) -> None:
    """Set every generator ``capture`` recorded."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy = state["numpy"]
    np.random.set_state(
        (
            numpy["name"],
            numpy["keys"].numpy().astype(np.uint32),
            numpy["pos"],
            numpy["has_gauss"],
            numpy["cached_gaussian"],
        )
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


class RngState(Callback):
    """Puts the generators' state into every checkpoint and sets it again on resume.

    Lightning calls ``state_dict`` while it writes a checkpoint and ``load_state_dict`` while it
    restores one, before the first step of the resumed run, which thus continues the same
    random streams. Under DDP the checkpoint holds rank 0's state and every rank restores it;
    bit-identical resume is promised (and tested) for single-process runs.
    """

    def state_dict(self) -> dict[str, Any]:
        return capture()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        restore(state_dict)
