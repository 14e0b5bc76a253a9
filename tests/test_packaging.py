"""Tierline as a user installs it: a wheel built from the tracked files alone (as a clean clone has them), and a
fresh virtualenv with only the client (`pip install tierline`) calling a running platform."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tierline_infra.supervisor import Stack

HEAVY = {"torch", "onnxruntime", "ai-edge-litert", "numpy", "nats-py", "tokenizers", "pyyaml", "onnx"}
PIP_TIMEOUT_S = 600


def _run(*argv, timeout: float = PIP_TIMEOUT_S, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout, **kw)
    assert proc.returncode == 0, f"{argv}: {proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """`pip wheel .` of the files git would give a clean clone (no generated code, no models)."""
    base = tmp_path_factory.mktemp("package")
    files = _run("git", "ls-files", "--cached", "--others", "--exclude-standard", cwd=ROOT).stdout.split()
    src = base / "src"
    with tarfile.open(base / "src.tar", "w") as tar:
        for f in files:
            if not f.startswith(("models/", "docs/", "tests/")) and (ROOT / f).is_file():
                tar.add(ROOT / f, arcname=f)
    with tarfile.open(base / "src.tar") as tar:
        tar.extractall(src, filter="data")
    assert not list(src.glob("proto/**/*_pb2.py"))
    # with build isolation, as a user's `pip install .` builds it
    _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", base / "dist", src)
    [whl] = (base / "dist").glob("tierline-*.whl")
    return whl


def test_the_wheel_has_the_generated_code_and_no_generic_top_level_names(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {"tierline_api/v1/inference_pb2.py", "tierline_api/v1/inference_pb2_grpc.py"} <= set(names)
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"tierline_api", "tierline", "tierline_shared", "tierline_router", "tierline_cloud_node",
                    "tierline_edge_node", "tierline_device_agent", "tierline_infra", "tierline_bench"}
    assert "tierline_infra/systemd/tierline-device.service" in names  # what a board's install points at


@pytest.fixture(scope="module")
def client_venv(wheel, tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("client") / "venv"
    _run(sys.executable, "-m", "venv", venv)
    _run(venv / "bin" / "python", "-m", "pip", "install", "-q", wheel)
    return venv


def test_a_client_install_pulls_grpc_and_protobuf_only(client_venv):
    listed = json.loads(_run(client_venv / "bin" / "python", "-m", "pip", "list", "--format", "json").stdout)
    installed = {p["name"].lower() for p in listed}
    assert {"tierline", "grpcio", "protobuf"} <= installed
    assert not installed & HEAVY, installed & HEAVY


def test_the_client_alone_talks_to_a_running_platform(client_venv, tiny_family):
    with Stack(tiny_family, tiers=("edge",), auth=True,
               overrides={"router.device_complexity": 0.0, "router.cloud_complexity": 1.0,
                          "router.confidence_threshold": {"edge": 0.0}}) as stack:
        script = ("import sys\nfrom tierline import InferenceClient\n"
                  "c = InferenceClient(api_key=sys.argv[1], model_name='tierline-reasoner', endpoint=sys.argv[2])\n"
                  "r = c.infer('Q:2+3=?\\nA:', {'temperature': 0.3, 'max_tokens': 8, 'attention_window': 32})\n"
                  "print(r.tier, r.usage.completion_tokens, r.choices[0].finish_reason, repr(r.choices[0].text))\n")
        out = _run(client_venv / "bin" / "python", "-c", script, stack.api_key, f"{stack.router_address}/v1",
                   timeout=120, cwd=client_venv)  # not from the repository: only what is installed
        tier, tokens, finish, _ = out.stdout.split(" ", 3)
        # a whole answer; sampled (temperature 0.3), the tiny model may end it at once: 0 tokens, "stop"
        assert tier == "edge" and int(tokens) >= 0 and finish in ("stop", "length"), out.stdout
        assert finish == "stop" or int(tokens) == 8, out.stdout
        common = ("--endpoint", stack.router_address, "--api-key", stack.api_key)
        cli = client_venv / "bin" / "tierline"
        answer = json.loads(_run(cli, "infer", "2+3=?", *common, "--max-tokens", "8", "--json", timeout=120,
                                 cwd=client_venv).stdout)
        assert answer["tier"] == "edge"
        assert "traffic share" in _run(cli, "status", *common, timeout=120, cwd=client_venv).stdout
        refused = subprocess.run([str(cli), "models", "eval", "--tier", "edge"], capture_output=True, text=True,
                                 timeout=120, cwd=client_venv)
        assert refused.returncode == 2 and "pip install 'tierline[build]'" in refused.stderr, refused.stderr
