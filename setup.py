"""Packaging beyond what pyproject.toml can say: every subpackage of the mapped folders, the generated code.

Each top-level folder of the repository is one package, installed under a name that says whose it
is (folder shared/ -> import tierline_shared; the mapping is [tool.setuptools.package-dir] in
pyproject.toml), so no generic top-level name lands in site-packages.
Building the package also generates the wire contract's code beside proto/tierline_api/v1/*.proto
(proto/generate.py; the package tierline_api), so a wheel or a `pip install .` of a clean clone
carries the code the SDK imports.
"""

import importlib.util
import tomllib
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
FOLDERS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]


def _generate_proto() -> None:
    spec = importlib.util.spec_from_file_location("proto_generate", ROOT / "proto" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.generate()


def _packages() -> list[str]:
    """Every folder with an __init__.py under the mapped folders, by its import name."""
    found = []
    for name, folder in FOLDERS.items():
        for init in sorted((ROOT / folder).rglob("__init__.py")):
            rel = init.parent.relative_to(ROOT / folder)
            found.append(".".join([name, *rel.parts]))
    return found


class BuildPy(build_py):
    def run(self):
        _generate_proto()
        super().run()


_generate_proto()  # before the package list is read: its __init__.py files must exist to be found
setup(
    packages=_packages(),
    package_data={"tierline_infra": ["manifests/*.yaml", "systemd/*", "*.md"], "tierline_api.v1": ["*.pyi", "*.proto"]},
    cmdclass={"build_py": BuildPy},
)
