"""advgen's library, installed as the package ``advgen`` (the folder is ``pipeline/``).

Pure functions over typed arguments: datasets, shards, victims, training,
attacks, generation, metrics, defenses. The CLI in ``advgen.stages`` (the
folder ``stages/``) does the I/O around them.

One line attacks any ``nn.Module`` that maps images in [0, 1] to logits::

    import advgen
    x_adv = advgen.attack("pgd", model.eval(), x, y, eps=8 / 255)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from advgen.versions import __version__

if TYPE_CHECKING:
    from advgen.attacks import METHODS
    from advgen.attacks import run as attack
    from advgen.victims import load

__all__ = ["METHODS", "__version__", "attack", "load"]


def __getattr__(name: str) -> object:
    # Imported on first use, so the `advgen` script starts without torch when a warm server runs the command.
    if name in ("METHODS", "attack"):
        from advgen import attacks

        return attacks.METHODS if name == "METHODS" else attacks.run
    if name == "load":
        from advgen.victims import load

        return load
    raise AttributeError(f"module 'advgen' has no attribute {name!r}")
