"""Progress display: a rich bar on a terminal, plain lines in logs (DVC, CI, pipes).

Both show done/total, percent, the rate in images/s where the caller reports
images, and the ETA. Off a terminal a line is printed when the caller marks a
milestone (``line=True``), at the end, and otherwise at most every
``$ADVGEN_PROGRESS_SECONDS`` (default 30) seconds, at the next update::

      generate: 12/40 (30%), 1234 images/s, ETA 0:01:23 - test test-000011.tar
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from advgen.stages.app import log

INTERVAL_ENV = "ADVGEN_PROGRESS_SECONDS"


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get(INTERVAL_ENV, "30")))
    except ValueError:
        return 30.0


def _duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


class Bar:
    """A task bar with a status text; off a terminal, periodic plain lines (see the module docstring)."""

    def __init__(self, progress: Progress | None, task: int | None, description: str = "") -> None:
        self._progress, self._task, self._description = progress, task, description
        self._start = self._last_line = time.monotonic()
        self._interval = _interval()
        # The first update is the rate's baseline: work reported there may have been
        # skipped rather than done (a resumed run), so it does not count as speed.
        self._first: tuple[float, int] | None = None
        self._ended = False
        self._total: int | None = None
        self._previous = self._start

    def _eta(self, now: float, completed: int, total: int) -> float | None:
        if self._first is not None and completed > self._first[1] and now > self._first[0]:
            speed = (completed - self._first[1]) / (now - self._first[0])
        elif completed > 0 and now > self._start:
            speed = completed / (now - self._start)
        else:
            return None
        return max(0, total - completed) / speed

    def update(self, completed: int, total: int, status: str, *, line: bool = False,
               images: int | None = None) -> None:
        """Report ``completed`` of ``total`` units; ``images``: images processed so far in this run, for a rate."""
        now = time.monotonic()
        if self._total is not None and total != self._total:  # a new phase (prepare's next split): new baseline
            self._start, self._first, self._ended = self._previous, None, False
        self._total, self._previous = total, now
        if self._first is None:
            self._first = (now, completed)
        eta = self._eta(now, completed, total)
        rate = f"{images / (now - self._start):.0f} images/s" if images is not None and now > self._start else ""
        done = total > 0 and completed >= total
        when = (f"done in {_duration(now - self._start)}" if done
                else f"ETA {_duration(eta)}" if eta is not None else "ETA ?")
        if self._progress is not None:
            self._progress.update(self._task, completed=completed, total=total, status=status, rate=rate,
                                  eta="done" if done else when)
            return
        if not (line or (done and not self._ended) or now - self._last_line >= self._interval):
            return
        self._last_line, self._ended = now, self._ended or done
        percent = f" ({100 * completed / total:.0f}%)" if total > 0 else ""
        parts = [f"{completed}/{total}{percent}", *([rate] if rate else []), when]
        log(f"  {self._description}: {', '.join(parts)}" + (f" - {status}" if status else ""))


@contextmanager
def bar(description: str) -> Iterator[Bar]:
    if not sys.stderr.isatty():
        log(description)
        yield Bar(None, None, description)
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
        TextColumn("{task.fields[rate]}"), TextColumn("{task.fields[eta]} · elapsed"), TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        console=Console(stderr=True), transient=False,
    )
    with progress:
        yield Bar(progress, progress.add_task(description, total=None, status="", rate="", eta=""), description)
