"""What `tierline up` leaves in runs/ while it runs, so other commands find the platform it started.

`runs/up.pid` holds its pid (`make down` signals it) and `runs/up.json` the manifest its processes
run with: `tierline keys` opens that manifest's key store, the one the running router reads (the
platform's manifest is written in a fresh working directory, with its own key store, at every start).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

PIDFILE = Path("runs/up.pid")  # relative to where `tierline up` / `make up` runs


def state_file(pidfile: Path) -> Path:
    return pidfile.with_suffix(".json")


def alive(pidfile: Path) -> int | None:
    """The pid in `pidfile` if that process is alive (a stale file, from a process that died, says nothing)."""
    try:
        pid = int(pidfile.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def record(pidfile: Path, manifest: Path) -> None:
    """Written once the platform is up; OSError when it cannot be (the caller stops what it started)."""
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    pidfile.write_text(str(os.getpid()))
    state_file(pidfile).write_text(json.dumps({"pid": os.getpid(), "manifest": str(Path(manifest).resolve())}))


def forget(pidfile: Path) -> None:
    """Remove what `record` wrote (a path that is not a file, such as a directory named as the pidfile, is not
    ours)."""
    for path in (pidfile, state_file(pidfile)):
        if not path.is_dir():
            path.unlink(missing_ok=True)


def running_manifest(pidfile: Path = PIDFILE) -> Path | None:
    """The manifest of the platform `tierline up` runs now (None: none is up, or it left no state)."""
    if alive(pidfile) is None:
        return None
    try:
        return Path(json.loads(state_file(pidfile).read_text())["manifest"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
