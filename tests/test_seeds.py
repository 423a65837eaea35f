"""`make seeds`: a Hydra multirun with one run folder and one results.json per seed."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RESULT_KEYS = {"config", "dataset", "model", "seed", "val", "val_best", "test", "epochs"}
RESULT_KEYS |= {"wall_time_s", "best_checkpoint"}


@pytest.mark.slow  # make test-all: a real run, long on 2 cores
def test_make_seeds_writes_one_results_file_per_seed(run_env: Path) -> None:
    args = (
        "trainer.max_epochs=1 trainer.check_val_every_n_epoch=1 callbacks.progress_bar=null "
        "model.hidden_size=16 model.net.num_blocks=1 model.net.num_heads=1 model.diffusion.num_steps=4 logger=csv"
    )
    planned = subprocess.run(
        # --no-print-directory: under `make test` this make is nested and would print
        # "Entering/Leaving directory" lines around the command.
        [
            "make",
            "--no-print-directory",
            "-n",
            "seeds",
            "DATA=synthetic",
            "MODEL=diffurecsys",
            "SEEDS=2",
            f"ARGS={args}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    command = shlex.split(planned.stdout.strip().splitlines()[-1])
    assert command[1:4] == ["-m", "diffurec_lightning.train", "-m"] and "seed=0,1" in command
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    (sweep_dir,) = (run_env / "outputs" / "multirun").glob("*/*_synthetic_diffurecsys")
    runs = sorted(sweep_dir.glob("*/results.json"))
    results = [json.loads(path.read_text()) for path in runs]
    assert [r["seed"] for r in results] == [0, 1]
    assert len({path.parent for path in runs}) == 2  # one folder per seed
    for result in results:
        assert set(result) >= RESULT_KEYS and result["dataset"] == "synthetic"
        assert result["config"]["seed"] == result["seed"] and "test/ndcg@10" in result["test"]
    assert results[0]["test"] != results[1]["test"]  # the seed reached the weights
