"""advgen's library, installed as the package ``advgen`` (the folder is ``pipeline/``).

Pure functions over typed arguments: datasets, shards, victims, training,
attacks, generation, metrics, defenses. The CLI in ``advgen.stages`` (the
folder ``stages/``) does the I/O around them.

One line attacks any ``nn.Module`` that maps images in [0, 1] to logits::

    import advgen
    x_adv = advgen.attack("pgd", model.eval(), x, y, eps=8 / 255)
"""

from advgen.attacks import METHODS
from advgen.attacks import run as attack
from advgen.versions import __version__
from advgen.victims import load

__all__ = ["METHODS", "__version__", "attack", "load"]
