"""`make reproduce`: every model's recipe over seeds into one folder, then one report with
validation, test and the published numbers (tiny budgets, real Toys data)."""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

from diffurec_lightning.analysis.reproduce import main, recipe

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "debug=fast",  # one training batch, one validation batch, one test batch
    "logger=csv",
    "callbacks.progress_bar=null",
    "model.hidden_size=16",  # sasrec only: pop and markov have no such setting
    "model.net.num_blocks=1",
]


def test_recipes_use_the_published_settings_where_there_are_some() -> None:
    assert recipe("toys", "diffurec") == ["data=toys", "model=diffurec", "experiment=diffurec_toys"]
    assert recipe("toys", "markov") == ["data=toys", "model=markov"]
    assert recipe("toys", "diffurec", preset=False) == ["data=toys", "model=diffurec"]


def test_make_reproduce_calls_the_entry_point() -> None:
    planned = subprocess.run(
        ["make", "--no-print-directory", "-n", "reproduce", "DATA=beauty", "SEEDS=2",
         "MODELS=pop markov", "ARGS=debug=fast"],
        cwd=REPO, capture_output=True, text=True, check=True,
    )  # fmt: skip
    command = shlex.split(planned.stdout.strip().splitlines()[-1])
    assert command[1:] == [
        "-m", "diffurec_lightning.analysis.reproduce", "--data", "beauty", "--models", "pop",
        "markov", "--seeds", "2", "--baseline", "markov", "debug=fast",
    ]  # fmt: skip


def test_reproduce_writes_every_run_and_the_report(run_env: Path, capsys) -> None:
    out = run_env / "repro"
    args = ["--data", "toys", "--models", "pop", "markov", "sasrec", "--seeds", "2"]
    assert main([*args, "--out-dir", str(out), "--no-wandb", *TINY]) == 0
    assert "pop: not its settings, skipped: model.hidden_size=16" in capsys.readouterr().out
    for model in ("pop", "markov", "sasrec"):
        for seed in (0, 1):
            result = json.loads((out / model / f"seed{seed}" / "results.json").read_text())
            assert (result["model"], result["seed"]) == (model, seed)
            assert "val/hr@10" in result["val_best"] and "test/hr@10" in result["test"]
    sasrec = json.loads((out / "sasrec" / "seed0" / "results.json").read_text())
    assert sasrec["config"]["model"]["hidden_size"] == 16
    text = (out / "report.md").read_text()
    assert (
        "| dataset | model | seeds | epoch | val hr@5 | test hr@5 | val hr@10 | test hr@10 |"
        in text
    )
    assert "| toys | sasrec | this project, test (mean of 2) |" in text
    assert (
        "| toys | diffurecsys | published: DiffuRecSys paper, Table 3 (V2, mean of 5 seeds) | 0.0684 |"
        in text
    )
    assert "## Paired t-test against `markov`" in text and "| toys | sasrec | hr@10 | 2 |" in text

    # the same command again (or with more seeds) keeps finished runs and trains only new ones
    # and a run without results.json is trained again (debug=fast writes no last.ckpt to resume
    # from; resuming through ckpt_path=auto is tested in test_resume.py)
    stamp = (out / "sasrec" / "seed0" / "results.json").stat().st_mtime_ns
    (out / "sasrec" / "seed1" / "results.json").unlink()
    assert main([*args[:-1], "3", "--out-dir", str(out), "--no-wandb", *TINY]) == 0
    printed = capsys.readouterr().out
    assert "== sasrec on toys, seed 0: finished before, kept" in printed
    assert "== sasrec on toys, seed 1 ->" in printed
    assert (out / "sasrec" / "seed1" / "results.json").is_file()
    assert "== sasrec on toys, seed 2 ->" in printed
    assert (out / "sasrec" / "seed0" / "results.json").stat().st_mtime_ns == stamp
    assert "| toys | sasrec | hr@10 | 3 |" in (out / "report.md").read_text()


def test_unknown_model_is_one_line(run_env: Path, capsys) -> None:
    assert main(["--models", "bert4rec", "--out-dir", str(run_env / "x"), "--no-wandb"]) == 2
    assert capsys.readouterr().err.strip() == "error: --models: no conf/model/bert4rec.yaml"


def test_reproduce_runs_the_refit_protocol(run_env: Path) -> None:
    """data.protocol=refit through make reproduce trains on training + validation items (no
    validation) and labels the run, instead of stopping at the standard path's validation check."""
    out = run_env / "refit"
    args = ["--data", "toys", "--models", "sasrec", "--seeds", "1", "--out-dir", str(out)]
    # debug=fast's fast_dev_run would validate; a one-batch budget does not
    tiny = [o for o in TINY if o != "debug=fast"]
    budget = ["trainer.limit_train_batches=1", "trainer.limit_test_batches=1"]
    assert main([*args, "--no-wandb", *tiny, *budget, "data.protocol=refit", "refit.epochs=1"]) == 0
    result = json.loads((out / "sasrec" / "seed0" / "results.json").read_text())
    assert result["protocol"] == "refit" and result["refit"]["epochs"] == 1
    assert result["refit"]["epochs_from"] == "refit.epochs" and "test/hr@10" in result["test"]
    assert "sasrec (refit)" in (out / "report.md").read_text()
