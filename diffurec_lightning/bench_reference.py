"""Throughput of the public reference code, side by side with ``make bench``.

    python -m diffurec_lightning.bench_reference --impl whuir --src <WHUIR/DiffuRec checkout>/src
    python -m diffurec_lightning.bench_reference --impl diffurecsys --src <shararezr/DiffuRecSys checkout>

The reference's own modules are imported from ``--src`` at run time (nothing of them is part of
this package) and run on CPU on the Toys benchmark file. It measures

* training samples/s: ``--train-steps`` steps of the reference's own training step (next batch of
  its DataLoader, ``forward(train_flag=True)``, ``loss_diffu_ce``, backward, its Adam step) after
  ``--warmup-steps`` untimed ones; also the model-only rate, DataLoader time left out;
* evaluation users/s: its own full-ranking validation loop (``forward(train_flag=False)``, i.e. the
  reverse process over all T steps, then ``diffu_rep_pre`` scoring every item, then
  ``hrs_and_ndcgs_k``) on ``--eval-users`` users after ``--eval-warmup-users`` untimed ones;
* the CPU share of each timed phase (process CPU time / wall time / threads), and the fp32
  matrix-multiply peak of our bench (``bench.matmul_peak``) before training and after evaluation.

The comparison is not equal. Above all, the reference pads every batch to max_len (50), in
training and evaluation, while ours left-pads each batch only to its longest history and, with
``data.bucketing=true``, groups similar lengths, so on Toys' short histories ours does far less
work per sample. Also: our bench times batches picked at quantiles of padded width, the reference's
are random (training) or in user-id order (evaluation); its ranking runs ``topk`` and a DCG loop
where ours computes ranks; it applies dropout to every block's output (ours: off by default);
DiffuRecSys feeds every block the original input, so backward skips all but the last block. Compare
with the fp32 row of ``make bench``.

Its args are its own defaults, read from its main.py with ``ast`` (main.py is never run: it parses
sys.argv, sets CUDA_VISIBLE_DEVICES and creates log folders), with the settings of our bench's
reference configuration put on top. Running it here needs only ``device='cpu'`` and numpy's
removed ``np.int`` restored (WHUIR's step_sample.py uses it); its files are not changed.
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import random
import sys
import time
import warnings
from pathlib import Path
from typing import Any, NoReturn

# impl: (modules --src must hold, its data-loader module, its trainer module). main.py is read
# (for its defaults), never imported.
IMPLS: dict[str, tuple[tuple[str, ...], str, str]] = {
    "whuir": (("main", "model", "diffurec", "step_sample", "utils", "trainer"), "utils", "trainer"),
    "diffurecsys": (
        ("main", "model", "diffurec", "step_sample", "tools", "training"),
        "tools",
        "training",
    ),
}
_SOURCE_HINT = {
    "whuir": "the src/ folder of a github.com/WHUIR/DiffuRec checkout",
    "diffurecsys": "a github.com/shararezr/DiffuRecSys checkout",
}
# argparse applies an option's `type` to a default given as a string.
_STRING_TYPES: dict[str, Any] = {"int": int, "float": float, "str": str}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not usage + error
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_cli(argv: list[str]) -> argparse.Namespace:
    """The command line; bad arguments end in a one-line error."""
    p = _Parser(
        prog="python -m diffurec_lightning.bench_reference",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--impl", choices=list(IMPLS), default="whuir")
    p.add_argument(
        "--src", required=True, help="folder holding the reference's main.py, model.py, ..."
    )
    p.add_argument(
        "--data",
        default=None,
        help="its dataset.pkl; default: the project's verified copy, as `data=<dataset>` finds it "
        "(<data_dir>/raw/<dataset>/dataset.pkl, else DIFFUREC_DATA_MIRROR, else downloaded)",
    )
    p.add_argument(
        "--dataset", default="toys", help="registry entry whose sha256 the file must have"
    )
    p.add_argument("--train-steps", type=int, default=20)
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--eval-users", type=int, default=1024)
    p.add_argument(
        "--eval-warmup-users", type=int, default=512, help="untimed users first (0 = none)"
    )
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    # Put into the reference's args namespace: our bench's reference configuration.
    p.add_argument(
        "--batch-size", type=int, default=512, help="training batch (its args.batch_size)"
    )
    p.add_argument(
        "--eval-batch-size",
        type=int,
        default=None,
        help="validation batch; default --batch-size, as the reference uses one args.batch_size",
    )
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-blocks", type=int, default=4)
    p.add_argument("--max-len", type=int, default=50)
    p.add_argument("--diffusion-steps", type=int, default=32, help="T, trained and reversed")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=0.001)
    p.add_argument("--weight-decay", type=float, default=None, help="default: the reference's own")
    p.add_argument("--seed", type=int, default=None, help="default: the reference's random_seed")
    p.add_argument("--json", default="", help="also write the results here")
    return p.parse_args(argv)


# -- the reference's sources and defaults ------------------------------------------------------------
def check_source(impl: str, src: str | Path) -> Path:
    """The --src folder, if it holds every module ``impl`` needs; otherwise a one-line exit."""
    folder = Path(src).expanduser().resolve()
    if not folder.is_dir():
        raise SystemExit(f"--src {src}: no such folder; pass {_SOURCE_HINT[impl]}")
    missing = [f"{name}.py" for name in IMPLS[impl][0] if not (folder / f"{name}.py").is_file()]
    if missing:
        raise SystemExit(
            f"--src {src}: {', '.join(missing)} missing; for --impl {impl} pass {_SOURCE_HINT[impl]}"
        )
    return folder


def _dest(call: ast.Call) -> str | None:
    """The dest argparse would give this add_argument call (None: no string option names)."""
    for keyword in call.keywords:
        if keyword.arg == "dest" and isinstance(keyword.value, ast.Constant):
            return str(keyword.value.value)
    names = [a.value for a in call.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    if not names:
        return None
    name = next((n for n in names if n.startswith("--")), names[0])  # argparse: first long option
    return name.lstrip("-").replace("-", "_")


def argparse_defaults(path: str | Path) -> tuple[dict[str, Any], list[str]]:
    """The defaults of the top-level ``parser.add_argument(...)`` calls in a Python file, read with
    ``ast`` (the file is parsed, never run), and the dests skipped for a non-literal default.

    Each call's dest is its option name as argparse makes it ('--max-len' -> 'max_len', or
    ``dest=``); its default is the ``default=`` literal (a string one converted by ``type=int`` /
    ``float``, as argparse does), None when absent, False/True for store_true/store_false.
    """
    tree = ast.parse(Path(path).read_text(), filename=str(path))
    defaults: dict[str, Any] = {}
    skipped: list[str] = []
    for node in tree.body:
        if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)):
            continue
        call = node.value
        if not (isinstance(call.func, ast.Attribute) and call.func.attr == "add_argument"):
            continue
        dest = _dest(call)
        if dest is None:
            continue
        keywords = {k.arg: k.value for k in call.keywords if k.arg}
        if "default" not in keywords:
            action = keywords.get("action")
            action = action.value if isinstance(action, ast.Constant) else None
            defaults[dest] = {"store_true": False, "store_false": True}.get(action)
            continue
        try:
            value = ast.literal_eval(keywords["default"])
        except (ValueError, TypeError, SyntaxError):
            skipped.append(dest)
            continue
        kind = keywords.get("type")
        if isinstance(value, str) and isinstance(kind, ast.Name) and kind.id in _STRING_TYPES:
            value = _STRING_TYPES[kind.id](value)
        defaults[dest] = value
    return defaults, skipped


def literal_dict(path: str | Path, name: str) -> dict[str, Any]:
    """The literal dict assigned to ``name`` in a Python file, read with ``ast`` (never run)."""
    for node in ast.walk(ast.parse(Path(path).read_text(), filename=str(path))):
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == name for t in node.targets
        ):
            try:
                return dict(ast.literal_eval(node.value))
            except (ValueError, TypeError, SyntaxError):
                raise SystemExit(f"{path}: {name} is not a literal dict") from None
    raise SystemExit(f"{path}: no {name} = {{...}} found")


def reference_defaults(impl: str, src: Path) -> tuple[dict[str, Any], list[str]]:
    """Its args namespace as ``python main.py`` (no arguments) builds it, and the skipped dests."""
    if impl == "diffurecsys":  # main.py: for each item of default_params, add_argument(default=...)
        return literal_dict(src / "main.py", "default_params"), []
    defaults, skipped = argparse_defaults(src / "main.py")
    if not defaults:
        raise SystemExit(f"{src / 'main.py'}: no parser.add_argument(...) calls found")
    return defaults, skipped


def build_args(
    defaults: dict[str, Any], cli: argparse.Namespace, item_num: int
) -> tuple[argparse.Namespace, dict[str, tuple[Any, Any]]]:
    """The reference's args: its defaults with our settings on top; and what those changed."""
    wanted: dict[str, Any] = {
        "device": "cpu",
        "num_gpu": 1,
        "hidden_size": cli.hidden_size,
        "num_blocks": cli.num_blocks,
        "max_len": cli.max_len,
        "batch_size": cli.batch_size,
        "diffusion_steps": cli.diffusion_steps,
        "dropout": cli.dropout,
        "lr": cli.lr,
        "dataset": cli.dataset,
    }
    if cli.weight_decay is not None:
        wanted["weight_decay"] = cli.weight_decay
    if cli.seed is not None:
        wanted["random_seed"] = cli.seed
    args = argparse.Namespace(**{**defaults, **wanted})
    args.item_num = item_num  # main.py's item_num_create
    changed = {k: (defaults.get(k), v) for k, v in wanted.items() if defaults.get(k) != v}
    return args, changed


