"""Packaging beyond what pyproject.toml can say: the folder -> package mapping and the generated gRPC code.

Each top-level folder of the repository is one package, installed under a name that says whose it
is (folder shared/ -> import tierline_shared), so no generic top-level name lands in site-packages.
Building the package also generates tierline/v1/ from proto/ (proto/generate.py), so a wheel or a
`pip install .` of a clean clone carries the code the SDK imports.
"""

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
FOLDERS = {  # import name -> folder
    "tierline": "tierline",
    "tierline_shared": "shared",
    "tierline_router": "router",
    "tierline_cloud_node": "cloud_node",
    "tierline_edge_node": "edge_node",
    "tierline_device_agent": "device_agent",
    "tierline_infra": "infra",
    "tierline_bench": "bench",
}


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


_generate_proto()  # before the package list is read: tierline/v1 must exist to be found
setup(
    package_dir=FOLDERS,
    packages=_packages(),
    package_data={"tierline_infra": ["manifests/*.yaml", "systemd/*", "*.md"], "tierline.v1": ["*.pyi"]},
    cmdclass={"build_py": BuildPy},
)
