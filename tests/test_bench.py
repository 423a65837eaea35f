"""`make bench` keeps working: a minimal real run on toys (one timed step each, a small model).

The figures themselves are not asserted against targets here (timing belongs in benchmarks and
docs/performance.md, not in unit tests); what is checked is that every column is measured and
consistent with the definitions: padding fractions, useful FLOP/s against the measured peak.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffurec_lightning.bench import main, parse_options
from diffurec_lightning.errors import ConfigError

SMALL = [
    "model.net.num_blocks=1",
    "model.diffusion.num_steps=2",
    "data.batch_size=64",
    "data.eval_batch_size=64",
]


@pytest.mark.slow  # make test-all: a real run, long on 2 cores
def test_bench_measures_every_column(run_env: Path, capsys: pytest.CaptureFixture) -> None:
    out = run_env / "bench.json"
    args = ["bench.warmup_steps=1", "bench.train_steps=1", "bench.eval_batches=1"]
    args += ["bench.precisions=fp32", f"bench.json={out}", "data=toys", "model=diffurecsys"]
    results = main([*args, *SMALL])
    printed = capsys.readouterr().out
    assert "train samples/s" in printed and "eval users/s" in printed
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))

    (block,) = results["runs"].values()
    assert block["peaks"]["fp32"] > 1e9  # any CPU of this decade does a GFLOP/s
    train, evaluation = block["precisions"]["fp32"]["train"], block["precisions"]["fp32"]["eval"]
    assert train["num_samples"] == 109_361 and evaluation["num_users"] == 19_412
    assert 0 < train["padding_fraction"] < 0.5  # bucketed: far below the unbucketed 84%
    assert train["samples_per_s"] > 0 and evaluation["users_per_s"] > 0
    assert train["epoch_s"] == pytest.approx(train["num_samples"] / train["samples_per_s"])
    assert 0 < train["useful_flops_per_s"] < block["peaks"]["fp32"] * 1.5
    assert train["peak_mb"] > 100 and evaluation["peak_mb"] > 100


def test_bench_options_are_checked() -> None:
    """The bench node of conf/bench.yaml is typed and key-checked at composition."""
    options, overrides = parse_options(["bench.train_steps=3", "data=beauty", "seed=1"])
    assert (options.train_steps, options.warmup_steps) == (3, 2)  # the rest: conf/bench.yaml
    assert overrides == ["data=beauty", "seed=1"]  # for the measured runs
    with pytest.raises(ConfigError, match=r"^bench.steps: no such setting \(did you mean"):
        parse_options(["bench.steps=3"])
    with pytest.raises(ConfigError, match=r"^bench.train_steps=x: expected an integer"):
        parse_options(["bench.train_steps=x"])
    with pytest.raises(ConfigError, match="bench.precisions: unknown 'fp8'"):
        parse_options(["bench.precisions=fp8"])
    with pytest.raises(ConfigError, match=r"bench.kernels: unknown 'fast'; use one of"):
        parse_options(["bench.kernels=fast"])
    assert parse_options(["bench.kernels=compile"])[0].kernels == "compile"
    with pytest.raises(ConfigError, match="one value per setting; quote"):
        parse_options(["bench.precisions=fp32,bf16-mixed"])
    assert parse_options(["bench.precisions='fp32,bf16-mixed'"])[0].precisions == "fp32,bf16-mixed"
    with pytest.raises(ConfigError, match="data.max_lenn: no such setting"):
        parse_options(["data.max_lenn=5"])  # the runs' overrides are checked up front too


@pytest.mark.slow  # make test-all: a real run, long on 2 cores
def test_time_to_accuracy_bench_on_real_toys(run_env: Path, capsys: pytest.CaptureFixture) -> None:
    from diffurec_lightning.bench_tta import main as tta

    out = run_env / "tta.json"
    args = ["data=toys", "model=diffurec", "logger=csv", "callbacks.progress_bar=null"]
    args += [
        "model.hidden_size=16",
        "model.net.num_blocks=1",
        "model.net.num_heads=1",
        "model.diffusion.num_steps=2",
    ]
    args += [
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=3",
        "callbacks.case_studies.enabled=false",
    ]
    result = tta([*args, "tta.target=0.0001", f"tta.json={out}"])
    printed = capsys.readouterr().out
    assert "machine:" in printed and "time to the final best val/hr@10" in printed
    history = result["history"]
    assert [record["epoch"] for record in history] == [1, 2]  # tta.every=1: every epoch
    assert history[0]["wall_s"] < history[1]["wall_s"]
    assert all(r["train_s"] + r["val_s"] <= r["wall_s"] + 0.5 for r in history)
    best = max(record["val/hr@10"] for record in history)
    assert result["summary"]["val/hr@10"]["best"] == best
    assert result["summary"]["val/hr@10"]["100%"]["value"] == best
    assert set(result["test"]) >= {"test/hr@10", "test/ndcg@10"}
    assert json.loads(out.read_text())["summary"] == json.loads(json.dumps(result["summary"]))


def test_time_to_accuracy_bench_rejects_unknown_options() -> None:
    from diffurec_lightning.bench_tta import TTAOptions

    with pytest.raises(ConfigError, match="unknown option tta.evry"):
        TTAOptions.parse(["tta.evry=2"])
    with pytest.raises(ConfigError, match="tta.every=x: expected a int"):
        TTAOptions.parse(["tta.every=x"])


def test_loss_bench_times_both_losses(capsys: pytest.CaptureFixture) -> None:
    from diffurec_lightning import bench_loss

    result = bench_loss.main(["--batch", "8", "--items", "50", "--rounds", "1", "--steps", "1"])
    assert set(result["ms_per_step"]) == {"F.cross_entropy", "lean cross_entropy"}
    assert all(ms > 0 for ms in result["ms_per_step"].values())
    assert "machine:" in capsys.readouterr().out
