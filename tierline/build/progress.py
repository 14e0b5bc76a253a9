"""Progress for the offline tools: one rich bar per stage, or plain lines in a log."""

from __future__ import annotations

import time
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class Steps:
    """A rich progress display with one bar per pipeline stage.

    A log file (no terminal) gets plain lines instead of bars: one at every tenth
    of a stage, with the elapsed time, and one when it ends.
    """

    LOG_EVERY = 10  # lines per stage in a log

    def __init__(self, console: Console):
        self.progress = Progress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[note]}"), TimeElapsedColumn(), console=console)

    @contextmanager
    def stage(self, title: str, total: int):
        task = self.progress.add_task(title, total=total, note="")
        console = self.progress.console
        t0 = time.perf_counter()
        done, logged = 0, 0

        def advance(n: int = 1, note: str = "") -> None:
            nonlocal done, logged
            self.progress.update(task, advance=n, note=note)
            done += n
            if not console.is_terminal and done * self.LOG_EVERY >= (logged + 1) * total and done < total:
                logged = done * self.LOG_EVERY // total
                console.print(f"{title}: {done}/{total} {note} ({time.perf_counter() - t0:.0f} s)".replace("  ", " "))

        yield advance
        self.progress.update(task, completed=total)
        if not console.is_terminal:
            console.print(f"{title}: done in {time.perf_counter() - t0:.1f} s")
