"""Shared fixtures: the local data mirror, a per-session prepared-data cache, quiet W&B."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Tests never talk to a W&B server; tests that check W&B files ask for offline mode explicitly.
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")


def find_mirror() -> Path | None:
    candidates = [os.environ.get("DIFFUREC_DATA_MIRROR"), REPO.parent / "shared" / "data"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "toys" / "dataset.pkl").is_file():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def mirror() -> Path:
    found = find_mirror()
    if found is None:
        pytest.skip("benchmark files not available: set DIFFUREC_DATA_MIRROR to a data mirror")
    return found


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Prepared-data cache shared by the whole session (conversions take about a second each)."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture()
def run_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, data_dir: Path, mirror: Path) -> Path:
    """Environment of a training run: outputs under tmp_path, the shared cache, the mirror."""
    monkeypatch.setenv("DIFFUREC_HOME", str(tmp_path))
    monkeypatch.setenv("DIFFUREC_DATA_DIR", str(data_dir))
    monkeypatch.setenv("DIFFUREC_DATA_MIRROR", str(mirror))
    return tmp_path


# Shared by test_eval.py and test_predict.py (tests/trained_run.py): one run for both files.
@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One short synthetic training run (with the case studies); its results.json."""
    import contextlib
    import io

    import torch
    from trained_run import TINY

    from diffurec_lightning.config import compose_config
    from diffurec_lightning.train import train

    torch.set_num_threads(1)
    home = tmp_path_factory.mktemp("home")
    # With the progress bar on, every batch reported: stdout is captured, so not a terminal.
    quiet = {"++trainer.enable_progress_bar=false", "callbacks.progress_bar=null"}
    overrides = [o for o in TINY if o not in quiet] + ["callbacks.progress_bar.interval_s=0"]
    log = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(log):
        mp.setenv("DIFFUREC_HOME", str(home))
        mp.setenv("DIFFUREC_DATA_DIR", str(home / "data"))
        results = train(compose_config([f"paths.output_dir={home / 'run'}", *overrides]))
    return {**results, "home": home, "run_dir": home / "run", "stdout": log.getvalue()}
