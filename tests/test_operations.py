"""Operator commands under the conditions that used to trip them (issue 21, finding 7): one line and exit 2, no
traceback, no silent wait, no file written unasked."""

from __future__ import annotations

import os
import socket
import time

from tests.conftest import ROOT, run_cli
from tierline_infra.supervisor import NatsServer, write_manifest


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
