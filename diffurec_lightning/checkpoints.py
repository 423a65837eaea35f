"""Checkpoints hold data only, so that loading one can never run code.

A checkpoint is a pickle, and a pickle can name any callable to run while it is read. Ours are
therefore made of tensors, numbers, strings and plain containers only (``plain`` runs on every
checkpoint before it is written, see RecommenderModule.on_save_checkpoint), and every entry
point reads user-supplied checkpoints with ``torch.load(weights_only=True)``, whose unpickler
refuses anything else. ``load_checkpoint`` turns every way a file can fail to be one of ours
(missing, truncated, not a checkpoint, holding foreign objects) into one ConfigError line.

Checkpoints written before this rule (OmegaConf lists in their hyperparameters) are refused too;
``python -m diffurec_lightning.checkpoints FILE...`` rewrites checkpoints you trust as plain data.

Each checkpoint also records its class (``model_class``), and its hyperparameters are exactly the
class's constructor arguments, so ``Class.load_from_checkpoint(path)`` rebuilds the model.
Checkpoints of the layout before the config objects (``lr``, ``delta``, ``approximator``,
``network`` ... as flat hyperparameters) are refused with one line; the same command upgrades
them (``upgrade``).
"""

from __future__ import annotations

import pickle
import re
import sys
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffurec_lightning.errors import ConfigError
from diffurec_lightning.io import write_atomic

# The checkpoint entry naming the module class ("package.module.Class").
MODEL_CLASS = "model_class"
# Flat hyperparameters of the layout before the config objects: any of them means that layout.
_OLD_KEYS = ("lr", "lr_gamma", "approximator", "network", "delta", "offset", "eval_steps")


def plain(value: Any) -> Any:
    """``value`` with OmegaConf containers, numpy values and dict subclasses turned into plain
    dicts, lists, tuples, numbers and tensors (what the weights-only unpickler accepts)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, DictConfig | ListConfig):
        return plain(OmegaConf.to_container(value, resolve=True))
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, Mapping):
        items = ((plain(key), plain(item)) for key, item in value.items())
        # OrderedDict is allowed (state dicts use it); defaultdict and the like become dicts.
        return OrderedDict(items) if type(value) is OrderedDict else dict(items)
    if type(value) is tuple:
        return tuple(plain(item) for item in value)
    if isinstance(value, list | tuple):  # lists, and named tuples as lists
        return [plain(item) for item in value]
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, np.generic):
        return value.item()
    return value


def _refused_global(message: str) -> str | None:
    """The object the weights-only unpickler refused, named as in its message."""
    match = re.search(r"GLOBAL (\S+)", message)
    return match.group(1) if match else None


def load_checkpoint(path: str | Path, what: str = "ckpt_path") -> dict[str, Any]:
    """Read a checkpoint with the weights-only unpickler; a one-line ConfigError for anything
    that is not a readable checkpoint of plain data (``what`` names the setting to fix)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what}={path}: no such checkpoint file; check the path")
    try:
        with warnings.catch_warnings():  # "Detected pickle protocol 4": harmless, and noise
            warnings.simplefilter("ignore", UserWarning)
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = _refused_global(str(exc))
        if refused is not None or "Weights only load failed" in str(exc):
            raise ConfigError(
                f"{what}={path}: refused to load: it refers to {refused or 'an object'}, not only "
                "to tensors and plain containers, and reading it could run code (a crafted file, "
                "or one written by an older version); re-save a checkpoint you trust with "
                "`python -m diffurec_lightning.checkpoints FILE`"
            ) from None
        raise _unreadable(path, what, exc) from None
    except Exception as exc:  # truncated zip, text, empty file: each fails its own way
        raise _unreadable(path, what, exc) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ConfigError(
            f"{what}={path}: not a model checkpoint (no state_dict); pass a .ckpt file that "
            "training wrote (<run>/checkpoints/*.ckpt)"
        )
    if is_old_layout(checkpoint):
        raise ConfigError(
            f"{what}={path}: written by an older version (flat hyperparameters such as lr, delta; "
            "now model.optimizer.lr, model.lambda_scale ...); upgrade a checkpoint you trust "
            "with `python -m diffurec_lightning.checkpoints FILE`"
        )
    return checkpoint


def is_old_layout(checkpoint: Mapping[str, Any]) -> bool:
    """Whether the hyperparameters are of the layout before the config objects."""
    hparams = checkpoint.get("hyper_parameters") or {}
    return any(key in hparams for key in _OLD_KEYS)


def _unreadable(path: Path, what: str, exc: BaseException) -> ConfigError:
    first = str(exc).split("\n")[0].split(". ")[0]
    reason = f"{type(exc).__name__}: {first}"[:100]
    return ConfigError(
        f"{what}={path}: not a readable checkpoint (truncated, damaged or not a torch file; "
        f"{reason}); pass a .ckpt file that training wrote (<run>/checkpoints/*.ckpt)"
    )


def check_checkpoint(path: str | Path | None, what: str = "ckpt_path") -> None:
    """Refuse, with one line, a checkpoint that Lightning could not load safely."""
    if path is not None:
        load_checkpoint(path, what)


def convert(path: Path) -> None:
    """Rewrite a trusted checkpoint as plain data of the current layout (full unpickler: only for
    your own files)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    checkpoint.pop("hparams_type", None)  # the class of an OmegaConf container
    checkpoint = plain(checkpoint)
    if is_old_layout(checkpoint):
        from diffurec_lightning.checkpoint_upgrade import upgrade

        checkpoint = upgrade(checkpoint)
    write_atomic(path, lambda tmp: torch.save(checkpoint, tmp))


def main(argv: list[str] | None = None) -> int:
    """``python -m diffurec_lightning.checkpoints FILE...``: convert checkpoints you trust."""
    paths = [Path(arg) for arg in (sys.argv[1:] if argv is None else argv)]
    if not paths:
        print("usage: python -m diffurec_lightning.checkpoints FILE.ckpt...", file=sys.stderr)
        return 2
    for path in paths:
        convert(path)
        load_checkpoint(path)
        print(f"{path}: plain data now; loads with weights_only=True")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
