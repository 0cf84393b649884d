"""The ``advgen`` console script: the command runs in a warm ``advgen serve`` when ``ADVGEN_SERVER`` names
one (see ``advgen.stages.warm``), else here. Light on purpose: nothing heavy is imported before that choice."""

from __future__ import annotations

import os
import sys

from advgen.stages.warm import SERVER_ENV, forward


def main() -> None:
    path = os.environ.get(SERVER_ENV)
    if path:
        code = forward(path, sys.argv[1:])
        if code is not None:
            sys.exit(code)
    from advgen.stages.cli import main as run

    run()
