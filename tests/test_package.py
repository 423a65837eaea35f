"""The package finds its configs both in a checkout and installed (a wheel ships conf/ inside
it); .ci/install-check then runs the commands of a real non-editable install."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffurec_lightning.config import CONF_DIR, find_conf_dir

REPO = Path(__file__).resolve().parents[1]


def test_a_checkout_reads_its_top_level_conf() -> None:
    assert CONF_DIR == REPO / "conf"
    assert find_conf_dir(REPO / "diffurec_lightning") == REPO / "conf"


def test_an_installed_package_reads_the_conf_it_ships(tmp_path: Path) -> None:
    site = tmp_path / "site-packages"
    package = site / "diffurec_lightning"
    (package / "conf").mkdir(parents=True)
    (package / "conf" / "train.yaml").write_text("seed: 0\n")
    (site / "conf").mkdir()  # some other distribution's folder beside it: never ours
    assert find_conf_dir(package) == package / "conf"


def test_every_console_script_names_a_function() -> None:
    import importlib

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"diffurec-train", "diffurec-eval", "diffurec-prepare", "diffurec-report"} <= set(
        scripts
    )
    for name, target in scripts.items():
        module, _, function = target.partition(":")
        assert callable(getattr(importlib.import_module(module), function)), name
