"""Operator commands under the conditions that used to trip them (issue 21, finding 7): one line and exit 2, no
traceback, no silent wait, no file written unasked."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli
from tierline_infra.nats_topology import free_ports
from tierline_infra.supervisor import NatsServer, terminate, write_manifest


def one_line_error(proc, *needles) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err


def test_a_second_up_refuses_while_one_is_running(tmp_path):
    pidfile = tmp_path / "up.pid"
    pidfile.write_text(str(os.getpid()))  # a live process holds the file: this test's own
    one_line_error(run_cli("up", "--pidfile", str(pidfile), timeout=60), "already up", str(os.getpid()), "make down")
    assert pidfile.read_text() == str(os.getpid())  # not overwritten


def test_devices_list_without_nats_or_without_jetstream_is_one_line(tiny_family, tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    nobody = NatsServer(tmp_path)
    nobody.port = closed
    manifest = write_manifest(tmp_path / "no-nats.yaml", tiny_family, nobody)
    t0 = time.monotonic()
    one_line_error(run_cli("devices", "list", "--manifest", str(manifest), timeout=60), "cannot connect to NATS")
    assert time.monotonic() - t0 < 8  # the connect timeout (2 s) and a process start, not 10 s of silence
    plain = NatsServer(tmp_path, jetstream=False).start()
    try:
        manifest = write_manifest(tmp_path / "no-js.yaml", tiny_family, plain)
        one_line_error(run_cli("devices", "list", "--manifest", str(manifest), timeout=60), "has no JetStream")
    finally:
        plain.stop()


def test_route_eval_writes_the_docs_only_when_asked(tiny_family):
    docs = ROOT / "docs" / "routing"
    before = {p.name: p.stat().st_mtime_ns for p in docs.iterdir()}
    proc = run_cli("route", "eval", "--models", str(tiny_family), "--n", "20", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {p.name: p.stat().st_mtime_ns for p in docs.iterdir()} == before


def test_up_takes_the_manifests_ports_gives_each_replica_its_own_and_refuses_a_second_stack(tiny_family, tmp_path):
    """Issue 25: a second edge on the same manifest used to share its gRPC port silently (SO_REUSEPORT) and
    crash on its metrics port; now replicas beyond the first get free ports of their own, every endpoint is
    listed, and a second stack on the same fixed ports stops at once with the port named."""
    from tierline.demo import endpoints
    from tierline_infra.supervisor import Stack

    manifest, (edge_grpc, edge_metrics, router_grpc, router_http, nats_port) = _ops_manifest(tmp_path)
    with Stack(tiny_family, tiers=("edge",), replicas={"edge": 2}, ports_from=manifest,
               overrides={"router.confidence_threshold": {"edge": 0.0}}) as s:
        rows = {r["process"]: r for r in endpoints(s)}
        assert set(rows) == {"edge-0", "edge-1", "router"}
        assert rows["edge-0"]["grpc"] == f"127.0.0.1:{edge_grpc}"
        assert rows["edge-0"]["metrics"] == f"http://127.0.0.1:{edge_metrics}/metrics"
        assert rows["edge-1"]["grpc"] != rows["edge-0"]["grpc"]
        assert rows["edge-1"]["metrics"] not in ("-", rows["edge-0"]["metrics"])
        assert rows["router"]["grpc"] == f"127.0.0.1:{router_grpc}"
        assert rows["router"]["http"] == f"http://127.0.0.1:{router_http}/v1"
        assert s.nats.port == nats_port
        second = Stack(tiny_family, tiers=("edge",), router=False, secure=False,
                       overrides={"tiers.edge.grpc_port": edge_grpc, "tiers.edge.metrics_port": 0})
        try:
            second.start()
            raise AssertionError("a second edge started on a port in use")
        except RuntimeError as exc:
            assert "exited with 2" in str(exc) and "grpc_port" in str(exc), exc
        finally:
            second.stop()


def test_up_replicas_must_name_tiers_and_counts(tmp_path):
    one_line_error(run_cli("up", "--replicas", "gpu=2", "--pidfile", str(tmp_path / "p"), timeout=60),
                   "--replicas", "gpu=2")


def _ops_manifest(tmp_path):
    """A manifest with fixed, free ports for nats-server, the edge and the router (what `up --manifest` takes)."""
    import yaml

    edge_grpc, edge_metrics, router_grpc, router_http, nats_port = ports = free_ports(5)
    manifest = tmp_path / "ops.yaml"
    manifest.write_text(yaml.safe_dump({
        "model_name": "m", "models_dir": ".", "nats": {"url": f"nats://127.0.0.1:{nats_port}"},
        "tiers": {"edge": {"artifact": "x", "sha256": "0" * 64, "grpc_port": edge_grpc, "metrics_port": edge_metrics}},
        "router": {"grpc_port": router_grpc, "http_port": router_http, "metrics_port": 0}}))
    return manifest, ports


def _all_free(ports) -> bool:
    """Nothing listens on any of `ports` (what `up` started is gone)."""
    for port in ports:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # closed connections' TIME_WAIT is not a listener
            try:
                s.bind(("127.0.0.1", port))
                s.listen()
            except OSError:
                return False
    return True


def test_up_that_cannot_write_its_pidfile_stops_the_platform(tiny_family, tmp_path):
    """Found by a fault hunt: a pidfile `up` could not write (here a directory) raised after the platform had
    started, outside the block that stops it: a traceback, and nats-server and every tier left running on the
    manifest's ports."""
    manifest, ports = _ops_manifest(tmp_path)
    taken = tmp_path / "a-directory"
    taken.mkdir()
    one_line_error(run_cli("up", "--models", str(tiny_family), "--manifest", str(manifest), "--pidfile", str(taken),
                           timeout=180), "--pidfile", str(taken), "stopped")
    deadline = time.monotonic() + 30
    while not _all_free(ports) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _all_free(ports)
    assert taken.is_dir() and not (tmp_path / "a-directory.json").exists()