# -- data -----------------------------------------------------------------------------------------
def expected_sha256(dataset: str) -> str:
    """The SHA-256 our benchmark registry records for ``dataset``."""
    from diffurec_lightning.data.benchmarks import get_benchmark
    from diffurec_lightning.errors import DataError

    try:
        return get_benchmark(dataset).sha256
    except DataError as exc:
        raise SystemExit(f"--dataset {dataset}: {exc}") from None


def default_data(dataset: str) -> Path:
    """The project's verified raw copy of ``dataset``, found (or mirrored, or downloaded) the way
    ``data=<dataset>`` does: ``<data_dir>/raw/<dataset>/dataset.pkl``, data_dir as conf/paths."""
    from diffurec_lightning.data.benchmarks import fetch_raw
    from diffurec_lightning.errors import DiffuRecError

    data_dir = os.environ.get("DIFFUREC_DATA_DIR") or (
        Path(os.environ.get("DIFFUREC_HOME", ".")) / "outputs" / "data"
    )
    try:
        return fetch_raw(dataset, Path(data_dir) / "raw")
    except DiffuRecError as exc:
        raise SystemExit(f"cannot find the {dataset} file ({exc}); or pass --data") from None


def load_data(path: str | Path, dataset: str) -> tuple[dict[str, Any], str]:
    """The reference-format dict in ``path`` and its sha256, if it has the registry's sha256."""
    from diffurec_lightning.data.safe_pickle import safe_load
    from diffurec_lightning.errors import DataError
    from diffurec_lightning.io import sha256_file

    expected = expected_sha256(dataset)
    try:
        digest = sha256_file(Path(path))
    except OSError as exc:
        raise SystemExit(f"--data {path}: cannot read it ({exc.strerror})") from None
    if digest != expected:
        raise SystemExit(
            f"--data {path}: sha256 {digest[:12]}… is not the {dataset} file's "
            f"({expected[:12]}…); not unpickling it"
        )
    try:  # the project's plain-data unpickler, as `data=<dataset>` reads the same file
        data = safe_load(path)
    except DataError as exc:
        raise SystemExit(str(exc)) from None
    if not isinstance(data, dict) or "smap" not in data:
        raise SystemExit(f"--data {path}: not a DiffuRec-format dict")
    return data, digest


