"""Bad input through the real command lines: one ``error:`` line, exit code 2, no traceback.

Every case runs the entry point as a user would (``python -m ...``) in a subprocess. The
crafted checkpoint's payload would create a marker file; it must never exist.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffurec_lightning.checkpoints import load_checkpoint
from diffurec_lightning.config import compose_config
from diffurec_lightning.errors import ConfigError
from diffurec_lightning.train import train

SMALL = [
    "data=synthetic",
    "logger=csv",
    "trainer.max_epochs=1",
    "trainer.check_val_every_n_epoch=1",
    "callbacks.progress_bar=null",
    "callbacks.representation=null",
    "model.hidden_size=16",
    "model.net.num_blocks=1",
    "model.net.num_heads=1",
    "model.diffusion.num_steps=4",
]


class Payload:
    """What a hostile checkpoint carries: unpickling it would run ``touch <marker>``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204 - the pickle protocol
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A trained run plus damaged and hostile checkpoint files."""
    root = tmp_path_factory.mktemp("bad_inputs")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DIFFUREC_HOME", str(root))
        patch.setenv("DIFFUREC_DATA_DIR", str(root / "data"))
        results = train(compose_config([f"paths.output_dir={root / 'run'}", *SMALL]))
    good = Path(results["best_checkpoint"])
    blob = good.read_bytes()
    (root / "truncated.ckpt").write_bytes(blob[: len(blob) // 2])
    (root / "text.ckpt").write_text("this is not a checkpoint\n")
    marker = root / "PAYLOAD_RAN"
    torch.save({"state_dict": {}, "hyper_parameters": Payload(marker)}, root / "crafted.ckpt")
    (root / "crafted.pkl").write_bytes(pickle.dumps({"state_dict": Payload(marker)}))
    (root / "clicks.csv").write_text("user_id,item_id,timestamp\n1,2,3\n")
    return {"root": root, "good": good, "marker": marker, "results": results}


def cli(files: dict[str, Path], module: str, *args: str) -> subprocess.CompletedProcess:
    root = files["root"]
    env = {
        **os.environ,
        "DIFFUREC_HOME": str(root),
        "DIFFUREC_DATA_DIR": str(root / "data"),
        "OMP_NUM_THREADS": "1",
    }
    argv = [a.format(**{k: str(v) for k, v in files.items() if isinstance(v, Path)}) for a in args]
    return subprocess.run(
        [sys.executable, "-m", module, *argv], env=env, capture_output=True, text=True, timeout=120
    )


TRAIN, EVAL, PREPARE, BENCH = (
    "diffurec_lightning.train",
    "diffurec_lightning.eval",
    "diffurec_lightning.data.prepare",
    "diffurec_lightning.bench",
)
RUN = ["data=synthetic", "logger=csv", "hydra.run.dir={root}/out"]
# (entry point, arguments, what the error line must say)
CASES = {
    "eval-truncated": (EVAL, ["ckpt_path={root}/truncated.ckpt"], "not a readable checkpoint"),
    "eval-text": (EVAL, ["ckpt_path={root}/text.ckpt"], "not a readable checkpoint"),
    "predict-truncated": (
        EVAL,
        ["mode=predict", "predict.out={root}/p.parquet", "ckpt_path={root}/truncated.ckpt"],
        "not a readable checkpoint",
    ),
    "curves-text": (EVAL, ["mode=curves", "ckpt_path={root}/text.ckpt"], "not a readable checkpoint"),
    "eval-missing": (EVAL, ["ckpt_path={root}/nothing.ckpt"], "no such checkpoint file"),
    "eval-no-ckpt": (EVAL, [], "ckpt_path is required"),
    "eval-data-key": (EVAL, ["ckpt_path={good}", "data.eval_batch_size=64"], "+data.eval_batch_size"),
    "train-resume-truncated": (TRAIN, [*RUN, "ckpt_path={root}/truncated.ckpt"], "not a readable"),
    "train-resume-text": (TRAIN, [*RUN, "ckpt_path={root}/text.ckpt"], "not a readable checkpoint"),
    "test-only-text": (
        TRAIN, [*RUN, "train=false", "ckpt_path={root}/text.ckpt"], "not a readable checkpoint"
    ),
    "test-only-truncated": (
        TRAIN, [*RUN, "train=false", "ckpt_path={root}/truncated.ckpt"], "not a readable"
    ),
    "train-resume-missing": (TRAIN, [*RUN, "ckpt_path={root}/gone.ckpt"], "no such checkpoint"),
    "custom-without-path": (TRAIN, ["data=custom"], "data=custom needs data.source.path=<file>"),
    "prepare-bogus": (PREPARE, ["data=bogus"], "data=bogus: no such option; choose one of: beauty"),
    "prepare-misspelt": (PREPARE, ["data.max_lenn=5"], "data.max_lenn: no such setting"),
    "train-misspelt": (TRAIN, ["data.max_lenn=5"], "(did you mean max_len?)"),
    "train-bogus": (TRAIN, ["model=bogus"], "model=bogus: no such option"),
    "seed": (TRAIN, ["seed=abc"], "seed=abc: expected an integer"),
    "k-core": (
        TRAIN, ["data=custom", "data.source.path={root}/clicks.csv", "data.source.k_core=abc"],
        "data.source.k_core=abc: expected an integer",
    ),
    "lr": (TRAIN, ["model.optimizer.lr=abc"], "model.optimizer.lr=abc: expected a number"),
    "num-steps": (
        TRAIN, ["data=toys", "model=diffurec", "model.diffusion.num_steps=abc"],
        "model.diffusion.num_steps=abc: expected an integer",
    ),
    "hidden-size": (TRAIN, ["model=sasrec", "model.hidden_size=abc"], "model.hidden_size=abc: expected an integer"),
    "model-misspelt": (TRAIN, ["model.net.num_block=2"], "(did you mean num_blocks?)"),
    "optimized-metric": (TRAIN, [*RUN, "optimized_metric=val/auc"], "optimized_metric=val/auc is not a metric"),
    "bench-misspelt": (BENCH, ["bench.allocater=both"], "bench.allocater: no such setting"),
    "bench-type": (BENCH, ["bench.train_steps=many"], "bench.train_steps=many: expected an integer"),
    "epochs-float": (TRAIN, ["trainer.max_epochs=2.5"], "trainer.max_epochs=2.5: expected an integer"),
    "unknown-parameter": (TRAIN, ["+model.diffusion.nm_steps=4"], "did you mean model.diffusion.num_steps?"),
    "bad-syntax": (TRAIN, ["model.ks=[5,10"], "cannot read the overrides"),
}  # fmt: skip


# Each refusal path stays in the fast suite once; these repeat one of them (another file kind,
# entry point or type) and run in make test-all, to keep make test short on slow CPUs.
SLOW_CASES = {
    "eval-text", "train-resume-text", "test-only-text", "curves-text", "prepare-bogus",
    "bench-type", "epochs-float",
}  # fmt: skip


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_CASES else c for c in sorted(CASES)],
)
def test_bad_input_gets_one_error_line(files: dict[str, Path], case: str) -> None:
    module, args, expected = CASES[case]
    done = cli(files, module, *args)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(errors) == 1 and expected in errors[0], done.stderr[-3000:]
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "name", ["crafted.ckpt", pytest.param("crafted.pkl", marks=pytest.mark.slow)]
)
def test_a_crafted_checkpoint_never_runs_its_payload(files: dict[str, Path], name: str) -> None:
    crafted = files["root"] / name
    # The zip checkpoint is refused at its global (named); torch's weights-only unpickler stops
    # a bare protocol-4 pickle even earlier, at an opcode, so that refusal names no object.
    named = "posix.system" if name.endswith(".ckpt") else "an object"
    with pytest.raises(ConfigError, match=f"refused to load: it refers to {named}"):
        load_checkpoint(crafted)
    for module, args in ((EVAL, [f"ckpt_path={crafted}"]), (TRAIN, [*RUN, f"ckpt_path={crafted}"])):
        done = cli(files, module, *args)
        assert (
            done.returncode == 2 and "error: " in done.stderr and "refused to load" in done.stderr
        )
        assert "Traceback" not in done.stderr
    assert not files["marker"].exists()


def test_our_checkpoints_are_plain_data(files: dict[str, Path]) -> None:
    checkpoint = torch.load(files["good"], weights_only=True)  # the strict unpickler reads it
    assert checkpoint["hyper_parameters"]["ks"] == [5, 10, 20]
    assert set(checkpoint["callbacks"]) >= {"RngState"}


def test_eval_batch_size_in_the_form_hydra_suggests(files: dict[str, Path]) -> None:
    done = cli(
        files, EVAL, "ckpt_path={good}", "+data.eval_batch_size=64", "logger=csv",
        "callbacks.representation=null", "hydra.run.dir={root}/eval64",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    evaluated = json.loads((files["root"] / "eval64" / "eval.json").read_text())
    assert evaluated["test"] == files["results"]["test"]  # batch size 64 instead of 512


@pytest.mark.parametrize(
    "model", sorted(p.stem for p in (Path(__file__).parents[1] / "conf" / "model").glob("*.yaml"))
)
def test_every_models_checkpoint_is_plain_data(model: str, tmp_path: Path) -> None:
    """What Lightning puts into a checkpoint of each model, after the module's hook, loads with
    the weights-only unpickler."""
    from hydra.utils import instantiate
    from omegaconf import open_dict

    cfg = compose_config([f"model={model}"])
    with open_dict(cfg):
        cfg.model.num_items = 50
    module = instantiate(cfg.model)
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "model.ckpt")
    loaded = load_checkpoint(tmp_path / "model.ckpt")
    assert loaded["hyper_parameters"]["name"] == model


@pytest.mark.slow  # three gloo ranks on two cores: about a minute
def test_ddp_with_more_ranks_than_evaluation_batches(files: dict[str, Path]) -> None:
    """400 users in one 512-user batch, three ranks: every rank gets a share, metrics unchanged."""
    done = cli(
        files, TRAIN, *SMALL, "train=false", "ckpt_path={good}", "trainer=ddp",
        "trainer.accelerator=cpu", "trainer.devices=3", "hydra.run.dir={root}/ddp3",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    ddp = json.loads((files["root"] / "ddp3" / "results.json").read_text())
    assert ddp["test"] == files["results"]["test"]