@pytest.mark.parametrize("held, child, field", [(0, "edge-0", "grpc_port"), (1, "edge-0", "tiers.edge.grpc_host / "
                                                                                "metrics_port"),
                                                (3, "router", "router.grpc_host / router.http_port")])
def test_up_with_a_port_in_use_is_one_line_naming_it(tiny_family, tmp_path, held, child, field):
    """Found by a fault hunt: a child that could not start (its port held by another process) made `up` print a
    traceback whose message pointed at a log the stopped stack had already deleted; now one line, the child's.
    A second hunt: a tier's metrics port or the router's HTTP port in use ended its process with a traceback
    (exit 1; `up` printed "OSError: [Errno 98] Address already in use" or an unawaited coroutine's warning, no port
    named); now they are refused as a gRPC port is, naming the field."""
    manifest, ports = _ops_manifest(tmp_path)
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", ports[held]))
        holder.listen()
        one_line_error(run_cli("up", "--models", str(tiny_family), "--manifest", str(manifest), "--pidfile",
                               str(tmp_path / "up.pid"), timeout=180), "did not start", child, field)
    assert not (tmp_path / "up.pid").exists()


def test_creds_init_into_a_file_is_one_line(tmp_path):
    """A fault hunt: `creds init --out` naming an existing file raised FileExistsError (a traceback)."""
    taken = tmp_path / "a-file"
    taken.write_text("mine")
    one_line_error(run_cli("creds", "init", "--out", str(taken), timeout=60), "--out", str(taken), "not a directory")
    assert taken.read_text() == "mine"


def test_a_key_given_twice_in_a_manifest_is_one_line_naming_it_before_any_work(tmp_path):
    """Found by a fault hunt: a manifest with two `router:` sections loaded (PyYAML keeps the last one, silently:
    the first's cloud_complexity was dropped), and `tierline route calibrate` ran every tier before its YAML writer
    refused the file with a 42-line traceback, leaving the manifest unchanged. Now any load of it says which key is
    given twice, on which line; the calibration refuses it before it starts."""
    from tierline_shared.config.manifest import ManifestError, load_manifest

    manifest = tmp_path / "dup.yaml"
    manifest.write_text("model_name: m\nrouter:\n  cloud_complexity: 0.3\nnats:\n  url: nats://127.0.0.1:4222\n"
                        "router:\n  device_complexity: 0.2\n")
    with pytest.raises(ManifestError, match=r"line 6: router: given twice"):
        load_manifest(manifest)
    nested = tmp_path / "nested.yaml"
    nested.write_text("model_name: m\nrouter:\n  cloud_complexity: 0.3\n  cloud_complexity: 0.9\n")
    with pytest.raises(ManifestError, match=r"line 4: cloud_complexity: given twice"):
        load_manifest(nested)
    t0 = time.monotonic()
    one_line_error(run_cli("route", "calibrate", "--target-edge-share", "0.9", "--n", "30", "--manifest",
                           str(manifest), timeout=120), str(manifest), "router: given twice")
    assert time.monotonic() - t0 < 60  # refused up front, not after running the tiers


