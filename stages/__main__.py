"""``python -m stages`` (what torchrun launches) runs the same CLI as ``advgen``."""

from stages.cli import main

main()
