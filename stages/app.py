"""The typer app every stage registers on, and the error boundary of the CLI.

``stage`` registers a command and makes bad input one line on stderr and exit
status 2 — never a traceback:

* before the command runs, every option is checked for what no command
  accepts: a float that is nan or infinite, a negative ``seed``, a path that
  is not valid UTF-8 (paths are recorded in UTF-8 JSON and cards);
* the library's ``AdvgenError`` (unknown names, bad values, corrupt files);
* ``OSError`` from the system (disk full, read-only file system, permissions),
  which says what failed and where.

Anything else is a bug and keeps its traceback; ``ADVGEN_DEBUG=1`` shows the
traceback of the handled errors too.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import sys
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import TypeVar

import typer

from advgen.errors import AdvgenError, BadParameter
from advgen.versions import __version__


def _version(value: bool) -> None:
    if value:
        typer.echo(f"advgen {__version__}")
        raise typer.Exit()


app = typer.Typer(
    name="advgen",
    help="Adversarial and cooperative copies of image datasets, as WebDataset shards.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Adversarial and cooperative copies of image datasets, as WebDataset shards."""


F = TypeVar("F", bound=Callable[..., object])


def printable(text: str) -> str:
    """``text`` safe to print anywhere: undecodable bytes of file names shown as escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def check_options(options: dict[str, object]) -> None:
    """Refuse values no command accepts (see the module docstring); ``BadParameter`` names the option."""
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, float) and not math.isfinite(v):
                raise BadParameter(f"{flag} must be a finite number, got {v}")
            if isinstance(v, (str, Path)):
                try:
                    os.fsencode(v).decode("utf-8")
                    str(v).encode("utf-8")
                except UnicodeError:
                    raise BadParameter(f"{flag} {printable(str(v))} is not valid UTF-8; advgen records paths "
                                       "in UTF-8 files, so rename it") from None
        if name == "seed" and isinstance(value, int) and not 0 <= value < 2**63:
            raise BadParameter(f"--seed must lie in [0, 2^63), got {value}")


def parse_number(text: object, flag: str) -> float:
    """A number as users write it: ``0.03``, ``8/255`` or ``1e-2``; ``BadParameter`` naming ``flag`` otherwise."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    t = str(text).strip()
    try:
        if "/" in t:
            num, den = t.split("/", 1)
            return float(Fraction(num.strip()) / Fraction(den.strip()))
        return float(t)
    except (ValueError, ZeroDivisionError):
        raise BadParameter(f"{flag} takes numbers such as 0.03 or 8/255, got {printable(str(text))!r}") from None


def number(text: str) -> float:
    """typer's ``parser`` for ε-like options: ``--eps 8/255`` works as well as ``--eps 0.0314``."""
    try:
        return parse_number(text, "the value")
    except BadParameter as e:
        raise typer.BadParameter(str(e)) from None


def _fail(command: str, message: str) -> typer.Exit:
    typer.echo(printable(f"advgen {command}: error: {message}"), err=True)
    return typer.Exit(2)


def stage(fn: F) -> F:
    """Register ``fn`` as ``advgen <name>`` with the CLI's checks and error handling."""
    command = fn.__name__.replace("_", "-")

    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> object:
        debug = os.environ.get("ADVGEN_DEBUG") == "1"
        try:
            check_options(kwargs)
            return fn(*args, **kwargs)
        except AdvgenError as e:
            if debug:
                raise
            raise _fail(command, str(e)) from None
        except OSError as e:
            if debug:
                raise
            where = " ".join(f"{f}" for f in (e.filename, e.filename2) if f)
            raise _fail(command, f"{e.strerror or e}" + (f": {where}" if where else "")) from None
        except KeyboardInterrupt:
            typer.echo(f"advgen {command}: interrupted; nothing partial was left in place", err=True)
            raise typer.Exit(130) from None

    app.command(name=command)(wrapper)
    return fn


def log(message: str) -> None:
    """A progress line on stderr (stdout stays clean for pipes)."""
    print(printable(message), file=sys.stderr, flush=True)



def with_options(options: list[tuple[str, object, type, str]], before: str) -> Callable[[F], F]:
    """Add generated options to a stage: (name, default, type, help) each, placed before parameter ``before``;
    the stage takes them as ``**kwargs``. Flags read from a registry (attack parameters) are declared once, there."""
    def decorate(fn: F) -> F:
        sig = inspect.signature(fn)
        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in sig.parameters.values()
                  if p.kind is not inspect.Parameter.VAR_KEYWORD]
        at = next(i for i, p in enumerate(params) if p.name == before)
        made = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=typer.Option(default, help=text),
                                  annotation=kind) for name, default, kind, text in options]
        fn.__signature__ = sig.replace(parameters=params[:at] + made + params[at:])  # type: ignore[attr-defined]
        return fn
    return decorate