def _descendants(pid: int) -> set[int]:
    """Every live process below `pid` (children, theirs, ...), from /proc."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":
            parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        found.update(kids)
        todo.extend(kids)
    return found


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").strip()
    except OSError:  # gone meanwhile
        return b""


def _running(pids) -> set[int]:
    """Those of `pids` still running (a zombie waiting for its reaper has stopped)."""
    alive = set()
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                alive.add(pid)
        except (OSError, IndexError):
            pass
    return alive


def test_up_killed_outright_leaves_no_process_behind(tiny_family, tmp_path):
    """`tierline up` SIGKILLed (the OOM killer, kill -9) could not stop what it started: nats-server, the tiers and
    the router ran on as orphans on their ports, out of reach of `make down`, and a second `up` started beside
    them. Now each Python child watches the supervisor and stops as on SIGTERM once it is gone, and nats-server
    runs under `setpriv --pdeathsig TERM`: all of them, and what they started, are gone within seconds."""
    manifest, ports = _ops_manifest(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tierline", "up", "--models", str(tiny_family), "--manifest",
                             str(manifest), "--pidfile", str(tmp_path / "up.pid")], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    children: set[int] = set()
    try:
        out, deadline = [], time.monotonic() + 180
        while time.monotonic() < deadline and not any("Stop with Ctrl-C" in line for line in out):
            line = proc.stdout.readline()
            if not line:
                break
            out.append(line)
        assert any("Stop with Ctrl-C" in line for line in out), "".join(out)[-3000:]
        assert not _all_free(ports)
        children = _descendants(proc.pid)
        names = {_cmdline(pid).split(b" ")[0].rsplit(b"/", 1)[-1] for pid in children}
        assert b"nats-server" in names and len(children) >= 5, names  # nats-server, 3 tiers, the router
        os.kill(proc.pid, signal.SIGKILL)  # the supervisor only: its children are in process groups of their own
        proc.wait(timeout=10)
        deadline = time.monotonic() + 15
        while (_running(children) or not _all_free(ports)) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = {pid: _cmdline(pid)[:160] for pid in _running(children)}
        assert not left, f"still running 15 s after the supervisor was killed: {left}"
        assert _all_free(ports)
    finally:
        terminate(proc, timeout_s=60)
        for pid in _running(children):  # what a failure left behind
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(OSError, ValueError, KeyError):  # the working folder the killed `up` left behind
            workdir = Path(json.loads((tmp_path / "up.json").read_text())["manifest"]).parent
            if workdir.name.startswith("tierline-"):
                shutil.rmtree(workdir, ignore_errors=True)


def test_a_child_whose_supervisor_is_already_gone_does_not_start(tmp_path):
    """The supervisor may die before its child looks (SIGKILLed while the child imports): the child exits at once,
    one line, instead of loading and serving as an orphan."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TIERLINE_SUPERVISOR_PID": str(dead.pid)}
    proc = subprocess.run([sys.executable, "-m", "tierline_router", "--manifest", str(tmp_path / "none.yaml")],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert proc.stderr.strip() == f"router: the supervisor (pid {dead.pid}) is gone: not starting", proc.stderr


def test_a_router_whose_nats_server_went_first_still_stops_cleanly(tiny_family):
    """Found with the supervisor's watchdog (a killed `tierline up`: nats-server and the router get SIGTERM at
    once): the router's NATS drain raised (ConnectionReconnectingError) out of its stop, so the key store was
    never closed after its settles, its metrics server never stopped, and it ended in a traceback, exit 1. Now
    the drain's failure is one line and the rest of the stop runs: exit 0."""
    from tierline_infra.supervisor import Stack

    with Stack(tiny_family, tiers=("edge",), auth=True) as s:
        s.nats.stop()
        router = next(p for p in s.procs if p.name == "router")
        time.sleep(0.5)  # the router has seen its connection go
        s.kill("router", signal.SIGTERM)
        log = (s.workdir / "router.log").read_text()
        assert router.popen.returncode == 0, log[-2000:]
        assert "Traceback" not in log and "router: warning: NATS drain at stop" in log, log[-2000:]
