"""Plumbing shared by the analyses that re-evaluate a finished run's checkpoints
(``prior_weight``, ``val_budget``): their command line, the evaluation precision, loading a
checkpoint with its data, and writing ``<stem>.{json,md}`` beside the run.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from diffurec_lightning.io import write_json, write_text


def parser(doc: str, run_help: str) -> argparse.ArgumentParser:
    """An argument parser with the options every checkpoint analysis takes: --run, --precision,
    --out (described by the first paragraph of the module's ``doc``)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--run", required=True, help=run_help)
    parser.add_argument("--precision", default="auto", help="auto | 32-true | bf16-mixed")
    parser.add_argument("--out", default=None, help="output folder (default: the run folder)")
    return parser


def autocast_dtype(precision: str) -> tuple[str, torch.dtype | None]:
    """(the precision ``precision`` resolves to on this CPU, the autocast dtype or None)."""
    from diffurec_lightning.precision import resolve_precision

    chosen = resolve_precision(precision, "cpu")
    return chosen, torch.bfloat16 if chosen.startswith("bf16") else None


@contextlib.contextmanager
def evaluating(dtype: torch.dtype | None) -> Iterator[None]:
    """No gradients, and CPU autocast to ``dtype`` when there is one (as bf16-mixed evaluates)."""
    with (
        torch.inference_mode(),
        torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None),
    ):
        yield


def load(checkpoint: Path) -> tuple[Any, Any]:
    """(datamodule set up for fitting, model) of a checkpoint, as ``eval`` builds them."""
    from diffurec_lightning.config import compose_config
    from diffurec_lightning.eval import setup

    cfg = compose_config([f"ckpt_path={checkpoint}", "logger=csv"], config_name="eval")
    _, datamodule, model = setup(cfg)
    datamodule.setup("fit")
    return datamodule, model


def write_outputs(out: Path, stem: str, result: dict[str, Any], text: str) -> None:
    """``out/<stem>.json`` (the result) and ``out/<stem>.md`` (the text, also printed)."""
    write_json(out / f"{stem}.json", result)
    write_text(out / f"{stem}.md", text)
    print(text)
