"""The cloud tier's peer: `transformers serve`, the OpenAI-compatible server that ships with transformers.

It serves the cloud checkpoint directory as it is (the family's cloud tier is a Hugging Face checkpoint), on the
CPU, once as it comes and once with `--continuous-batching`. `TransformersServe` starts the process on a free
port, waits for its /health and stops its whole process group; `OpenAIClient` sends the bench's load to its
/v1/completions (greedy: temperature 0), whole answers and streamed first tokens. `available()` says why it
cannot run (a cloud config.json Tierline does not serve, or the serving extra missing), so the report says so
instead of inventing a number.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tierline_bench.load import HttpClient, Outcome
from tierline_bench.peer import free_port
from tierline_shared.models.configs import read_config

READY_TIMEOUT_S = 120.0  # the server starting and loading the checkpoint, at most
CB_NUM_BLOCKS = 128  # --continuous-batching's KV pages (256 tokens each): 32,768 tokens, far more than the bench's
# load holds at once; without it the server sizes its cache from the machine's memory and takes ~15 s more to start
HEALTH_TIMEOUT_S = 2.0  # one /health probe


def cloud_checkpoint(models_dir: Path) -> Path:
    return Path(models_dir) / "cloud"


def available(models_dir: Path) -> str | None:
    """None when `transformers serve` can serve the family's cloud checkpoint, else the reason it cannot."""
    config = cloud_checkpoint(models_dir) / "config.json"
    try:
        read_config(config)
    except OSError as exc:
        return f"{config}: unreadable ({exc})"
    except ValueError as exc:  # names the file and what is wrong (an old pre-Llama family: rebuild it)
        return str(exc)
    for module in ("fastapi", "uvicorn", "accelerate"):
        try:
            __import__(module)
        except ImportError:
            return f"transformers serve needs {module} (its serving extra; the dev extra installs it)"
    return None


class TransformersServe:
    """One `transformers serve` process for the cloud checkpoint, stopped with its whole process group."""

    def __init__(self, models_dir: Path, workdir: Path, threads: int, continuous_batching: bool = False):
        self.checkpoint = cloud_checkpoint(models_dir).resolve()
        self.workdir, self.threads, self.continuous_batching = Path(workdir), threads, continuous_batching
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def name(self) -> str:
        return "transformers_serve_cb" if self.continuous_batching else "transformers_serve"

    def start(self) -> "TransformersServe":
        return self.launch().wait_ready()

    def launch(self) -> "TransformersServe":
        """Start the process and return at once (`wait_ready` waits for it): several start side by side."""
        self.port = free_port()
        exe = Path(sys.executable).with_name("transformers")
        cmd = [str(exe), "serve", str(self.checkpoint), "--host", "127.0.0.1", "--port", str(self.port),
               "--device", "cpu", "--dtype", "float32", "--log-level", "warning",
               *(["--continuous-batching", "--cb-num-blocks", str(CB_NUM_BLOCKS)] if self.continuous_batching
                 else ["--no-continuous-batching"])]
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_VERBOSITY": "error"}
        log = open(self.workdir / f"{self.name}.log", "w")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        return self

    def wait_ready(self) -> "TransformersServe":
        """Wait for /health; raises (and stops the process) when it exits or does not answer in time."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited with {self.proc.returncode}; see {self.workdir / (self.name + '.log')}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=HEALTH_TIMEOUT_S)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"no /health within {READY_TIMEOUT_S:.0f} s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)

    def __enter__(self) -> "TransformersServe":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class OpenAIClient(HttpClient):
    """An OpenAI-compatible /v1/completions endpoint, greedy; one keep-alive connection per client thread."""

    def __init__(self, port: int, model: str, max_tokens: int, label: str, host: str = "127.0.0.1"):
        super().__init__(host, port, max_tokens, path="/v1/completions")
        self.model, self.label = model, label

    def _body(self, prompt: str, stream: bool) -> dict:
        return {"model": self.model, "prompt": prompt, "max_tokens": self.max_tokens, "temperature": 0,
                "stream": stream}

    def infer(self, prompt: str) -> Outcome:
        reply = self.post(self._body(prompt, stream=False), time.perf_counter())
        if isinstance(reply, Outcome):
            return reply
        latency, out = reply
        usage = out.get("usage") or {}
        return Outcome(latency, tier=self.label, prompt_tokens=usage.get("prompt_tokens", 0),
                       completion_tokens=usage.get("completion_tokens", 0), text=out["choices"][0]["text"])

    def first_token(self, prompt: str) -> Outcome:
        """Time to the first streamed chunk with text; the rest is read and dropped (the connection is reused)."""
        t0 = time.perf_counter()
        try:
            conn = self._conn()
            conn.request("POST", self.path, json.dumps(self._body(prompt, stream=True)),
                         {"Content-Type": "application/json"})
            resp = conn.getresponse()
            first = None
            while line := resp.readline():
                if first is None and line.startswith(b"data: {") and b'"text"' in line:
                    first = time.perf_counter() - t0
        except (OSError, http.client.HTTPException) as exc:
            self._local.conn = None
            return Outcome(time.perf_counter() - t0, ok=False, error=f"{type(exc).__name__}: {exc}")
        if resp.status != 200 or first is None:
            return Outcome(time.perf_counter() - t0, ok=False, error=f"HTTP {resp.status}: no text chunk")
        return Outcome(first, tier=self.label)
