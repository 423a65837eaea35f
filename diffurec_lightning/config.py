"""Where the Hydra configs live, and composing them outside a Hydra app (tests, tools)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from diffurec_lightning.schemas import register as register_schemas


def find_conf_dir(package: Path) -> Path:
    """The configs of the package folder ``package``: the copy a built package ships inside
    itself (setup.py copies conf/ to diffurec_lightning/conf/), else ``conf/`` of the source
    checkout (also what an editable install reads)."""
    shipped = package / "conf"
    # The shipped copy first: an installed package lives in site-packages, beside which an
    # unrelated conf/ folder may lie; a checkout never has diffurec_lightning/conf/.
    return shipped if (shipped / "train.yaml").is_file() else package.parent / "conf"


CONF_DIR = find_conf_dir(Path(__file__).resolve().parent)


def compose_config(overrides: list[str] | None = None, config_name: str = "train") -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with overrides, as the command line would."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides or [])


def run_key() -> str:
    """``_<id>`` naming this run when a scheduler does (a W&B sweep run, a SLURM array task or
    job), else ``""``: run folders are named to the second, and parallel sweep agents or array
    tasks started in the same second would otherwise share one (conf/hydra/default.yaml)."""
    import os
    import re

    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    for key in (
        os.environ.get("WANDB_RUN_ID"),
        f"{array_job}_{task}" if array_job and task else None,
        os.environ.get("SLURM_JOB_ID"),
    ):
        if key:
            return "_" + re.sub(r"[^A-Za-z0-9_.-]", "_", key)
    return ""


def _register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("run_key"):
        OmegaConf.register_new_resolver("run_key", run_key)


_register_resolvers()
register_schemas()
