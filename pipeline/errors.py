"""Errors the library raises on bad input.

Every error here carries a message meant for the person who typed the command:
what was expected, what came, and — where there is one — what to do about it.
The CLI prints the message on one line and exits non-zero; anything that is not
an ``AdvgenError`` is a bug and keeps its traceback.
"""

from __future__ import annotations


class AdvgenError(Exception):
    """Base class: a user-facing problem with inputs, files or parameters."""


class UnknownName(AdvgenError):
    """A dataset, victim, method or defense name that is not registered."""

    def __init__(self, kind: str, name: str, known: list[str] | tuple[str, ...]) -> None:
        super().__init__(f"unknown {kind} {name!r}; known: {', '.join(sorted(known))}")


class BadParameter(AdvgenError):
    """A parameter outside its valid range."""


class DatasetNotFound(AdvgenError):
    """No source holds the files of a dataset."""


class CorruptFile(AdvgenError):
    """A file exists but its content is not what its format or reference says."""

    def __init__(self, path: object, problem: str) -> None:
        super().__init__(f"{path}: {problem}")


class CheckpointError(AdvgenError):
    """A checkpoint that cannot be used: missing, corrupt, or for another dataset."""


def unknown(kind: str, name: str, registry: dict) -> UnknownName:
    """The error for ``name`` missing from ``registry`` (a helper for lookups)."""
    return UnknownName(kind, name, list(registry))
