"""Entry point of the ``advgen`` console script: imports every stage, then runs the app."""

from __future__ import annotations

from advgen.stages import (  # noqa: F401 - importing registers the commands
    check,
    defend,
    directions,
    evaluate,
    generate,
    inspect,
    prepare,
    profile,
    publish,
    report,
    retrain,
    serve,
    train,
    transfer,
    verify,
)
from advgen.stages.app import app


def main() -> None:
    app()
