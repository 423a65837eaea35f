"""Typed schemas of the ``data`` and ``trainer`` config groups and of the ``bench`` node
(Hydra structured configs); the ``model`` group's are in model_schemas.py.

Every YAML of these groups names its schema first in its defaults list (``- data_schema``,
``- trainer_schema``), so composition itself checks the types and the keys: ``data.batch_size=abc``
or ``trainer.max_epochs=abc`` fails before any data is read, and a misspelt key in a YAML file
is an error instead of an ignored setting. The defaults here are the YAML defaults; the YAML
files stay the documented place for each setting. Keys can still be added on purpose from the
command line with ``+`` / ``++`` (``++trainer.enable_progress_bar=false``).

``data.source`` is typed ``Any``: each source class (data/sources.py) checks its own fields
when it is built.
"""

from dataclasses import dataclass
from typing import Any

from omegaconf import MISSING

# OmegaConf reads these annotations at runtime: no `from __future__ import annotations` here.


@dataclass
class DataSchema:
    _target_: str = "diffurec_lightning.data.datamodule.SequenceDataModule"
    name: str = MISSING
    source: Any = MISSING
    data_dir: str = MISSING
    max_len: int = 50
    batch_size: int = 512
    eval_batch_size: int = 512
    bucketing: bool = True
    num_workers: int = 0
    seed: int = 0
    train_samples: str = "prefixes"
    protocol: str = "standard"


@dataclass
class TrainerSchema:
    _target_: str = "lightning.pytorch.Trainer"
    default_root_dir: str | None = None
    accelerator: str = "auto"
    devices: Any = 1  # an int, a list of device ids, or "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str | int = "auto"
    max_epochs: int = 50
    check_val_every_n_epoch: int | None = 1
    num_sanity_val_steps: int = 0
    log_every_n_steps: int = 50
    gradient_clip_val: float | None = None
    limit_train_batches: int | float | None = None
    limit_val_batches: int | float | None = None
    limit_test_batches: int | float | None = None
    use_distributed_sampler: bool = False
    deterministic: Any = False  # true | false | "warn"
    fast_dev_run: bool | int = False  # conf/debug/fast.yaml


@dataclass
class BenchSchema:
    """The ``bench`` node of conf/bench.yaml (``bench.<key>=<value>``; bench.py reads it)."""

    warmup_steps: int = 2
    train_steps: int = 6
    eval_batches: int = 4
    threads: int = 0
    precisions: str = "fp32,bf16-mixed"
    allocator: str = "env"
    device: str = "cpu"
    profile: int = 0
    kernels: str = "custom"
    json: str = ""


def register() -> None:
    """Put the schemas in Hydra's ConfigStore (before any config is composed)."""
    from hydra.core.config_store import ConfigStore

    from diffurec_lightning.model_schemas import MODEL_SCHEMAS

    store = ConfigStore.instance()
    store.store(group="data", name="data_schema", node=DataSchema)
    store.store(group="trainer", name="trainer_schema", node=TrainerSchema)
    for name, schema in MODEL_SCHEMAS.items():
        store.store(group="model", name=name, node=schema)
    store.store(name="bench_schema", node=BenchSchema)  # placed at `bench` by conf/bench.yaml
