"""Shared fixtures: the tiny model family is built once per test session."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`tierline ...` as a user runs it: a real process, its own stdout/stderr/exit code."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "tierline", *args], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=timeout)


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory) -> Path:
    """The whole pipeline (train, distill, quantize, prune, export, evaluate) on the tiny config."""
    out = tmp_path_factory.mktemp("tiny") / "models"
    proc = run_cli("models", "build", "--config", "tiny", "--out", str(out), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["family"] == "tiny"
    (out.parent / "build.log").write_text(proc.stderr)
    return out


COMMITTED_MODELS = ROOT / "models"


@pytest.fixture(scope="session")
def committed_calib_labels() -> tuple[list[str], dict[str, list[bool]]]:
    """600 calib prompts and whether the committed device and edge models answer them (labelled once).

    The edge is right on about 94% of them: 600 leave some 9 wrong answers in the scorer's held-out quarter
    (300 left about 5, too few for a stable AUC).
    """
    from tierline.build.scorer import collect_labels

    return collect_labels(COMMITTED_MODELS, 600, seed=0)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: one torch thread is faster, and on a busy 2-core CPU several threads spin-wait."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def new_key(stack, plan: str) -> tuple[str, str]:
    """(key id, raw key) of a fresh API key on a running stack's store, made through the CLI."""
    proc = run_cli("keys", "create", "--plan", plan, "--manifest", str(stack.manifest), "--json", timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    return out["id"], out["key"]


class Scrape:
    """What one process's /metrics served, parsed as Prometheus does."""

    def __init__(self, text: str):
        from prometheus_client.parser import text_string_to_metric_families

        self.text = text
        self.samples = [s for family in text_string_to_metric_families(text) for s in family.samples]

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples called `name` whose labels include `labels` (0 when there are none)."""
        return sum(s.value for s in self.samples if s.name == name and labels.items() <= s.labels.items())

    def names(self) -> set[str]:
        return {s.name for s in self.samples}


def scrape(stack, process: str, timeout: float = 10) -> Scrape:
    """One of a running stack's processes' /metrics now (`process`: "router", "edge-0", ...)."""
    import urllib.request

    port = next(p.ready["metrics_port"] for p in stack.procs if p.name == process)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as resp:
        return Scrape(resp.read().decode())


def processes_with(match) -> list[str]:
    """Pids of the running processes whose argv (a list of bytes) satisfies `match`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if match(args):
            found.append(cmdline.parent.name)
    return found


def tiny_decoder(seed: int, **over):
    """A tiny randomly initialised Llama-family decoder over the shared tokenizer (4 query heads on 2 KV heads,
    context 64); `over`: DecoderConfig fields to change."""
    import torch

    from tierline_shared.models.configs import DecoderConfig
    from tierline_shared.models.llama import Decoder
    from tierline_shared.models.tokenizer import TextTokenizer

    cfg = dict(vocab_size=TextTokenizer.default().vocab_size, hidden_size=32, intermediate_size=64,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
               max_position_embeddings=64)
    torch.manual_seed(seed)
    return Decoder(DecoderConfig(**(cfg | over))).eval()


def random_torch_engine(seed: int, tier: str = "cloud"):
    """A tiny randomly initialised model behind the torch engine: the decoding loop without training."""
    from tierline_cloud_node.engine import TorchEngine
    from tierline_shared.models.tokenizer import TextTokenizer
    from tierline_shared.runtime.engine import EngineInfo

    model = tiny_decoder(seed)
    return TorchEngine(model, TextTokenizer.default(), EngineInfo(tier, "t", "0", model.num_params(), 0, 64, 64))
