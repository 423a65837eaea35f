"""Build hook: ship the top-level conf/ inside the package (everything else is pyproject.toml).

conf/ stays at the top of the repository, where Hydra users expect it and where a checkout's
commands read it (diffurec_lightning/config.py). A wheel has no such place, so the build copies
conf/ to diffurec_lightning/conf/, which config.CONF_DIR finds in an installed package.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithConf(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return  # an editable install reads conf/ of the checkout itself
        for source in sorted(Path("conf").rglob("*.yaml")):
            target = Path(self.build_lib, "diffurec_lightning", source)
            self.mkpath(str(target.parent))
            self.copy_file(str(source), str(target))


setup(cmdclass={"build_py": BuildPyWithConf})
