"""A wheel carries the YAML configs as package data (toolkit/_configs); a checkout and an
editable install read configs/ next to toolkit/ (toolkit.planner.paths)."""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithConfigs(build_py):
    def run(self):
        super().run()
        target = Path(self.build_lib) / "toolkit" / "_configs"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(Path(__file__).resolve().parent / "configs", target)


setup(cmdclass={"build_py": BuildPyWithConfigs})
