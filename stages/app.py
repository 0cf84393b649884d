"""The typer app every stage registers on, and the error boundary of the CLI.

``stage`` registers a command and turns the library's ``AdvgenError`` into one
line on stderr and exit status 2 — never a traceback. Anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import functools
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import typer

from advgen.errors import AdvgenError

app = typer.Typer(
    name="advgen",
    help="Adversarial and cooperative copies of image datasets, as WebDataset shards.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

F = TypeVar("F", bound=Callable[..., object])


def stage(fn: F) -> F:
    """Register ``fn`` as ``advgen <name>`` with the CLI's error handling."""

    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> object:
        try:
            return fn(*args, **kwargs)
        except AdvgenError as e:
            typer.echo(f"advgen {fn.__name__}: error: {e}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo(f"advgen {fn.__name__}: interrupted; nothing partial was left in place", err=True)
            raise typer.Exit(130) from None

    app.command(name=fn.__name__.replace("_", "-"))(wrapper)
    return fn


def log(message: str) -> None:
    """A progress line on stderr (stdout stays clean for pipes)."""
    print(message, file=sys.stderr, flush=True)


def git_commit() -> str | None:
    """The commit of the advgen checkout running this, with ``-dirty`` if modified."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None
