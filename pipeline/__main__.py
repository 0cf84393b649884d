"""``python -m advgen`` (what torchrun launches: ``torchrun ... -m advgen generate ...``) runs the ``advgen`` CLI."""

from advgen.stages.cli import main

main()
