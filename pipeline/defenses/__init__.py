"""Input defenses: image transforms placed in front of a victim, and a registry.

Each defense is an ``nn.Module`` mapping images (N, C, H, W) in [0, 1] to
images of the same shape and dtype, on any device, differentiable, so that
``Defended(defense, model)`` can be attacked end to end (adaptive attacks).
Defenses have no train/eval behaviour of their own.

``build_defense(name, value)`` turns the one number a defense takes (a blur
σ in pixels, a resampling size in pixels) into a module.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advgen.errors import BadParameter, unknown


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> Tensor:
    """The normalized 1-D Gaussian of standard deviation ``sigma`` pixels, float64, length 2r + 1.

    The radius r = int(truncate * sigma + 0.5), as ``scipy.ndimage.gaussian_filter``
    computes it. sigma == 0 gives the identity kernel [1.0].
    """
    _check_sigma(sigma)
    if not truncate > 0:
        raise BadParameter(f"truncate must be > 0, got {truncate}")
    if sigma == 0:
        return torch.ones(1, dtype=torch.float64)
    r = int(truncate * sigma + 0.5)
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


class GaussianBlur(nn.Module):
    """Per-channel Gaussian blur over H and W, matching ``scipy.ndimage.gaussian_filter(mode='reflect')``.

    Borders are extended half-sample symmetrically (d c b a | a b c d), the
    scipy default, repeatedly when the kernel is wider than the image.
    sigma == 0 is the identity.
    """

    kernel: Tensor

    def __init__(self, sigma: float) -> None:
        super().__init__()
        _check_sigma(sigma)
        self.sigma = float(sigma)
        # Not persistent: it follows from sigma, and a Defended model's state_dict should stay the victim's.
        self.register_buffer("kernel", gaussian_kernel1d(self.sigma), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        _check_images(x)
        if self.sigma == 0:
            return x
        k = self.kernel.to(dtype=x.dtype, device=x.device)
        c, r = x.shape[1], len(k) // 2
        x = x.index_select(2, _symmetric_index(x.shape[2], r, x.device))
        x = F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
        x = x.index_select(3, _symmetric_index(x.shape[3], r, x.device))
        return F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}"


def _symmetric_index(n: int, r: int, device: torch.device) -> Tensor:
    """Source indices of a length-n axis padded by r on each side, half-sample symmetric.

    The symmetric extension is periodic with period 2n, so any padding width
    works, unlike ``F.pad(mode='reflect')`` (which is scipy's 'mirror' and
    needs r < n).
    """
    i = torch.arange(-r, n + r, device=device) % (2 * n)
    return torch.where(i < n, i, 2 * n - 1 - i)


class Resample(nn.Module):
    """Bicubic down-sampling to size x size pixels and back to H x W, clamped to [0, 1].

    A step that shrinks an axis antialiases (so the detail it removes is
    averaged away, not aliased into the result); a step that only enlarges
    does not. size equal to both H and W is the identity.
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise BadParameter(f"resample size must be an integer >= 1 (pixels), got {size!r}")
        self.size = size

    def forward(self, x: Tensor) -> Tensor:
        _check_images(x)
        h, w = x.shape[2:]
        s = self.size
        if (h, w) == (s, s):
            return x
        small = F.interpolate(x, size=(s, s), mode="bicubic", align_corners=False, antialias=s < h or s < w)
        back = F.interpolate(small, size=(h, w), mode="bicubic", align_corners=False, antialias=h < s or w < s)
        return back.clamp(0.0, 1.0)

    def extra_repr(self) -> str:
        return f"size={self.size}"


class Defended(nn.Module):
    """``model(defense(x))``: a victim behind an input defense, differentiable end to end."""

    def __init__(self, defense: nn.Module, model: nn.Module) -> None:
        super().__init__()
        self.defense, self.model = defense, model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(self.defense(x))


def _whole_pixels(value: float) -> int:
    """``value`` as an int when it is a whole number (14.0 from a YAML float is fine; 14.5 is not)."""
    if isinstance(value, bool) or not float(value).is_integer():
        raise BadParameter(f"resample size must be a whole number of pixels, got {value!r}")
    return int(value)


DEFENSES: dict[str, Callable[[float], nn.Module]] = {
    "gaussian": lambda v: GaussianBlur(float(v)),  # v = σ in pixels
    "resample": lambda v: Resample(_whole_pixels(v)),  # v = intermediate size in pixels
}


def build_defense(name: str, value: float) -> nn.Module:
    """The defense registered as ``name`` with its one parameter ``value``; UnknownName for other names."""
    if name not in DEFENSES:
        raise unknown("defense", name, DEFENSES)
    return DEFENSES[name](value)


def _check_sigma(sigma: float) -> None:
    if not (sigma >= 0 and math.isfinite(sigma)):  # also rejects nan
        raise BadParameter(f"sigma must be >= 0 and finite (pixels), got {sigma}")


def _check_images(x: Tensor) -> None:
    if x.ndim != 4 or not x.is_floating_point():
        raise BadParameter(f"expected float images (N, C, H, W), got {x.dtype} of shape {tuple(x.shape)}")
