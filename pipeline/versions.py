"""Versions of the code and libraries that shape output bytes, for cards and fingerprints."""

from __future__ import annotations

import zlib
from importlib import metadata

__version__ = "0.2.0"


def _dist(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


def versions() -> dict[str, str]:
    """Library versions recorded in every stats file and card.

    PNG bytes depend on zlib, manifests on pyarrow, images and gradients on torch;
    pillow decodes, webdataset is how users read the shards.
    """
    return {
        "advgen": __version__,
        "numpy": _dist("numpy"),
        "pillow": _dist("pillow"),
        "pyarrow": _dist("pyarrow"),
        "torch": _dist("torch"),
        "torchvision": _dist("torchvision"),
        "webdataset": _dist("webdataset"),
        "zlib": zlib.ZLIB_VERSION,
    }
