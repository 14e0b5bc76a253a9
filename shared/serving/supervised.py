"""A child of the supervisor (`tierline up`, infra/supervisor.py: `Stack`) stops when the supervisor is gone.

The supervisor stops its children itself (SIGTERM, then SIGKILL); killed outright (the OOM killer, kill -9) it
cannot, and they would run on as orphans on their ports, out of reach of `make down`. So it passes its pid in
SUPERVISOR_PID_ENV, and every Python process it starts (each tier's `run`, the router's `main`) calls
`exit_with_supervisor` first: a daemon thread watches the parent and, once it has gone, sends this process the
SIGTERM the supervisor would have sent (the process stops as it does on SIGTERM: its requests in flight get
their grace), and ends it outright `backstop_s` later if it has not stopped by then (the supervisor's SIGKILL).
Nothing runs between fork and exec in the supervisor (no preexec_fn: a fork of a threaded process may crash
there), which is why this is the child's own job. A process started without the variable watches nothing.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

SUPERVISOR_PID_ENV = "TIERLINE_SUPERVISOR_PID"
POLL_S = 0.5  # how often the parent is looked at
# past a tier's grace (the router has none): as long as the supervisor waits for a stopping child before its SIGKILL
# (infra/supervisor.py: Proc.stop_timeout_s)
BACKSTOP_S = 10.0


def supervisor_env(env: dict | None = None) -> dict:
    """`env` (default: this process's environment) for a child this process supervises."""
    return {**(os.environ if env is None else env), SUPERVISOR_PID_ENV: str(os.getpid())}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def exit_with_supervisor(name: str, backstop_s: float) -> None:
    """Watch the supervisor named in SUPERVISOR_PID_ENV (none named: nothing to do). Already gone: exit now (1).
    Gone later: SIGTERM to this process, and `os._exit(1)` if it is still running `backstop_s` after that.

    The variable is taken out of this process's environment, so that a process this one starts does not take
    this one's parent for its own."""
    raw = os.environ.pop(SUPERVISOR_PID_ENV, "")
    if not raw.strip():
        return
    try:
        pid = int(raw)
    except ValueError:
        print(f"{name}: warning: {SUPERVISOR_PID_ENV}={raw!r} is not a pid: not watching the supervisor",
              file=sys.stderr, flush=True)
        return
    if os.getppid() == pid:  # its child, as a rule: the parent changes when it dies (a pid may be reused)
        def gone() -> bool:
            return os.getppid() != pid
    else:  # started through another process, or the supervisor died before this looked
        def gone() -> bool:
            return not _alive(pid)
    if gone():
        print(f"{name}: the supervisor (pid {pid}) is gone: not starting", file=sys.stderr, flush=True)
        raise SystemExit(1)
    threading.Thread(target=_watch, args=(name, pid, gone, backstop_s), name="supervisor-watch",
                     daemon=True).start()


def _watch(name: str, pid: int, gone, backstop_s: float) -> None:
    while not gone():
        time.sleep(POLL_S)
    print(f"{name}: the supervisor (pid {pid}) is gone: stopping", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)  # the process's own SIGTERM handling (the default one before it is ready)
    time.sleep(backstop_s)
    print(f"{name}: not stopped {backstop_s:.0f} s after the supervisor went: exiting now", file=sys.stderr,
          flush=True)
    os._exit(1)
