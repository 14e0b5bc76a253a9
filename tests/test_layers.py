"""The layers (pyproject.toml, [tool.importlinter]) hold, and an import that breaks them fails `make lint`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import ROOT

LINT = Path(sys.executable).parent / "lint-imports"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PACKAGES = PYPROJECT["tool"]["importlinter"]["root_packages"]
FOLDERS = PYPROJECT["tool"]["setuptools"]["package-dir"]  # import name -> folder


def lint(cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_contracts_are_kept():
    proc = lint(ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "0 broken" in proc.stdout


@pytest.fixture
def tree(tmp_path) -> Path:
    """Every package copied under its import name (shared/ -> tierline_shared/), found first on PYTHONPATH."""
    for name in PACKAGES:
        shutil.copytree(ROOT / FOLDERS[name], tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "*.png"))
    return tmp_path


@pytest.mark.parametrize("where, line, broken", [
    ("tierline_shared/serving/probe.py", "from tierline_router.policy import Policy\n",
     "tierline_shared is not allowed to import tierline_router"),
    ("tierline_edge_node/probe.py", "import tierline_cloud_node.engine\n",
     "tierline_edge_node is not allowed to import tierline_cloud_node"),
    ("tierline/client_probe.py", "import numpy\n", None),  # not the SDK module: allowed
    ("tierline_device_agent/probe.py", "from tierline_shared.models.llama import Decoder\n",
     "tierline_device_agent is not allowed to import torch"),  # the model needs torch; its config does not
    ("tierline_router/probe.py", "from tierline_infra import supervisor\n",
     "tierline_router is not allowed to import tierline_infra"),
])
def test_an_import_against_the_layers_fails(tree, where, line, broken):
    (tree / where).write_text(line)
    proc = lint(tree, env={**os.environ, "PYTHONPATH": str(tree)})
    if broken is None:
        assert proc.returncode == 0, proc.stdout[-3000:]
    else:
        assert proc.returncode != 0 and broken in proc.stdout, proc.stdout[-3000:]


def test_the_sdk_may_not_grow_heavy(tree):
    client = tree / "tierline" / "client.py"
    client.write_text(client.read_text() + "\nimport numpy  # noqa\n")
    proc = lint(tree, env={**os.environ, "PYTHONPATH": str(tree)})
    assert proc.returncode != 0 and "tierline.client is not allowed to import numpy" in proc.stdout, proc.stdout
