"""CPU affinity: which CPUs a process's threads may run on (Linux `sched_setaffinity`).

Used by the engine core and its tier process (`tiers.<tier>.engine_cpus`: shared/runtime/engine_core.py,
shared/serving/process.py), the device's Pi-class profile (device_agent/profile.py) and the bench.
"""

from __future__ import annotations

import contextlib
import os
from typing import Collection, Iterator

PIN_PASSES = 5  # listings of a process's threads at most, until one finds no thread it had not pinned


def supported() -> bool:
    return hasattr(os, "sched_setaffinity")


def allowed() -> set[int]:
    """The CPUs this thread may run on (every CPU the OS reports where affinity is not supported)."""
    return os.sched_getaffinity(0) if supported() else set(range(os.cpu_count() or 1))


def pin(cpus: Collection[int], pid: int | None = None) -> None:
    """Run this process (or process `pid`) on `cpus` only: each of its threads, and (inherited) those it starts
    later. The threads are listed again until no new one appears (a thread started while they were being set
    would keep its old CPUs)."""
    done: set[int] = set()
    for _ in range(PIN_PASSES):
        tids = {int(t) for t in os.listdir(f"/proc/{pid or 'self'}/task")} - done
        if not tids:
            return
        for tid in tids:
            try:
                os.sched_setaffinity(tid, cpus)
            except ProcessLookupError:  # the thread ended meanwhile
                pass
        done |= tids


def leave(cpus: Collection[int], pid: int | None = None) -> None:
    """Run this process (or process `pid`) on the CPUs this thread may use but `cpus`; unchanged when `cpus` is
    empty or names them all."""
    rest = allowed() - set(cpus) if cpus else set()
    if rest:
        pin(rest, pid)


@contextlib.contextmanager
def on(cpus: Collection[int]) -> Iterator[None]:
    """This thread (only) on `cpus` within the block, then back; nothing when `cpus` is empty. What it spawns or
    starts meanwhile inherits them."""
    if not cpus:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)
