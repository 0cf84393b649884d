"""Progress display: a rich bar on a terminal, plain lines in logs (DVC, CI, pipes)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from advgen.stages.app import log


class Bar:
    """A task bar with a status text; falls back to one log line per ``line_every`` updates."""

    def __init__(self, progress: Progress | None, task: int | None) -> None:
        self._progress, self._task = progress, task

    def update(self, completed: int, total: int, status: str, *, line: bool = False) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=completed, total=total, status=status)
        elif line:
            log(f"  {status}")


@contextmanager
def bar(description: str) -> Iterator[Bar]:
    if not sys.stderr.isatty():
        log(description)
        yield Bar(None, None)
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
        console=Console(stderr=True), transient=False,
    )
    with progress:
        yield Bar(progress, progress.add_task(description, total=None, status=""))
