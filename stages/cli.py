"""Entry point of the ``advgen`` console script: imports every stage, then runs the app."""

from __future__ import annotations

from advgen.stages import defend, evaluate, generate, inspect, prepare, report, retrain, train, transfer, verify  # noqa: F401 - importing registers the commands
from advgen.stages.app import app


def main() -> None:
    app()
