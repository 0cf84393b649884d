"""Rendering the report: figures drawn in forked worker processes (FigureJobs), saved without timestamps, and
the Markdown helpers (numbers, tables, relative links)."""

from __future__ import annotations

import inspect
import math
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from advgen.storage.outputs import staging_path


def _plt():
    """matplotlib's pyplot on the Agg backend, imported on first use: it costs every advgen process
    half a second at start-up otherwise, and only the report draws."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _render(fig, path: Path) -> None:
    """Draw ``fig`` into ``path`` as PNG, atomically (a partial file never sits under the final name)."""
    tmp = staging_path(path)  # .NAME.tmp-PID: what clean_stale removes if a child is killed mid-write
    try:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class FigureJobs:
    """Figures built and drawn in ``jobs`` worker processes while the report goes on: matplotlib's layout,
    rasterizing and PNG encoding are most of a report's time. ``draw(fn, ...)`` hands the call of a ``figure_*``
    function to a worker and returns its ``path`` at once; the workers run the same code on the same arguments,
    so the bytes do not depend on ``jobs``. The workers are forked once, when the first figure is handed over
    (not one process per figure: forking a process that holds torch costs tens of milliseconds of page copying).
    ``jobs`` 1, or a system without fork, draws in this process. Use as a context manager (``R.figure_jobs``);
    leaving it waits for every figure and raises ``OSError`` naming those that could not be written."""

    def __init__(self, jobs: int) -> None:
        self.jobs = max(1, jobs) if hasattr(os, "fork") else 1
        self.pool = None
        self.pending: list[tuple[object, Path]] = []

    def draw(self, fn: Callable[..., Path], *args, **kwargs) -> Path:
        if self.jobs == 1:
            return fn(*args, **kwargs)
        path = Path(inspect.signature(fn).bind(*args, **kwargs).arguments["path"])
        if self.pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(self.jobs, mp_context=multiprocessing.get_context("fork"),
                                            initializer=_worker_init)
        self.pending.append((self.pool.submit(fn, *args, **kwargs), path))
        return path

    def cancel(self) -> None:
        """Drop the figures no worker has started (an error or Ctrl-C in the report); wait for the others."""
        self.pending = []
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None

    def wait(self) -> None:
        failed = []
        try:
            for future, path in self.pending:
                try:
                    future.result()
                except Exception as e:  # noqa: BLE001 - reported by path, all together
                    print(f"advgen report: {path}: {e}", file=sys.stderr, flush=True)
                    failed.append(path)
        finally:
            self.cancel()  # every figure is done by now: this only stops the workers
        if failed:
            raise OSError(f"{len(failed)} figure(s) could not be written: " + ", ".join(map(str, failed[:5])))


def _worker_init() -> None:
    """A figure worker: draws in this process (never hands figures on) and leaves Ctrl-C to the report."""
    global _JOBS
    _JOBS = FigureJobs(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


_JOBS = FigureJobs(1)


def draw(fn: Callable[..., Path], *args, **kwargs) -> Path:
    """``fn(*args, **kwargs)`` (a ``figure_*`` function), in a worker inside ``figure_jobs``: its ``path``."""
    return _JOBS.draw(fn, *args, **kwargs)


@contextmanager
def figure_jobs(jobs: int) -> Iterator[FigureJobs]:
    """``with figure_jobs(n): ...`` draws the figures handed to ``draw`` inside in up to ``n`` worker
    processes; leaving waits for them. An error raised inside the block is the one reported, and the figures
    not yet started are dropped."""
    global _JOBS
    previous, _JOBS = _JOBS, FigureJobs(jobs)
    try:
        yield _JOBS
    except BaseException:
        _JOBS.cancel()
        raise
    finally:
        pending, _JOBS = _JOBS, previous
    pending.wait()


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        _render(fig, path)
    finally:
        _plt().close(fig)
    return path


def fmt(v: object, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if math.isinf(v):
            return "∞"
        if abs(v) >= 100:  # seconds, images/s: whole numbers read better
            return f"{v:.0f}"
        return f"{v:.1f}" if abs(v) >= 10 else f"{v:.{digits}f}"
    return str(v)


def table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def rel(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path, start)).as_posix()
