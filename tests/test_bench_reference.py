"""bench_reference's input handling: no reference code is needed, and nothing is measured.

Its defaults reader must read the reference's main.py without running it, bad input must end in
one line (no traceback), and a data file is unpickled only once its sha256 is the registry's.
"""

from __future__ import annotations

import pickle
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from diffurec_lightning import bench_reference
from diffurec_lightning.bench_reference import argparse_defaults, load_data, parse_cli
from diffurec_lightning.data.benchmarks import BENCHMARKS

FAKE_MAIN = """\
import argparse
import os
from pathlib import Path

Path({marker!r}).write_text("main.py was executed")
parser = argparse.ArgumentParser()
parser.add_argument('--dataset', default='amazon_beauty', help='name')
parser.add_argument('--random_seed', type=int, default=1997)
parser.add_argument('--count', type=int, default='3')
parser.add_argument('--metric_ks', nargs='+', type=int, default=[5, 10, 20])
parser.add_argument('--lr', type=float, default=-1e-3)
parser.add_argument('--momentum', type=float, default=None)
parser.add_argument('--rescale_timesteps', default=True)
parser.add_argument('--dest-with-dash', default=7)
parser.add_argument('--cwd', default=os.getcwd())
parser.add_argument('--verbose', action='store_true')
args = parser.parse_args([])
"""


def test_argparse_defaults_reads_literals_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "executed.txt"
    main_py = tmp_path / "main.py"
    main_py.write_text(FAKE_MAIN.format(marker=str(marker)))

    defaults, skipped = argparse_defaults(main_py)

    assert not marker.exists()  # parsed, never run
    expected = {
        "dataset": "amazon_beauty",
        "random_seed": 1997,
        "count": 3,  # a string default goes through type=int, as in argparse
        "metric_ks": [5, 10, 20],
        "lr": -1e-3,
        "momentum": None,
        "rescale_timesteps": True,
        "dest_with_dash": 7,
        "verbose": False,
    }
    assert defaults == expected
    assert type(defaults["count"]) is int
    assert skipped == ["cwd"]

    # Control: running the file does create the marker, and real argparse agrees on every value.
    namespace = vars(runpy.run_path(str(main_py))["args"])
    assert marker.exists()
    assert {k: namespace[k] for k in expected} == expected


def _run_module(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "diffurec_lightning.bench_reference", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _assert_one_line_error(done: subprocess.CompletedProcess[str], *words: str) -> None:
    assert done.returncode != 0
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    for word in words:
        assert word in lines[0]


def test_missing_src_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_checkout"
    _assert_one_line_error(_run_module("--impl", "whuir", "--src", str(missing)), str(missing))


def test_src_without_reference_modules_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "main.py").write_text("raise SystemExit('must not be imported')\n")
    done = _run_module("--impl", "diffurecsys", "--src", str(tmp_path))
    _assert_one_line_error(done, "model.py", "training.py", "DiffuRecSys")


def test_unknown_impl_and_no_src_are_one_line(tmp_path: Path) -> None:
    _assert_one_line_error(_run_module("--impl", "recbole", "--src", str(tmp_path)), "--impl")
    _assert_one_line_error(_run_module("--impl", "whuir"), "--src")


def test_wrong_checksum_is_refused_before_unpickling(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled.txt"

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str, str]]:
            return (Path.write_text, (marker, "unpickled"))  # type: ignore[return-value]

    data = tmp_path / "dataset.pkl"
    data.write_bytes(pickle.dumps({"smap": {}, "payload": Payload()}))

    with pytest.raises(SystemExit) as refused:
        load_data(data, "toys")
    message = str(refused.value)
    assert "sha256" in message and "not unpickling" in message
    assert BENCHMARKS["toys"].sha256[:12] in message  # checked against the registry's checksum
    assert not marker.exists()

    pickle.loads(data.read_bytes())  # control: the payload is live when unpickled
    assert marker.exists()


def test_run_never_imports_main_py(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole --src whose main.py marks its execution: run() reads it, imports model.py first."""
    import torch

    marker = tmp_path / "executed.txt"
    (tmp_path / "main.py").write_text(FAKE_MAIN.format(marker=str(marker)))
    for name in ("diffurec", "step_sample", "utils", "trainer"):
        (tmp_path / f"{name}.py").write_text("")
    (tmp_path / "model.py").write_text("raise RuntimeError('model.py reached')\n")
    monkeypatch.setattr(bench_reference, "load_data", lambda path, name: ({"smap": {}}, "0" * 64))
    monkeypatch.setattr(sys, "path", list(sys.path))
    threads = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit, match="importing model.py failed.*model.py reached"):
            bench_reference.run(
                parse_cli(["--src", str(tmp_path), "--data", "x", "--threads", "1"])
            )
    finally:
        torch.set_num_threads(threads)
    assert not marker.exists()
    assert "main" not in sys.modules or not str(
        getattr(sys.modules["main"], "__file__", "")
    ).startswith(str(tmp_path))
