"""``python -m advgen.stages`` runs the same CLI as ``advgen``."""

from advgen.stages.cli import main

main()
