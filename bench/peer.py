"""The peer: the same int8 ONNX edge model served by LitServe with its own batching.

`python -m tierline_bench.peer --models DIR --port P` runs it (one inference worker, the
same engine, thread count and batch settings as the edge tier); `--mode` picks LitServe's
dynamic batching (`batch`) or its continuous batching loop (`continuous`, a streamed reply
whose one line is the same JSON: bench/litserve_api.py). `PeerServer`
starts that process, waits for LitServe's /health and stops its whole process
group. `available()` says why it cannot run when litserve is not installed, so the
report can say so instead of inventing a number.
"""

from __future__ import annotations

import argparse
import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

READY_TIMEOUT_S = 90.0  # LitServe spawning its workers and loading the model, at most
HEALTH_TIMEOUT_S = 2.0  # one /health probe
MODES = ("batch", "continuous")


def available() -> str | None:
    """None when litserve can be imported, else the reason it cannot."""
    try:
        import litserve  # noqa: F401
    except ImportError as exc:
        return f"litserve is not installed ({exc}); install the dev extra (make setup)"
    return None


def serve(models_dir: str, port: int, threads: int, max_batch_size: int, batch_timeout_s: float,
          mode: str = "batch", engine_cpus: list[int] | None = None) -> None:
    """Run LitServe until killed; `batch_timeout_s` only applies to `batch` (continuous admits at every step).
    `engine_cpus`: its inference worker runs there and its HTTP server on the other CPUs, as the edge tier's
    engine core and serving process do with tiers.edge.engine_cpus."""
    import litserve as ls

    from tierline_bench.litserve_api import EdgeContinuousLitAPI, EdgeLitAPI
    from tierline_shared.runtime.affinity import leave

    engine_cpus = engine_cpus or []
    leave(engine_cpus)  # before LitServe starts its processes: they inherit it; the worker moves to engine_cpus
    if mode == "continuous":
        api = EdgeContinuousLitAPI(models_dir, threads, engine_cpus, max_batch_size=max_batch_size)
    else:
        api = EdgeLitAPI(models_dir, threads, engine_cpus, max_batch_size=max_batch_size,
                         batch_timeout=batch_timeout_s)
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1, timeout=60)
    server.run(host="127.0.0.1", port=port, num_api_servers=1, log_level="warning", generate_client_file=False)


def free_port() -> int:
    """A free loopback port (LitServe refuses port 0, so one is picked here)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PeerServer:
    """A LitServe process serving the edge model, stopped with its whole process group."""

    def __init__(self, models_dir: Path, workdir: Path, threads: int, max_batch_size: int, batch_timeout_s: float,
                 mode: str = "batch", engine_cpus: list[int] | None = None):
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {MODES}")
        self.models_dir, self.workdir = Path(models_dir), Path(workdir)
        self.threads, self.max_batch_size, self.batch_timeout_s = threads, max_batch_size, batch_timeout_s
        self.mode, self.engine_cpus = mode, list(engine_cpus or [])
        self.port = 0
        self.proc: subprocess.Popen | None = None

    def start(self) -> "PeerServer":
        self.port = free_port()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        log = open(self.workdir / "litserve.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tierline_bench.peer", "--models", str(self.models_dir.resolve()),
             "--port", str(self.port), "--threads", str(self.threads), "--max-batch-size", str(self.max_batch_size),
             "--batch-timeout", str(self.batch_timeout_s), "--mode", self.mode,
             "--engine-cpus", ",".join(map(str, self.engine_cpus))],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.workdir, start_new_session=True)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"LitServe exited with {self.proc.returncode}: "
                                   f"{(self.workdir / 'litserve.log').read_text()[-2000:]}")
            if self._healthy():
                return self
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"LitServe not ready in {READY_TIMEOUT_S} s")

    def _healthy(self) -> bool:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=HEALTH_TIMEOUT_S)
            conn.request("GET", "/health")
            ok = conn.getresponse().status == 200
            conn.close()
            return ok
        except OSError:
            return False

    def pause(self) -> None:
        """Freeze the whole process group (SIGSTOP) while other targets are measured: idle, LitServe's loops still
        poll (about a tenth of a core for both modes), which the measured target would pay for."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        from tierline_infra.supervisor import terminate  # SIGTERM to the process group, then SIGKILL

        self.resume()  # a stopped process would not act on SIGTERM
        terminate(self.proc)

    def __enter__(self) -> "PeerServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tierline_bench.peer", description="the edge model behind LitServe")
    parser.add_argument("--models", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--max-batch-size", type=int, required=True)
    parser.add_argument("--batch-timeout", type=float, required=True, help="seconds (batch mode)")
    parser.add_argument("--mode", choices=MODES, default="batch",
                        help="LitServe's dynamic batching or its continuous batching loop")
    parser.add_argument("--engine-cpus", default="", help="CPUs of its inference worker, e.g. 1 or 2,3 (none: any)")
    args = parser.parse_args(argv)
    serve(args.models, args.port, args.threads, args.max_batch_size, args.batch_timeout, args.mode,
          [int(c) for c in args.engine_cpus.split(",") if c])
    return 0


if __name__ == "__main__":
    sys.exit(main())
