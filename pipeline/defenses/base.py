"""The defense registry: what a defense is, and how the rest of advgen finds it.

A defense is an image transform in front of a victim, with one parameter swept
by ``advgen defend``. ``register(Defense(...))`` in the defense's own file
declares everything else reads: the ``defend`` flag and its default sweep, how
a flag value becomes the transform's parameter, the transform, the labels of
its figure and table, the setting that is the identity (not attacked
adaptively), and how the adaptive attack gets gradients through it.

Every transform maps images (N, C, H, W) in [0, 1] to images of the same
shape and dtype, on any device, and passes gradients (exact ones, or a BPDA
rule for a transform that has none), so that ``Defended(defense, model)`` can
be attacked end to end.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from advgen.errors import BadParameter, unknown


@dataclass(frozen=True)
class Defense:
    name: str  # in metrics rows, plot files (plots/<name>.csv) and figures
    build: Callable[[float], nn.Module]  # the transform for one setting value
    flag: str  # defend's option (Python name; --flag-with-dashes), repeatable: the sweep
    sweep: tuple[float, ...]  # its default values
    help: str  # the option's help
    title: str  # what it is, in a figure title: "<victim>: <title>"
    axis: str  # x axis of its sweep figure, in setting values
    label: Callable[[float], str]  # one setting, short: "σ=0.5"
    setting: Callable[[float, int], float] = lambda value, side: float(value)  # flag value, image side → setting
    check: Callable[[float], None] | None = None  # BadParameter for a flag value out of range, before compute
    identity: Callable[[float], bool] = lambda value: False  # a setting that changes nothing: no adaptive attack
    gradient: str = "exact"  # how the adaptive attack differentiates it: "exact", or the BPDA rule it uses


REGISTRY: dict[str, Defense] = {}


def register(defense: Defense) -> Defense:
    if defense.name in REGISTRY:
        raise ValueError(f"defense {defense.name!r} is registered twice")
    REGISTRY[defense.name] = defense
    return defense


def get(name: str) -> Defense:
    """The defense registered as ``name``; UnknownName for any other name."""
    if name not in REGISTRY:
        raise unknown("defense", name, REGISTRY)
    return REGISTRY[name]


def build_defense(name: str, value: float) -> nn.Module:
    """The transform of defense ``name`` at setting ``value``; UnknownName for other names."""
    return get(name).build(value)


class Defended(nn.Module):
    """``model(defense(x))``: a victim behind an input defense, differentiable end to end."""

    def __init__(self, defense: nn.Module, model: nn.Module) -> None:
        super().__init__()
        self.defense, self.model = defense, model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(self.defense(x))


def check_images(x: Tensor) -> None:
    if x.ndim != 4 or not x.is_floating_point():
        raise BadParameter(f"expected float images (N, C, H, W), got {x.dtype} of shape {tuple(x.shape)}")