# -- measurement ----------------------------------------------------------------------------------
class Phase:
    """Wall and process-CPU seconds of a timed block."""

    def __enter__(self) -> Phase:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


def _import_reference(src: Path, names: tuple[str, ...]) -> dict[str, Any]:
    """Import the reference's modules from ``src`` (first on sys.path); each must come from there."""
    import importlib

    if "main" in names:  # it runs at import (sys.argv, CUDA_VISIBLE_DEVICES, log folders)
        raise ValueError("the reference's main.py is read with ast, never imported")
    sys.path.insert(0, str(src))
    modules = {}
    for name in names:
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # its code, our input: one line, not its traceback
            raise SystemExit(f"--src {src}: importing {name}.py failed: {exc!r}") from None
        if Path(getattr(module, "__file__", "") or "").resolve().parent != src:
            raise SystemExit(f"module name {name!r} is taken by {module!r}; run in a fresh process")
        modules[name] = module
    return modules


def run(cli: argparse.Namespace) -> dict[str, Any]:
    """Measure the reference's training step and full-ranking evaluation; return the figures."""
    _, data_name, trainer_name = IMPLS[cli.impl]
    src = check_source(cli.impl, cli.src)
    defaults, skipped = reference_defaults(cli.impl, src)
    data_raw, digest = load_data(cli.data or default_data(cli.dataset), cli.dataset)

    import numpy as np

    if not hasattr(np, "int"):  # WHUIR's step_sample.py uses np.int (removed in numpy 1.24)
        np.int = int  # type: ignore[attr-defined]
    import torch

    from diffurec_lightning.bench import matmul_peak  # the probe our bench divides by
    from diffurec_lightning.bench_report import machine

    warnings.filterwarnings("ignore", message=".*pin_memory.*")
    torch.set_num_threads(cli.threads)
    modules = _import_reference(src, ("model", data_name, trainer_name))  # never main.py
    data_utils, trainer, model_mod = modules[data_name], modules[trainer_name], modules["model"]
    args, changed = build_args(defaults, cli, len(data_raw["smap"]))

    random.seed(args.random_seed)  # main.py's fix_random_seed_as
    torch.manual_seed(args.random_seed)
    np.random.seed(args.random_seed)

    device = torch.device(args.device)
    model = model_mod.Att_Diffuse_model(model_mod.create_model_diffu(args), args).to(device)
    optimizer = trainer.optimizers(model, args)
    result: dict[str, Any] = {
        "impl": cli.impl,
        "src": str(src),
        "machine": machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "data_sha256": digest,
        "item_num": args.item_num,
        "changed_from_reference_defaults": changed,
        "skipped_non_literal_defaults": skipped,
        "args": dict(sorted(vars(args).items())),
        "params": sum(p.numel() for p in model.parameters()),
        "load_before": os.getloadavg(),
    }

    # (a) training: the inner loop of the reference's model_train, one batch per step
    train_loader = data_utils.Data_Train(data_raw["train"], args).get_pytorch_dataloaders()
    result["train_samples"] = len(train_loader.dataset)
    batches = iter(train_loader)

    def next_batch() -> list[Any]:
        nonlocal batches
        try:
            return next(batches)
        except StopIteration:
            batches = iter(train_loader)
            return next(batches)

    def train_step() -> tuple[int, float]:
        started = time.perf_counter()
        batch = [x.to(device) for x in next_batch()]
        loaded = time.perf_counter() - started
        optimizer.zero_grad()
        _, diffu_rep, *_ = model(batch[0], batch[1], train_flag=True)
        loss = model.loss_diffu_ce(diffu_rep, batch[1])
        loss.backward()
        optimizer.step()
        return batch[0].shape[0], loaded

    result["peak_before_gflops"] = matmul_peak(torch.float32, device) / 1e9
    model.train()
    for _ in range(cli.warmup_steps):
        train_step()
    samples, load_s = 0, 0.0
    with Phase() as train:
        for _ in range(cli.train_steps):
            size, loaded = train_step()
            samples += size
            load_s += loaded
    result["train"] = {
        "steps": cli.train_steps,
        "samples": samples,
        "wall_s": train.wall,
        "samples_per_s": samples / train.wall,
        "model_only_samples_per_s": samples / max(train.wall - load_s, 1e-9),
        "loader_share": load_s / train.wall,
        "cpu_share": train.cpu / (train.wall * cli.threads),
    }

    # (b) evaluation: its validation loop (Data_Val: training history -> validation item)
    eval_args = copy.copy(args)
    eval_args.batch_size = cli.eval_batch_size or args.batch_size
    val_loader = data_utils.Data_Val(
        data_raw["train"], data_raw["val"], eval_args
    ).get_pytorch_dataloaders()
    result["val_users"] = len(val_loader.dataset)
    model.eval()
    val_batches = iter(val_loader)

    def eval_until(users: int) -> int:
        done = 0
        while done < users:
            batch = next(val_batches, None)
            if batch is None:
                break
            batch = [x.to(device) for x in batch]
            _, rep_diffu, *_ = model(batch[0], batch[1], train_flag=False)
            scores = model.diffu_rep_pre(rep_diffu)
            trainer.hrs_and_ndcgs_k(scores, batch[1], args.metric_ks)
            done += batch[0].shape[0]
        return done

    with torch.no_grad():
        eval_until(cli.eval_warmup_users)
        with Phase() as evaluation:
            users = eval_until(cli.eval_users)
    if users == 0:
        raise SystemExit("no validation users left to time: lower --eval-warmup-users")
    result["eval"] = {
        "users": users,
        "batch_size": eval_args.batch_size,
        "reverse_steps": args.diffusion_steps,
        "wall_s": evaluation.wall,
        "users_per_s": users / evaluation.wall,
        "cpu_share": evaluation.cpu / (evaluation.wall * cli.threads),
        "full_val_s": result["val_users"] / (users / evaluation.wall),
    }
    result["peak_after_gflops"] = matmul_peak(torch.float32, device) / 1e9
    result["load_after"] = os.getloadavg()
    return result


