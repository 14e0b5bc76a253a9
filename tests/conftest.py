"""Shared fixtures and the order of the run: the tiny model family is built once per test run, in the background."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`tierline ...` as a user runs it: a real process, its own stdout/stderr/exit code."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "tierline", *args], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=timeout)


FAMILY_BUILD_TIMEOUT_S = 600
_family_build: list[subprocess.Popen] = []  # the build this process started, if it did


def _family_dir(config) -> Path:
    """Where this test run builds the tiny family: its base temporary folder, which xdist's workers share."""
    base = config._tmp_path_factory.getbasetemp()  # what the tmp_path_factory fixture gives out
    return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "tiny-family"


def _start_family_build(folder: Path) -> None:
    """`tierline models build --config tiny` into `folder`/models, in the background, unless this run (any of its
    workers) started it already; it writes its exit status to `folder`/rc when it ends."""
    from filelock import FileLock

    with FileLock(f"{folder}.lock"):
        if folder.exists():
            return
        folder.mkdir(parents=True)
        q = {k: shlex.quote(str(v)) for k, v in {"py": sys.executable, "out": folder / "models", "stdout": folder /
             "stdout", "log": folder / "build.log", "rc": folder / "rc"}.items()}
        script = (f"{q['py']} -m tierline models build --config tiny --out {q['out']} > {q['stdout']} 2> {q['log']}; "
                  f"echo $? > {q['rc']}.tmp; mv {q['rc']}.tmp {q['rc']}")
        _family_build.append(subprocess.Popen(["/bin/sh", "-c", script], cwd=ROOT, start_new_session=True,
                                              env={**os.environ, "PYTHONPATH": str(ROOT)}))


@pytest.hookimpl(trylast=True)  # after -k/-m and --lf have deselected what will not run
def pytest_collection_modifyitems(session, config, items):
    """The tiny family's build starts as soon as a test that will run needs it, in the background, and the modules
    that need no family run first meanwhile; the larger modules first in each group (xdist's workers are handed
    whole modules in this order: `make test` runs --dist loadfile --no-loadscope-reorder)."""
    modules: dict[str, list] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::")[0], []).append(item)
    needs = {m: any("tiny_family" in i.fixturenames for i in v) for m, v in modules.items()}
    items[:] = [i for m in sorted(modules, key=lambda m: (needs[m], -len(modules[m]))) for i in modules[m]]
    if any(needs.values()) and not config.option.collectonly:
        _start_family_build(_family_dir(config))


def pytest_sessionfinish(session, exitstatus):
    """The build this process started ends before it does: another worker may still wait for it; a run that was
    interrupted kills it."""
    for proc in _family_build:
        try:
            proc.wait(timeout=0 if exitstatus == pytest.ExitCode.INTERRUPTED else FAMILY_BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def tiny_family(request) -> Path:
    """The whole pipeline (train, distill, quantize, prune, export, evaluate) on the tiny config, built once per
    test run (started when the tests were collected; xdist's workers share it)."""
    folder = _family_dir(request.config)
    _start_family_build(folder)
    deadline = time.monotonic() + FAMILY_BUILD_TIMEOUT_S
    while not (folder / "rc").is_file():
        assert time.monotonic() < deadline, f"the tiny family was not built within {FAMILY_BUILD_TIMEOUT_S} s"
        time.sleep(0.2)
    assert (folder / "rc").read_text().strip() == "0", (folder / "build.log").read_text()[-3000:]
    assert json.loads((folder / "stdout").read_text().strip().splitlines()[-1])["family"] == "tiny"
    return folder / "models"


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


if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on a two-core machine: torch's threads in one spin-wait while the other works
    # (the tiers' own processes set their threads from their manifests)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


# every process this test run starts inherits this mark (xdist workers: one each), so that a check for
# processes left behind sees this run's own and not another worker's or another checkout's
RUN_MARK = f"TIERLINE_TEST_RUN={os.getpid()}"
os.environ["TIERLINE_TEST_RUN"] = str(os.getpid())


def processes_with(match) -> list[str]:
    """Pids of this test run's running processes (those started with its RUN_MARK in their environment) whose
    argv (a list of bytes) satisfies `match`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
            if not match(args) or RUN_MARK.encode() not in (cmdline.parent / "environ").read_bytes().split(b"\0"):
                continue
        except OSError:
            continue
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
