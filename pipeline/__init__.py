"""advgen's library: datasets, shards, victims, training (and later attacks, metrics, defenses).

Pure functions over typed arguments; the CLI in ``stages/`` does the I/O around them.
"""

from pipeline.versions import __version__
from pipeline.victims import load

__all__ = ["__version__", "load"]