def report(r: dict[str, Any]) -> None:
    """Print the figures of :func:`run`."""
    from diffurec_lightning.bench_report import machine_line

    t, e, a = r["train"], r["eval"], r["args"]
    print(
        f"== reference {r['impl']}  {machine_line(r['machine'])}  threads: {r['threads']}  "
        f"numpy {r['numpy']}"
    )
    print(
        f"   data sha256 {r['data_sha256'][:16]}...  items {r['item_num']}  "
        f"train samples {r['train_samples']}  val users {r['val_users']}  params {r['params']}"
    )
    print(
        f"   config: hidden {a['hidden_size']}  blocks {a['num_blocks']}  max_len {a['max_len']}  "
        f"batch {a['batch_size']}  T {a['diffusion_steps']}  dropout {a['dropout']}  "
        f"emb_dropout {a.get('emb_dropout')}  lr {a['lr']}  wd {a.get('weight_decay')}  "
        f"sampler {a.get('schedule_sampler_name')}"
    )
    print(f"   changed from its defaults: {r['changed_from_reference_defaults']}")
    if r["skipped_non_literal_defaults"]:
        print(f"   not read (non-literal default): {r['skipped_non_literal_defaults']}")
    print(
        f"   loadavg before {tuple(round(x, 2) for x in r['load_before'])}  "
        f"after {tuple(round(x, 2) for x in r['load_after'])}"
    )
    print(
        f"   fp32 matmul peak (our bench's probe): before {r['peak_before_gflops']:.1f}  "
        f"after {r['peak_after_gflops']:.1f} GFLOP/s"
    )
    print(
        f"   train: {t['samples_per_s']:9.1f} samples/s  ({t['steps']} steps, {t['samples']} "
        f"samples, {t['wall_s']:.2f} s; model only {t['model_only_samples_per_s']:.1f}/s, "
        f"DataLoader {100 * t['loader_share']:.1f}% of wall)  cpu share {100 * t['cpu_share']:.0f}%"
    )
    print(
        f"   eval:  {e['users_per_s']:9.1f} users/s    ({e['users']} users, batch "
        f"{e['batch_size']}, {e['reverse_steps']} reverse steps, {e['wall_s']:.2f} s; full val "
        f"{e['full_val_s']:.0f} s)  cpu share {100 * e['cpu_share']:.0f}%",
        flush=True,
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse ``argv``, measure, print, and write --json if asked."""
    cli = parse_cli(sys.argv[1:] if argv is None else argv)
    result = run(cli)
    report(result)
    if cli.json:
        Path(cli.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
