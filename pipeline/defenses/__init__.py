"""Input defenses: image transforms placed in front of a victim, one file each, and their registry.

A defense declares itself in its own file with ``register(Defense(...))``
(``advgen.defenses.base``); ``defend``'s flags, its metrics and plot tables,
the DVC plots, and the report's figures and table all read ``REGISTRY``.
To add one: a new file beside these, and its name on the registration line below.
"""

from __future__ import annotations

from advgen.defenses.base import REGISTRY, Defended, Defense, build_defense, get, register
from advgen.defenses.gaussian import GaussianBlur, gaussian_kernel1d
from advgen.defenses.resample import Resample

from advgen.defenses import gaussian, resample, jpeg  # noqa: F401, E402, I001 - the registration line: one per defense

DEFENSES = REGISTRY

__all__ = ["DEFENSES", "REGISTRY", "Defended", "Defense", "GaussianBlur", "Resample", "build_defense",
           "gaussian_kernel1d", "get", "register"]
