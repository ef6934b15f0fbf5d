"""Build hook: the top-level ``catalogs/`` folder (the source of truth, edited in the
checkout) is copied into the wheel as ``stimage_embed/catalogs``, where
:func:`stimage_embed.paths.catalogs_dir` finds it in an installed (non-editable) package.
Everything else is declared in pyproject.toml."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithCatalogs(build_py):
    """``build_py`` that also copies ``catalogs/`` into the built package."""

    def run(self):
        super().run()
        source = Path(__file__).parent / "catalogs"
        target = Path(self.build_lib) / "stimage_embed" / "catalogs"
        shutil.copytree(source, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))


setup(cmdclass={"build_py": BuildPyWithCatalogs})
